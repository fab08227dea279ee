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
//!
//! For a PACS without C-GET (`pacs.retrieve = "c-move"`) the same request goes to the PACS as a
//! C-MOVE to the gateway itself (negotiated in the C-GET's place); the receiver hands each
//! sub-operation's instance here as it arrives, and it reaches the client as a C-STORE on its
//! own association, read strictly and checked exactly as a relayed one.

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
    if s.ctx.cfg.pacs.retrieve == crate::config::Retrieve::Move {
        return by_move::handle(s, pc_id, cmd, identifier, allowed).await;
    }
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

/// A client's C-GET served by C-MOVE to the gateway's own receiver.
mod by_move {
    use super::*;
    use crate::dicom::head::{InstanceReader, MAX_HEAD};
    use crate::dimse::receiver::{Route, Sink};
    use crate::pacs::dimse::Retrieved;

    /// Items in flight from the receiver: the PACS waits (TCP) when they are full.
    const QUEUE: usize = 16;

    /// The instance being passed on.
    enum Current {
        None,
        /// Not passed on (no context of the client's for it, another patient's, unreadable):
        /// the rest of it is dropped.
        Skip,
        /// Its head is being read (nothing has gone to the client yet).
        Head {
            ctx: u8,
            command: Box<Command>,
            reader: Box<InstanceReader>,
            buffered: Vec<u8>,
        },
        /// Its command went to the client; the data follows.
        Sending {
            ctx: u8,
            message_id: u16,
            reader: Box<InstanceReader>,
            carry: Option<u8>,
        },
    }

