//! An established relayed association: the loop that takes the client's messages one at a time,
//! hands each to its service (one file per service), and handles release, abort and timeouts.
//!
//! Owns: the association's state after negotiation (both peers, the verified principal, the
//! accepted presentation contexts) and its lifecycle. Must not decide access: services ask the
//! policy core.

use super::assoc::AcceptedContext;
use super::command::{self, Command};
use super::message::Event;
use super::peer::{Incoming, MAX_BATCH, Peer};
use super::{Ctx, cmove, echo, find, get, store};
use crate::trust::Principal;
use dicom_ul::pdu::Pdu;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a release may take before the association is aborted instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Session {
    pub id: u64,
    /// The client's AE title, shown to C-MOVE destinations as the move originator.
    pub calling_ae: String,
    pub client: Peer,
    pub pacs: Peer,
    pub principal: Principal,
    pub contexts: HashMap<u8, AcceptedContext>,
    pub ctx: Arc<Ctx>,
}

/// How an operation ended for the association.
pub enum Flow {
    Continue,
    /// The association is over (both peers have been released, aborted or closed).
    End,
}

enum Side {
    Client(Incoming),
    Pacs(Incoming),
    Idle,
}

impl Session {
    pub async fn run(mut self) {
        let idle = self.ctx.cfg.limits.idle_timeout;
        loop {
            let side = tokio::select! {
                i = self.client.next() => Side::Client(i),
                i = self.pacs.next() => Side::Pacs(i),
                _ = tokio::time::sleep(idle) => Side::Idle,
            };
            let flow = match side {
                Side::Idle => {
                    tracing::info!(
                        assoc = self.id,
                        "idle for {idle:?}; aborting the association"
                    );
                    self.abort_both().await
                }
                Side::Client(Incoming::Message(Event::Command { pc_id, bytes })) => {
                    self.dispatch(pc_id, bytes).await
                }
                Side::Client(Incoming::Message(Event::Data { .. })) => {
                    self.protocol_violation("client", "data set without a command")
                        .await
                }
                Side::Client(Incoming::ReleaseRq) => self.release().await,
                Side::Client(Incoming::Abort) => {
                    tracing::info!(assoc = self.id, "client aborted");
                    self.pacs.abort().await;
                    Flow::End
                }
                Side::Client(Incoming::Gone(why)) => {
                    tracing::info!(assoc = self.id, reason = %why, "client connection ended");
                    self.pacs.abort().await;
                    Flow::End
                }
                Side::Client(Incoming::ReleaseRp) => {
                    self.protocol_violation("client", "unexpected A-RELEASE-RP")
                        .await
                }
                Side::Pacs(i) => {
                    let why = match i {
                        Incoming::Abort => "PACS aborted the association".to_string(),
                        Incoming::Gone(w) => format!("PACS connection ended: {w}"),
                        Incoming::ReleaseRq => "PACS asked to release".to_string(),
                        _ => "PACS sent a message nobody asked for".to_string(),
                    };
                    tracing::warn!(assoc = self.id, reason = %why, "aborting the client association");
                    self.abort_both().await
                }
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    async fn dispatch(&mut self, pc_id: u8, bytes: Vec<u8>) -> Flow {
        let cmd = match Command::decode(bytes) {
            Ok(c) => c,
            Err(e) => return self.protocol_violation("client", &e.to_string()).await,
        };
        self.client.expect_data(pc_id, cmd.has_data_set());
        if !self.contexts.contains_key(&pc_id) {
            return self
                .protocol_violation(
                    "client",
                    &format!("message on presentation context {pc_id}, which was not accepted"),
                )
                .await;
        }
        match cmd.field() {
            Some(command::C_ECHO_RQ) => echo::handle(self, pc_id, cmd).await,
            Some(command::C_FIND_RQ) => find::handle(self, pc_id, cmd).await,
            Some(command::C_STORE_RQ) => store::handle(self, pc_id, cmd).await,
            Some(command::C_GET_RQ) => get::handle(self, pc_id, cmd).await,
            Some(command::C_MOVE_RQ) => cmove::handle(self, pc_id, cmd).await,
            // A cancel for an operation that has already ended is ignored (PS3.7 9.3.2.3).
            Some(command::C_CANCEL_RQ) => Flow::Continue,
            other => self.unsupported(pc_id, cmd, other.unwrap_or(0)).await,
        }
    }

    /// Operations this version does not relay get a failure status, after their data set (if
    /// any) was read and discarded.
    async fn unsupported(&mut self, pc_id: u8, cmd: Command, field: u16) -> Flow {
        if cmd.has_data_set()
            && let Err(e) = self
                .client
                .discard_data(pc_id, self.ctx.cfg.limits.idle_timeout)
                .await
        {
            tracing::info!(assoc = self.id, reason = %e, "client failed while sending a data set");
            return self.abort_both().await;
        }
        tracing::info!(
            assoc = self.id,
            command = format!("{field:#06x}"),
            "operation not supported; refused"
        );
        if field & 0x8000 != 0 {
            return self
                .protocol_violation("client", "response message from the requestor")
                .await;
        }
        let rsp = cmd.response(
            command::STATUS_UNRECOGNIZED_OPERATION,
            Some("operation not supported by the gateway"),
        );
        self.reply(pc_id, &rsp, None).await
    }

    /// Sends a message to the client; a failure ends the association.
    /// Answers a request the policy core refused: the denial goes to the audit trail, the
    /// client gets 0124H (Refused: Not Authorized) and nothing more.
    pub async fn refuse(
        &mut self,
        pc_id: u8,
        cmd: &Command,
        what: &str,
        denial: &crate::policy::Denial,
    ) -> Flow {
        crate::audit::record(
            "dimse",
            self.id,
            Some(&self.principal),
            what,
            crate::audit::Outcome::Denied,
            &denial.to_string(),
        );
        let rsp = cmd.response(command::STATUS_NOT_AUTHORIZED, Some("not authorized"));
        self.reply(pc_id, &rsp, None).await
    }

    pub async fn reply(&mut self, pc_id: u8, command: &[u8], data: Option<&[u8]>) -> Flow {
        match self.client.send_message(pc_id, command, data).await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::info!(assoc = self.id, reason = %e, "cannot write to the client");
                self.pacs.abort().await;
                Flow::End
            }
        }
    }

    /// Relays a message to the client, holding it back (bounded by [`MAX_BATCH`]) while the
    /// PACS's next message is already at hand, so bursts go out in few writes.
    pub async fn relay_to_client(
        &mut self,
        pc_id: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Flow {
        if let Err(e) = self.client.queue_message(pc_id, command, data) {
            tracing::info!(assoc = self.id, reason = %e, "cannot encode for the client");
            return self.abort_both().await;
        }
        if self.pacs.has_input_at_hand() && self.client.queued_bytes() < MAX_BATCH {
            return Flow::Continue;
        }
        match self.client.flush().await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::info!(assoc = self.id, reason = %e, "cannot write to the client");
                self.pacs.abort().await;
                Flow::End
            }
        }
    }

