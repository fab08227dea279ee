//! The HTTP front end: DICOMweb (QIDO-RS, WADO-RS) under `{public_url}/dicom-web` with bearer
//! tokens, FHIR ImagingStudy search, the token endpoint of the gateway's own authorization
//! server, the discovery documents, and `/healthz`.
//!
//! Owns: the HTTP front end's limits (concurrent requests, request time; connections in
//! [`listener`]), routing, and the relay to the PACS's DICOMweb service. Every access question goes to the policy core through
//! the same `Action`s and requests as DIMSE; no rule lives here. Must not know DIMSE framing.

pub(crate) mod auth;
pub(crate) mod checked;
pub(crate) mod cors;
pub(crate) mod discovery;
pub(crate) mod fhir;
pub(crate) mod listener;
pub mod multipart;
pub mod path;
pub(crate) mod qido;
pub(crate) mod render;
pub(crate) mod stow;
pub(crate) mod token;
pub(crate) mod translate;
pub(crate) mod wado;
pub(crate) mod wado_uri;

use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::config::Config;
use crate::pacs::dicomweb::DicomWeb;
use crate::policy::Policy;
use crate::trust::TrustCore;
use auth::{ApiError, Challenge};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// What the audit trail says of the request being handled, whatever handler records.
#[derive(Clone)]
struct RequestScope {
    /// Also the X-Request-Id header.
    id: u64,
    /// The subject of the client certificate its connection's TLS handshake verified.
    client_cert: Option<Arc<str>>,
    /// The client's address.
    peer: Option<std::net::IpAddr>,
}

tokio::task_local! {
    static REQUEST: RequestScope;
}

static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The id of the request this task is handling (0 outside a request).
pub(crate) fn request_id() -> u64 {
    REQUEST.try_with(|r| r.id).unwrap_or(0)
}

/// The verified client certificate's subject of the running request's connection, if any.
pub(crate) fn client_cert() -> Option<Arc<str>> {
    REQUEST.try_with(|r| r.client_cert.clone()).ok().flatten()
}

/// Where the running request's decisions are recorded.
pub(crate) fn trail(principal: Option<&crate::trust::Principal>) -> Trail<'_> {
    let peer = REQUEST.try_with(|r| r.peer).ok().flatten();
    Trail::new(Channel::Http, request_id(), principal)
        .with_client_cert(client_cert())
        .with_peer(peer)
}

