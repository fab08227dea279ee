//! C-MOVE routing: the gateway's own store SCP (`pacs.receive_listen`), where the PACS delivers
//! the sub-operations of every C-MOVE the gateway asked for, and the registry that ties each
//! sub-operation to its C-MOVE.
//!
//! The gateway sends the PACS each C-MOVE under a message ID of its own, drawn at random over
//! the whole 16-bit space, with itself as the destination; the PACS's C-STORE sub-operations
//! name that ID as Move Originator Message ID. Each arriving instance is matched to its move,
//! read by the strict reader, checked against what the move asked for (the caller's patient,
//! and the study, series or instance UIDs the request named; each instance once; never more
//! than the PACS has announced), and streamed to the real destination as it arrives; the
//! destination's answer is the PACS's answer. The SCP accepts associations only from the PACS
//! (its AE title and address). Must not decide access itself: routes carry the policy core's
//! decision.

use super::instance::{self, HeadError, StreamError};
use super::listener::Pending;
use super::listener::Stop;
use super::retrieve::Tally;
use super::{Ctx, read_request, send_reject};
use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::config::Destination;
use crate::dicom::command::{self, Command};
use crate::dicom::message::Event;
use crate::dicom::negotiation as assoc;
use crate::dicom::pdu::{PDU_SLACK, write_pdu};
use crate::dicom::peer::{Incoming, Peer, Stream};
use crate::dicom::syntax;
use crate::logtext::Clean;
use crate::policy::{InstanceId, Permit};
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// C-MOVEs in flight at once through the gateway; more are refused (out of resources).
const MAX_MOVES: usize = 1024;

/// Where a client's C-MOVE sends its instances, and what they must be.
pub struct Forward {
    pub destination: Destination,
    /// The policy core's decision: every instance must pass its `admits_instance`.
    pub allowed: Permit,
    /// The client's AE title and message ID, shown to the destination as the move originator.
    pub client_ae: String,
    pub client_message_id: u16,
}

/// Where the instances of one C-MOVE go.
pub enum Sink {
    /// A client's C-MOVE: to a destination of `[[destinations]]`, each instance judged here.
    Forward(Box<Forward>),
    /// A retrieval of the gateway's own (DICOMweb by translation from a PACS without C-GET):
    /// each instance goes into the channel as it arrives, as a C-GET's would, and its consumer
    /// judges it (the same per-instance check as every retrieval path).
    Channel(tokio::sync::mpsc::Sender<crate::pacs::dimse::Retrieved>),
}

/// Where the instances of one C-MOVE go, and what they must be.
pub struct Route {
    pub sink: Sink,
    /// The client association, for logs.
    pub session: u64,
    /// Sub-operations as answered to the PACS: the final response is reconciled with these.
    pub tally: Mutex<Tally>,
    /// The number of sub-operations the PACS announced (remaining + completed + failed +
    /// warning in a pending response); 0 while it has announced none. No more are delivered.
    pub announced: AtomicUsize,
    /// SOP Instance UIDs delivered or refused so far: each instance is taken once.
    seen: Mutex<HashSet<String>>,
    /// Held for the whole of one instance's delivery into a channel: two associations of the
    /// PACS delivering into one route at once cannot interleave their fragments.
    delivering: tokio::sync::Mutex<()>,
}

impl Route {
    pub fn new(
        destination: Destination,
        allowed: Permit,
        client_ae: String,
        client_message_id: u16,
        session: u64,
    ) -> Route {
        Route::to(
            Sink::Forward(Box::new(Forward {
                destination,
                allowed,
                client_ae,
                client_message_id,
            })),
            session,
        )
    }

    pub fn to(sink: Sink, session: u64) -> Route {
        Route {
            sink,
            session,
            tally: Mutex::default(),
            announced: AtomicUsize::new(0),
            seen: Mutex::default(),
            delivering: tokio::sync::Mutex::new(()),
        }
    }

