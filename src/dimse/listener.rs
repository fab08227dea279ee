//! The one accept loop of both DIMSE listeners (the front end and the C-MOVE receiver), and
//! admission before authentication.
//!
//! Owns: who may hold what before a request is known. A new connection first takes a slot of
//! the pending budget (`limits.max_pending_associations`, at most
//! `limits.max_pending_per_peer` per peer address) and must send its whole A-ASSOCIATE-RQ
//! within `limits.association_request_timeout_secs`; only then does it compete for one of
//! the association slots (`limits.max_associations`), so silent sockets never hold an
//! association slot and one address cannot take the whole pending budget. Connections over
//! the pending limits are closed at once. Must not know what associations are for.

use crate::dicom::peer::Stream;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// What a connection's task hears of the gateway stopping. `draining` turns true when the
/// listener stops accepting: an association finishes the operation it runs and then ends.
/// `cut` turns true when the drain time is over: what is left ends now, with an A-ABORT to
/// each peer, so no peer is left with a connection that simply disappears.
#[derive(Clone)]
pub(crate) struct Stop {
    draining: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
}

impl Stop {
    /// Resolves once the gateway is draining.
    pub(crate) async fn draining(&mut self) {
        until(&mut self.draining).await
    }

    /// Resolves once the drain time is over.
    pub async fn cut(&mut self) {
        until(&mut self.cut).await
    }
}

/// Waits for a signal to turn true; a signal whose sender is gone never does.
async fn until(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long associations have, once cut, to send their A-ABORTs before their tasks end.
const CUT_WAIT: Duration = Duration::from_secs(3);

/// The budgets a listener admits connections under.
pub struct Admission {
    /// Connections that have not sent a complete A-ASSOCIATE-RQ yet.
    pending: Arc<Semaphore>,
    /// Pending connections per peer address.
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_peer: usize,
    /// Established (or being established) associations.
    associations: Arc<Semaphore>,
}

/// A pending connection's claim; dropping it frees the slot and the peer's share.
pub(crate) struct Pending {
    _permit: OwnedSemaphorePermit,
    peer: IpAddr,
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: &crate::config::Limits) -> Admission {
        Admission {
            pending: Arc::new(Semaphore::new(limits.max_pending_associations)),
            per_peer: Arc::default(),
            max_per_peer: limits.max_pending_per_peer,
            associations: Arc::new(Semaphore::new(limits.max_associations)),
        }
    }

    fn try_pending(&self, peer: IpAddr) -> Option<Pending> {
        let permit = self.pending.clone().try_acquire_owned().ok()?;
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return None;
        }
        *n += 1;
        Some(Pending {
            _permit: permit,
            peer,
            per_peer: self.per_peer.clone(),
        })
    }

    /// An association slot, once the request has arrived; `None`: the gateway is full.
    pub(crate) fn try_association(&self) -> Option<OwnedSemaphorePermit> {
        self.associations.clone().try_acquire_owned().ok()
    }
}

/// Accepts connections until `shutdown` turns true, giving each admitted one to `handle`
/// with its pending claim (which `handle` drops once the request is read) and the [`Stop`] it
/// must heed; then waits up to `grace` for running ones, and cuts what is left.
/// With `tls`, every connection completes a DICOM TLS handshake (within `limits`' request
/// deadline, holding only its pending claim) before `handle` sees it.
#[allow(clippy::too_many_arguments)]
pub async fn serve<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    admission: Arc<Admission>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    handshake_wait: Duration,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    handle: F,
) where
    F: Fn(Stream, SocketAddr, Pending, Stop) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let (cut_tx, cut_rx) = watch::channel(false);
    let stop = Stop {
        draining: shutdown.clone(),
        cut: cut_rx,
    };
    loop {
        crate::metrics::connections_open(name, tasks.len());
        tokio::select! {
            // A finished connection is joined as soon as it ends, whatever the accept arm did
            // last: a set that only grows is memory lost with every association.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => {
                let (stream, addr) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(pending) = admission.try_pending(addr.ip()) else {
                    tracing::debug!(listener = name, %addr, "too many connections without a request; closed");
                    crate::metrics::association_rejected("pending_limit");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Boxed: an association's state machine is large, and tokio moves the future it
                // is given into the task and its output out of it.
                match &tls {
                    None => {
                        tasks.spawn(Box::pin(handle(stream.into(), addr, pending, stop.clone())));
                    }
                    Some(tls) => {
                        let (acceptor, handle, stop) = (tls.dicom(), handle.clone(), stop.clone());
                        tasks.spawn(Box::pin(async move {
                            if let Some(s) =
                                accept_tls(name, acceptor, stream, addr, handshake_wait).await
                            {
                                handle(s, addr, pending, stop).await
                            }
                        }));
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = name,
        running = tasks.len(),
        "listener stopped; waiting for running associations"
    );
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if !tasks.is_empty() {
        tracing::warn!(
            listener = name,
            running = tasks.len(),
            "drain time over; aborting what is left"
        );
        let _ = cut_tx.send(true);
        let _ = tokio::time::timeout(CUT_WAIT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    tasks.abort_all();
    crate::metrics::connections_open(name, 0);
}

/// The DICOM TLS handshake of a new connection, within `wait` (the connection holds only its
/// pending claim meanwhile); `None` when it failed or took too long: the connection is closed
/// without a word, as PS3.15 B.1 leaves a failed handshake.
async fn accept_tls(
    listener: &'static str,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    wait: Duration,
) -> Option<Stream> {
    match tokio::time::timeout(wait, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))),
        Ok(Err(e)) => {
            crate::metrics::tls_handshake_failed(listener);
            tracing::info!(%addr, listener, reason = %e, "TLS handshake failed; closed");
            None
        }
        Err(_) => {
            crate::metrics::tls_handshake_failed(listener);
            tracing::info!(%addr, listener, "TLS handshake not done within {wait:?}; closed");
            None
        }
    }
}