/// Gives every request an id, visible in audit records and as `X-Request-Id`.
async fn with_request_id(req: Request, next: axum::middleware::Next) -> Response {
    let t0 = std::time::Instant::now();
    let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let client_cert = req
        .extensions()
        .get::<listener::ClientCert>()
        .map(|c| c.0.clone());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let scope = RequestScope {
        id,
        client_cert,
        peer,
    };
    // Every line logged for this request carries its id (no path: it may name a patient's UIDs).
    // ERROR level: kept under any filter (see dimse::session::handle).
    let span = tracing::error_span!("request", id, method = %req.method());
    let mut r = tracing::Instrument::instrument(REQUEST.scope(scope, next.run(req)), span).await;
    crate::metrics::http_response(r.status().as_u16(), t0.elapsed());
    if let Ok(v) = axum::http::HeaderValue::from_str(&id.to_string()) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

/// Requests handled at once; more wait briefly, then get 503.
const MAX_CONCURRENT_REQUESTS: usize = 256;
/// How long a request may wait for a slot.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// How the PACS answers DICOMweb requests.
#[derive(Clone, Copy)]
pub(crate) enum Upstream<'a> {
    /// Its own DICOMweb service, relayed.
    Web(&'a DicomWeb),
    /// DIMSE only: translated.
    Dimse(&'a Arc<crate::pacs::dimse::Dimse>),
}

/// What every HTTP request shares.
pub struct WebCtx {
    pub cfg: Arc<Config>,
    pub trust: Arc<TrustCore>,
    pub policy: Arc<Policy>,
    /// For the discovery documents' issuer metadata.
    pub http: reqwest::Client,
    pub challenge: Challenge,
    /// `{public_url}/dicom-web`: what clients see as the DICOMweb root.
    pub public_base: String,
    /// The PACS's DICOMweb service; `None` when `pacs.dicomweb_url` is not set, and DICOMweb
    /// is answered by translation to DIMSE ([`translate`]) instead.
    pub pacs: Option<DicomWeb>,
    /// The PACS's DIMSE services, for DICOMweb by translation.
    pub dimse: Arc<crate::pacs::dimse::Dimse>,
    /// Requests at once, across configurations (a reload does not make room for more).
    slots: Arc<Semaphore>,
    discovery: discovery::Cache,
    /// What `/readyz` answers from.
    readiness: Arc<crate::readiness::Readiness>,
    /// The gateway's own authorization server (`[authorization_server]`), when enabled.
    pub authority: Option<Arc<crate::authority::Authority>>,
    /// The subject tokens exchanged already, across configurations.
    exchanged: Arc<crate::authority::Exchanged>,
}

impl WebCtx {
    pub fn new(
        cfg: Arc<Config>,
        trust: Arc<TrustCore>,
        policy: Arc<Policy>,
        readiness: Arc<crate::readiness::Readiness>,
        moves: Arc<crate::dimse::receiver::MoveRegistry>,
        places: Arc<crate::pacs::Slots>,
        own: (
            Option<Arc<crate::authority::Authority>>,
            Arc<crate::authority::Exchanged>,
        ),
    ) -> anyhow::Result<Arc<WebCtx>> {
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
        WebCtx::build(cfg, trust, policy, readiness, slots, (moves, places), own)
    }

    /// The context of the next configuration; the request slots, readiness, the C-MOVE
    /// registry and the memory of exchanged tokens carry over.
    pub fn succeeding(
        &self,
        cfg: Arc<Config>,
        trust: Arc<TrustCore>,
        policy: Arc<Policy>,
        moves: Arc<crate::dimse::receiver::MoveRegistry>,
        places: Arc<crate::pacs::Slots>,
        authority: Option<Arc<crate::authority::Authority>>,
    ) -> anyhow::Result<Arc<WebCtx>> {
        WebCtx::build(
            cfg,
            trust,
            policy,
            self.readiness.clone(),
            self.slots.clone(),
            (moves, places),
            (authority, self.exchanged.clone()),
        )
    }

    /// The memory of exchanged subject tokens, for the next configuration's authority.
    pub fn exchanged(&self) -> Arc<crate::authority::Exchanged> {
        self.exchanged.clone()
    }

    fn build(
        cfg: Arc<Config>,
        trust: Arc<TrustCore>,
        policy: Arc<Policy>,
        readiness: Arc<crate::readiness::Readiness>,
        slots: Arc<Semaphore>,
        (moves, places): (
            Arc<crate::dimse::receiver::MoveRegistry>,
            Arc<crate::pacs::Slots>,
        ),
        (authority, exchanged): (
            Option<Arc<crate::authority::Authority>>,
            Arc<crate::authority::Exchanged>,
        ),
    ) -> anyhow::Result<Arc<WebCtx>> {
        // One client (one connection pool, one set of trust anchors) for the PACS and the
        // issuers' metadata the discovery documents point at.
        let http = DicomWeb::http_client(&cfg, None)?;
        let public = cfg.gateway.public_url.trim_end_matches('/').to_string();
        Ok(Arc::new(WebCtx {
            challenge: Challenge {
                realm: "pacsgate".into(),
                resource_metadata: format!("{public}/.well-known/oauth-protected-resource"),
            },
            public_base: format!("{public}/dicom-web"),
            pacs: DicomWeb::new(&cfg)?,
            dimse: Arc::new(crate::pacs::dimse::Dimse::new(&cfg, moves, places)),
            http,
            slots,
            discovery: discovery::Cache::default(),
            readiness,
            authority,
            exchanged,
            cfg,
            trust,
            policy,
        }))
    }

    /// Where DICOMweb requests are answered: the PACS's DICOMweb service, or DIMSE.
    pub(crate) fn upstream(&self) -> Upstream<'_> {
        match &self.pacs {
            Some(w) => Upstream::Web(w),
            None => Upstream::Dimse(&self.dimse),
        }
    }

    /// The readiness state `/readyz` answers from.
    pub fn readiness(&self) -> &Arc<crate::readiness::Readiness> {
        &self.readiness
    }

    /// The request's caller: its token verified by the trust core, then prepared by the
    /// policy core. Recorded in the audit trail either way (a user authentication, 110114, per
    /// request as per association on DIMSE): an accepted token on the request's path, a
    /// refused one on `on` (operation and object), on every path alike.
    pub(crate) async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
        (op, object): (Operation, &str),
    ) -> Result<crate::policy::Caller, ApiError> {
        match auth::principal(&self.trust, headers, self.cfg.limits.token_verify_timeout).await {
            Ok(p) => {
                let caller = self.policy.caller(p).await;
                // As an association is: a token that opens no imaging access at all is refused
                // (403) before anything else is asked, whatever the request and the
                // configuration (DICOMweb served or not).
                if let Err(d) = self
                    .policy
                    .decide(&caller, crate::policy::Action::Connect)
                    .await
                {
                    trail(Some(caller.principal())).record(
                        Operation::HttpRequest,
                        object,
                        Outcome::Denied,
                        &d.to_string(),
                    );
                    return Err(ApiError::from_denial(d));
                }
                trail(Some(caller.principal())).record(
                    Operation::HttpRequest,
                    object,
                    Outcome::Allowed,
                    "token accepted",
                );
                Ok(caller)
            }
            Err(e) => {
                trail(None).record(op, object, Outcome::Denied, &format!("{e:?}"));
                Err(e)
            }
        }
    }

    /// Asks the policy core for `action` and records the decision on `on` (operation and
    /// object) in this request's audit trail; a refusal becomes the HTTP answer its kind says.
    /// `asked`: the studies the request names, recorded with a refusal.
    pub(crate) async fn permit(
        &self,
        caller: &crate::policy::Caller,
        action: crate::policy::Action<'_>,
        (op, object): (Operation, &str),
        allowed: &str,
        asked: Vec<String>,
    ) -> Result<crate::policy::Permit, ApiError> {
        let trail = trail(Some(caller.principal()));
        match self.policy.decide(caller, action).await {
            Ok(permit) => {
                let studies = match permit.audited_studies() {
                    s if s.is_empty() => asked,
                    s => s,
                };
                trail.about(permit.audited_patients(), studies).record(
                    op,
                    object,
                    Outcome::Allowed,
                    allowed,
                );
                Ok(permit)
            }
            Err(d) => {
                let outcome = match d.kind() {
                    crate::policy::DenialKind::Unavailable => Outcome::Failed,
                    _ => Outcome::Denied,
                };
                trail
                    .about(Vec::new(), asked)
                    .record(op, object, outcome, &d.to_string());
                Err(ApiError::from_denial(d))
            }
        }
    }

    /// Rewrites the PACS's URLs in a response body to the gateway's.
    pub(crate) fn rewrite_urls(&self, body: &str) -> String {
        match &self.pacs {
            Some(pacs) => pacs.rewrite_urls(body, &self.public_base),
            None => body.to_string(),
        }
    }
}

