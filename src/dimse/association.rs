//! One relayed association's state and the moves every service makes on it.
//!
//! Owns: both peers, the verified caller, the accepted presentation contexts, and the ways a
//! service answers or ends the association: reply, relay, refuse (audit record + status),
//! refuse a malformed identifier, fail on the PACS's account, abort for a protocol violation
//! (with the A-ABORT reason that names it), release or renew the PACS leg. Services take
//! `&mut Association`, never the session loop ([`super::session`]). Must not decide access:
//! services ask the policy core.

use super::Ctx;
use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::dicom::command::{self, Command};
use crate::dicom::dataset::DataSet;
use crate::dicom::negotiation::AcceptedContext;
use crate::dicom::peer::{Broken, Incoming, MAX_BATCH, Peer};
use crate::dicom::reader::Violation;
use crate::dicom::syntax::{self, Syntax};
use crate::policy::{Caller, Denial, DenialKind};
use dicom_ul::pdu::AbortRQServiceProviderReason;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a release may take before the association is aborted instead.
pub(crate) const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Association {
    /// The association's number in logs and audit records.
    pub id: u64,
    /// The client's AE title, shown to C-MOVE destinations as the move originator.
    pub calling_ae: String,
    /// The client's leg; its commands arrive read strictly.
    pub client: Peer,
    /// The gateway's own association to the PACS, opened for this client.
    pub pacs: Peer,
    /// Its place under `pacs.max_associations` (kept when it is renewed).
    pub _pacs_slot: crate::pacs::Slot,
    /// The request that opened it, to open another one like it (see [`Association::renew_pacs`]).
    pub upstream_rq: dicom_ul::pdu::AssociationRQ,
    /// Who the token says the caller is, prepared by the policy core; every operation is
    /// decided for it.
    pub caller: Caller,
    /// The subject of the client certificate the TLS handshake verified, if any.
    pub client_cert: Option<Arc<str>>,
    /// The client's address, for the audit trail.
    pub peer: std::net::IpAddr,
    /// The presentation contexts accepted on both legs, by id.
    pub contexts: HashMap<u8, AcceptedContext>,
    pub ctx: Arc<Ctx>,
}

/// How an operation ended for the association.
pub(crate) enum Flow {
    Continue,
    /// The association is over (both peers have been released, aborted or closed).
    End,
}

/// Which peer broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Pacs,
}

/// How a peer broke the protocol. Each kind names the A-ABORT reason the peer is sent (PS3.8
/// 9.3.8); the other peer's abort says only that the gateway ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Misbehaviour {
    /// A PDU the association's state does not admit (an A-RELEASE-RP nobody asked for, an
    /// A-ASSOCIATE in an established association).
    UnexpectedPdu,
    /// A data set with no command before it.
    DataSetWithoutCommand,
    /// A message the running operation does not admit: a new request while one is running, a
    /// response of another kind or on another presentation context.
    UnexpectedMessage,
    /// A response message from the requestor.
    ResponseFromRequestor,
    /// A message on a presentation context that was not accepted.
    UnacceptedContext(u8),
    /// A C-STORE sub-operation without a data set, or on a context that is not for storage.
    BadSubOperation,
    /// A response data set the strict reader refused.
    MalformedDataSet,
}

impl Misbehaviour {
    /// The A-ABORT reason the misbehaving peer is sent.
    pub(crate) fn abort_reason(self) -> AbortRQServiceProviderReason {
        use AbortRQServiceProviderReason as R;
        match self {
            Misbehaviour::UnexpectedPdu => R::UnexpectedPdu,
            Misbehaviour::DataSetWithoutCommand
            | Misbehaviour::UnexpectedMessage
            | Misbehaviour::ResponseFromRequestor
            | Misbehaviour::BadSubOperation => R::UnexpectedPduParameter,
            Misbehaviour::UnacceptedContext(_) | Misbehaviour::MalformedDataSet => {
                R::InvalidPduParameter
            }
        }
    }
}

impl std::fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misbehaviour::UnexpectedPdu => f.write_str("unexpected PDU"),
            Misbehaviour::DataSetWithoutCommand => f.write_str("data set without a command"),
            Misbehaviour::UnexpectedMessage => f.write_str("unexpected message"),
            Misbehaviour::ResponseFromRequestor => {
                f.write_str("response message from the requestor")
            }
            Misbehaviour::UnacceptedContext(id) => {
                write!(
                    f,
                    "message on presentation context {id}, which was not accepted"
                )
            }
            Misbehaviour::BadSubOperation => {
                f.write_str("C-STORE sub-operation without a data set or off a storage context")
            }
            Misbehaviour::MalformedDataSet => f.write_str("malformed response data set"),
        }
    }
}

