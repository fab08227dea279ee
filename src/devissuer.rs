//! `pacsgate dev-issuer`: a development authorization server for demos and tests. NOT FOR PRODUCTION.
//!
//! Owns: a signing key (generated, or loaded from a PEM file), the discovery documents, the JWKS,
//! minting of SMART access tokens (`POST /token`, and `mint` for the command line) and RFC 7662
//! introspection of its own tokens. It authenticates nobody: anyone who can reach it can mint a
//! token, which is exactly what a test needs and what production must never have. Must not know
//! the gateway's policy or DICOM.

use anyhow::bail;
use axum::extract::{Form, Query, State};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use axum::{Router, http::StatusCode};
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The development issuer's signing key: the production key type (see [`crate::crypto`]).
pub type DevKey = crate::crypto::SigningKey;

/// What a caller asks to be minted.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MintRequest {
    pub patient: Option<String>,
    pub scope: Option<String>,
    pub aud: Option<String>,
    pub expires_in: Option<i64>,
    pub client_id: Option<String>,
    pub sub: Option<String>,
    #[serde(rename = "fhirUser")]
    pub fhir_user: Option<String>,
    /// "true": an opaque token that only introspection can judge.
    pub opaque: Option<String>,
    /// More claims, as a JSON object (e.g. `{"dicom_patient_id": "MRN-1"}`).
    pub claims: Option<String>,
    pub grant_type: Option<String>,
    pub client_assertion: Option<String>,
    pub client_assertion_type: Option<String>,
}

/// A client registered at the development issuer (the gateway, for introspection).
pub struct DevClient {
    pub id: String,
    pub secret: Option<String>,
    /// The public half of the client's assertion key.
    pub key: Option<DevKey>,
    /// The client's public JWK Set, as a registration keeps it: an assertion is verified with
    /// the key its `kid` names.
    pub jwks: Option<jsonwebtoken::jwk::JwkSet>,
}

/// Opaque tokens the issuer remembers, at most.
const MAX_OPAQUE: usize = 100_000;

/// The development issuer.
pub struct DevIssuer {
    pub issuer: String,
    pub key: DevKey,
    pub default_aud: String,
    /// Registered clients; when there are any, introspection requires one of them.
    pub clients: Vec<DevClient>,
    /// Opaque tokens and their claims.
    opaque: std::sync::Mutex<std::collections::HashMap<String, Value>>,
    /// Tokens revoked through `/revoke` (by digest).
    revoked: std::sync::Mutex<std::collections::HashSet<String>>,
    /// MRNs the FHIR Patient endpoint reports, by patient id (default: `MRN-{id}`).
    pub mrns: std::collections::HashMap<String, String>,
    /// Study Instance UIDs the FHIR ImagingStudy read endpoint reports, by resource id.
    pub studies: std::collections::HashMap<String, String>,
    /// Imaging FHIR servers that accept this issuer's tokens (`associated_endpoints`).
    pub associated: Vec<String>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl DevIssuer {
    pub fn new(issuer: String, key: DevKey, default_aud: String) -> DevIssuer {
        DevIssuer {
            issuer,
            key,
            default_aud,
            clients: Vec::new(),
            opaque: Default::default(),
            revoked: Default::default(),
            mrns: Default::default(),
            studies: Default::default(),
            associated: Vec::new(),
        }
    }

    /// An opaque token for `req`: a random string the issuer remembers with its claims.
    pub fn mint_opaque(&self, req: &MintRequest) -> String {
        let token = format!("opaque-{}{}", rand_hex(), rand_hex());
        if let Ok(mut m) = self.opaque.lock() {
            if m.len() >= MAX_OPAQUE {
                m.clear();
            }
            m.insert(token.clone(), self.claims(req));
        }
        token
    }

    /// The claims of an active token of this issuer, or `None`.
    fn active_claims(&self, token: &str) -> Option<Value> {
        if self
            .revoked
            .lock()
            .ok()?
            .contains(&crate::crypto::token_id(token))
        {
            return None;
        }
        let now = now();
        if let Some(c) = self.opaque.lock().ok()?.get(token).cloned() {
            return (c["exp"].as_i64().unwrap_or(0) > now).then_some(c);
        }
        let mut v = Validation::new(self.key.alg);
        v.validate_aud = false;
        v.leeway = 0;
        v.set_issuer(&[self.issuer.as_str()]);
        jsonwebtoken::decode::<Value>(token, self.key.decoding(), &v)
            .ok()
            .map(|d| d.claims)
    }

    /// Whether a request to the introspection endpoint comes from a registered client.
    fn client_allowed(&self, authorization: Option<&str>) -> bool {
        if self.clients.is_empty() {
            return true;
        }
        let Some(a) = authorization else { return false };
        if let Some(b) = a.strip_prefix("Basic ") {
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
                return false;
            };
            let Ok(pair) = String::from_utf8(raw) else {
                return false;
            };
            let Some((id, secret)) = pair.split_once(':') else {
                return false;
            };
            return self
                .clients
                .iter()
                .any(|c| c.id == id && c.secret.as_deref() == Some(secret));
        }
        if let Some(t) = a.strip_prefix("Bearer ") {
            let Some(c) = self.active_claims(t.trim()) else {
                return false;
            };
            let id = c["client_id"].as_str().unwrap_or_default();
            return self.clients.iter().any(|k| k.id == id);
        }
        false
    }

