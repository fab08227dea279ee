//! C-STORE through the gateway.
//!
//! The instance's head is read until PatientID, StudyInstanceUID and SeriesInstanceUID are
//! known; the policy core decides (write scope, the caller's patient, a study or series the PACS
//! already holds must be that patient's); a refused instance is drained and never reaches the
//! PACS; an allowed one is streamed on as it arrives. The client gets the PACS's own answer, so
//! success means stored; a PACS failure, timeout or abort is a failure status, never a success.

use super::command::{self, Command};
use super::instance::{self, HeadError, StreamError};
use super::message::Event;
use super::peer::Incoming;
use super::session::{Flow, Session};
use crate::audit::{self, Outcome};
use crate::policy::{Decision, StoreRequest};
use std::time::SystemTime;

pub async fn handle(s: &mut Session, pc_id: u8, cmd: Command) -> Flow {
    let wait = s.ctx.cfg.limits.idle_timeout;
    if !cmd.has_data_set() {
        let rsp = cmd.response(
            command::STATUS_CANNOT_UNDERSTAND,
            Some("C-STORE without a data set"),
        );
        return s.reply(pc_id, &rsp, None).await;
    }
    let Some(ts) = s.transfer_syntax(pc_id) else {
        if let Err(e) = instance::drain(&mut s.client, pc_id, wait).await {
            tracing::info!(assoc = s.id, reason = %e, "client failed during C-STORE");
            return s.abort_both().await;
        }
        let rsp = cmd.response(
            command::STATUS_CANNOT_UNDERSTAND,
            Some("transfer syntax not supported"),
        );
        return s.reply(pc_id, &rsp, None).await;
    };
    let head = match instance::read_head(&mut s.client, pc_id, ts, wait).await {
        Ok(h) => h,
        Err(HeadError::Peer(e)) => {
            tracing::info!(assoc = s.id, reason = %e, "client failed during C-STORE");
            return s.abort_both().await;
        }
        Err(HeadError::Unreadable { last }) => {
            if !last && let Err(e) = instance::drain(&mut s.client, pc_id, wait).await {
                tracing::info!(assoc = s.id, reason = %e, "client failed during C-STORE");
                return s.abort_both().await;
            }
            audit::record(
                "dimse",
                s.id,
                Some(&s.principal),
                "C-STORE",
                Outcome::Denied,
                "data set unreadable",
            );
            let rsp = cmd.response(
                command::STATUS_CANNOT_UNDERSTAND,
                Some("data set cannot be read"),
            );
            return s.reply(pc_id, &rsp, None).await;
        }
    };
    let req = StoreRequest {
        patient_id: head.patient_id.as_deref(),
        issuer: head.issuer.as_deref(),
        study_uid: head.study_uid.as_deref(),
        series_uid: head.series_uid.as_deref(),
        modality: head.modality.as_deref(),
        study_date: head.study_date.as_deref(),
    };
    let decision = s
        .ctx
        .policy
        .decide_store(
            &s.principal,
            &req,
            &*s.ctx.lookup,
            &*s.ctx.trust,
            SystemTime::now(),
        )
        .await;
    let study = head.study_uid.clone().unwrap_or_default();
    let series = head.series_uid.clone();
    let patient = head.patient_id.clone().unwrap_or_default();
    let issuer = head.issuer.clone();
    let what = format!("C-STORE study={study}");
    if let Decision::Deny(d) = decision {
        if !head.last
            && let Err(e) = instance::drain(&mut s.client, pc_id, wait).await
        {
            tracing::info!(assoc = s.id, reason = %e, "client failed during C-STORE");
            return s.abort_both().await;
        }
        return s.refuse(pc_id, &cmd, &what, &d).await;
    }

    match instance::stream(&mut s.client, &mut s.pacs, pc_id, &cmd.raw, head, wait).await {
        Ok(()) => {}
        Err(StreamError::From(e)) => {
            // The PACS must not keep a truncated instance: abort its association.
            tracing::info!(assoc = s.id, reason = %e, "client failed during C-STORE; PACS association aborted");
            return s.abort_both().await;
        }
        Err(StreamError::To(e)) => {
            tracing::warn!(assoc = s.id, reason = %e, "PACS failed during C-STORE");
            let _ = instance::drain(&mut s.client, pc_id, wait).await;
            return fail(s, pc_id, &cmd).await;
        }
    }
    // The PACS's answer is the client's answer.
    match s.pacs_next().await {
        Some(Incoming::Message(Event::Command { pc_id: rpc, bytes })) if rpc == pc_id => {
            match Command::decode(bytes) {
                Ok(rsp) if rsp.field() == Some(command::C_STORE_RSP) => {
                    s.pacs.expect_data(rpc, rsp.has_data_set());
                    if rsp.has_data_set() {
                        return s
                            .protocol_violation("pacs", "C-STORE-RSP with a data set")
                            .await;
                    }
                    let status = rsp.status().unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
                    let stored = status == 0
                        || (status & 0xF000) == 0xB000
                        || status == 0x0107
                        || status == 0x0116;
                    if stored {
                        s.ctx
                            .policy
                            .remember_stored(
                                &study,
                                series.as_deref(),
                                patient.trim_matches(' '),
                                issuer.as_deref(),
                            )
                            .await;
                    }
                    audit::record(
                        "dimse",
                        s.id,
                        Some(&s.principal),
                        &what,
                        if stored {
                            Outcome::Allowed
                        } else {
                            Outcome::Denied
                        },
                        &format!("PACS status {status:#06x}"),
                    );
                    s.reply(pc_id, &rsp.raw, None).await
                }
                _ => {
                    s.protocol_violation("pacs", "unexpected answer to C-STORE")
                        .await
                }
            }
        }
        Some(_) => {
            tracing::warn!(assoc = s.id, "PACS went away before answering C-STORE");
            fail(s, pc_id, &cmd).await
        }
        None => {
            tracing::warn!(assoc = s.id, "PACS did not answer C-STORE in time");
            fail(s, pc_id, &cmd).await
        }
    }
}

/// The PACS failed: a failure status to the client (never a success), then both end.
async fn fail(s: &mut Session, pc_id: u8, cmd: &Command) -> Flow {
    let rsp = cmd.response(
        command::STATUS_UNABLE_TO_PROCESS,
        Some("PACS did not store the instance"),
    );
    let _ = s.client.send_message(pc_id, &rsp, None).await;
    s.abort_both().await
}
