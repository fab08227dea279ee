//! C-MOVE through the gateway.
//!
//! The Move Destination must be one of `[[destinations]]` (else A801H). The policy core resolves
//! every UID of the identifier before anything moves (a foreign or unknown UID: 0124H). The PACS
//! is then asked to move to the gateway's own store SCP under a message ID of the gateway's; the
//! receiver ([`super::receiver`]) checks each instance and streams it to the real destination.
//! The PACS's pending and final responses are relayed with the client's message ID; their
//! sub-operation counts cover both legs, because the receiver answers the PACS with the
//! destination's own status. C-CANCEL is relayed.

use super::command::{self, Command, Set};
use super::get;
use super::message::Event;
use super::peer::Incoming;
use super::receiver::Route;
use super::session::{Flow, Session};
use crate::audit::{self, Outcome};
use dicom_dictionary_std::tags;
use std::sync::atomic::{AtomicUsize, Ordering};

pub async fn handle(s: &mut Session, pc_id: u8, cmd: Command) -> Flow {
    let cfg = s.ctx.cfg.clone();
    let client_id = cmd.message_id().unwrap_or(0);
    let destination = s.ctx.policy.move_destination(cmd.move_destination());
    let Some(destination) = destination.filter(|_| cfg.pacs.receive_listen.is_some()) else {
        if cmd.has_data_set() {
            let limits = &cfg.limits;
            if s.client
                .collect_data(pc_id, limits.max_identifier_bytes, limits.idle_timeout)
                .await
                .is_err()
            {
                return s.abort_both().await;
            }
        }
        audit::record(
            "dimse",
            s.id,
            Some(&s.principal),
            &format!("C-MOVE to {}", cmd.move_destination().unwrap_or("-")),
            Outcome::Denied,
            "move destination is not configured",
        );
        let rsp = cmd.response(
            command::STATUS_MOVE_DESTINATION_UNKNOWN,
            Some("move destination unknown"),
        );
        return s.reply(pc_id, &rsp, None).await;
    };
    let (identifier, allowed) = match get::authorize(s, pc_id, &cmd, "C-MOVE").await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    let route = Route {
        destination,
        allowed,
        client_ae: s.calling_ae.clone(),
        client_message_id: client_id,
        session: s.id,
        withheld: AtomicUsize::new(0),
        completed: AtomicUsize::new(0),
        warning: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    };
    let Some(guard) = s.ctx.moves.register(route) else {
        let rsp = cmd.response(0xA702, Some("too many moves in flight"));
        return s.reply(pc_id, &rsp, None).await;
    };
    let upstream_cmd = match command::rewrite(
        &cmd.raw,
        &[
            (tags::MESSAGE_ID, Set::Us(guard.id)),
            (tags::MOVE_DESTINATION, Set::Ae(&cfg.pacs.calling_ae_title)),
        ],
    ) {
        Ok(c) => c,
        Err(_) => {
            return s
                .protocol_violation("client", "malformed C-MOVE command")
                .await;
        }
    };
    if let Err(e) = s
        .pacs
        .send_message(pc_id, &upstream_cmd, Some(&identifier))
        .await
    {
        tracing::warn!(assoc = s.id, reason = %e, "cannot send C-MOVE to the PACS");
        return fail(s, pc_id, &cmd).await;
    }
    loop {
        let incoming = tokio::select! {
            i = tokio::time::timeout(cfg.limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS went silent during C-MOVE");
                    return fail(s, pc_id, &cmd).await;
                }
            },
            c = s.client.next() => {
                match c {
                    Incoming::Message(Event::Command { pc_id: cpc, bytes }) => match Command::decode(bytes) {
                        Ok(cancel) if cancel.field() == Some(command::C_CANCEL_RQ) && cpc == pc_id => {
                            s.client.expect_data(cpc, false);
                            let up = command::rewrite(&cancel.raw, &[(tags::MESSAGE_ID_BEING_RESPONDED_TO, Set::Us(guard.id))]);
                            match up {
                                Ok(up) if s.pacs.send_message(pc_id, &up, None).await.is_ok() => continue,
                                _ => return s.abort_both().await,
                            }
                        }
                        _ => return s.protocol_violation("client", "unexpected message during C-MOVE").await,
                    },
                    Incoming::Abort | Incoming::Gone(_) => {
                        tracing::info!(assoc = s.id, "client left during C-MOVE");
                        s.pacs.abort().await;
                        return Flow::End;
                    }
                    _ => return s.protocol_violation("client", "unexpected PDU during C-MOVE").await,
                }
            }
        };
        let (rpc, bytes) = match incoming {
            Incoming::Message(Event::Command { pc_id: rpc, bytes }) => (rpc, bytes),
            _ => {
                tracing::warn!(assoc = s.id, "PACS went away during C-MOVE");
                return fail(s, pc_id, &cmd).await;
            }
        };
        let rsp = match Command::decode(bytes) {
            Ok(r) if r.field() == Some(command::C_MOVE_RSP) && rpc == pc_id => r,
            _ => {
                return s
                    .protocol_violation("pacs", "unexpected message during C-MOVE")
                    .await;
            }
        };
        s.pacs.expect_data(rpc, rsp.has_data_set());
        let data = if rsp.has_data_set() {
            let limits = &cfg.limits;
            match s
                .pacs
                .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                .await
            {
                Ok(d) => Some(d),
                Err(_) => return fail(s, pc_id, &cmd).await,
            }
        } else {
            None
        };
        let status = rsp.status().unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
        let mut edits = vec![(tags::MESSAGE_ID_BEING_RESPONDED_TO, Set::Us(client_id))];
        if !command::is_pending(status) {
            // The final counts are what the gateway saw answered, whatever the PACS reports
            // (a PACS may stop at the first failure and report nothing); failures at either leg
            // turn a success into a warning.
            let r = &guard.route;
            let n = |a: &AtomicUsize| a.load(Ordering::Relaxed).min(u16::MAX as usize) as u16;
            let (completed, warning, failed) = (n(&r.completed), n(&r.warning), n(&r.failed));
            let pacs_failed = rsp.u16_field(0x1022).unwrap_or(0);
            edits.push((tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, Set::Us(completed)));
            edits.push((tags::NUMBER_OF_WARNING_SUBOPERATIONS, Set::Us(warning)));
            edits.push((
                tags::NUMBER_OF_FAILED_SUBOPERATIONS,
                Set::Us(failed.max(pacs_failed)),
            ));
            if status == command::STATUS_SUCCESS && (failed > 0 || warning > 0) {
                edits.push((tags::STATUS, Set::Us(command::STATUS_SUBOPS_WARNING)));
            }
        }
        let out = match command::rewrite(&rsp.raw, &edits) {
            Ok(o) => o,
            Err(_) => return s.protocol_violation("pacs", "malformed C-MOVE-RSP").await,
        };
        let flow = s.reply(pc_id, &out, data.as_deref()).await;
        if !command::is_pending(status) || matches!(flow, Flow::End) {
            let withheld = guard.route.withheld.load(Ordering::Relaxed);
            if withheld > 0 {
                audit::record(
                    "dimse",
                    s.id,
                    Some(&s.principal),
                    "C-MOVE",
                    Outcome::Anomaly,
                    &format!("{withheld} instance(s) withheld (other patients' or unreadable)"),
                );
            }
            return flow;
        }
    }
}

async fn fail(s: &mut Session, pc_id: u8, cmd: &Command) -> Flow {
    let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some("PACS unavailable"));
    let _ = s.client.send_message(pc_id, &rsp, None).await;
    s.abort_both().await
}