    fn count(&self, status: u16) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(status);
    }

    fn withhold(&self) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.failed += 1;
        t.withheld += 1;
    }

    pub(crate) fn tally(&self) -> Tally {
        *self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an instance for delivery: `false` when it was seen already or the PACS's
    /// announced count is reached.
    fn take(&self, sop_instance: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let announced = self.announced.load(Ordering::Relaxed);
        if announced > 0 && seen.len() >= announced {
            return false;
        }
        seen.insert(sop_instance.to_string())
    }
}

/// The C-MOVEs in flight, by the message ID the gateway used toward the PACS.
#[derive(Default)]
pub struct MoveRegistry {
    routes: Mutex<HashMap<u16, Arc<Route>>>,
}

/// Keeps a route registered; dropping it ends the route.
pub(crate) struct RouteGuard {
    registry: Arc<MoveRegistry>,
    pub id: u16,
    pub route: Arc<Route>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.routes.lock() {
            m.remove(&self.id);
        }
    }
}

/// A message ID nobody can predict: a process that reaches the receiver cannot guess which
/// move an instance would join.
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    if !crate::crypto::random(&mut b) {
        // The system's generator failed: fall back on the clock's low bits (still not a
        // sequence a peer can follow).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (nanos ^ (nanos >> 16)) as u16;
    }
    u16::from_le_bytes(b)
}

impl MoveRegistry {
    /// Registers a route under a fresh random message ID; `None` when too many moves are in
    /// flight.
    pub(crate) fn register(self: &Arc<Self>, route: Route) -> Option<RouteGuard> {
        let mut m = self.routes.lock().ok()?;
        if m.len() >= MAX_MOVES {
            return None;
        }
        let route = Arc::new(route);
        loop {
            let id = random_id();
            if id != 0 && !m.contains_key(&id) {
                m.insert(id, route.clone());
                return Some(RouteGuard {
                    registry: self.clone(),
                    id,
                    route,
                });
            }
        }
    }

    pub fn get(&self, id: u16) -> Option<Arc<Route>> {
        self.routes.lock().ok()?.get(&id).cloned()
    }

    /// For a PACS that omits Move Originator Message ID: the route its instance belongs to
    /// when exactly one move is in flight (with two or more it cannot be known, and the
    /// instance is refused). Whatever route it joins, the instance is judged like every other.
    pub fn only(&self) -> Option<(u16, Arc<Route>)> {
        let m = self.routes.lock().ok()?;
        let mut it = m.iter();
        match (it.next(), it.next()) {
            (Some((id, r)), None) => Some((*id, r.clone())),
            _ => None,
        }
    }
}

/// Accepts the PACS's sub-operation associations until `shutdown`. With `tls`
/// (`pacs.tls.receive_tls_listen`), over DICOM TLS: the PACS must present a certificate that
/// `pacs.tls.ca_file` signed, which replaces the check of its address (a PACS behind NAT or on
/// several addresses is named by its certificate instead); the calling AE title is still
/// checked. A failed handshake is most often a PACS without such a certificate.
pub async fn serve(
    listener: TcpListener,
    current: watch::Receiver<Arc<Ctx>>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let ctx = current.borrow().clone();
    let admission = ctx.receiver_admission.clone();
    let (name, wait) = match tls {
        None => ("receiver", Duration::ZERO),
        Some(_) => ("receiver-tls", ctx.cfg.limits.association_request_timeout),
    };
    drop(ctx);
    super::listener::serve(
        name,
        listener,
        admission,
        tls,
        wait,
        shutdown,
        grace,
        move |stream, addr, pending, stop| {
            // The PACS's deliveries for moves in flight; each record names the move's association.
            let span = tracing::error_span!("delivery");
            let ctx = current.borrow().clone();
            tracing::Instrument::instrument(receive(stream, addr, pending, stop, ctx), span)
        },
    )
    .await
}

/// Whether a connection comes from the PACS: its address must be one of the PACS host's.
async fn from_pacs(ctx: &Ctx, addr: SocketAddr) -> bool {
    match tokio::net::lookup_host(&ctx.cfg.pacs.address).await {
        Ok(addrs) => addrs.into_iter().any(|a| a.ip() == addr.ip()),
        Err(_) => false,
    }
}

