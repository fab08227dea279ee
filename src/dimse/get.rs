//! C-GET through the gateway.
//!
//! The policy core resolves every UID of the identifier against the PACS before anything
//! moves; a request touching a foreign or unknown UID is refused with 0124H. Allowed requests go
//! to the PACS, whose C-STORE sub-operations arrive on the same association and are relayed to
//! the client on its association as they arrive (streamed), each checked once more against the
//! caller's patient: an instance of another patient is refused toward the PACS (so it counts as
//! a failed sub-operation) and never reaches the client. Pending and final C-GET responses are
//! the PACS's, so the counts are its own. C-CANCEL is relayed.

use super::command::{self, Command};
use super::instance::{self, HeadError, StreamError};
use super::message::Event;
use super::peer::Incoming;
use super::session::{Flow, Session};
use crate::audit::{self, Outcome};
use crate::policy::{Allowed, Decision, RetrieveRequest, UidLevel};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntax;
use dicom_object::InMemDicomObject;
use std::time::SystemTime;

/// What a retrieval identifier (C-GET or C-MOVE) asks for.
pub struct Retrieval {
    pub identifier: InMemDicomObject,
    pub level_name: String,
    pub level: Option<UidLevel>,
    pub patient_id: Option<String>,
    pub study_uids: Vec<String>,
    pub series_uids: Vec<String>,
    pub instance_uids: Vec<String>,
}

