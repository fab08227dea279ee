//! The DIMSE front end: the listener, association negotiation with a SMART token in the user
//! identity, and the relay to the PACS.
//!
//! Owns: accepting connections under a cap, reading the A-ASSOCIATE-RQ (size- and time-bounded),
//! asking the trust core about the token and the policy core whether the principal may connect,
//! opening the PACS association under the gateway's identity, and answering the client with what
//! the PACS accepted. Sessions ([`session`]) then relay one service at a time. Must not know
//! HTTP, and decides no access itself.

pub(crate) mod association;
pub(crate) mod cmove;
pub(crate) mod echo;
pub(crate) mod find;
pub(crate) mod get;
pub mod instance;
pub mod listener;
pub(crate) mod receiver;
pub(crate) mod retrieve;
pub(crate) mod session;
pub(crate) mod store;

use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::config::Config;
use crate::dicom::negotiation::{self as assoc, Refusal, reject};
use crate::dicom::pdu::{PDU_SLACK, read_pdu, write_pdu};
use crate::dicom::peer::Peer;
use crate::logtext::Clean;
use crate::policy::{Action, Policy};
use crate::trust::TrustCore;
use dicom_ul::pdu::{AssociationRQ, Pdu};
use listener::{Admission, Pending, Stop};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
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
    next_id: AtomicU64,
}

impl Ctx {
    pub fn new(cfg: Arc<Config>, trust: Arc<TrustCore>, policy: Arc<Policy>) -> Arc<Ctx> {
        Arc::new(Ctx {
            moves: Arc::new(receiver::MoveRegistry::default()),
            admission: Arc::new(Admission::new(&cfg.limits)),
            receiver_admission: Arc::new(Admission::new(&cfg.limits)),
            cfg,
            trust,
            policy,
            next_id: AtomicU64::new(1),
        })
    }
}

/// Accepts associations until `shutdown` turns true, then waits up to `grace` for running ones.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let admission = ctx.admission.clone();
    listener::serve(
        "dimse",
        listener,
        admission,
        shutdown,
        grace,
        move |stream, addr, pending, stop| handle(stream, addr, pending, stop, ctx.clone()),
    )
    .await
}