async fn receive(
    mut stream: Stream,
    addr: SocketAddr,
    pending: Pending,
    stop: Stop,
    ctx: Arc<Ctx>,
) {
    let limits = &ctx.cfg.limits;
    let Some(rq) = read_request(&mut stream, addr, 0, limits).await else {
        return;
    };
    drop(pending);
    let pacs = &ctx.cfg.pacs;
    // Over TLS the PACS is known by its certificate: signed by pacs.tls.ca_file (the handshake
    // checked that) and naming the PACS (a CA that signs for workstations too does not make
    // them the PACS). In plaintext its address is all.
    let by_certificate = match (&stream, &pacs.tls) {
        (Stream::Tls(_), Some(t)) => stream.peer_certifies(&t.server_name),
        _ => false,
    };
    if rq.calling_ae_title.trim() != pacs.ae_title.trim()
        || !(by_certificate || (matches!(stream, Stream::Plain(_)) && from_pacs(&ctx, addr).await))
    {
        tracing::warn!(%addr, calling_ae = %Clean(rq.calling_ae_title.trim()), "receiver: association not from the PACS; rejected");
        send_reject(&mut stream, assoc::Refusal::CallingAeTitle).await;
        return;
    }
    if rq.called_ae_title.trim() != pacs.calling_ae_title.trim() {
        send_reject(&mut stream, assoc::Refusal::CalledAeTitle).await;
        return;
    }
    let Some(_slot) = ctx.receiver_admission.try_association() else {
        send_reject(&mut stream, assoc::Refusal::Busy).await;
        return;
    };
    let our_max = limits.max_pdu_length;
    let mut results = Vec::new();
    let mut accepted: Vec<PresentationContextProposed> = Vec::new();
    for pc in &rq.presentation_contexts {
        // Explicit VR Little Endian when offered (what DICOMweb answers by default and what
        // clients most often accept), else the PACS's first syntax the strict reader decodes,
        // so instances pass unchanged.
        let ts = pc
            .transfer_syntaxes
            .iter()
            .find(|t| t.trim_end_matches('\0') == syntax::EXPLICIT_VR_LITTLE_ENDIAN)
            .or_else(|| {
                pc.transfer_syntaxes
                    .iter()
                    .find(|t| syntax::readable(t).is_some())
            });
        match ts {
            Some(t) => {
                results.push(PresentationContextResult {
                    id: pc.id,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: t.clone(),
                });
                accepted.push(PresentationContextProposed {
                    id: pc.id,
                    abstract_syntax: pc.abstract_syntax.clone(),
                    transfer_syntaxes: vec![t.clone()],
                });
            }
            None => results.push(PresentationContextResult {
                id: pc.id,
                reason: PresentationContextResultReason::TransferSyntaxesNotSupported,
                transfer_syntax: pc.transfer_syntaxes.first().cloned().unwrap_or_default(),
            }),
        }
    }
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: rq.application_context_name.clone(),
        presentation_contexts: results,
        user_variables: vec![
            UserVariableItem::MaxLength(our_max),
            UserVariableItem::ImplementationClassUID(assoc::IMPLEMENTATION_CLASS_UID.into()),
            UserVariableItem::ImplementationVersionName(assoc::IMPLEMENTATION_VERSION_NAME.into()),
        ],
    };
    if write_pdu(&mut stream, &Pdu::AssociationAC(ac))
        .await
        .is_err()
    {
        return;
    }
    let pacs_peer = Peer::new(
        "pacs",
        stream,
        our_max + PDU_SLACK,
        assoc::announced_max(&rq.user_variables),
    )
    .tolerating_command_tail();
    let mut r = Receiver {
        ctx: ctx.clone(),
        pacs: pacs_peer,
        accepted,
        dest: None,
    };
    // The PACS's sub-operations serve C-MOVEs the front end drains; once the drain time is
    // over, what is left is aborted on both legs.
    let mut stop = stop;
    let cut = tokio::select! {
        _ = r.run() => false,
        _ = stop.cut() => true,
    };
    if cut {
        tracing::warn!("drain time over during C-MOVE sub-operations; aborting both legs");
        if let Some(d) = r.dest.as_mut().and_then(|d| d.peer.as_mut()) {
            d.abort().await;
        }
        r.pacs.abort().await;
    }
}