fn uid_list(o: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<String> {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|v| {
            v.split('\\')
                .map(|u| u.trim_matches(['\0', ' ']).to_string())
                .filter(|u| !u.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a retrieval identifier; `None` when it cannot be read or names no valid level.
pub fn parse_retrieval(bytes: &[u8], ts: &TransferSyntax) -> Option<Retrieval> {
    let identifier = InMemDicomObject::read_dataset_with_ts(bytes, ts).ok()?;
    let level_name = identifier
        .get(tags::QUERY_RETRIEVE_LEVEL)
        .and_then(|e| e.to_str().ok())
        .map(|l| l.trim_matches(['\0', ' ']).to_string())?;
    let level = match level_name.as_str() {
        "PATIENT" => None,
        "STUDY" => Some(UidLevel::Study),
        "SERIES" => Some(UidLevel::Series),
        "IMAGE" => Some(UidLevel::Instance),
        _ => return None,
    };
    Some(Retrieval {
        patient_id: identifier
            .get(tags::PATIENT_ID)
            .map(|e| e.to_str().map(|s| s.into_owned()).unwrap_or_default()),
        study_uids: uid_list(&identifier, tags::STUDY_INSTANCE_UID),
        series_uids: uid_list(&identifier, tags::SERIES_INSTANCE_UID),
        instance_uids: uid_list(&identifier, tags::SOP_INSTANCE_UID),
        identifier,
        level_name,
        level,
    })
}

/// Reads a retrieval identifier and asks the policy core. On refusal the client has been
/// answered (with `refusal_status`) and `Err(flow)` says how the association goes on. On
/// success: the identifier to send upstream, and the decision every instance must pass.
pub async fn authorize(
    s: &mut Session,
    pc_id: u8,
    cmd: &Command,
    op: &str,
) -> Result<(Vec<u8>, Allowed), Flow> {
    let (bytes, ts) = s.read_identifier(pc_id, cmd).await?;
    let parsed = parse_retrieval(&bytes, ts).map(|r| (r, ts));
    let Some((mut r, ts)) = parsed else {
        let rsp = cmd.response(
            command::STATUS_IDENTIFIER_MISMATCH,
            Some("identifier cannot be read"),
        );
        return Err(s.reply(pc_id, &rsp, None).await);
    };
    let req = RetrieveRequest {
        level: r.level,
        patient_id: r.patient_id.as_deref(),
        study_uids: std::mem::take(&mut r.study_uids),
        series_uids: std::mem::take(&mut r.series_uids),
        instance_uids: std::mem::take(&mut r.instance_uids),
    };
    let decision = s
        .ctx
        .policy
        .decide_retrieve(
            &s.principal,
            &req,
            &*s.ctx.lookup,
            &*s.ctx.trust,
            SystemTime::now(),
        )
        .await;
    let what = format!(
        "{op} level={} uids={}",
        r.level_name,
        req.study_uids.len() + req.series_uids.len() + req.instance_uids.len()
    );
    let allowed = match decision {
        Decision::Deny(d) => {
            return Err(s.refuse(pc_id, cmd, &what, &d).await);
        }
        Decision::Allow(a) => a,
    };
    audit::record(
        "dimse",
        s.id,
        Some(&s.principal),
        &what,
        Outcome::Allowed,
        "every UID belongs to the caller's patient",
    );
    let upstream = match allowed.query_patient_ids.first() {
        Some(pid) => {
            r.identifier.put(DataElement::new(
                tags::PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(pid.as_str()),
            ));
            let mut out = Vec::new();
            if r.identifier.write_dataset_with_ts(&mut out, ts).is_err() {
                let rsp = cmd.response(
                    command::STATUS_UNABLE_TO_PROCESS,
                    Some("identifier cannot be encoded"),
                );
                return Err(s.reply(pc_id, &rsp, None).await);
            }
            out
        }
        None => bytes,
    };
    Ok((upstream, allowed))
}

pub async fn handle(s: &mut Session, pc_id: u8, cmd: Command) -> Flow {
    let (identifier, allowed) = match authorize(s, pc_id, &cmd, "C-GET").await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    if let Err(e) = s
        .pacs
        .send_message(pc_id, &cmd.raw, Some(&identifier))
        .await
    {
        tracing::warn!(assoc = s.id, reason = %e, "cannot send C-GET to the PACS");
        return fail(s, pc_id, &cmd).await;
    }
    let limits = s.ctx.cfg.limits.clone();
    let mut withheld = 0usize;
    loop {
        let incoming = tokio::select! {
            i = tokio::time::timeout(limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS went silent during C-GET");
                    return fail(s, pc_id, &cmd).await;
                }
            },
            c = s.client.next() => match relay_cancel(s, pc_id, c).await {
                Some(flow) => return flow,
                None => continue,
            },
        };
        let (rpc, bytes) = match incoming {
            Incoming::Message(Event::Command { pc_id: rpc, bytes }) => (rpc, bytes),
            _ => {
                tracing::warn!(assoc = s.id, "PACS went away during C-GET");
                return fail(s, pc_id, &cmd).await;
            }
        };
        let rsp = match Command::decode(bytes) {
            Ok(r) => r,
            Err(_) => {
                return s
                    .protocol_violation("pacs", "malformed command during C-GET")
                    .await;
            }
        };
        s.pacs.expect_data(rpc, rsp.has_data_set());
        match rsp.field() {
            Some(command::C_STORE_RQ) => {
                if let Flow::End = sub_store(s, rpc, rsp, &allowed, &mut withheld).await {
                    return Flow::End;
                }
            }
            Some(command::C_GET_RSP) if rpc == pc_id => {
                if rsp.has_data_set() {
                    // Failed SOP Instance UID lists: relay them; they name UIDs of this request.
                    let data = match s
                        .pacs
                        .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                        .await
                    {
                        Ok(d) => d,
                        Err(_) => return fail(s, pc_id, &cmd).await,
                    };
                    let status = rsp.status().unwrap_or(0);
                    let flow = s.reply(pc_id, &rsp.raw, Some(&data)).await;
                    if !command::is_pending(status) || matches!(flow, Flow::End) {
                        return finish(s, flow, withheld);
                    }
                    continue;
                }
                let status = rsp.status().unwrap_or(0);
                if command::is_pending(status) {
                    if let Flow::End = s.reply(pc_id, &rsp.raw, None).await {
                        return Flow::End;
                    }
                } else {
                    let flow = s.reply(pc_id, &rsp.raw, None).await;
                    return finish(s, flow, withheld);
                }
            }
            _ => {
                return s
                    .protocol_violation("pacs", "unexpected message during C-GET")
                    .await;
            }
        }
    }
}

fn finish(s: &mut Session, flow: Flow, withheld: usize) -> Flow {
    if withheld > 0 {
        audit::record(
            "dimse",
            s.id,
            Some(&s.principal),
            "C-GET",
            Outcome::Anomaly,
            &format!("{withheld} instance(s) of other patients withheld"),
        );
    }
    flow
}

/// Handles something from the client while a retrieval runs: a C-CANCEL is relayed (`None`:
/// go on); anything else ends the association.
pub async fn relay_cancel(s: &mut Session, pc_id: u8, c: Incoming) -> Option<Flow> {
    match c {
        Incoming::Message(Event::Command { pc_id: cpc, bytes }) => match Command::decode(bytes) {
            Ok(cancel) if cancel.field() == Some(command::C_CANCEL_RQ) && cpc == pc_id => {
                s.client.expect_data(cpc, false);
                match s.pacs.send_message(pc_id, &cancel.raw, None).await {
                    Ok(()) => None,
                    Err(_) => Some(s.abort_both().await),
                }
            }
            _ => Some(
                s.protocol_violation("client", "unexpected message during a retrieval")
                    .await,
            ),
        },
        Incoming::Abort | Incoming::Gone(_) => {
            tracing::info!(assoc = s.id, "client left during a retrieval");
            s.pacs.abort().await;
            Some(Flow::End)
        }
        _ => Some(
            s.protocol_violation("client", "unexpected PDU during a retrieval")
                .await,
        ),
    }
}

/// One C-STORE sub-operation from the PACS: checked, then streamed to the client, whose answer
/// goes back to the PACS; or refused toward the PACS.
async fn sub_store(
    s: &mut Session,
    sub_pc: u8,
    sub: Command,
    allowed: &Allowed,
    withheld: &mut usize,
) -> Flow {
    let wait = s.ctx.cfg.limits.upstream_timeout;
    if !sub.has_data_set() {
        return s
            .protocol_violation("pacs", "C-STORE sub-operation without a data set")
            .await;
    }
    let refuse = |status: u16| sub.response(status, Some("refused by the gateway"));
    let Some(ts) = s.transfer_syntax(sub_pc) else {
        return s
            .protocol_violation("pacs", "sub-operation on a context that was not accepted")
            .await;
    };
    let head = match instance::read_head(&mut s.pacs, sub_pc, ts, wait).await {
        Ok(h) => h,
        Err(HeadError::Peer(e)) => {
            tracing::warn!(assoc = s.id, reason = %e, "PACS failed during a sub-operation");
            return s.abort_both().await;
        }
        Err(HeadError::Unreadable { last }) => {
            if !last && instance::drain(&mut s.pacs, sub_pc, wait).await.is_err() {
                return s.abort_both().await;
            }
            *withheld += 1;
            return to_pacs(s, sub_pc, &refuse(command::STATUS_CANNOT_UNDERSTAND)).await;
        }
    };
    if !allowed.admits_instance(
        head.patient_id.as_deref(),
        head.issuer.as_deref(),
        head.study_uid.as_deref(),
    ) {
        tracing::warn!(
            assoc = s.id,
            "PACS sent an instance of another patient or study; withheld"
        );
        if !head.last && instance::drain(&mut s.pacs, sub_pc, wait).await.is_err() {
            return s.abort_both().await;
        }
        *withheld += 1;
        return to_pacs(s, sub_pc, &refuse(command::STATUS_NOT_AUTHORIZED)).await;
    }
    match instance::stream(&mut s.pacs, &mut s.client, sub_pc, &sub.raw, head, wait).await {
        Ok(()) => {}
        Err(StreamError::From(e)) | Err(StreamError::To(e)) => {
            // The client holds a partial instance: the association cannot go on.
            tracing::warn!(assoc = s.id, reason = %e, "sub-operation broken off");
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
            Incoming::Message(Event::Command { pc_id: cpc, bytes }) => {
                let rsp = match Command::decode(bytes) {
                    Ok(r) => r,
                    Err(_) => return s.protocol_violation("client", "malformed command").await,
                };
                s.client.expect_data(cpc, rsp.has_data_set());
                match rsp.field() {
                    Some(command::C_STORE_RSP) if cpc == sub_pc && !rsp.has_data_set() => {
                        return to_pacs(s, sub_pc, &rsp.raw).await;
                    }
                    Some(command::C_CANCEL_RQ) => {
                        if s.pacs.send_message(cpc, &rsp.raw, None).await.is_err() {
                            return s.abort_both().await;
                        }
                    }
                    _ => {
                        return s
                            .protocol_violation(
                                "client",
                                "unexpected message during a sub-operation",
                            )
                            .await;
                    }
                }
            }
            Incoming::Abort | Incoming::Gone(_) => {
                s.pacs.abort().await;
                return Flow::End;
            }
            _ => {
                return s
                    .protocol_violation("client", "unexpected PDU during a sub-operation")
                    .await;
            }
        }
    }
}

async fn to_pacs(s: &mut Session, pc_id: u8, command: &[u8]) -> Flow {
    match s.pacs.send_message(pc_id, command, None).await {
        Ok(()) => Flow::Continue,
        Err(e) => {
            tracing::warn!(assoc = s.id, reason = %e, "cannot write to the PACS");
            fail_flow(s).await
        }
    }
}

async fn fail_flow(s: &mut Session) -> Flow {
    s.abort_both().await
}

/// The PACS failed: a failure status for the retrieval, then both associations end.
async fn fail(s: &mut Session, pc_id: u8, cmd: &Command) -> Flow {
    let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some("PACS unavailable"));
    let _ = s.client.send_message(pc_id, &rsp, None).await;
    s.abort_both().await
}
