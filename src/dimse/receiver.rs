//! C-MOVE routing: the gateway's own store SCP (`pacs.receive_listen`), where the PACS delivers
//! the sub-operations of every C-MOVE the gateway asked for, and the registry that ties each
//! sub-operation to its C-MOVE.
//!
//! The gateway sends the PACS each C-MOVE under a message ID of its own, with itself as the
//! destination; the PACS's C-STORE sub-operations name that ID as Move Originator Message ID.
//! Each arriving instance is matched to its move, checked once more against the caller's
//! patient, and streamed to the real destination as it arrives; the destination's answer is the
//! PACS's answer, so the PACS's sub-operation counts are true end to end. The SCP accepts
//! associations only from the PACS (its AE title and address). Must not decide access itself:
//! routes carry the policy core's patient filter.

use super::command::{self, Command, Set};
use super::instance::{self, HeadError, StreamError};
use super::message::Event;
use super::peer::{Incoming, Peer, read_pdu, write_pdu};
use super::{Ctx, PDU_SLACK, assoc, send_reject};
use crate::audit::{self, Outcome};
use crate::config::Destination;
use crate::policy::Allowed;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// C-MOVEs in flight at once through the gateway; more are refused (out of resources).
const MAX_MOVES: usize = 1024;

/// Where the instances of one C-MOVE go, and what they must be.
pub struct Route {
    pub destination: Destination,
    pub allowed: Allowed,
    /// The client's AE title and message ID, shown to the destination as the move originator.
    pub client_ae: String,
    pub client_message_id: u16,
    /// The client association, for logs.
    pub session: u64,
    /// Instances refused because they were another patient's (or unreadable).
    pub withheld: AtomicUsize,
    /// Sub-operations as answered to the PACS: the final response is reconciled with these.
    pub completed: AtomicUsize,
    pub warning: AtomicUsize,
    pub failed: AtomicUsize,
}

