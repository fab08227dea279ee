//! One client association from its A-ASSOCIATE-RQ to its end: negotiation (the token, the
//! policy core's Connect decision, the PACS association, the answer to the client), then the
//! loop that takes the client's messages one at a time, hands each to its service (one file
//! per service), and handles release, abort, idle time and the gateway's stop.
//!
//! Owns: the association's lifecycle and the first check of every request: a command must
//! belong to the SOP class of its presentation context (C-FIND on FIND models, C-GET on GET,
//! C-MOVE on MOVE, C-STORE on storage, C-ECHO on Verification) and name that class as its
//! Affected SOP Class. Must not decide access (services ask the policy core), and services
//! never see it: they take the [`Association`].

use super::association::{Association, Flow, Misbehaviour, RELEASE_TIMEOUT, Side};
use super::listener::{Pending, Stop};
use super::{Ctx, cmove, echo, find, get, read_request, send_reject, store};
use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::dicom::command::{self, Command, Service};
use crate::dicom::message::Event;
use crate::dicom::negotiation::{self as assoc, Refusal};
use crate::dicom::pdu::{PDU_SLACK, write_pdu};
use crate::dicom::peer::Incoming;
use crate::dicom::peer::{Peer, Stream};
use crate::logtext::Clean;
use crate::policy::Action;
use dicom_ul::pdu::AssociationRQ;
use dicom_ul::pdu::Pdu;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(crate) struct Session {
    pub assoc: Association,
    /// The gateway stopping: the association ends between operations once it drains, and
    /// at once (A-ABORT to both peers) when the drain time is over.
    pub stop: Stop,
}

enum Next {
    Client(Incoming),
    Pacs(Incoming),
    Idle,
    Stopping,
    /// The caller's token expired [`EXPIRED_GRACE`] ago: its association ends between
    /// operations (every request is refused by then, and an association held open on a dead
    /// token holds a slot and a PACS association for nothing).
    Expired,
}

