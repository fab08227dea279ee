//! C-STORE through the gateway.
//!
//! The instance's head is read through the strict reader until its SOP Class and Instance,
//! PatientID, IssuerOfPatientID, StudyInstanceUID and SeriesInstanceUID are known, each read
//! once and validated (a malformed head is C000H and never reaches the PACS); the command must
//! name the same SOP Class and Instance as the data set. The policy core decides (write scope,
//! the caller's patient, a study, series or SOP Instance UID the PACS already holds must be
//! that patient's); a refused instance is drained and never reaches the PACS; an allowed one
//! is streamed on as it arrives, its tail read by the same reader (a defect there aborts the
//! PACS association before the last fragment, so the PACS never stores it). The client gets
//! the PACS's own answer, so success means stored; a PACS failure, timeout or abort is a
//! failure status, never a success.

use super::association::{Association, Flow, Misbehaviour, Side};
use super::instance::{self, HeadError, StreamError};
use crate::audit::{Operation, Outcome};
use crate::dicom::command::{self, Command};
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::policy::{Action, StoreRequest};

pub async fn handle(s: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    let wait = s.ctx.cfg.limits.idle_timeout;
    if !cmd.has_data_set() {
        let rsp = cmd.response(
            command::STATUS_CANNOT_UNDERSTAND,
            Some("C-STORE without a data set"),
        );
        return s.reply(pc_id, &rsp, None).await;
    }
    let Some(syntax) = s.syntax(pc_id) else {
        if let Err(flow) = drain_client(s, pc_id, false).await {
            return flow;
        }
        let rsp = cmd.response(
            command::STATUS_CANNOT_UNDERSTAND,
            Some("transfer syntax not supported"),
        );
        return s.reply(pc_id, &rsp, None).await;
    };
    let limits = s.ctx.cfg.limits.reader();
    let head = match instance::read_head(&mut s.client, pc_id, syntax, limits, wait).await {
        Ok(h) => h,
        Err(HeadError::Peer(e)) => return s.broken(Side::Client, &e).await,
        Err(HeadError::Unreadable { last, why }) => {
            if let Err(flow) = drain_client(s, pc_id, last).await {
                return flow;
            }
            s.trail().record(
                Operation::Store,
                "",
                Outcome::Denied,
                &format!("data set refused by the strict reader: {why}"),
            );
            let rsp = cmd.response(
                command::STATUS_CANNOT_UNDERSTAND,
                Some("data set is not well formed"),
            );
            return s.reply(pc_id, &rsp, None).await;
        }
    };
    let h = head.head.clone();
    let what = format!(
        "study={} instance={}",
        h.study.as_deref().unwrap_or("-"),
        h.sop_instance.as_deref().unwrap_or("-")
    );
    // The command and the data set must name the same instance: a PACS may file it under
    // either.
    let mismatch = if h.sop_class != cmd.affected_sop_class {
        Some((
            command::STATUS_IDENTIFIER_MISMATCH,
            "the data set's SOP Class UID differs from the command's",
        ))
    } else if h.sop_instance != cmd.affected_sop_instance {
        Some((
            command::STATUS_CANNOT_UNDERSTAND,
            "the data set's SOP Instance UID differs from the command's",
        ))
    } else {
        None
    };
    if let Some((status, why)) = mismatch {
        if let Err(flow) = drain_client(s, pc_id, head.last).await {
            return flow;
        }
        s.trail()
            .record(Operation::Store, &what, Outcome::Denied, why);
        return s.reply(pc_id, &cmd.response(status, Some(why)), None).await;
    }
    let req = StoreRequest::of(&h);
    let asked: Vec<String> = h.study.iter().cloned().collect();
    let permit = match s.ctx.policy.decide(&s.caller, Action::Store(req)).await {
        Ok(p) => p,
        Err(d) => {
            if let Err(flow) = drain_client(s, pc_id, head.last).await {
                return flow;
            }
            return s
                .refuse_about(pc_id, &cmd, (Operation::Store, &what), &d, asked)
                .await;
        }
    };

    let upstream = cmd.encode();
    match instance::stream(&mut s.client, &mut s.pacs, pc_id, &upstream, head, wait).await {
        Ok(bytes) => crate::metrics::relayed("dimse", "store", bytes),
        Err(StreamError::From(e)) => {
            // The PACS must not keep a truncated instance: its association is aborted too.
            return s.broken(Side::Client, &e).await;
        }
        Err(StreamError::Invalid { why: v, ended }) => {
            // The PACS holds part of an instance without its last fragment: aborting its
            // association makes it drop that part; a new one takes over for the client.
            s.trail().record(
                Operation::Store,
                &what,
                Outcome::Denied,
                &format!("data set refused by the strict reader after the head: {v}"),
            );
            // The client may have sent the rest already: it is read and dropped.
            if let Err(flow) = drain_client(s, pc_id, ended).await {
                return flow;
            }
            if !s.renew_pacs().await {
                tracing::warn!(assoc = s.id, "the PACS association could not be renewed");
                let rsp = cmd.response(
                    command::STATUS_CANNOT_UNDERSTAND,
                    Some("data set is not well formed"),
                );
                let _ = s.client.send_message(pc_id, &rsp.encode(), None).await;
                s.client.abort().await;
                return Flow::End;
            }
            let rsp = cmd.response(
                command::STATUS_CANNOT_UNDERSTAND,
                Some("data set is not well formed"),
            );
            return s.reply(pc_id, &rsp, None).await;
        }
        Err(StreamError::To(e)) => {
            tracing::warn!(assoc = s.id, reason = %e, "PACS failed during C-STORE");
            let _ = s.client.discard_data(pc_id, wait).await;
            return s
                .fail_upstream(pc_id, &cmd, "PACS did not store the instance")
                .await;
        }
    }
    // The PACS's answer is the client's answer.
    match s.pacs_next().await {
        Some(Incoming::Message(Event::Command {
            pc_id: rpc,
            command: rsp,
        })) if rpc == pc_id => {
            if rsp.field != command::C_STORE_RSP || rsp.has_data_set() {
                return s
                    .protocol_violation(
                        Side::Pacs,
                        Misbehaviour::UnexpectedMessage,
                        Some(Operation::Store),
                    )
                    .await;
            }
            let status = rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
            let stored = command::is_stored(status);
            if stored {
                s.ctx.policy.stored(&permit).await;
            }
            // A PACS that did not store it: an upstream failure, not the policy's refusal.
            s.trail().about_permit(&permit).record(
                Operation::Store,
                &what,
                if stored {
                    Outcome::Allowed
                } else {
                    Outcome::Failed
                },
                &format!("PACS status {status:#06x}"),
            );
            s.reply(pc_id, &rsp, None).await
        }
        Some(_) => {
            tracing::warn!(assoc = s.id, "PACS went away before answering C-STORE");
            s.fail_upstream(pc_id, &cmd, "PACS did not store the instance")
                .await
        }
        None => {
            tracing::warn!(assoc = s.id, "PACS did not answer C-STORE in time");
            s.fail_upstream(pc_id, &cmd, "PACS did not store the instance")
                .await
        }
    }
}

/// Reads and drops the rest of a refused instance (nothing when it has ended already); a
/// client that fails meanwhile ends the association.
async fn drain_client(s: &mut Association, pc_id: u8, ended: bool) -> Result<(), Flow> {
    if ended {
        return Ok(());
    }
    let wait = s.ctx.cfg.limits.idle_timeout;
    if let Err(e) = s.client.discard_data(pc_id, wait).await {
        return Err(s.broken(Side::Client, &e).await);
    }
    Ok(())
}