/// Whether the request comes from an address `gateway.metrics_clients` names.
fn from_monitoring(ctx: &WebCtx, req: &Request) -> bool {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    peer.is_some_and(|ip| {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ctx.cfg
            .gateway
            .metrics_clients
            .iter()
            .any(|n| n.contains(&ip))
    })
}

/// Prometheus metrics (no PHI, no tokens), only to the clients `gateway.metrics_clients`
/// names (loopback by default); anyone else gets 404, as if there were none.
async fn metrics(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    if !from_monitoring(&ctx, &req) {
        return StatusCode::NOT_FOUND.into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::metrics::render(),
    )
        .into_response()
}

/// 200 when the PACS and every issuer answered the background checks within the last 30 s,
/// else 503; from the checks' last results, never waiting for one. What is down is named to
/// everyone; why (addresses, errors) only to `gateway.metrics_clients`.
async fn readyz(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    let report = ctx.readiness.report();
    let detailed = from_monitoring(&ctx, &req);
    let down: Vec<serde_json::Value> = report
        .down
        .iter()
        .map(|d| {
            let mut v = serde_json::json!({ "component": d.what });
            if detailed {
                v["reason"] = serde_json::Value::String(d.reason.clone());
            }
            v
        })
        .collect();
    let (status, body) = if report.ready {
        (StatusCode::OK, serde_json::json!({ "status": "ready" }))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "not ready", "down": down }),
        )
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        "ok\n",
    )
}

/// Every DICOMweb GET: parse, authenticate, dispatch.
async fn dicomweb_get(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    let Ok(_slot) = tokio::time::timeout(SLOT_WAIT, ctx.slots.acquire()).await else {
        return ctx
            .challenge
            .respond(ApiError::Unavailable("too many requests at once".into()));
    };
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let raw = uri.path().strip_prefix("/dicom-web/").unwrap_or("");
    let resource = match path::parse(raw) {
        Ok(r) => r,
        Err(e) => return ctx.challenge.respond(ApiError::BadRequest(e)),
    };
    let principal = match ctx
        .authenticate(&headers, (Operation::HttpRequest, uri.path()))
        .await
    {
        Ok(p) => p,
        Err(e) => return ctx.challenge.respond(e),
    };
    let upstream = ctx.upstream();
    // Everything up to the response head is bounded in time; a streamed body is then bounded
    // by the PACS read timeout per chunk.
    let work = async {
        match &resource {
            path::Resource::Search { .. } => {
                qido::search(
                    &ctx,
                    &principal,
                    &resource,
                    uri.query().unwrap_or(""),
                    upstream,
                )
                .await
            }
            path::Resource::Retrieve { .. } => {
                wado::retrieve(&ctx, &principal, &resource, uri.query(), &headers, upstream).await
            }
        }
    };
    let limit = ctx.cfg.limits.upstream_timeout * 2;
    let result = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::Unavailable(format!(
            "the PACS did not answer within {limit:?}"
        ))),
    };
    match result {
        Ok(r) => r,
        Err(e) => ctx.challenge.respond(e),
    }
}