    struct Run<'a> {
        allowed: &'a Permit,
        tally: Tally,
        current: Current,
        next_id: u16,
        /// The C-MOVE's message ID toward the PACS (a C-CANCEL names it).
        move_id: u16,
        pc_id: u8,
    }

    pub(super) async fn handle(
        s: &mut Association,
        pc_id: u8,
        cmd: Command,
        identifier: Vec<u8>,
        allowed: Permit,
    ) -> Flow {
        let limits = s.ctx.cfg.limits.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
        let Some(guard) = s.ctx.moves.register(Route::to(Sink::Channel(tx), s.id)) else {
            let rsp = cmd.response(
                command::STATUS_OUT_OF_RESOURCES_SUBOPS,
                Some("too many moves in flight"),
            );
            return s.reply(pc_id, &rsp, None).await;
        };
        let class = cmd.affected_sop_class.as_deref().unwrap_or_default();
        let Some(move_class) = crate::dicom::negotiation::move_of_get(class) else {
            let rsp = cmd.response(
                command::STATUS_UNABLE_TO_PROCESS,
                Some("the PACS has no C-GET and no C-MOVE for this model"),
            );
            return s.reply(pc_id, &rsp, None).await;
        };
        let mut up = Command::request(command::C_MOVE_RQ, guard.id, move_class, true);
        up.priority = cmd.priority;
        up.move_destination = Some(s.ctx.cfg.pacs.calling_ae_title.clone());
        if let Err(e) = s
            .pacs
            .send_message(pc_id, &up.encode(), Some(&identifier))
            .await
        {
            tracing::warn!(assoc = s.id, reason = %e, "cannot send C-MOVE to the PACS");
            return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
        }
        let mut run = Run {
            allowed: &allowed,
            tally: Tally::default(),
            current: Current::None,
            next_id: 1,
            move_id: guard.id,
            pc_id,
        };
        let mut quiet_until = tokio::time::Instant::now() + limits.upstream_timeout;
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else {
                        return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                    };
                    quiet_until = tokio::time::Instant::now() + limits.upstream_timeout;
                    if let Err(flow) = run.item(s, item).await {
                        return flow;
                    }
                }
                i = s.pacs.next() => {
                    let (rpc, rsp) = match i {
                        Incoming::Message(Event::Command { pc_id: rpc, command }) => (rpc, command),
                        other => {
                            tracing::warn!(assoc = s.id, what = ?other, "PACS went away during C-MOVE");
                            return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                        }
                    };
                    if rpc != pc_id
                        || rsp.field != command::C_MOVE_RSP
                        || rsp.responded_to != Some(guard.id)
                    {
                        return s
                            .protocol_violation(Side::Pacs, Misbehaviour::UnexpectedMessage, Some(Operation::Get))
                            .await;
                    }
                    quiet_until = tokio::time::Instant::now() + limits.upstream_timeout;
                    if rsp.has_data_set()
                        && s.pacs.discard_data(rpc, limits.upstream_timeout).await.is_err()
                    {
                        return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                    }
                    let status = rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
                    let mut out = cmd.response(status, None);
                    if command::is_pending(status) {
                        out.remaining = rsp.remaining;
                        let t = run.tally;
                        let n = |v: usize| v.min(u16::MAX as usize) as u16;
                        out.completed = Some(n(t.completed));
                        out.failed = Some(n(t.failed));
                        out.warning = Some(n(t.warning));
                        if let Flow::End = s.reply(pc_id, &out, None).await {
                            return Flow::End;
                        }
                        continue;
                    }
                    // Every sub-operation was answered before the final response: what is
                    // queued is all there is.
                    let at_receiver = guard.route.tally();
                    let refused_at_receiver = at_receiver.failed;
                    run.tally.withheld += at_receiver.withheld;
                    drop(guard);
                    while let Ok(item) = rx.try_recv() {
                        if let Err(flow) = run.item(s, item).await {
                            return flow;
                        }
                    }
                    if !matches!(run.current, Current::None | Current::Skip) {
                        // An instance cut short: the client holds part of it.
                        return s.abort_both().await;
                    }
                    // Failed: what the gateway withheld here, what the receiver refused, and
                    // what the PACS could not move at all (each counted once).
                    run.tally.failed += refused_at_receiver + rsp.failed.unwrap_or(0) as usize;
                    out.failed = None;
                    run.tally.apply_final(&mut out);
                    let flow = s.reply(pc_id, &out, None).await;
                    return finish(s, flow, run.tally.withheld);
                }
                c = s.client.next() => {
                    if let Some(flow) = run.cancel(s, c).await {
                        return flow;
                    }
                }
                _ = tokio::time::sleep_until(quiet_until) => {
                    tracing::warn!(assoc = s.id, "PACS went silent during C-MOVE");
                    return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
                }
            }
        }
    }

    impl Run<'_> {
        /// A C-CANCEL from the client names its C-GET: the PACS is sent one for the C-MOVE.
        async fn cancel(&self, s: &mut Association, c: Incoming) -> Option<Flow> {
            match c {
                Incoming::Message(Event::Command { pc_id, command })
                    if command.field == command::C_CANCEL_RQ && pc_id == self.pc_id =>
                {
                    let mut cancel = *command;
                    cancel.responded_to = Some(self.move_id);
                    match s.pacs.send_message(pc_id, &cancel.encode(), None).await {
                        Ok(()) => None,
                        Err(_) => Some(s.abort_both().await),
                    }
                }
                other => relay_cancel(s, self.pc_id, other).await,
            }
        }

        /// One item from the receiver: an instance starts, or a fragment of it.
        async fn item(&mut self, s: &mut Association, item: Retrieved) -> Result<(), Flow> {
            match item {
                Retrieved::Instance {
                    sop_class,
                    sop_instance,
                    transfer_syntax,
                } => {
                    // One instance at a time, each whole: a new one while another is open is
                    // one cut short.
                    if !matches!(self.current, Current::None) {
                        return Err(s.abort_both().await);
                    }
                    // The client's storage context for this class and syntax (the PACS chose
                    // the syntax; the gateway does not convert).
                    let ctx = s.contexts.iter().find(|(_, c)| {
                        c.abstract_syntax == sop_class
                            && c.transfer_syntax == transfer_syntax
                            && Service::of(&c.abstract_syntax) == Service::Storage
                    });
                    let (Some((&ctx, _)), Some(syntax)) =
                        (ctx, crate::dicom::syntax::readable(&transfer_syntax))
                    else {
                        self.tally.failed += 1;
                        self.current = Current::Skip;
                        return Ok(());
                    };
                    let mut command = Command::request(command::C_STORE_RQ, 0, &sop_class, true);
                    command.affected_sop_instance = Some(sop_instance);
                    command.move_originator_ae = None;
                    self.current = Current::Head {
                        ctx,
                        command: Box::new(command),
                        reader: Box::new(InstanceReader::dataset(
                            syntax,
                            s.ctx.cfg.limits.reader(),
                        )),
                        buffered: Vec::new(),
                    };
                    Ok(())
                }
                Retrieved::Data { bytes, last } => self.data(s, &bytes, last).await,
                // An instance the receiver could not hand on whole.
                Retrieved::Failed(_) => Err(s.abort_both().await),
                Retrieved::Done { .. } => Ok(()),
            }
        }

        async fn data(
            &mut self,
            s: &mut Association,
            bytes: &[u8],
            last: bool,
        ) -> Result<(), Flow> {
            match std::mem::replace(&mut self.current, Current::None) {
                Current::None => Err(s.abort_both().await),
                Current::Skip => {
                    if !last {
                        self.current = Current::Skip;
                    }
                    Ok(())
                }
                Current::Head {
                    ctx,
                    mut command,
                    mut reader,
                    mut buffered,
                } => {
                    let read = reader
                        .feed(bytes)
                        .and_then(|()| if last { reader.finish() } else { Ok(()) })
                        .and_then(|()| reader.head());
                    let head = match read {
                        Ok(Some(h)) => h,
                        Ok(None) if !last && buffered.len() + bytes.len() <= MAX_HEAD => {
                            buffered.extend_from_slice(bytes);
                            self.current = Current::Head {
                                ctx,
                                command,
                                reader,
                                buffered,
                            };
                            return Ok(());
                        }
                        _ => {
                            tracing::warn!(
                                assoc = s.id,
                                "PACS moved an instance the strict reader refused; withheld"
                            );
                            self.withhold(last);
                            return Ok(());
                        }
                    };
                    if !self.allowed.admits_instance(&InstanceId::of(&head))
                        || head.sop_instance != command.affected_sop_instance
                    {
                        tracing::warn!(
                            assoc = s.id,
                            "PACS moved an instance of another patient, or one not requested; withheld"
                        );
                        self.withhold(last);
                        return Ok(());
                    }
                    let message_id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1).max(1);
                    command.message_id = Some(message_id);
                    if let Err(e) = s.client.send_command(ctx, &command.encode()).await {
                        tracing::warn!(assoc = s.id, reason = %e, "client failed during a sub-operation");
                        return Err(s.abort_both().await);
                    }
                    buffered.extend_from_slice(bytes);
                    self.current = Current::Sending {
                        ctx,
                        message_id,
                        reader,
                        carry: None,
                    };
                    self.send(s, &buffered, last, false).await
                }
                sending @ Current::Sending { .. } => {
                    self.current = sending;
                    self.send(s, bytes, last, true).await
                }
            }
        }

        fn withhold(&mut self, last: bool) {
            self.tally.failed += 1;
            self.tally.withheld += 1;
            self.current = if last { Current::None } else { Current::Skip };
        }

        /// Sends data of the instance whose command went out; `read`: it still has to be read
        /// (the head's bytes were). After the last, the client's answer is awaited.
        async fn send(
            &mut self,
            s: &mut Association,
            bytes: &[u8],
            last: bool,
            read: bool,
        ) -> Result<(), Flow> {
            let Current::Sending {
                ctx,
                message_id,
                reader,
                carry,
            } = &mut self.current
            else {
                return Err(s.abort_both().await);
            };
            if read
                && reader
                    .feed(bytes)
                    .and_then(|()| if last { reader.finish() } else { Ok(()) })
                    .is_err()
            {
                // The client holds part of an instance: the association cannot go on.
                tracing::warn!(
                    assoc = s.id,
                    "PACS moved an instance whose tail the strict reader refused"
                );
                return Err(s.abort_both().await);
            }
            let (ctx, message_id) = (*ctx, *message_id);
            s.client.queue_even(ctx, bytes, last, carry);
            if let Err(e) = s.client.flush().await {
                tracing::warn!(assoc = s.id, reason = %e, "client failed during a sub-operation");
                return Err(s.abort_both().await);
            }
            crate::metrics::relayed("dimse", "retrieve", bytes.len() as u64);
            if !last {
                return Ok(());
            }
            self.current = Current::None;
            // The client's answer; a cancel may come first.
            loop {
                let c = match tokio::time::timeout(s.ctx.cfg.limits.idle_timeout, s.client.next())
                    .await
                {
                    Ok(c) => c,
                    Err(_) => return Err(s.abort_both().await),
                };
                match c {
                    Incoming::Message(Event::Command {
                        pc_id: cpc,
                        command: rsp,
                    }) if rsp.field == command::C_STORE_RSP => {
                        if cpc != ctx || rsp.has_data_set() || rsp.responded_to != Some(message_id)
                        {
                            return Err(s
                                .protocol_violation(
                                    Side::Client,
                                    Misbehaviour::UnexpectedMessage,
                                    Some(Operation::Get),
                                )
                                .await);
                        }
                        self.tally
                            .count(rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS));
                        return Ok(());
                    }
                    other => {
                        if let Some(flow) = self.cancel(s, other).await {
                            return Err(flow);
                        }
                    }
                }
            }
        }
    }
}