impl Association {
    /// Where this association's decisions are recorded.
    pub(crate) fn trail(&self) -> Trail<'_> {
        Trail::new(Channel::Dimse, self.id, Some(self.caller.principal()))
            .with_client_cert(self.client_cert.clone())
            .with_peer(Some(self.peer))
    }

    /// Reads and drops the data set of a request that is refused before it is looked at.
    pub(crate) async fn drop_data_set(&mut self, pc_id: u8, cmd: &Command) -> Result<(), Flow> {
        if cmd.has_data_set()
            && let Err(e) = self
                .client
                .discard_data(pc_id, self.ctx.cfg.limits.idle_timeout)
                .await
        {
            return Err(self.broken(Side::Client, &e).await);
        }
        Ok(())
    }

    /// Answers a request the policy core refused: the denial goes to the audit trail, the
    /// client gets 0124H (Refused: Not Authorized) and nothing more.
    pub async fn refuse(
        &mut self,
        pc_id: u8,
        cmd: &Command,
        on: (Operation, &str),
        denial: &Denial,
    ) -> Flow {
        self.refuse_about(pc_id, cmd, on, denial, Vec::new()).await
    }

    /// [`Association::refuse`], naming the studies the request asked for in the audit trail.
    pub async fn refuse_about(
        &mut self,
        pc_id: u8,
        cmd: &Command,
        (op, object): (Operation, &str),
        denial: &Denial,
        studies: Vec<String>,
    ) -> Flow {
        let outcome = match denial.kind() {
            DenialKind::Unavailable => Outcome::Failed,
            _ => Outcome::Denied,
        };
        self.trail()
            .about(Vec::new(), studies)
            .record(op, object, outcome, &denial.to_string());
        // Every refusal is 0124H but one: what could not be asked may be asked again.
        let rsp = match denial.kind() {
            DenialKind::Unavailable => cmd.response(
                command::unavailable_status(cmd.field),
                Some("PACS or EHR unavailable"),
            ),
            _ => cmd.response(command::STATUS_NOT_AUTHORIZED, Some("not authorized")),
        };
        self.reply(pc_id, &rsp, None).await
    }

    /// Answers a request whose identifier the strict reader refused: A900H, nothing relayed.
    pub(crate) async fn bad_identifier(&mut self, pc_id: u8, cmd: &Command, v: &Violation) -> Flow {
        tracing::info!(assoc = self.id, violation = %v, "identifier refused by the strict reader");
        self.trail().record(
            Operation::DimseIdentifier,
            "",
            Outcome::Denied,
            &format!("malformed identifier: {v}"),
        );
        let rsp = cmd.response(
            command::STATUS_IDENTIFIER_MISMATCH,
            Some("identifier is not a well-formed data set"),
        );
        self.reply(pc_id, &rsp, None).await
    }

    /// The PACS failed during an operation: the client gets a failure status for it (never a
    /// success), then both associations end, since the upstream one is in an unknown state.
    pub(crate) async fn fail_upstream(&mut self, pc_id: u8, cmd: &Command, why: &str) -> Flow {
        let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some(why));
        let _ = self.client.send_message(pc_id, &rsp.encode(), None).await;
        self.abort_both().await
    }

    /// Sends a message to the client; a failure ends the association.
    pub(crate) async fn reply(
        &mut self,
        pc_id: u8,
        command: &Command,
        data: Option<&[u8]>,
    ) -> Flow {
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
    pub(crate) async fn relay_to_client(
        &mut self,
        pc_id: u8,
        command: &Command,
        data: Option<&[u8]>,
    ) -> Flow {
        self.relay_encoded(pc_id, &command.encode(), data).await
    }

    /// [`Association::relay_to_client`] with the command set already encoded.
    pub(crate) async fn relay_encoded(
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

    /// Releases the gateway's association to the PACS (A-ABORT when the PACS does not answer
    /// within `within`).
    pub(crate) async fn release_pacs(&mut self, within: Duration) {
        if let Err(e) = self.pacs.release(within).await {
            tracing::info!(assoc = self.id, reason = %e, "PACS release incomplete; aborted");
        }
    }

    /// Aborts the PACS association and opens a new one like it, so the client's association
    /// goes on (after an instance had to be broken off mid-stream). `false` when the PACS does
    /// not accept every context as before: the client's association cannot go on then.
    pub(crate) async fn renew_pacs(&mut self) -> bool {
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
        .tolerating_command_tail();
        if !same || peer_max != self.pacs.peer_max {
            pacs.abort().await;
            return false;
        }
        self.pacs = pacs;
        true
    }

    pub(crate) async fn abort_both(&mut self) -> Flow {
        self.client.abort().await;
        self.pacs.abort().await;
        Flow::End
    }

    /// Ends the association because `side` did not send a data set whole: that peer's A-ABORT
    /// says why when it broke a rule (a command inside the data set, say), the other's reason 0.
    pub(crate) async fn broken(&mut self, side: Side, e: &Broken) -> Flow {
        tracing::info!(assoc = self.id, peer = ?side, reason = %e, "data set broken off; aborting");
        self.abort_for(side, e.abort_reason()).await
    }

    /// Aborts `side` with `reason` and the other leg with reason 0.
    async fn abort_for(&mut self, side: Side, reason: AbortRQServiceProviderReason) -> Flow {
        match side {
            Side::Client => {
                self.client.abort_with(reason).await;
                self.pacs.abort().await;
            }
            Side::Pacs => {
                self.pacs.abort_with(reason).await;
                self.client.abort().await;
            }
        }
        Flow::End
    }

    /// Ends the association because a peer broke the protocol during `during`: the peer is
    /// told why by its A-ABORT reason, the other peer is aborted too.
    pub(crate) async fn protocol_violation(
        &mut self,
        side: Side,
        what: Misbehaviour,
        during: Option<Operation>,
    ) -> Flow {
        let during = during.map_or("", Operation::name);
        tracing::warn!(assoc = self.id, peer = ?side, violation = %what, during, "protocol violation; aborting");
        self.abort_for(side, what.abort_reason()).await
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
    pub(crate) async fn read_identifier(
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
            Err(e) => return Err(self.broken(Side::Client, &e).await),
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
    pub(crate) async fn pacs_next(&mut self) -> Option<Incoming> {
        tokio::time::timeout(self.ctx.cfg.limits.upstream_timeout, self.pacs.next())
            .await
            .ok()
    }
}