/// Sends an A-ASSOCIATE-RJ, then waits (at most 2 s, like the ARTIM timer of PS3.8 state
/// Sta13) for the requestor to close the connection first, so the rejection is read before any
/// close or reset reaches it.
pub(crate) async fn send_reject(stream: &mut TcpStream, r: Refusal) {
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
pub(crate) async fn read_request(
    stream: &mut TcpStream,
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

/// Negotiates one association and, if it is accepted, runs it to its end.
async fn handle(
    mut stream: TcpStream,
    addr: SocketAddr,
    pending: Pending,
    stop: Stop,
    ctx: Arc<Ctx>,
) {
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(rq) = read_request(&mut stream, addr, id, &ctx.cfg.limits).await else {
        return;
    };
    drop(pending);
    let Some(_slot) = ctx.admission.try_association() else {
        tracing::warn!(assoc = id, %addr, "association limit reached; refusing");
        send_reject(&mut stream, Refusal::Busy).await;
        return;
    };
    let _active = crate::metrics::association_started();
    tracing::info!(assoc = id, %addr, calling_ae = %Clean(rq.calling_ae_title.trim()), called_ae = %Clean(rq.called_ae_title.trim()), "association requested");
    if let Some(session) = negotiate(stream, id, &rq, stop, &ctx).await {
        Box::pin(session.run()).await;
    }
}

/// Checks the request, the token and the policy, opens the PACS association, and answers the
/// client. `None` when the association was refused (the client has been answered).
async fn negotiate(
    mut stream: TcpStream,
    id: u64,
    rq: &AssociationRQ,
    stop: Stop,
    ctx: &Arc<Ctx>,
) -> Option<session::Session> {
    let cfg = &ctx.cfg;
    if cfg.gateway.require_called_ae_title
        && rq.called_ae_title.trim() != cfg.gateway.ae_title.trim()
    {
        tracing::info!(
            assoc = id,
            called_ae = %Clean(rq.called_ae_title.trim()),
            expected = %cfg.gateway.ae_title,
            "called AE title is not the gateway's; rejected"
        );
        send_reject(&mut stream, Refusal::CalledAeTitle).await;
        return None;
    }
    if rq.application_context_name.trim_end_matches('\0') != assoc::APPLICATION_CONTEXT {
        send_reject(&mut stream, Refusal::ApplicationContext).await;
        return None;
    }
    let identity = match assoc::presented_identity(rq) {
        Ok(i) => i,
        Err(e) => {
            Trail::new(Channel::Dimse, id, None).record(
                Operation::Associate,
                "",
                Outcome::Denied,
                &e.to_string(),
            );
            send_reject(&mut stream, Refusal::Identity).await;
            return None;
        }
    };
    let verified = tokio::time::timeout(
        cfg.limits.token_verify_timeout,
        ctx.trust.verify(&identity.token),
    )
    .await;
    let principal = match verified {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            Trail::new(Channel::Dimse, id, None).record(
                Operation::Associate,
                "",
                Outcome::Denied,
                &format!("token refused: {e}"),
            );
            let refusal = if e.is_transient() {
                Refusal::Unavailable
            } else {
                Refusal::Identity
            };
            send_reject(&mut stream, refusal).await;
            return None;
        }
        Err(_) => {
            Trail::new(Channel::Dimse, id, None).record(
                Operation::Associate,
                "",
                Outcome::Denied,
                "token verification timed out",
            );
            send_reject(&mut stream, Refusal::Unavailable).await;
            return None;
        }
    };
    let caller = ctx.policy.caller(principal).await;
    if let Err(d) = ctx.policy.decide(&caller, Action::Connect).await {
        Trail::new(Channel::Dimse, id, Some(caller.principal())).record(
            Operation::Associate,
            "",
            Outcome::Denied,
            &d.to_string(),
        );
        send_reject(&mut stream, Refusal::Identity).await;
        return None;
    }
    let our_max = cfg.limits.max_pdu_length;
    let up_rq =
        assoc::upstream_request(rq, &cfg.pacs.calling_ae_title, &cfg.pacs.ae_title, our_max);
    let (up_stream, up_ac) = match crate::pacs::associate(
        &cfg.pacs,
        up_rq.clone(),
        cfg.limits.upstream_timeout,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(assoc = id, reason = %e, "PACS association failed; client rejected (transient)");
            send_reject(&mut stream, Refusal::Unavailable).await;
            return None;
        }
    };
    let (ac, contexts) =
        assoc::downstream_accept(rq, &up_ac, our_max, identity.positive_response_requested);
    let client_max = assoc::announced_max(&rq.user_variables);
    let pacs_max = assoc::announced_max(&up_ac.user_variables);
    let mut pacs = Peer::new("pacs", up_stream, our_max + PDU_SLACK, pacs_max).is_pacs();
    if let Err(e) = write_pdu(&mut stream, &Pdu::AssociationAC(ac)).await {
        tracing::info!(assoc = id, reason = %e, "client went away during negotiation");
        pacs.abort().await;
        return None;
    }
    Trail::new(Channel::Dimse, id, Some(caller.principal())).record(
        Operation::Associate,
        "",
        Outcome::Allowed,
        &format!("{} presentation context(s) accepted", contexts.len()),
    );
    let client = Peer::new("client", stream, our_max + PDU_SLACK, client_max);
    Some(session::Session {
        assoc: association::Association {
            id,
            calling_ae: rq.calling_ae_title.trim().to_string(),
            client,
            pacs,
            upstream_rq: up_rq,
            caller,
            contexts,
            ctx: ctx.clone(),
        },
        stop,
    })
}