/// The association to a destination, opened on the first instance of a route.
struct DestinationLeg {
    route_id: u16,
    peer: Option<Peer>,
    /// Contexts the destination accepted (ids as the PACS's).
    accepted: Vec<u8>,
}

struct Receiver {
    ctx: Arc<Ctx>,
    pacs: Peer,
    /// The contexts accepted from the PACS, proposed unchanged to destinations.
    accepted: Vec<PresentationContextProposed>,
    dest: Option<DestinationLeg>,
}

/// The status the PACS is given for an instance the gateway withholds: a warning (B006,
/// Elements Discarded). A failure status makes some PACS (Orthanc) end the whole move at once,
/// taking the caller's own instances with it; the client learns the truth from the gateway's
/// counts, where the instance is failed.
const WITHHELD_TO_PACS: u16 = 0xB006;

impl Receiver {
    async fn run(&mut self) {
        let idle = self.ctx.cfg.limits.idle_timeout;
        loop {
            let next = match tokio::time::timeout(idle, self.pacs.next()).await {
                Ok(n) => n,
                Err(_) => break,
            };
            match next {
                Incoming::Message(Event::Command {
                    pc_id,
                    command: cmd,
                }) => {
                    let ok = match cmd.field {
                        command::C_STORE_RQ if cmd.has_data_set() => self.store(pc_id, *cmd).await,
                        command::C_ECHO_RQ if !cmd.has_data_set() => {
                            let r = cmd.response(command::STATUS_SUCCESS, None);
                            self.pacs
                                .send_message(pc_id, &r.encode(), None)
                                .await
                                .is_ok()
                        }
                        _ => false,
                    };
                    if !ok {
                        break;
                    }
                }
                Incoming::ReleaseRq => {
                    self.close_destination().await;
                    let _ = self.pacs.send_pdu(&Pdu::ReleaseRP).await;
                    self.pacs.close().await;
                    return;
                }
                _ => break,
            }
        }
        if let Some(mut d) = self.dest.take()
            && let Some(p) = d.peer.as_mut()
        {
            p.abort().await;
        }
        self.pacs.abort().await;
    }

    /// Answers the PACS for a sub-operation; false when the PACS association is broken.
    async fn answer(&mut self, pc_id: u8, cmd: &Command, status: u16, comment: &str) -> bool {
        let r = cmd.response(status, Some(comment));
        self.pacs
            .send_message(pc_id, &r.encode(), None)
            .await
            .is_ok()
    }

    /// Refuses one instance: drains what is left of it and answers the PACS.
    async fn refuse(
        &mut self,
        route: Option<&Route>,
        pc_id: u8,
        cmd: &Command,
        drained: bool,
        status: u16,
        comment: &str,
    ) -> bool {
        let wait = self.ctx.cfg.limits.upstream_timeout;
        if let Some(r) = route {
            r.withhold();
        }
        (drained || self.pacs.discard_data(pc_id, wait).await.is_ok())
            && self.answer(pc_id, cmd, status, comment).await
    }

