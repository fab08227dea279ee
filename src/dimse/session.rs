//! An established relayed association: the loop that takes the client's messages one at a time,
//! hands each to its service (one file per service), and handles release, abort and timeouts.
//!
//! Owns: the association's state after negotiation (both peers, the verified principal, the
//! accepted presentation contexts), its lifecycle, and the first check of every request: a
//! command must belong to the SOP class of its presentation context (C-FIND on FIND models,
//! C-GET on GET, C-MOVE on MOVE, C-STORE on storage, C-ECHO on Verification) and name that
//! class as its Affected SOP Class. Must not decide access: services ask the policy core.

use super::{Ctx, cmove, echo, find, get, store};
use crate::dicom::command::{self, Command, Service};
use crate::dicom::dataset::DataSet;
use crate::dicom::message::Event;
use crate::dicom::negotiation::AcceptedContext;
use crate::dicom::peer::{Incoming, MAX_BATCH, Peer};
use crate::dicom::reader::Violation;
use crate::dicom::syntax::{self, Syntax};
use crate::policy::Caller;
use dicom_ul::pdu::Pdu;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a release may take before the association is aborted instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Session {
    /// The association's number in logs and audit records.
    pub id: u64,
    /// The client's AE title, shown to C-MOVE destinations as the move originator.
    pub calling_ae: String,
    /// The client's leg; its commands arrive read strictly.
    pub client: Peer,
    /// The gateway's own association to the PACS, opened for this client.
    pub pacs: Peer,
    /// The request that opened it, to open another one like it (see [`Session::renew_pacs`]).
    pub upstream_rq: dicom_ul::pdu::AssociationRQ,
    /// Who the token says the caller is, prepared by the policy core; every operation is
    /// decided for it.
    pub caller: Caller,
    /// The gateway stopping: the association ends between operations once it drains, and
    /// at once (A-ABORT to both peers) when the drain time is over.
    pub stop: super::listener::Stop,
    /// The presentation contexts accepted on both legs, by id.
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
    Stopping,
}