impl Session {
    pub async fn run(mut self) {
        let idle = self.assoc.ctx.cfg.limits.idle_timeout;
        let expiry = expiry_of(self.assoc.caller.principal());
        loop {
            let a = &mut self.assoc;
            let event = tokio::select! {
                i = a.client.next() => Next::Client(i),
                i = a.pacs.next() => Next::Pacs(i),
                _ = tokio::time::sleep(idle) => Next::Idle,
                _ = self.stop.draining() => Next::Stopping,
                _ = tokio::time::sleep_until(expiry) => Next::Expired,
            };
            let flow = match event {
                Next::Idle => {
                    tracing::info!(assoc = a.id, "idle for {idle:?}; aborting the association");
                    a.abort_both().await
                }
                Next::Expired => {
                    a.trail().record(
                        Operation::Associate,
                        "",
                        Outcome::Denied,
                        "token expired; association ended",
                    );
                    a.release_pacs(RELEASE_TIMEOUT).await;
                    a.client.abort().await;
                    Flow::End
                }
                Next::Stopping => {
                    tracing::info!(
                        assoc = a.id,
                        "the gateway is stopping; the association ends between operations"
                    );
                    self.end_for_stop().await
                }
                Next::Client(Incoming::Message(Event::Command { pc_id, command })) => {
                    // The operation runs to its end unless the drain time runs out first.
                    let mut stop = self.stop.clone();
                    let done = tokio::select! {
                        flow = dispatch(&mut self.assoc, pc_id, *command) => Some(flow),
                        _ = stop.cut() => None,
                    };
                    match done {
                        Some(flow) => flow,
                        None => {
                            tracing::warn!(
                                assoc = self.assoc.id,
                                "drain time over during an operation; aborting both associations"
                            );
                            self.assoc.abort_both().await
                        }
                    }
                }
                Next::Client(Incoming::Message(Event::Data { .. })) => {
                    a.protocol_violation(Side::Client, Misbehaviour::DataSetWithoutCommand, None)
                        .await
                }
                Next::Client(Incoming::ReleaseRq) => {
                    a.release_pacs(RELEASE_TIMEOUT).await;
                    let _ = a.client.send_pdu(&Pdu::ReleaseRP).await;
                    a.client.close().await;
                    tracing::info!(assoc = a.id, "association released");
                    Flow::End
                }
                Next::Client(Incoming::Abort) => {
                    tracing::info!(assoc = a.id, "client aborted");
                    a.pacs.abort().await;
                    Flow::End
                }
                Next::Client(Incoming::Gone(why)) => {
                    tracing::info!(assoc = a.id, reason = %why, "client connection ended");
                    // A malformed command set or PDU ends here: the client is told which
                    // kind of rule it broke by the A-ABORT reason.
                    a.client.abort_with(why.abort_reason()).await;
                    a.pacs.abort().await;
                    Flow::End
                }
                Next::Client(Incoming::ReleaseRp) => {
                    a.protocol_violation(Side::Client, Misbehaviour::UnexpectedPdu, None)
                        .await
                }
                Next::Pacs(i) => {
                    let why = match i {
                        Incoming::Abort => "PACS aborted the association".to_string(),
                        Incoming::Gone(w) => format!("PACS connection ended: {w}"),
                        Incoming::ReleaseRq => "PACS asked to release".to_string(),
                        _ => "PACS sent a message nobody asked for".to_string(),
                    };
                    tracing::warn!(assoc = a.id, reason = %why, "aborting the client association");
                    a.abort_both().await
                }
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    /// Ends the association because the gateway is stopping, between operations: the PACS
    /// association is released, the client's aborted (the gateway accepted it, and the
    /// acceptor does not ask for a release). The release waits no longer than the drain
    /// leaves: at the cut the PACS association is aborted instead.
    async fn end_for_stop(&mut self) -> Flow {
        let mut stop = self.stop.clone();
        let released = tokio::select! {
            _ = self.assoc.release_pacs(RELEASE_TIMEOUT) => true,
            _ = stop.cut() => false,
        };
        if !released {
            self.assoc.pacs.abort().await;
        }
        self.assoc.client.abort().await;
        Flow::End
    }
}

async fn dispatch(a: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    let Some(context) = a.contexts.get(&pc_id) else {
        return a
            .protocol_violation(Side::Client, Misbehaviour::UnacceptedContext(pc_id), None)
            .await;
    };
    if cmd.is_response() {
        return a
            .protocol_violation(Side::Client, Misbehaviour::ResponseFromRequestor, None)
            .await;
    }
    let field = cmd.field;
    let known = matches!(
        field,
        command::C_ECHO_RQ
            | command::C_FIND_RQ
            | command::C_STORE_RQ
            | command::C_GET_RQ
            | command::C_MOVE_RQ
            | command::C_CANCEL_RQ
    );
    if !known {
        return unsupported(a, pc_id, cmd).await;
    }
    let service = Service::of(&context.abstract_syntax);
    let names_its_class = field == command::C_CANCEL_RQ
        || cmd.affected_sop_class.as_deref() == Some(context.abstract_syntax.as_str());
    if !service.admits(field) || !names_its_class {
        return wrong_sop_class(a, pc_id, cmd).await;
    }
    let t0 = std::time::Instant::now();
    let (flow, operation) = match field {
        command::C_ECHO_RQ => (echo::handle(a, pc_id, cmd).await, "C-ECHO"),
        command::C_FIND_RQ => (find::handle(a, pc_id, cmd).await, "C-FIND"),
        command::C_STORE_RQ => (store::handle(a, pc_id, cmd).await, "C-STORE"),
        command::C_GET_RQ => (get::handle(a, pc_id, cmd).await, "C-GET"),
        command::C_MOVE_RQ => (cmove::handle(a, pc_id, cmd).await, "C-MOVE"),
        // A cancel for an operation that has already ended is ignored (PS3.7 9.3.2.3).
        _ => return Flow::Continue,
    };
    crate::metrics::dimse_operation(operation, t0.elapsed());
    flow
}

/// Operations this version does not relay (DIMSE-N) get a failure status, after their data
/// set (if any) was read and discarded.
async fn unsupported(a: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    if let Err(flow) = a.drop_data_set(pc_id, &cmd).await {
        return flow;
    }
    tracing::info!(
        assoc = a.id,
        command = format!("{:#06x}", cmd.field),
        "operation not supported; refused"
    );
    let rsp = cmd.response(
        command::STATUS_UNRECOGNIZED_OPERATION,
        Some("operation not supported by the gateway"),
    );
    a.reply(pc_id, &rsp, None).await
}

/// A request on a presentation context whose SOP class it does not belong to: refused (0122H),
/// so a command can never run as one service here and another at the PACS.
async fn wrong_sop_class(a: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    if let Err(flow) = a.drop_data_set(pc_id, &cmd).await {
        return flow;
    }
    tracing::warn!(
        assoc = a.id,
        command = format!("{:#06x}", cmd.field),
        "command does not belong to its presentation context's SOP class; refused"
    );
    a.trail().record(
        Operation::DimseRequest,
        "",
        Outcome::Denied,
        "command does not belong to the SOP class of its presentation context",
    );
    let rsp = cmd.response(
        command::STATUS_SOP_CLASS_NOT_SUPPORTED,
        Some("command does not belong to the presentation context's SOP class"),
    );
    a.reply(pc_id, &rsp, None).await
}

/// Negotiates one association and, if it is accepted, runs it to its end.
pub(crate) async fn handle(
    stream: Stream,
    addr: SocketAddr,
    pending: Pending,
    stop: Stop,
    ctx: Arc<Ctx>,
) {
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    // Every line logged for this association, in any module, carries its id. At ERROR level
    // so that no per-module filter drops the span while it keeps a line written inside it
    // (a span's level decides only whether it is recorded).
    let span = tracing::error_span!("association", id);
    tracing::Instrument::instrument(
        serve_association(stream, addr, pending, stop, ctx, id),
        span,
    )
    .await
}

async fn serve_association(
    mut stream: Stream,
    addr: SocketAddr,
    pending: Pending,
    stop: Stop,
    ctx: Arc<Ctx>,
    id: u64,
) {
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
    if let Some(session) = negotiate(stream, id, addr, &rq, stop, &ctx).await {
        Box::pin(session.run()).await;
    }
}

/// Checks the request, the token and the policy, opens the PACS association, and answers the
/// client. `None` when the association was refused (the client has been answered).
async fn negotiate(
    mut stream: Stream,
    id: u64,
    addr: SocketAddr,
    rq: &AssociationRQ,
    stop: Stop,
    ctx: &Arc<Ctx>,
) -> Option<Session> {
    let cfg = &ctx.cfg;
    let client_cert: Option<Arc<str>> = stream.peer_subject().map(Arc::from);
    let trail = |p| {
        Trail::new(Channel::Dimse, id, p)
            .with_client_cert(client_cert.clone())
            .with_peer(Some(addr.ip()))
    };
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
            trail(None).record(Operation::Associate, "", Outcome::Denied, &e.to_string());
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
            // An issuer that could not be asked is an upstream failure, not a refusal.
            let outcome = if e.is_transient() {
                Outcome::Failed
            } else {
                Outcome::Denied
            };
            trail(None).record(
                Operation::Associate,
                "",
                outcome,
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
            trail(None).record(
                Operation::Associate,
                "",
                Outcome::Failed,
                "token verification timed out",
            );
            send_reject(&mut stream, Refusal::Unavailable).await;
            return None;
        }
    };
    let caller = ctx.policy.caller(principal).await;
    if let Err(d) = ctx.policy.decide(&caller, Action::Connect).await {
        trail(Some(caller.principal())).record(
            Operation::Associate,
            "",
            Outcome::Denied,
            &d.to_string(),
        );
        send_reject(&mut stream, Refusal::Identity).await;
        return None;
    }
    let our_max = cfg.limits.max_pdu_length;
    let get_by_move = cfg.pacs.retrieve == crate::config::Retrieve::Move;
    let up_rq = assoc::upstream_request(
        rq,
        &cfg.pacs.calling_ae_title,
        &cfg.pacs.ae_title,
        our_max,
        get_by_move,
    );
    // A place under pacs.max_associations, waited for briefly (then a transient rejection).
    let pacs_slot = match ctx.pacs_slots.relay().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(assoc = id, reason = %e, "no association to the PACS free; client rejected (transient)");
            trail(Some(caller.principal())).record(
                Operation::Associate,
                "",
                Outcome::Failed,
                "no association to the PACS free (pacs.max_associations)",
            );
            send_reject(&mut stream, Refusal::Busy).await;
            return None;
        }
    };
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
            trail(Some(caller.principal())).record(
                Operation::Associate,
                "",
                Outcome::Failed,
                "the PACS could not be associated with",
            );
            send_reject(&mut stream, Refusal::Unavailable).await;
            return None;
        }
    };
    let (ac, contexts) = assoc::downstream_accept(
        rq,
        &up_ac,
        our_max,
        identity.positive_response_requested,
        get_by_move,
    );
    let client_max = assoc::announced_max(&rq.user_variables);
    let pacs_max = assoc::announced_max(&up_ac.user_variables);
    let mut pacs =
        Peer::new("pacs", up_stream, our_max + PDU_SLACK, pacs_max).tolerating_command_tail();
    if let Err(e) = write_pdu(&mut stream, &Pdu::AssociationAC(ac)).await {
        tracing::info!(assoc = id, reason = %e, "client went away during negotiation");
        pacs.abort().await;
        return None;
    }
    trail(Some(caller.principal())).record(
        Operation::Associate,
        "",
        Outcome::Allowed,
        &format!("{} presentation context(s) accepted", contexts.len()),
    );
    let client = Peer::new("client", stream, our_max + PDU_SLACK, client_max);
    Some(Session {
        assoc: Association {
            id,
            calling_ae: rq.calling_ae_title.trim().to_string(),
            client,
            pacs,
            _pacs_slot: pacs_slot,
            upstream_rq: up_rq,
            caller,
            client_cert,
            peer: addr.ip(),
            contexts,
            ctx: ctx.clone(),
        },
        stop,
    })
}

/// How long an association outlives its token: a request in that time is answered 0124H
/// (Refused: Not Authorized), so that the client learns to renew its token rather than seeing
/// its association cut; after it the association ends, whatever the client sends.
const EXPIRED_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// When the caller's association ends for its token's expiry, on the runtime's clock.
fn expiry_of(p: &crate::trust::Principal) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Capped so that no `exp` can overflow the clock (an association lasts hours, not weeks).
    let left = p.expires_at.saturating_sub(now).min(30 * 86_400);
    tokio::time::Instant::now() + std::time::Duration::from_secs(left) + EXPIRED_GRACE
}