    /// One sub-operation; false when the PACS association cannot go on.
    async fn store(&mut self, pc_id: u8, cmd: Command) -> bool {
        let wait = self.ctx.cfg.limits.upstream_timeout;
        let Some(syntax) = self
            .accepted
            .iter()
            .find(|p| p.id == pc_id)
            .and_then(|p| p.transfer_syntaxes.first())
            .and_then(|t| syntax::readable(t))
        else {
            return false;
        };
        let found = match cmd.move_originator_id {
            Some(id) => self.ctx.moves.get(id).map(|r| (id, r)),
            None => self.ctx.moves.only(),
        };
        let Some((route_id, route)) = found else {
            tracing::warn!("receiver: an instance for no C-MOVE of the gateway; refused");
            Trail::new(Channel::Dimse, 0, None).record(
                Operation::MoveInstance,
                "",
                Outcome::Anomaly,
                "an instance arrived for no move in flight; refused",
            );
            return self
                .refuse(
                    None,
                    pc_id,
                    &cmd,
                    false,
                    command::STATUS_NOT_AUTHORIZED,
                    "no such move",
                )
                .await;
        };
        let fwd = match &route.sink {
            Sink::Forward(f) => f,
            Sink::Channel(tx) => {
                let tx = tx.clone();
                let ts = self
                    .accepted
                    .iter()
                    .find(|p| p.id == pc_id)
                    .and_then(|p| p.transfer_syntaxes.first())
                    .map(|t| t.trim_end_matches('\0').to_string())
                    .unwrap_or_default();
                return self.deliver(pc_id, cmd, &route, &tx, ts).await;
            }
        };
        let limits = self.ctx.cfg.limits.reader();
        let head = match instance::read_head(&mut self.pacs, pc_id, syntax, limits, wait).await {
            Ok(h) => h,
            Err(HeadError::Peer(_)) => return false,
            Err(HeadError::Unreadable { last, why }) => {
                tracing::warn!(violation = %why, "receiver: an instance the strict reader refused; withheld");
                return self
                    .refuse(
                        Some(&route),
                        pc_id,
                        &cmd,
                        last,
                        WITHHELD_TO_PACS,
                        "data set is not well formed",
                    )
                    .await;
            }
        };
        let h = &head.head;
        let id = InstanceId::of(h);
        let admitted = fwd.allowed.admits_instance(&id)
            && h.sop_instance == cmd.affected_sop_instance
            && h.sop_instance.as_deref().is_some_and(|u| route.take(u));
        if !admitted {
            Trail::new(Channel::Dimse, route.session, None).record(
 Operation::MoveInstance, "", Outcome::Anomaly,
                "the PACS sent an instance of another patient, one not requested, or one too many; withheld",
            );
            return self
                .refuse(
                    Some(&route),
                    pc_id,
                    &cmd,
                    head.last,
                    WITHHELD_TO_PACS,
                    "not authorized",
                )
                .await;
        }
        if !self.destination_ready(route_id, fwd).await || !self.dest_accepts(pc_id) {
            route.count(command::STATUS_UNABLE_TO_PROCESS);
            return (head.last || self.pacs.discard_data(pc_id, wait).await.is_ok())
                && self
                    .answer(
                        pc_id,
                        &cmd,
                        command::STATUS_UNABLE_TO_PROCESS,
                        "destination unavailable",
                    )
                    .await;
        }
        let mut forward = cmd.clone();
        forward.move_originator_ae = Some(fwd.client_ae.clone());
        forward.move_originator_id = Some(fwd.client_message_id);
        let forward = forward.encode();
        let Some(dest) = self.dest.as_mut().and_then(|d| d.peer.as_mut()) else {
            return false;
        };
        match instance::stream(&mut self.pacs, dest, pc_id, &forward, head, wait).await {
            Ok(bytes) => crate::metrics::relayed("dimse", "retrieve", bytes),
            Err(StreamError::From(_)) => {
                dest.abort().await;
                self.dest = None;
                return false;
            }
            Err(StreamError::Invalid { why: v, ended }) => {
                // The destination holds part of an instance: its association is aborted, so
                // it never completes; the rest from the PACS is read and dropped.
                tracing::warn!(violation = %v, "receiver: the tail of an instance was refused");
                dest.abort().await;
                self.dest = None;
                return self
                    .refuse(
                        Some(&route),
                        pc_id,
                        &cmd,
                        ended,
                        WITHHELD_TO_PACS,
                        "data set is not well formed",
                    )
                    .await;
            }
            Err(StreamError::To(e)) => {
                tracing::warn!(reason = %e, "destination failed during a C-MOVE sub-operation");
                self.dest = None;
                route.count(command::STATUS_UNABLE_TO_PROCESS);
                return self.pacs.discard_data(pc_id, wait).await.is_ok()
                    && self
                        .answer(
                            pc_id,
                            &cmd,
                            command::STATUS_UNABLE_TO_PROCESS,
                            "destination failed",
                        )
                        .await;
            }
        }
        // The destination's answer is the PACS's answer.
        let answer = match tokio::time::timeout(wait, dest.next()).await {
            Ok(Incoming::Message(Event::Command {
                pc_id: rpc,
                command: r,
            })) if rpc == pc_id
                && r.field == command::C_STORE_RSP
                && !r.has_data_set()
                && r.responded_to == cmd.message_id =>
            {
                Some(r)
            }
            _ => None,
        };
        match answer {
            Some(rsp) => {
                route.count(rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS));
                self.pacs
                    .send_message(pc_id, &rsp.encode(), None)
                    .await
                    .is_ok()
            }
            None => {
                dest.abort().await;
                self.dest = None;
                route.count(command::STATUS_UNABLE_TO_PROCESS);
                self.answer(
                    pc_id,
                    &cmd,
                    command::STATUS_UNABLE_TO_PROCESS,
                    "destination failed",
                )
                .await
            }
        }
    }

    /// One instance of a retrieval of the gateway's own: handed on, fragment by fragment, as
    /// it arrives (the consumer reads it strictly and judges it); the PACS is answered once all
    /// of it was taken, so the retrieval's final answer comes after its last instance. A
    /// consumer that is gone or stalls (past `limits.idle_timeout`) fails the sub-operation.
    async fn deliver(
        &mut self,
        pc_id: u8,
        cmd: Command,
        route: &Route,
        tx: &tokio::sync::mpsc::Sender<crate::pacs::dimse::Retrieved>,
        transfer_syntax: String,
    ) -> bool {
        use crate::pacs::dimse::{DimseError, Retrieved};
        let wait = self.ctx.cfg.limits.upstream_timeout;
        // Longer than a consumer waits for its own client (a C-GET client's C-STORE-RSP), so a
        // slow client is that consumer's to judge.
        let consumer_wait = self.ctx.cfg.limits.idle_timeout * 2;
        let _one_at_a_time = route.delivering.lock().await;
        let (Some(class), Some(instance)) = (
            cmd.affected_sop_class.as_deref(),
            cmd.affected_sop_instance.as_deref(),
        ) else {
            return self
                .refuse(
                    Some(route),
                    pc_id,
                    &cmd,
                    false,
                    WITHHELD_TO_PACS,
                    "no SOP instance",
                )
                .await;
        };
        let instance = instance.trim_end_matches('\0').to_string();
        if !route.take(&instance) {
            return self
                .refuse(
                    Some(route),
                    pc_id,
                    &cmd,
                    false,
                    WITHHELD_TO_PACS,
                    "not requested",
                )
                .await;
        }
        let hand = |item| async {
            matches!(
                tokio::time::timeout(consumer_wait, tx.send(item)).await,
                Ok(Ok(()))
            )
        };
        let start = Retrieved::Instance {
            sop_class: class.trim_end_matches('\0').to_string(),
            sop_instance: instance,
            transfer_syntax,
        };
        let mut taken = hand(start).await;
        let mut ended = false;
        while taken {
            let (bytes, last) = match self.pacs.next_fragment(pc_id, wait).await {
                Ok(f) => f,
                Err(e) => {
                    // The consumer holds part of an instance: it must learn it is cut short.
                    let why = DimseError::BadAnswer(format!("an instance was cut short: {e}"));
                    let _ =
                        tokio::time::timeout(consumer_wait, tx.send(Retrieved::Failed(why))).await;
                    return false;
                }
            };
            taken = hand(Retrieved::Data { bytes, last }).await;
            if last {
                ended = true;
                break;
            }
        }
        if !taken {
            route.count(command::STATUS_UNABLE_TO_PROCESS);
            return (ended || self.pacs.discard_data(pc_id, wait).await.is_ok())
                && self
                    .answer(
                        pc_id,
                        &cmd,
                        command::STATUS_UNABLE_TO_PROCESS,
                        "retrieval ended",
                    )
                    .await;
        }
        route.count(command::STATUS_SUCCESS);
        self.answer(pc_id, &cmd, command::STATUS_SUCCESS, "").await
    }

    fn dest_accepts(&self, pc_id: u8) -> bool {
        self.dest
            .as_ref()
            .is_some_and(|d| d.accepted.contains(&pc_id))
    }

    /// Opens the destination association for a route, once; a failure is remembered so the
    /// route's other instances fail fast.
    async fn destination_ready(&mut self, route_id: u16, route: &Forward) -> bool {
        if let Some(d) = &self.dest {
            if d.route_id == route_id {
                return d.peer.is_some();
            }
            // Another move on the same PACS association: start over with its destination.
            self.close_destination().await;
        }
        let cfg = &self.ctx.cfg;
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: cfg.gateway.ae_title.clone(),
            called_ae_title: route.destination.ae_title.clone(),
            application_context_name: assoc::APPLICATION_CONTEXT.into(),
            presentation_contexts: self.accepted.clone(),
            user_variables: vec![
                UserVariableItem::MaxLength(cfg.limits.max_pdu_length),
                UserVariableItem::ImplementationClassUID(assoc::IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(
                    assoc::IMPLEMENTATION_VERSION_NAME.into(),
                ),
            ],
        };
        let target = crate::config::Pacs {
            ae_title: route.destination.ae_title.clone(),
            address: route.destination.address.clone(),
            dicomweb_url: None,
            calling_ae_title: cfg.gateway.ae_title.clone(),
            receive_listen: None,
            connect_timeout: cfg.pacs.connect_timeout,
            dimse_tls: route.destination.tls.clone(),
            tls: None,
            max_associations: cfg.pacs.max_associations,
            query_model: cfg.pacs.query_model,
            retrieve: cfg.pacs.retrieve,
        };
        let leg = match crate::pacs::associate(&target, rq, cfg.limits.upstream_timeout).await {
            Ok((stream, ac)) => {
                let accepted = ac
                    .presentation_contexts
                    .iter()
                    .filter(|r| {
                        r.reason == PresentationContextResultReason::Acceptance
                            && self.accepted.iter().any(|p| {
                                p.id == r.id
                                    && p.transfer_syntaxes.first().is_some_and(|t| {
                                        t.trim_end_matches('\0')
                                            == r.transfer_syntax.trim_end_matches('\0')
                                    })
                            })
                    })
                    .map(|r| r.id)
                    .collect();
                let peer = Peer::new(
                    "destination",
                    stream,
                    cfg.limits.max_pdu_length + PDU_SLACK,
                    assoc::announced_max(&ac.user_variables),
                );
                DestinationLeg {
                    route_id,
                    peer: Some(peer),
                    accepted,
                }
            }
            Err(e) => {
                tracing::warn!(destination = %route.destination.ae_title, reason = %e, "cannot reach the C-MOVE destination");
                DestinationLeg {
                    route_id,
                    peer: None,
                    accepted: Vec::new(),
                }
            }
        };
        let ok = leg.peer.is_some();
        self.dest = Some(leg);
        ok
    }

    async fn close_destination(&mut self) {
        let Some(mut d) = self.dest.take() else {
            return;
        };
        let Some(p) = d.peer.as_mut() else { return };
        let _ = p.release(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel_route() -> Route {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Route::to(Sink::Channel(tx), 0)
    }

    /// A PACS that omits Move Originator Message ID: its instance joins the move in flight
    /// only when there is exactly one; with none or several it belongs to none.
    #[test]
    fn an_instance_without_its_moves_id_joins_only_a_lone_move() {
        let reg = Arc::new(MoveRegistry::default());
        assert!(reg.only().is_none());
        let first = reg.register(channel_route()).expect("room for a move");
        let (id, _) = reg.only().expect("one move in flight");
        assert_eq!(id, first.id);
        let second = reg.register(channel_route()).expect("room for a move");
        assert!(reg.only().is_none(), "two moves: which one cannot be known");
        drop(first);
        assert_eq!(reg.only().map(|(id, _)| id), Some(second.id));
        drop(second);
        assert!(reg.only().is_none());
    }
}