    /// Checks a client_credentials request: a registered client's assertion (RFC 7523) or its
    /// secret. Returns the client id.
    fn authenticate_client(
        &self,
        form: &MintRequest,
        authorization: Option<&str>,
    ) -> Option<String> {
        if let Some(assertion) = &form.client_assertion {
            let header = jsonwebtoken::decode_header(assertion).ok()?;
            let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(assertion).ok()?;
            let id = claims["iss"].as_str()?.to_string();
            let client = self.clients.iter().find(|c| c.id == id)?;
            let registered;
            let key = match (&client.key, &client.jwks) {
                (Some(k), _) => k.decoding(),
                (None, Some(set)) => {
                    registered =
                        jsonwebtoken::DecodingKey::from_jwk(set.find(header.kid.as_deref()?)?)
                            .ok()?;
                    &registered
                }
                (None, None) => return None,
            };
            let mut v = Validation::new(header.alg);
            v.set_audience(&[format!("{}/token", self.issuer)]);
            v.set_issuer(&[id.as_str()]);
            v.sub = Some(id.clone());
            jsonwebtoken::decode::<Value>(assertion, key, &v).ok()?;
            return Some(id);
        }
        let b = authorization?.strip_prefix("Basic ")?;
        let pair = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()?,
        )
        .ok()?;
        let (id, secret) = pair.split_once(':')?;
        self.clients
            .iter()
            .any(|c| c.id == id && c.secret.as_deref() == Some(secret))
            .then(|| id.to_string())
    }

    /// The claims of a token for `req`.
    pub fn claims(&self, req: &MintRequest) -> Value {
        let iat = now();
        let exp = iat + req.expires_in.unwrap_or(3600);
        let client_id = req.client_id.clone().unwrap_or_else(|| "dev-viewer".into());
        let mut c = json!({
            "iss": self.issuer,
            "sub": req.sub.clone().unwrap_or_else(|| client_id.clone()),
            "aud": req.aud.clone().unwrap_or_else(|| self.default_aud.clone()),
            "exp": exp,
            "iat": iat,
            "jti": crate::crypto::token_id(&format!("{iat}{}", rand_hex())),
            "client_id": client_id,
            "scope": req.scope.clone().unwrap_or_else(|| "patient/ImagingStudy.rs".into()),
        });
        if let Some(p) = req.patient.as_ref().filter(|p| !p.is_empty()) {
            c["patient"] = json!(p);
        }
        if let Some(u) = &req.fhir_user {
            c["fhirUser"] = json!(u);
        }
        if let Some(Ok(Value::Object(extra))) =
            req.claims.as_deref().map(serde_json::from_str::<Value>)
        {
            for (k, v) in extra {
                c[k] = v;
            }
        }
        c
    }

    pub fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        self.key.sign(&self.claims(req))
    }

    pub(crate) fn smart_configuration(&self) -> Value {
        let i = &self.issuer;
        let associated: Vec<Value> = self
            .associated
            .iter()
            .map(|url| {
                json!({
                    "url": url,
                    "capabilities": [
                        "smart-imaging-access",
                        "http://fhir.org/argonaut/smart-imaging/capabilities/app-launch",
                    ],
                })
            })
            .collect();
        let mut doc = json!({
            "issuer": i,
            "jwks_uri": format!("{i}/jwks"),
            "token_endpoint": format!("{i}/token"),
            "introspection_endpoint": format!("{i}/introspect"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["patient/ImagingStudy.rs", "patient/ImagingStudy.cruds", "user/ImagingStudy.rs", "system/ImagingStudy.rs"],
            "capabilities": ["permission-patient", "permission-user", "permission-v1", "permission-v2"],
            "code_challenge_methods_supported": ["S256"],
            "response_types_supported": ["token"],
            "x-development-only": "pacsgate dev-issuer: anyone can mint tokens here; never trust it in production",
        });
        if !associated.is_empty() {
            doc["associated_endpoints"] = Value::Array(associated);
        }
        doc
    }

    pub(crate) fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/.well-known/smart-configuration", get(well_known))
            .route("/.well-known/openid-configuration", get(well_known))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .route("/introspect", post(introspect))
            .route("/revoke", post(revoke))
            .route("/fhir/Patient/{id}", get(fhir_patient))
            .route("/fhir/ImagingStudy/{id}", get(fhir_imaging_study))
            .route("/fhir/ImagingStudy", get(fhir_imaging_study_search))
            .with_state(self)
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn well_known(State(s): State<Arc<DevIssuer>>) -> Json<Value> {
    Json(s.smart_configuration())
}

async fn jwks(State(s): State<Arc<DevIssuer>>) -> Json<Value> {
    Json(json!({ "keys": [s.key.public_jwk()] }))
}

fn authorization(h: &axum::http::HeaderMap) -> Option<&str> {
    h.get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn token(
    State(s): State<Arc<DevIssuer>>,
    headers: axum::http::HeaderMap,
    Form(req): Form<MintRequest>,
) -> impl IntoResponse {
    let mut req = req;
    if req.grant_type.as_deref() == Some("client_credentials") {
        // The gateway's own token (SMART Backend Services): only for registered clients.
        let Some(id) = s.authenticate_client(&req, authorization(&headers)) else {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client"})),
            );
        };
        req.client_id = Some(id.clone());
        req.sub = Some(id);
        req.patient = None;
        req.aud = Some(s.issuer.clone());
        req.scope = Some(req.scope.clone().unwrap_or_else(|| "system/*.rs".into()));
    }
    let opaque = req.opaque.as_deref() == Some("true");
    let minted = if opaque {
        Ok(s.mint_opaque(&req))
    } else {
        s.mint(&req)
    };
    match minted {
        Ok(t) => {
            let mut body = json!({
                "access_token": t,
                "token_type": "Bearer",
                "expires_in": req.expires_in.unwrap_or(3600),
                "scope": req.scope.clone().unwrap_or_else(|| "patient/ImagingStudy.rs".into()),
            });
            if let Some(p) = &req.patient {
                body["patient"] = json!(p);
            }
            (StatusCode::OK, Json(body))
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "server_error", "error_description": e.to_string()})),
        ),
    }
}

