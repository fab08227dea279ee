//! The DIMSE front end: the listener, association negotiation with a SMART token in the user
//! identity, and the relay to the PACS.
//!
//! Owns: what every association shares ([`Ctx`]), the listener's start, and the two steps both
//! listeners take before an association exists: reading the A-ASSOCIATE-RQ (size- and
//! time-bounded) and sending an A-ASSOCIATE-RJ. A session ([`session`]) negotiates each
//! association (the token, the policy core's Connect decision, the PACS association) and runs
//! it; services (one file each) take its [`association::Association`]. Must not know HTTP, and
//! decides no access itself.

pub(crate) mod association;
pub(crate) mod cmove;
pub(crate) mod echo;
pub(crate) mod find;
pub(crate) mod get;
pub mod instance;
pub(crate) mod listener;
pub(crate) mod receiver;
pub(crate) mod retrieve;
pub(crate) mod session;
pub(crate) mod store;

use crate::config::Config;
use crate::dicom::negotiation::{Refusal, reject};
use crate::dicom::pdu::{read_pdu, write_pdu};
use crate::policy::Policy;
use crate::trust::TrustCore;
use dicom_ul::pdu::{AssociationRQ, Pdu};
use listener::Admission;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What every association shares.
pub struct Ctx {
    pub cfg: Arc<Config>,
    /// Turns the token of each association into a principal.
    pub trust: Arc<TrustCore>,
    /// Decides every operation.
    pub policy: Arc<Policy>,
    /// C-MOVEs in flight, for the receiver to route their sub-operations.
    pub moves: Arc<receiver::MoveRegistry>,
    /// Admission of client connections (pending budget, association slots).
    pub admission: Arc<Admission>,
    /// Admission of the PACS's sub-operation associations at the C-MOVE receiver.
    pub receiver_admission: Arc<Admission>,
    /// Places under `pacs.max_associations`: each client's association to the PACS takes one.
    pub pacs_slots: Arc<crate::pacs::Slots>,
    next_id: Arc<AtomicU64>,
}

impl Ctx {
    pub fn new(
        cfg: Arc<Config>,
        trust: Arc<TrustCore>,
        policy: Arc<Policy>,
        pacs_slots: Arc<crate::pacs::Slots>,
    ) -> Arc<Ctx> {
        Arc::new(Ctx {
            pacs_slots,
            moves: Arc::new(receiver::MoveRegistry::default()),
            admission: Arc::new(Admission::new(&cfg.limits)),
            receiver_admission: Arc::new(Admission::new(&cfg.limits)),
            cfg,
            trust,
            policy,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The context of the next configuration: new trust and policy, while what counts live
    /// connections, the C-MOVEs in flight and association ids carry over, so associations begun
    /// under either are admitted, routed and named as one.
    pub fn succeeding(
        &self,
        cfg: Arc<Config>,
        trust: Arc<TrustCore>,
        policy: Arc<Policy>,
        pacs_slots: Arc<crate::pacs::Slots>,
    ) -> Arc<Ctx> {
        Arc::new(Ctx {
            pacs_slots,
            moves: self.moves.clone(),
            admission: self.admission.clone(),
            receiver_admission: self.receiver_admission.clone(),
            next_id: self.next_id.clone(),
            cfg,
            trust,
            policy,
        })
    }
}

/// Accepts associations until `shutdown` turns true, then waits up to `grace` for running ones.
/// Each association takes the context `current` holds when it arrives and keeps it to its end.
/// With `tls`, over DICOM TLS (PS3.15 Annex B): a client that does not complete the handshake,
/// or whose certificate does not verify, gets nothing.
pub async fn serve(
    listener: TcpListener,
    current: watch::Receiver<Arc<Ctx>>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let ctx = current.borrow().clone();
    let admission = ctx.admission.clone();
    let (name, wait) = match tls {
        None => ("dimse", Duration::ZERO),
        Some(_) => ("dimse-tls", ctx.cfg.limits.association_request_timeout),
    };
    drop(ctx);
    listener::serve(
        name,
        listener,
        admission,
        tls,
        wait,
        shutdown,
        grace,
        move |stream, addr, pending, stop| {
            let ctx = current.borrow().clone();
            session::handle(stream, addr, pending, stop, ctx)
        },
    )
    .await
}

/// Sends an A-ASSOCIATE-RJ, then waits (at most 2 s, like the ARTIM timer of PS3.8 state
/// Sta13) for the requestor to close the connection first, so the rejection is read before any
/// close or reset reaches it.
pub(crate) async fn send_reject<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, r: Refusal) {
    crate::metrics::association_rejected(r.name());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = write_pdu(stream, &Pdu::AssociationRJ(reject(r))).await;
        let mut sink = [0u8; 512];
        while let Ok(n) = tokio::io::AsyncReadExt::read(stream, &mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads the A-ASSOCIATE-RQ of a new connection within the request deadline (the connection
/// holds only its pending claim meanwhile). `None`: nothing valid came; the connection is done.
pub(crate) async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: SocketAddr,
    id: u64,
    limits: &crate::config::Limits,
) -> Option<AssociationRQ> {
    let first = tokio::time::timeout(
        limits.association_request_timeout,
        read_pdu(stream, limits.max_association_request_bytes),
    )
    .await;
    match first {
        Err(_) => {
            tracing::info!(assoc = id, %addr, "no A-ASSOCIATE-RQ within {:?}; closed", limits.association_request_timeout);
            None
        }
        Ok(Err(e)) => {
            tracing::info!(assoc = id, %addr, reason = %e, "no valid A-ASSOCIATE-RQ; closed");
            let abort = Pdu::AbortRQ {
                source: dicom_ul::pdu::AbortRQSource::ServiceProvider(
                    dicom_ul::pdu::AbortRQServiceProviderReason::InvalidPduParameter,
                ),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), write_pdu(stream, &abort)).await;
            None
        }
        Ok(Ok(Pdu::AssociationRQ(rq))) => Some(rq),
        Ok(Ok(other)) => {
            tracing::info!(assoc = id, %addr, pdu = %other.short_description(), "expected an A-ASSOCIATE-RQ; closed");
            None
        }
    }
}
