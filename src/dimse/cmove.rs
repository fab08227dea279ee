//! C-MOVE through the gateway.
//!
//! The Move Destination must be one of `[[destinations]]` (else A801H). The identifier is read
//! strictly; the policy core resolves every UID of it before anything moves (a foreign or
//! unknown UID: 0124H). The PACS is then asked to move to the gateway's own store SCP under a
//! random message ID of the gateway's; the receiver ([`super::receiver`]) checks each instance
//! against what the move asked for and streams it to the real destination. The PACS's pending
//! and final responses are relayed with the client's message ID; the final counts are those the
//! gateway saw answered at the destination (a withheld instance counts as failed). C-CANCEL is
//! relayed.

use super::association::{Association, Flow, Misbehaviour, Side};
use super::receiver::Route;
use super::retrieve;
use crate::audit::{Operation, Outcome};
use crate::dicom::command::{self, Command};
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::logtext::Clean;
use std::sync::atomic::Ordering;

pub async fn handle(s: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    let cfg = s.ctx.cfg.clone();
    let client_id = cmd.message_id.unwrap_or(0);
    let destination = s
        .ctx
        .policy
        .move_destination(cmd.move_destination.as_deref());
    let Some(destination) = destination.filter(|_| cfg.pacs.receives()) else {
        if cmd.has_data_set() {
            let limits = &cfg.limits;
            if let Err(e) = s
                .client
                .collect_data(pc_id, limits.max_identifier_bytes, limits.idle_timeout)
                .await
            {
                return s.broken(Side::Client, &e).await;
            }
        }
        s.trail().record(
            Operation::Move,
            &format!(
                "to {}",
                Clean(cmd.move_destination.as_deref().unwrap_or("-"))
            ),
            Outcome::Denied,
            "move destination is not configured",
        );
        let rsp = cmd.response(
            command::STATUS_MOVE_DESTINATION_UNKNOWN,
            Some("move destination unknown"),
        );
        return s.reply(pc_id, &rsp, None).await;
    };
    let (identifier, allowed) = match retrieve::authorize(s, pc_id, &cmd, Operation::Move).await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    let route = Route::new(destination, allowed, s.calling_ae.clone(), client_id, s.id);
    let Some(guard) = s.ctx.moves.register(route) else {
        let rsp = cmd.response(
            command::STATUS_OUT_OF_RESOURCES_SUBOPS,
            Some("too many moves in flight"),
        );
        return s.reply(pc_id, &rsp, None).await;
    };
    let mut upstream = cmd.clone();
    upstream.message_id = Some(guard.id);
    upstream.move_destination = Some(cfg.pacs.calling_ae_title.clone());
    if let Err(e) = s
        .pacs
        .send_message(pc_id, &upstream.encode(), Some(&identifier))
        .await
    {
        tracing::warn!(assoc = s.id, reason = %e, "cannot send C-MOVE to the PACS");
        return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
    }
    loop {
        let incoming = tokio::select! {
            i = tokio::time::timeout(cfg.limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS went silent during C-MOVE");
                    return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                }
            },
            c = s.client.next() => {
                match c {
                    Incoming::Message(Event::Command { pc_id: cpc, command: mut cancel })
                        if cancel.field == command::C_CANCEL_RQ && cpc == pc_id =>
                    {
                        cancel.responded_to = Some(guard.id);
                        if s.pacs.send_message(pc_id, &cancel.encode(), None).await.is_err() {
                            return s.abort_both().await;
                        }
                        continue;
                    }
                    Incoming::Message(_) => {
                        return s.protocol_violation(Side::Client, Misbehaviour::UnexpectedMessage, Some(Operation::Move)).await;
                    }
                    Incoming::Abort | Incoming::Gone(_) => {
                        tracing::info!(assoc = s.id, "client left during C-MOVE");
                        s.pacs.abort().await;
                        return Flow::End;
                    }
                    _ => return s.protocol_violation(Side::Client, Misbehaviour::UnexpectedPdu, Some(Operation::Move)).await,
                }
            }
        };
        let (rpc, mut rsp) = match incoming {
            Incoming::Message(Event::Command {
                pc_id: rpc,
                command,
            }) => (rpc, command),
            _ => {
                tracing::warn!(assoc = s.id, "PACS went away during C-MOVE");
                return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
            }
        };
        if rsp.field != command::C_MOVE_RSP || rpc != pc_id {
            return s
                .protocol_violation(
                    Side::Pacs,
                    Misbehaviour::UnexpectedMessage,
                    Some(Operation::Move),
                )
                .await;
        }
        let data = if rsp.has_data_set() {
            let limits = &cfg.limits;
            match s
                .pacs
                .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                .await
            {
                Ok(d) => {
                    let ok = s.syntax(rpc).is_some_and(|x| {
                        crate::dicom::dataset::DataSet::read(&d, x.encoding, limits.reader())
                            .is_ok()
                    });
                    if !ok {
                        return s
                            .protocol_violation(
                                Side::Pacs,
                                Misbehaviour::MalformedDataSet,
                                Some(Operation::Move),
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
        let status = rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
        rsp.responded_to = Some(client_id);
        let pending = command::is_pending(status);
        if pending {
            // What the PACS says it will send bounds what the receiver delivers.
            let total = [rsp.remaining, rsp.completed, rsp.failed, rsp.warning]
                .iter()
                .map(|c| c.unwrap_or(0) as usize)
                .sum::<usize>();
            if rsp.remaining.is_some() && total > 0 {
                guard.route.announced.store(total, Ordering::Relaxed);
            }
        } else {
            // The final counts are what the gateway saw answered, whatever the PACS reports (a
            // PACS may stop at the first failure and report nothing); failures at either leg
            // turn a success into a warning.
            guard.route.tally().apply_final(&mut rsp);
        }
        let flow = s.reply(pc_id, &rsp, data.as_deref()).await;
        if !pending || matches!(flow, Flow::End) {
            let withheld = guard.route.tally().withheld;
            if withheld > 0 {
                s.trail().record(
 Operation::Move, "",
                    Outcome::Anomaly,
                    &format!(
                        "{withheld} instance(s) withheld (other patients', not requested, or unreadable)"
                    ),
                );
            }
            return flow;
        }
    }
}
