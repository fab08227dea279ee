//! The HTTP listener: connections admitted under bounds, so slow or silent clients cannot hold
//! the server (or the process's descriptors).
//!
//! Owns: at most `limits.max_http_connections` connections at once, at most
//! `limits.max_http_connections_per_peer` from one address (more are closed on accept); each
//! request head (request line and headers) must arrive within `limits.http_header_timeout_secs`
//! and fit `limits.max_http_header_bytes` (else 431 or the connection closes); a connection
//! that has moved no byte for `limits.idle_timeout_secs` is closed once no request is running;
//! on stop, connections finish what they are doing and close. Must not know routes or rules.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// The bounds a listener serves under.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    /// The listener's name in metrics and logs: `http`, `https`, `monitor`.
    pub name: &'static str,
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    /// How long running requests may take to finish after a stop.
    pub drain: Duration,
    /// Addresses of the monitoring (`gateway.metrics_clients`): when every connection slot is
    /// taken, they still get one of a few reserved ones, so `/healthz` and `/metrics` answer
    /// during a flood.
    pub monitors: Vec<ipnet::IpNet>,
}

/// Connections kept for the monitoring beyond `max_connections`.
const MONITOR_RESERVE: usize = 8;

/// Connections per peer address; a claim frees its share when dropped.
#[derive(Default)]
struct PerPeer(Mutex<HashMap<IpAddr, usize>>);

struct PeerClaim {
    peers: Arc<PerPeer>,
    ip: IpAddr,
}

impl PerPeer {
    fn claim(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerClaim> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerClaim {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerClaim {
    fn drop(&mut self) {
        let mut m = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A stream that remembers when it last moved a byte.
struct Watched<S> {
    inner: S,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last: Arc<AtomicU64>,
}

impl<S> Watched<S> {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    // Vectored writes matter: without them every response chunk costs its own system calls.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the routes `current` holds on `listener` until `shutdown` turns true, then lets
/// running requests finish for at most `bounds.drain`. Each request takes the routes current
/// when it arrives (a reload reaches requests on connections already open, too).
pub async fn serve(
    listener: TcpListener,
    current: watch::Receiver<Router>,
    bounds: Bounds,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let reserve = Arc::new(Semaphore::new(MONITOR_RESERVE));
    let peers = Arc::new(PerPeer::default());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        crate::metrics::connections_open(bounds.name, tasks.len());
        tokio::select! {
            // Joined as soon as it ends, whatever the accept arm did last (see dimse::listener).
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => {
                let (stream, addr) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let monitor = || {
                    let ip = match addr.ip() {
                        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
                        v4 => v4,
                    };
                    bounds.monitors.iter().any(|n| n.contains(&ip))
                };
                let slot = match slots.clone().try_acquire_owned() {
                    Ok(s) => s,
                    Err(_) => match reserve.clone().try_acquire_owned() {
                        Ok(s) if monitor() => s,
                        _ => {
                            tracing::debug!(%addr, "HTTP connection limit reached; closed");
                            continue;
                        }
                    },
                };
                let Some(claim) = peers.claim(addr.ip(), bounds.max_per_peer) else {
                    tracing::debug!(%addr, "HTTP connections per peer limit reached; closed");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let router = current.clone();
                let stop = shutdown.clone();
                let b = bounds.clone();
                let tls = tls.clone();
                tasks.spawn(async move {
                    let _held = (slot, claim);
                    connection(stream, addr, router, b, stop, tls).await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(bounds.drain, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    crate::metrics::connections_open(bounds.name, 0);
}

/// The subject of the client certificate an HTTPS connection's handshake verified, put into
/// every request's extensions (for the audit trail).
#[derive(Clone, Debug)]
pub(crate) struct ClientCert(pub Arc<str>);

async fn connection(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    router: watch::Receiver<Router>,
    bounds: Bounds,
    stop: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let last = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let io = Watched {
        inner: stream,
        epoch,
        last: last.clone(),
    };
    let watch = Idle { epoch, last };
    let Some(tls) = tls else {
        return serve_connection(io, false, None, addr, router, bounds, stop, watch).await;
    };
    // The handshake is bounded like a request head: a silent or slow client holds its slot
    // no longer than that.
    match tokio::time::timeout(bounds.header_timeout, tls.https().accept(io)).await {
        Ok(Ok(s)) => {
            let (_, session) = s.get_ref();
            let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
            let cert = crate::tls::subject_of(session.peer_certificates()).map(Arc::<str>::from);
            serve_connection(s, h2, cert, addr, router, bounds, stop, watch).await
        }
        Ok(Err(e)) => {
            crate::metrics::tls_handshake_failed("https");
            tracing::debug!(%addr, reason = %e, "TLS handshake failed; closed");
        }
        Err(_) => {
            crate::metrics::tls_handshake_failed("https");
            tracing::debug!(%addr, "TLS handshake not done in time; closed");
        }
    }
}

/// When a connection last moved a byte.
struct Idle {
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl Idle {
    fn for_how_long(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Drives one connection (HTTP/1.1, or HTTP/2 when ALPN chose it) until it ends: closed when
/// it has moved no byte for the idle time and no request runs, and gracefully on stop.
macro_rules! drive {
    ($conn:expr, $addr:expr, $bounds:expr, $stop:expr, $idle:expr) => {{
        let mut conn = std::pin::pin!($conn);
        let check =
            ($bounds.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        // Once closing, the connection gets the drain time to finish what runs, then is
        // dropped: a client that stops reading (an HTTP/2 window held at zero) cannot keep
        // its responses, and the PACS connections behind them, open for ever.
        let mut closing: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(addr = %$addr, error = %e, "HTTP connection ended with an error");
                    }
                    return;
                }
                _ = tokio::time::sleep(check), if closing.is_none() => {
                    if $idle.for_how_long() >= $bounds.idle_timeout {
                        // Closes at once when no request is running; a running one finishes.
                        conn.as_mut().graceful_shutdown();
                        closing = Some(tokio::time::Instant::now() + $bounds.drain);
                    }
                }
                _ = $stop.changed(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + $bounds.drain);
                }
                _ = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                    tracing::debug!(addr = %$addr, "HTTP connection did not finish in the drain time; dropped");
                    return;
                }
            }
        }
    }};
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<I>(
    io: I,
    h2: bool,
    cert: Option<Arc<str>>,
    addr: SocketAddr,
    router: watch::Receiver<Router>,
    bounds: Bounds,
    mut stop: watch::Receiver<bool>,
    idle: Idle,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(addr));
            if let Some(c) = &cert {
                req.extensions_mut().insert(ClientCert(c.clone()));
            }
            let mut router = router.borrow().clone();
            async move {
                tower_service::Service::call(&mut router, req.map(axum::body::Body::new)).await
            }
        });
    if h2 {
        let mut builder =
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(bounds.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_STREAMS);
        drive!(
            builder.serve_connection(io, service),
            addr,
            bounds,
            stop,
            idle
        )
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(bounds.header_timeout)
            .max_header_size(bounds.max_header_bytes);
        drive!(
            builder.serve_connection(io, service),
            addr,
            bounds,
            stop,
            idle
        )
    }
}

/// Requests at once on one HTTP/2 connection: enough for a viewer's frames in flight; the
/// gateway's request slots bound them all, and a response whose client stops reading holds a
/// PACS connection until the idle and drain times are over, so a connection may not hold many.
const MAX_STREAMS: u32 = 32;