impl Route {
    /// Counts the status answered to the PACS for one sub-operation.
    fn count(&self, status: u16) {
        let c = match status {
            0x0000 => &self.completed,
            0x0001 | 0x0107 | 0x0116 => &self.warning,
            s if s & 0xF000 == 0xB000 => &self.warning,
            _ => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The C-MOVEs in flight, by the message ID the gateway used toward the PACS.
#[derive(Default)]
pub struct MoveRegistry {
    routes: Mutex<HashMap<u16, Arc<Route>>>,
    next: AtomicU16,
}

/// Keeps a route registered; dropping it ends the route.
pub struct RouteGuard {
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

impl MoveRegistry {
    /// Registers a route under a fresh message ID; `None` when too many moves are in flight.
    pub fn register(self: &Arc<Self>, route: Route) -> Option<RouteGuard> {
        let mut m = self.routes.lock().ok()?;
        if m.len() >= MAX_MOVES {
            return None;
        }
        let route = Arc::new(route);
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
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
}

/// Accepts the PACS's sub-operation associations until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(ctx.cfg.limits.max_associations));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((stream, addr)) = r else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%addr, "receiver: association limit reached; closing");
                    continue;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    receive(stream, addr, ctx).await;
                });
            }
            _ = shutdown.changed() => break,
        }
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

/// Whether a connection comes from the PACS: its address must be one of the PACS host's.
async fn from_pacs(ctx: &Ctx, addr: SocketAddr) -> bool {
    match tokio::net::lookup_host(&ctx.cfg.pacs.address).await {
        Ok(addrs) => addrs.into_iter().any(|a| a.ip() == addr.ip()),
        Err(_) => false,
    }
}

async fn receive(mut stream: TcpStream, addr: SocketAddr, ctx: Arc<Ctx>) {
    let limits = &ctx.cfg.limits;
    let rq = match tokio::time::timeout(
        limits.association_request_timeout,
        read_pdu(&mut stream, limits.max_association_request_bytes),
    )
    .await
    {
        Ok(Ok(Pdu::AssociationRQ(rq))) => rq,
        _ => return,
    };
    let pacs = &ctx.cfg.pacs;
    if rq.calling_ae_title.trim() != pacs.ae_title.trim() || !from_pacs(&ctx, addr).await {
        tracing::warn!(%addr, calling_ae = %rq.calling_ae_title.trim(), "receiver: association not from the PACS; rejected");
        send_reject(&mut stream, assoc::Refusal::CallingAeTitle).await;
        return;
    }
    if rq.called_ae_title.trim() != pacs.calling_ae_title.trim() {
        send_reject(&mut stream, assoc::Refusal::CalledAeTitle).await;
        return;
    }
    let our_max = limits.max_pdu_length;
    let mut results = Vec::new();
    let mut accepted: Vec<PresentationContextProposed> = Vec::new();
    for pc in &rq.presentation_contexts {
        // Keep the PACS's first known transfer syntax, so instances pass through unchanged.
        let ts = pc.transfer_syntaxes.iter().find(|t| {
            TransferSyntaxRegistry
                .get(t.trim_end_matches('\0'))
                .is_some()
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
    );
    let mut r = Receiver {
        ctx: ctx.clone(),
        pacs: pacs_peer,
        accepted,
        dest: None,
    };
    r.run().await;
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

impl Receiver {
    async fn run(&mut self) {
        let idle = self.ctx.cfg.limits.idle_timeout;
        loop {
            let next = match tokio::time::timeout(idle, self.pacs.next()).await {
                Ok(n) => n,
                Err(_) => break,
            };
            match next {
                Incoming::Message(Event::Command { pc_id, bytes }) => {
                    let cmd = match Command::decode(bytes) {
                        Ok(c) => c,
                        Err(_) => break,
                    };
                    self.pacs.expect_data(pc_id, cmd.has_data_set());
                    let ok = match cmd.field() {
                        Some(command::C_STORE_RQ) => self.store(pc_id, cmd).await,
                        Some(command::C_ECHO_RQ) => {
                            let r = cmd.response(command::STATUS_SUCCESS, None);
                            self.pacs.send_message(pc_id, &r, None).await.is_ok()
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
    async fn answer(
        &mut self,
        route: Option<&Route>,
        pc_id: u8,
        cmd: &Command,
        status: u16,
        comment: &str,
    ) -> bool {
        if let Some(r) = route {
            r.count(status);
        }
        let r = cmd.response(status, Some(comment));
        self.pacs.send_message(pc_id, &r, None).await.is_ok()
    }

    /// One sub-operation; false when the PACS association cannot go on.
    async fn store(&mut self, pc_id: u8, cmd: Command) -> bool {
        let wait = self.ctx.cfg.limits.upstream_timeout;
        let Some(ts) = self.accepted.iter().find(|p| p.id == pc_id).and_then(|p| {
            TransferSyntaxRegistry.get(p.transfer_syntaxes[0].trim_end_matches('\0'))
        }) else {
            return false;
        };
        let route_id = cmd.move_originator_id();
        let route = route_id.and_then(|id| self.ctx.moves.get(id));
        let (Some(route_id), Some(route)) = (route_id, route) else {
            tracing::warn!("receiver: an instance for no C-MOVE of the gateway; refused");
            return instance::drain(&mut self.pacs, pc_id, wait).await.is_ok()
                && self
                    .answer(
                        None,
                        pc_id,
                        &cmd,
                        command::STATUS_NOT_AUTHORIZED,
                        "no such move",
                    )
                    .await;
        };
        let head = match instance::read_head(&mut self.pacs, pc_id, ts, wait).await {
            Ok(h) => h,
            Err(HeadError::Peer(_)) => return false,
            Err(HeadError::Unreadable { last }) => {
                route.withheld.fetch_add(1, Ordering::Relaxed);
                return (last || instance::drain(&mut self.pacs, pc_id, wait).await.is_ok())
                    && self
                        .answer(
                            Some(&route),
                            pc_id,
                            &cmd,
                            command::STATUS_CANNOT_UNDERSTAND,
                            "data set cannot be read",
                        )
                        .await;
            }
        };
        if !route.allowed.admits_instance(
            head.patient_id.as_deref(),
            head.issuer.as_deref(),
            head.study_uid.as_deref(),
        ) {
            route.withheld.fetch_add(1, Ordering::Relaxed);
            audit::record(
                "dimse",
                route.session,
                None,
                "C-MOVE sub-operation",
                Outcome::Anomaly,
                "the PACS sent an instance of another patient; withheld",
            );
            return (head.last || instance::drain(&mut self.pacs, pc_id, wait).await.is_ok())
                && self
                    .answer(
                        Some(&route),
                        pc_id,
                        &cmd,
                        command::STATUS_NOT_AUTHORIZED,
                        "not authorized",
                    )
                    .await;
        }
        if !self.destination_ready(route_id, &route).await || !self.dest_accepts(pc_id) {
            return (head.last || instance::drain(&mut self.pacs, pc_id, wait).await.is_ok())
                && self
                    .answer(
                        Some(&route),
                        pc_id,
                        &cmd,
                        command::STATUS_UNABLE_TO_PROCESS,
                        "destination unavailable",
                    )
                    .await;
        }
        let forward = match command::rewrite(
            &cmd.raw,
            &[
                (
                    tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE,
                    Set::Ae(&route.client_ae),
                ),
                (
                    tags::MOVE_ORIGINATOR_MESSAGE_ID,
                    Set::Us(route.client_message_id),
                ),
            ],
        ) {
            Ok(f) => f,
            Err(_) => return false,
        };
        let Some(dest) = self.dest.as_mut().and_then(|d| d.peer.as_mut()) else {
            return false;
        };
        match instance::stream(&mut self.pacs, dest, pc_id, &forward, head, wait).await {
            Ok(()) => {}
            Err(StreamError::From(_)) => {
                dest.abort().await;
                self.dest = None;
                return false;
            }
            Err(StreamError::To(e)) => {
                tracing::warn!(reason = %e, "destination failed during a C-MOVE sub-operation");
                self.dest = None;
                return instance::drain(&mut self.pacs, pc_id, wait).await.is_ok()
                    && self
                        .answer(
                            Some(&route),
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
            Ok(Incoming::Message(Event::Command { pc_id: rpc, bytes })) if rpc == pc_id => {
                Command::decode(bytes)
                    .ok()
                    .filter(|r| r.field() == Some(command::C_STORE_RSP) && !r.has_data_set())
            }
            _ => None,
        };
        match answer {
            Some(rsp) => {
                dest.expect_data(pc_id, false);
                route.count(rsp.status().unwrap_or(command::STATUS_UNABLE_TO_PROCESS));
                self.pacs.send_message(pc_id, &rsp.raw, None).await.is_ok()
            }
            None => {
                dest.abort().await;
                self.dest = None;
                self.answer(
                    Some(&route),
                    pc_id,
                    &cmd,
                    command::STATUS_UNABLE_TO_PROCESS,
                    "destination failed",
                )
                .await
            }
        }
    }

    fn dest_accepts(&self, pc_id: u8) -> bool {
        self.dest
            .as_ref()
            .is_some_and(|d| d.accepted.contains(&pc_id))
    }

    /// Opens the destination association for a route, once; a failure is remembered so the
    /// route's other instances fail fast.
    async fn destination_ready(&mut self, route_id: u16, route: &Route) -> bool {
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
                                    && p.transfer_syntaxes[0].trim_end_matches('\0')
                                        == r.transfer_syntax.trim_end_matches('\0')
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
        if p.send_pdu(&Pdu::ReleaseRQ).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match p.next().await {
                    Incoming::ReleaseRp | Incoming::Abort | Incoming::Gone(_) => break,
                    _ => continue,
                }
            }
        })
        .await;
        p.close().await;
    }
}
