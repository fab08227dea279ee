//! C-GET through the gateway.
//!
//! The identifier is read strictly; the policy core resolves every UID of it against the PACS
//! before anything moves; a request touching a foreign or unknown UID is refused with 0124H.
//! Allowed requests go to the PACS, whose C-STORE sub-operations arrive on the same association
//! and are relayed to the client on its association as they arrive (streamed, every fragment
//! read by the strict reader), each checked once more: an instance of another patient, or one
//! the request did not name, is refused toward the PACS and never reaches the client, and the
//! retrieval goes on with the rest. The counts in the C-GET responses are those the gateway saw
//! answered (a withheld instance counts as failed). C-CANCEL is relayed.

use super::association::{Association, Flow, Misbehaviour, Side};
use super::instance::{self, HeadError, StreamError};
use super::retrieve::{Tally, authorize, relay_cancel};
use crate::audit::{Operation, Outcome};
use crate::dicom::command::{self, Command, Service};
use crate::dicom::dataset::DataSet;
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::policy::{InstanceId, Permit};

pub async fn handle(s: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    let (identifier, allowed) = match authorize(s, pc_id, &cmd, Operation::Get).await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    if let Err(e) = s
        .pacs
        .send_message(pc_id, &cmd.encode(), Some(&identifier))
        .await
    {
        tracing::warn!(assoc = s.id, reason = %e, "cannot send C-GET to the PACS");
        return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
    }
    let limits = s.ctx.cfg.limits.clone();
    let mut tally = Tally::default();
    loop {
        let incoming = tokio::select! {
            i = tokio::time::timeout(limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS went silent during C-GET");
                    return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                }
            },
            c = s.client.next() => match relay_cancel(s, pc_id, c).await {
                Some(flow) => return flow,
                None => continue,
            },
        };
        let (rpc, mut rsp) = match incoming {
            Incoming::Message(Event::Command {
                pc_id: rpc,
                command,
            }) => (rpc, command),
            other => {
                tracing::warn!(assoc = s.id, what = ?other, "PACS went away during C-GET");
                return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
            }
        };
        match rsp.field {
            command::C_STORE_RQ => {
                if let Flow::End = sub_store(s, rpc, *rsp, &allowed, &mut tally).await {
                    return Flow::End;
                }
            }
            command::C_GET_RSP if rpc == pc_id => {
                let status = rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
                let data = if rsp.has_data_set() {
                    // Failed SOP Instance UID lists: relayed once read strictly; they name UIDs
                    // of this request.
                    match s
                        .pacs
                        .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                        .await
                    {
                        Ok(d) => {
                            let syntax = s.syntax(rpc);
                            let ok = syntax.is_some_and(|x| {
                                DataSet::read(&d, x.encoding, limits.reader()).is_ok()
                            });
                            if !ok {
                                return s
                                    .protocol_violation(
                                        Side::Pacs,
                                        Misbehaviour::MalformedDataSet,
                                        Some(Operation::Get),
                                    )
                                    .await;
                            }
                            Some(d)
                        }
                        Err(_) => return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await,
                    }
                } else {
                    None
                };
                let pending = command::is_pending(status);
                if !pending {
                    tally.apply_final(&mut rsp);
                }
                let flow = s.reply(pc_id, &rsp, data.as_deref()).await;
                if !pending || matches!(flow, Flow::End) {
                    return finish(s, flow, tally.withheld);
                }
            }
            _ => {
                return s
                    .protocol_violation(
                        Side::Pacs,
                        Misbehaviour::UnexpectedMessage,
                        Some(Operation::Get),
                    )
                    .await;
            }
        }
    }
}

fn finish(s: &mut Association, flow: Flow, withheld: usize) -> Flow {
    if withheld > 0 {
        s.trail().record(
            Operation::Get,
            "",
            Outcome::Anomaly,
            &format!(
                "{withheld} instance(s) withheld (other patients', not requested, or unreadable)"
            ),
        );
    }
    flow
}

/// The status the PACS is given for a sub-operation the gateway withholds (Cannot
/// Understand, a failure C-GET SCPs go on after); the client's counts say failed either way.
const WITHHELD_TO_PACS: u16 = command::STATUS_CANNOT_UNDERSTAND;