pub(crate) fn router(ctx: Arc<WebCtx>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/.well-known/oauth-protected-resource",
            get(discovery::protected_resource),
        )
        .route(
            "/dicom-web/.well-known/smart-configuration",
            get(discovery::smart_configuration),
        )
        .route("/dicom-web/studies", get(dicomweb_get).post(stow::handle))
        .route(
            "/dicom-web/studies/{study}",
            get(dicomweb_get).post(stow::handle),
        )
        .route("/dicom-web/{*rest}", get(dicomweb_get))
        .route("/wado", get(wado_uri::handle))
        .merge(fhir_routes(&ctx))
        .merge(authority_routes(&ctx))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            cors::layer,
        ))
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(ctx)
}

/// `{public_url}/fhir`, when `[fhir] enabled`.
fn fhir_routes(ctx: &Arc<WebCtx>) -> Router<Arc<WebCtx>> {
    if !ctx.cfg.fhir.enabled {
        return Router::new();
    }
    Router::new()
        .route("/fhir/ImagingStudy", get(fhir::imaging_study))
        .route("/fhir/Endpoint/dicom-wado-rs", get(fhir::read_endpoint))
        .route("/fhir/metadata", get(fhir::metadata))
        .route(
            "/fhir/.well-known/smart-configuration",
            get(discovery::smart_configuration),
        )
}

/// `{public_url}/token` and the key set, when `[authorization_server] enabled`.
fn authority_routes(ctx: &Arc<WebCtx>) -> Router<Arc<WebCtx>> {
    if ctx.authority.is_none() {
        return Router::new();
    }
    Router::new()
        .route("/token", axum::routing::post(token::token))
        .route("/.well-known/jwks.json", get(token::jwks))
}

/// `gateway.monitor_listen`: the probes and metrics alone, nothing a token opens.
fn monitor_router(ctx: Arc<WebCtx>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// DICOMweb, discovery and the probes (`http_listen`, `https_listen`).
    Front,
    /// `/healthz`, `/readyz` and `/metrics` only (`monitor_listen`).
    Monitor,
}

/// Connections one peer may hold on the monitoring listener.
const MONITOR_PER_PEER: usize = 8;

/// The routes of each face, built once per configuration.
#[derive(Clone)]
pub struct Routes {
    front: Router,
    monitor: Router,
}

impl Routes {
    pub fn new(ctx: Arc<WebCtx>) -> Routes {
        Routes {
            front: router(ctx.clone()),
            monitor: monitor_router(ctx),
        }
    }

    fn of(&self, face: Face) -> Router {
        match face {
            Face::Front => self.front.clone(),
            Face::Monitor => self.monitor.clone(),
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` turns true, under the listener's bounds
/// ([`listener`], from `cfg`, read once); over TLS (HTTPS, with HTTP/2 by ALPN) when `tls` is
/// given. Each request is answered by the routes `current` holds when it arrives.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: &Config,
    mut current: watch::Receiver<Routes>,
    shutdown: watch::Receiver<bool>,
    max_connections: usize,
    tls: Option<Arc<crate::tls::ServerTls>>,
    face: Face,
) -> std::io::Result<()> {
    let l = &cfg.limits;
    let name = match (face, &tls) {
        (Face::Monitor, _) => "monitor",
        (Face::Front, Some(_)) => "https",
        (Face::Front, None) => "http",
    };
    let bounds = listener::Bounds {
        name,
        max_connections,
        // A peer on the monitoring port is a probe or a scraper: a few connections each, so
        // one client cannot take every slot from the probes.
        max_per_peer: match face {
            Face::Monitor => MONITOR_PER_PEER.min(l.max_http_connections_per_peer),
            Face::Front => l.max_http_connections_per_peer,
        },
        header_timeout: l.http_header_timeout,
        max_header_bytes: l.max_http_header_bytes,
        idle_timeout: l.idle_timeout,
        drain: cfg.gateway.drain,
        monitors: cfg.gateway.metrics_clients.clone(),
    };
    // This face's routes, following `current`.
    let (tx, rx) = watch::channel(current.borrow_and_update().of(face));
    let mut stop = shutdown.clone();
    let follow = async move {
        loop {
            tokio::select! {
                r = current.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let next = current.borrow_and_update().of(face);
                    let _ = tx.send(next);
                }
                _ = stop.changed() => return,
            }
        }
    };
    tokio::join!(follow, listener::serve(listener, rx, bounds, shutdown, tls));
    Ok(())
}