#[derive(Deserialize)]
struct IntrospectForm {
    token: String,
}

async fn introspect(
    State(s): State<Arc<DevIssuer>>,
    headers: axum::http::HeaderMap,
    Form(f): Form<IntrospectForm>,
) -> impl IntoResponse {
    if !s.client_allowed(authorization(&headers)) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        );
    }
    match s.active_claims(f.token.trim()) {
        Some(mut c) => {
            c["active"] = json!(true);
            (StatusCode::OK, Json(c))
        }
        None => (StatusCode::OK, Json(json!({"active": false}))),
    }
}

/// A FHIR Patient with two identifiers: an MR (the MRN, `--fhir-patient ID=MRN` or `MRN-{id}`)
/// and a social-security-like one. Needs a token of a registered client when there are any.
async fn fhir_patient(
    State(s): State<Arc<DevIssuer>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> impl IntoResponse {
    if !gateway_token_ok(&s, &headers) {
        return fhir_error(StatusCode::UNAUTHORIZED);
    }
    let mrn = s
        .mrns
        .get(&id)
        .cloned()
        .unwrap_or_else(|| format!("MRN-{id}"));
    (
        StatusCode::OK,
        Json(json!({
            "resourceType": "Patient",
            "id": id,
            "identifier": [
                {"system": "urn:oid:1.2.36.146.595.217.0.1",
                 "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                 "value": mrn},
                {"system": "http://hl7.org/fhir/sid/us-ssn",
                 "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]},
                 "value": "000-00-0000"},
            ]
        })),
    )
}

/// Whether a request carries a token of a registered client (any token when none are registered),
/// as the gateway's own FHIR look-ups do.
fn gateway_token_ok(s: &DevIssuer, headers: &axum::http::HeaderMap) -> bool {
    match authorization(headers).and_then(|a| a.strip_prefix("Bearer ")) {
        Some(t) => s.active_claims(t.trim()).is_some_and(|c| {
            s.clients.is_empty()
                || s.clients
                    .iter()
                    .any(|k| Some(k.id.as_str()) == c["client_id"].as_str())
        }),
        None => s.clients.is_empty(),
    }
}

fn fhir_error(status: StatusCode) -> (StatusCode, Json<Value>) {
    (status, Json(json!({"resourceType": "OperationOutcome"})))
}

fn imaging_study(id: &str, uid: &str) -> Value {
    json!({
        "resourceType": "ImagingStudy",
        "id": id,
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}],
    })
}