/// One C-STORE sub-operation from the PACS: checked, then streamed to the client, whose answer
/// goes back to the PACS; or refused toward the PACS.
async fn sub_store(
    s: &mut Association,
    sub_pc: u8,
    sub: Command,
    allowed: &Permit,
    tally: &mut Tally,
) -> Flow {
    let wait = s.ctx.cfg.limits.upstream_timeout;
    let storage_context = s
        .contexts
        .get(&sub_pc)
        .is_some_and(|c| Service::of(&c.abstract_syntax) == Service::Storage);
    if !sub.has_data_set() || !storage_context {
        return s
            .protocol_violation(
                Side::Pacs,
                Misbehaviour::BadSubOperation,
                Some(Operation::Get),
            )
            .await;
    }
    let Some(syntax) = s.syntax(sub_pc) else {
        return s
            .protocol_violation(
                Side::Pacs,
                Misbehaviour::UnacceptedContext(sub_pc),
                Some(Operation::Get),
            )
            .await;
    };
    let limits = s.ctx.cfg.limits.reader();
    let head = match instance::read_head(&mut s.pacs, sub_pc, syntax, limits, wait).await {
        Ok(h) => h,
        Err(HeadError::Peer(e)) => return s.broken(Side::Pacs, &e).await,
        Err(HeadError::Unreadable { last, why }) => {
            tracing::warn!(assoc = s.id, violation = %why, "PACS sent an instance the strict reader refused; withheld");
            if !last && let Err(e) = s.pacs.discard_data(sub_pc, wait).await {
                return s.broken(Side::Pacs, &e).await;
            }
            tally.failed += 1;
            tally.withheld += 1;
            let rsp = sub.response(
                command::STATUS_CANNOT_UNDERSTAND,
                Some("refused by the gateway"),
            );
            return to_pacs(s, sub_pc, &rsp).await;
        }
    };
    let h = &head.head;
    let id = InstanceId::of(h);
    if !allowed.admits_instance(&id) || h.sop_instance != sub.affected_sop_instance {
        tracing::warn!(
            assoc = s.id,
            "PACS sent an instance of another patient, or one not requested; withheld"
        );
        if !head.last
            && let Err(e) = s.pacs.discard_data(sub_pc, wait).await
        {
            return s.broken(Side::Pacs, &e).await;
        }
        tally.failed += 1;
        tally.withheld += 1;
        let rsp = sub.response(WITHHELD_TO_PACS, Some("refused by the gateway"));
        return to_pacs(s, sub_pc, &rsp).await;
    }
    let forward = sub.encode();
    match instance::stream(&mut s.pacs, &mut s.client, sub_pc, &forward, head, wait).await {
        Ok(bytes) => crate::metrics::relayed("dimse", "retrieve", bytes),
        // The client holds a partial instance: the association cannot go on.
        Err(StreamError::From(e)) => return s.broken(Side::Pacs, &e).await,
        Err(StreamError::To(e)) => {
            tracing::warn!(assoc = s.id, reason = %e, "client failed during a sub-operation");
            return s.abort_both().await;
        }
        Err(StreamError::Invalid { why: v, .. }) => {
            tracing::warn!(assoc = s.id, violation = %v, "PACS sent an instance whose tail the strict reader refused");
            return s.abort_both().await;
        }
    }
    // The client's answer goes back to the PACS; a cancel may come first.
    loop {
        let c = match tokio::time::timeout(s.ctx.cfg.limits.idle_timeout, s.client.next()).await {
            Ok(c) => c,
            Err(_) => return s.abort_both().await,
        };
        match c {
            Incoming::Message(Event::Command {
                pc_id: cpc,
                command: rsp,
            }) => match rsp.field {
                command::C_STORE_RSP
                    if cpc == sub_pc
                        && !rsp.has_data_set()
                        && rsp.responded_to == sub.message_id =>
                {
                    tally.count(rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS));
                    return to_pacs(s, sub_pc, &rsp).await;
                }
                command::C_CANCEL_RQ => {
                    if s.pacs.send_message(cpc, &rsp.encode(), None).await.is_err() {
                        return s.abort_both().await;
                    }
                }
                _ => {
                    return s
                        .protocol_violation(
                            Side::Client,
                            Misbehaviour::UnexpectedMessage,
                            Some(Operation::Get),
                        )
                        .await;
                }
            },
            Incoming::Abort | Incoming::Gone(_) => {
                s.pacs.abort().await;
                return Flow::End;
            }
            _ => {
                return s
                    .protocol_violation(
                        Side::Client,
                        Misbehaviour::UnexpectedPdu,
                        Some(Operation::Get),
                    )
                    .await;
            }
        }
    }
}

async fn to_pacs(s: &mut Association, pc_id: u8, command: &Command) -> Flow {
    match s.pacs.send_message(pc_id, &command.encode(), None).await {
        Ok(()) => Flow::Continue,
        Err(e) => {
            tracing::warn!(assoc = s.id, reason = %e, "cannot write to the PACS");
            s.abort_both().await
        }
    }
}