    async fn release(&mut self) -> Flow {
        let upstream = async {
            self.pacs
                .send_pdu(&Pdu::ReleaseRQ)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                match self.pacs.next().await {
                    Incoming::ReleaseRp => return Ok(()),
                    // a late response of a cancelled operation may still arrive: skip it
                    Incoming::Message(_) => continue,
                    Incoming::ReleaseRq => return Ok(()),
                    Incoming::Abort => return Err("PACS aborted during release".to_string()),
                    Incoming::Gone(w) => return Err(w),
                }
            }
        };
        match tokio::time::timeout(RELEASE_TIMEOUT, upstream).await {
            Ok(Ok(())) => self.pacs.close().await,
            Ok(Err(e)) => {
                tracing::info!(assoc = self.id, reason = %e, "PACS release incomplete");
                self.pacs.abort().await;
            }
            Err(_) => {
                tracing::info!(assoc = self.id, "PACS did not answer the release; aborted");
                self.pacs.abort().await;
            }
        }
        let _ = self.client.send_pdu(&Pdu::ReleaseRP).await;
        self.client.close().await;
        tracing::info!(assoc = self.id, "association released");
        Flow::End
    }

    pub async fn abort_both(&mut self) -> Flow {
        self.client.abort().await;
        self.pacs.abort().await;
        Flow::End
    }

    pub async fn protocol_violation(&mut self, who: &str, what: &str) -> Flow {
        tracing::warn!(assoc = self.id, peer = who, violation = %what, "protocol violation; aborting");
        self.abort_both().await
    }

    /// The transfer syntax negotiated for a presentation context, if the registry knows it.
    pub fn transfer_syntax(
        &self,
        pc_id: u8,
    ) -> Option<&'static dicom_encoding::transfer_syntax::TransferSyntax> {
        use dicom_encoding::TransferSyntaxIndex;
        let uid = &self.contexts.get(&pc_id)?.transfer_syntax;
        dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(uid.trim_end_matches('\0'))
    }

    /// Reads the identifier of a query or retrieval request and the transfer syntax it is
    /// encoded in. On failure the client has been answered (or the association ended) and the
    /// `Flow` says how the association goes on.
    pub async fn read_identifier(
        &mut self,
        pc_id: u8,
        cmd: &Command,
    ) -> Result<
        (
            Vec<u8>,
            &'static dicom_encoding::transfer_syntax::TransferSyntax,
        ),
        Flow,
    > {
        let limits = self.ctx.cfg.limits.clone();
        if !cmd.has_data_set() {
            let rsp = cmd.response(command::STATUS_IDENTIFIER_MISMATCH, Some("no identifier"));
            return Err(self.reply(pc_id, &rsp, None).await);
        }
        let bytes = match self
            .client
            .collect_data(pc_id, limits.max_identifier_bytes, limits.idle_timeout)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::info!(assoc = self.id, reason = %e, "client failed while sending an identifier");
                return Err(self.abort_both().await);
            }
        };
        match self.transfer_syntax(pc_id) {
            Some(ts) => Ok((bytes, ts)),
            None => {
                let rsp = cmd.response(
                    command::STATUS_UNABLE_TO_PROCESS,
                    Some("transfer syntax not supported"),
                );
                Err(self.reply(pc_id, &rsp, None).await)
            }
        }
    }

    /// Waits for the PACS, bounded by the upstream timeout.
    pub async fn pacs_next(&mut self) -> Option<Incoming> {
        tokio::time::timeout(self.ctx.cfg.limits.upstream_timeout, self.pacs.next())
            .await
            .ok()
    }
}