/// An ImagingStudy registered with `--imaging-study ID=UID`, for launch contexts that name
/// a study by reference.
async fn fhir_imaging_study(
    State(s): State<Arc<DevIssuer>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> impl IntoResponse {
    if !gateway_token_ok(&s, &headers) {
        return fhir_error(StatusCode::UNAUTHORIZED);
    }
    match s.studies.get(&id) {
        Some(uid) => (StatusCode::OK, Json(imaging_study(&id, uid))),
        None => fhir_error(StatusCode::NOT_FOUND),
    }
}

/// `GET /fhir/ImagingStudy?identifier=urn:oid:{uid}` as the EHR answers a user: with the
/// caller's own token, the studies that token's `ehr_studies` claim lists (what this user may
/// see), filtered by the identifier. 401 without an active token of this issuer.
async fn fhir_imaging_study_search(
    State(s): State<Arc<DevIssuer>>,
    headers: axum::http::HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    let claims = authorization(&headers)
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|t| s.active_claims(t.trim()));
    let Some(claims) = claims else {
        return fhir_error(StatusCode::UNAUTHORIZED);
    };
    // `identifier=a,b,c`: any of them (FHIR token search).
    let wanted: Option<Vec<String>> = q.get("identifier").map(|v| {
        v.split(',')
            .map(|v| {
                let v = v.strip_prefix("urn:dicom:uid|").unwrap_or(v);
                v.strip_prefix("urn:oid:").unwrap_or(v).to_string()
            })
            .collect()
    });
    let entries: Vec<Value> = claims["ehr_studies"]
        .as_array()
        .map(|a| a.iter().filter_map(|u| u.as_str()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|u| wanted.as_ref().is_none_or(|w| w.iter().any(|x| x == u)))
        .enumerate()
        .map(|(i, u)| json!({"resource": imaging_study(&format!("s{i}"), u)}))
        .collect();
    (
        StatusCode::OK,
        Json(
            json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries}),
        ),
    )
}

/// RFC 7009-style revocation, open like the rest of the development issuer.
async fn revoke(State(s): State<Arc<DevIssuer>>, Form(f): Form<IntrospectForm>) -> StatusCode {
    if let Ok(mut r) = s.revoked.lock() {
        if r.len() >= MAX_OPAQUE {
            r.clear();
        }
        r.insert(crate::crypto::token_id(f.token.trim()));
    }
    StatusCode::OK
}

/// Parses an algorithm name given on the command line.
pub fn parse_alg(s: &str) -> anyhow::Result<Algorithm> {
    Ok(match s {
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "PS256" => Algorithm::PS256,
        other => bail!("unsupported --alg {other}; use ES256, ES384, RS256, RS384 or PS256"),
    })
}

/// Runs the development issuer until SIGINT or SIGTERM. Both are handled, not left to their
/// default: a shell starts background jobs with SIGINT ignored, and a demo's Ctrl-C must
/// still stop it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    issuer: Arc<DevIssuer>,
) -> anyhow::Result<()> {
    axum::serve(listener, issuer.router())
        .with_graceful_shutdown(stop_signal())
        .await?;
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(_) = async { term.as_mut()?.recv().await } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