impl Session {
    pub async fn run(mut self) {
        let idle = self.ctx.cfg.limits.idle_timeout;
        loop {
            let side = tokio::select! {
                i = self.client.next() => Side::Client(i),
                i = self.pacs.next() => Side::Pacs(i),
                _ = tokio::time::sleep(idle) => Side::Idle,
                _ = self.stop.draining() => Side::Stopping,
            };
            let flow = match side {
                Side::Idle => {
                    tracing::info!(
                        assoc = self.id,
                        "idle for {idle:?}; aborting the association"
                    );
                    self.abort_both().await
                }
                Side::Stopping => {
                    tracing::info!(
                        assoc = self.id,
                        "the gateway is stopping; the association ends between operations"
                    );
                    self.end_for_stop().await
                }
                Side::Client(Incoming::Message(Event::Command { pc_id, command })) => {
                    // The operation runs to its end unless the drain time runs out first.
                    let mut stop = self.stop.clone();
                    let done = tokio::select! {
                        flow = self.dispatch(pc_id, *command) => Some(flow),
                        _ = stop.cut() => None,
                    };
                    match done {
                        Some(flow) => flow,
                        None => {
                            tracing::warn!(
                                assoc = self.id,
                                "drain time over during an operation; aborting both associations"
                            );
                            self.abort_both().await
                        }
                    }
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
                    // A malformed command set ends here: the client is told by an A-ABORT.
                    self.abort_both().await
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

    async fn dispatch(&mut self, pc_id: u8, cmd: Command) -> Flow {
        let Some(context) = self.contexts.get(&pc_id) else {
            return self
                .protocol_violation(
                    "client",
                    &format!("message on presentation context {pc_id}, which was not accepted"),
                )
                .await;
        };
        if cmd.is_response() {
            return self
                .protocol_violation("client", "response message from the requestor")
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
            return self.unsupported(pc_id, cmd).await;
        }
        let service = Service::of(&context.abstract_syntax);
        let names_its_class = field == command::C_CANCEL_RQ
            || cmd.affected_sop_class.as_deref() == Some(context.abstract_syntax.as_str());
        if !service.admits(field) || !names_its_class {
            return self.wrong_sop_class(pc_id, cmd).await;
        }
        match field {
            command::C_ECHO_RQ => echo::handle(self, pc_id, cmd).await,
            command::C_FIND_RQ => find::handle(self, pc_id, cmd).await,
            command::C_STORE_RQ => store::handle(self, pc_id, cmd).await,
            command::C_GET_RQ => get::handle(self, pc_id, cmd).await,
            command::C_MOVE_RQ => cmove::handle(self, pc_id, cmd).await,
            // A cancel for an operation that has already ended is ignored (PS3.7 9.3.2.3).
            _ => Flow::Continue,
        }
    }

    /// Reads and drops the data set of a request that is refused before it is looked at.
    async fn drop_data_set(&mut self, pc_id: u8, cmd: &Command) -> Result<(), Flow> {
        if cmd.has_data_set()
            && let Err(e) = self
                .client
                .discard_data(pc_id, self.ctx.cfg.limits.idle_timeout)
                .await
        {
            tracing::info!(assoc = self.id, reason = %e, "client failed while sending a data set");
            return Err(self.abort_both().await);
        }
        Ok(())
    }

    /// Operations this version does not relay (DIMSE-N) get a failure status, after their
    /// data set (if any) was read and discarded.
    async fn unsupported(&mut self, pc_id: u8, cmd: Command) -> Flow {
        if let Err(flow) = self.drop_data_set(pc_id, &cmd).await {
            return flow;
        }
        tracing::info!(
            assoc = self.id,
            command = format!("{:#06x}", cmd.field),
            "operation not supported; refused"
        );
        let rsp = cmd.response(
            command::STATUS_UNRECOGNIZED_OPERATION,
            Some("operation not supported by the gateway"),
        );
        self.reply(pc_id, &rsp, None).await
    }

    /// A request on a presentation context whose SOP class it does not belong to: refused
    /// (0122H), so a command can never run as one service here and another at the PACS.
    async fn wrong_sop_class(&mut self, pc_id: u8, cmd: Command) -> Flow {
        if let Err(flow) = self.drop_data_set(pc_id, &cmd).await {
            return flow;
        }
        tracing::warn!(
            assoc = self.id,
            command = format!("{:#06x}", cmd.field),
            "command does not belong to its presentation context's SOP class; refused"
        );
        crate::audit::record(
            "dimse",
            self.id,
            Some(self.caller.principal()),
            "DIMSE request",
            crate::audit::Outcome::Denied,
            "command does not belong to the SOP class of its presentation context",
        );
        let rsp = cmd.response(
            command::STATUS_SOP_CLASS_NOT_SUPPORTED,
            Some("command does not belong to the presentation context's SOP class"),
        );
        self.reply(pc_id, &rsp, None).await
    }

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
            Some(self.caller.principal()),
            what,
            crate::audit::Outcome::Denied,
            &denial.to_string(),
        );
        // Every refusal is 0124H but one: what could not be asked may be asked again.
        let rsp = match denial.kind() {
            crate::policy::DenialKind::Unavailable => cmd.response(
                command::unavailable_status(cmd.field),
                Some("PACS or EHR unavailable"),
            ),
            _ => cmd.response(command::STATUS_NOT_AUTHORIZED, Some("not authorized")),
        };
        self.reply(pc_id, &rsp, None).await
    }

    /// Answers a request whose identifier the strict reader refused: A900H, nothing relayed.
    pub async fn bad_identifier(&mut self, pc_id: u8, cmd: &Command, v: &Violation) -> Flow {
        tracing::info!(assoc = self.id, violation = %v, "identifier refused by the strict reader");
        crate::audit::record(
            "dimse",
            self.id,
            Some(self.caller.principal()),
            "DIMSE identifier",
            crate::audit::Outcome::Denied,
            &format!("malformed identifier: {v}"),
        );
        let rsp = cmd.response(
            command::STATUS_IDENTIFIER_MISMATCH,
            Some("identifier is not a well-formed data set"),
        );
        self.reply(pc_id, &rsp, None).await
    }

    /// Sends a message to the client; a failure ends the association.
    pub async fn reply(&mut self, pc_id: u8, command: &Command, data: Option<&[u8]>) -> Flow {
        match self
            .client
            .send_message(pc_id, &command.encode(), data)
            .await
        {
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
        command: &Command,
        data: Option<&[u8]>,
    ) -> Flow {
        self.relay_encoded(pc_id, &command.encode(), data).await
    }

    /// [`Session::relay_to_client`] with the command set already encoded.
    pub async fn relay_encoded(&mut self, pc_id: u8, command: &[u8], data: Option<&[u8]>) -> Flow {
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
        self.release_pacs().await;
        let _ = self.client.send_pdu(&Pdu::ReleaseRP).await;
        self.client.close().await;
        tracing::info!(assoc = self.id, "association released");
        Flow::End
    }

    /// Releases the gateway's association to the PACS (A-ABORT when the PACS does not answer
    /// in time).
    async fn release_pacs(&mut self) {
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
    }

    /// Ends the association because the gateway is stopping, between operations: the PACS
    /// association is released, the client's aborted (the gateway accepted it, and the
    /// acceptor does not ask for a release).
    async fn end_for_stop(&mut self) -> Flow {
        self.release_pacs().await;
        self.client.abort().await;
        Flow::End
    }

    /// Aborts the PACS association and opens a new one like it, so the client's association
    /// goes on (after an instance had to be broken off mid-stream). `false` when the PACS does
    /// not accept every context as before: the client's association cannot go on then.
    pub async fn renew_pacs(&mut self) -> bool {
        use dicom_ul::pdu::PresentationContextResultReason as R;
        self.pacs.abort().await;
        let cfg = &self.ctx.cfg;
        let Ok((stream, ac)) = crate::pacs::associate(
            &cfg.pacs,
            self.upstream_rq.clone(),
            cfg.limits.upstream_timeout,
        )
        .await
        else {
            return false;
        };
        let same = self.contexts.iter().all(|(id, c)| {
            ac.presentation_contexts.iter().any(|r| {
                r.id == *id
                    && r.reason == R::Acceptance
                    && r.transfer_syntax.trim_end_matches('\0') == c.transfer_syntax
            })
        });
        let peer_max = crate::dicom::negotiation::announced_max(&ac.user_variables);
        let mut pacs = Peer::new(
            "pacs",
            stream,
            cfg.limits.max_pdu_length + crate::dicom::pdu::PDU_SLACK,
            peer_max,
        )
        .is_pacs();
        if !same || peer_max != self.pacs.peer_max {
            pacs.abort().await;
            return false;
        }
        self.pacs = pacs;
        true
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

    /// How data sets on a presentation context are read (negotiation accepts only syntaxes the
    /// strict reader decodes, so this is known for every accepted context).
    pub fn syntax(&self, pc_id: u8) -> Option<Syntax> {
        syntax::readable(&self.contexts.get(&pc_id)?.transfer_syntax)
    }

    /// Reads the identifier of a query or retrieval request (whole, bounded) and checks it
    /// with the strict reader. On failure the client has been answered (A900H for an
    /// identifier that is missing or malformed) or the association ended; the `Flow` says
    /// how it goes on. The caller reads the returned bytes with [`DataSet::read`] again,
    /// which cannot fail then.
    pub async fn read_identifier(
        &mut self,
        pc_id: u8,
        cmd: &Command,
    ) -> Result<(Vec<u8>, Syntax), Flow> {
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
        let Some(syntax) = self.syntax(pc_id) else {
            let rsp = cmd.response(
                command::STATUS_UNABLE_TO_PROCESS,
                Some("transfer syntax not supported"),
            );
            return Err(self.reply(pc_id, &rsp, None).await);
        };
        if let Err(v) = DataSet::read(&bytes, syntax.encoding, limits.reader()) {
            return Err(self.bad_identifier(pc_id, cmd, &v).await);
        }
        Ok((bytes, syntax))
    }

    /// Waits for the PACS, bounded by the upstream timeout.
    pub async fn pacs_next(&mut self) -> Option<Incoming> {
        tokio::time::timeout(self.ctx.cfg.limits.upstream_timeout, self.pacs.next())
            .await
            .ok()
    }
}
