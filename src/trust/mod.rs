//! The trust core: an access token in, a [`Principal`] out, or a named refusal.
//!
//! Owns: which issuers are trusted, their keys ([`keys`]), local validation of JWT access tokens
//! per RFC 9068 and SMART App Launch 2.2 (signature with an algorithm bound to the key type,
//! `typ`, `iss`, `aud`, `exp`/`nbf`/`iat` with at most 60 s leeway), SMART scope parsing
//! ([`scopes`]) and claim normalization. Must not know DICOM, HTTP front ends, or what a
//! principal may do: that is the policy core's.

pub mod client;
pub mod keys;
pub mod own;
pub mod scopes;

use crate::config::{Config, Issuer, VerifyMode};
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use keys::{IssuerKeys, KeyError};
use scopes::ScopeSet;
use serde::Deserialize;
use sha2::Digest;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest token accepted (the DIMSE user identity field is limited to 65,535 bytes).
pub(crate) const MAX_TOKEN_BYTES: usize = 65_535;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub(crate) const LEEWAY_SECS: u64 = 60;

/// Who the caller is and what its token says, after the token was verified.
#[derive(Debug, Clone)]
pub struct Principal {
    pub issuer: String,
    pub subject: Option<String>,
    pub client_id: Option<String>,
    pub fhir_user: Option<String>,
    pub scopes: ScopeSet,
    /// The patient in context as a logical id (normalized: no `Patient/` prefix, no base URL).
    pub patient: Option<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    pub jti: Option<String>,
    /// A short digest of the token, for logs and cache keys (never the token itself).
    pub token_id: String,
    /// Every claim of the verified token (or of the introspection answer), for mappings that
    /// read a claim of their own.
    pub claims: Arc<serde_json::Value>,
    /// The patient's FHIR resource as the EHR gave it to the gateway, when a mapping needed it
    /// (`Some(None)`: the look-up failed or found nothing).
    pub fhir_patient: Option<Option<Arc<serde_json::Value>>>,
    /// The ImagingStudy entries of the launch context, when the issuer treats launch context
    /// as a restriction (`launch_context_restricts`); `None`: no such restriction.
    pub launch_studies: Option<Vec<ContextStudy>>,
    /// The token itself, for the one call made on the caller's behalf (`user_level =
    /// "ehr-check"`). Never printed.
    pub bearer: Bearer,
    /// For a token the gateway issued itself (token exchange): what it fixed then (the
    /// patient identities as it mapped them, the studies that restrict it). `None` for every
    /// other token.
    pub granted: Option<Arc<own::Granted>>,
}

/// An ImagingStudy of the launch context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextStudy {
    /// Its Study Instance UID.
    Uid(String),
    /// `ImagingStudy/{id}` at the issuer's FHIR server, not resolved yet.
    Reference(String),
    /// An entry that names no study the gateway can identify: it admits nothing.
    Unknown,
}

/// A caller's token, kept only to be passed on. Its `Debug` shows a digest, never the token.
#[derive(Clone)]
pub struct Bearer(Arc<str>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(Arc::from(token))
    }
    /// The token, for an `Authorization` header toward the issuer's own EHR.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
    /// A full SHA-256 of the token, for cache keys that must never collide across tokens.
    pub(crate) fn digest(&self) -> [u8; 32] {
        sha2::Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bearer({})", token_id(&self.0))
    }
}

impl Principal {
    pub(crate) fn is_expired_at(&self, now: SystemTime) -> bool {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now >= self.expires_at
    }
}

/// Why a token was refused. The text is safe to log: it never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("token is empty or larger than {MAX_TOKEN_BYTES} bytes")]
    Size,
    #[error("token is not a compact JWS ({0})")]
    Malformed(String),
    #[error("algorithm {0} is not accepted (allowed: RS256/384/512, PS256/384/512, ES256, ES384)")]
    Algorithm(String),
    #[error("issuer {0:?} is not configured as trusted")]
    UntrustedIssuer(String),
    #[error("token type {0:?} is not accepted for this issuer (accept_typ)")]
    Type(Option<String>),
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("signature does not verify with any key of the issuer")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("token audience names none of this gateway's audiences")]
    Audience,
    #[error("claim {0} is missing or invalid")]
    Claim(&'static str),
    #[error("client_id is not in allowed_client_ids of the issuer")]
    Client,
    #[error("verification mode of the issuer is not supported")]
    Mode,
    #[error("the token is not active (introspection)")]
    Inactive,
    #[error("the token cannot be checked now: {0}")]
    Unavailable(String),
}

impl TrustError {
    /// Whether the token could not be checked at all (the issuer's keys or its introspection
    /// endpoint could not be reached): the caller is told to try again, not that its token is
    /// bad.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            TrustError::Keys(keys::KeyError::Unavailable { .. }) | TrustError::Unavailable(_)
        )
    }
}

struct TrustedIssuer {
    cfg: Issuer,
    keys: IssuerKeys,
    audiences: Vec<String>,
    /// The gateway's client at this issuer, when it has credentials there.
    client: Option<client::IssuerClient>,
    /// The gateway itself (`[authorization_server]`): its tokens carry [`own::Granted`].
    own: bool,
}

/// The trust core.
pub struct TrustCore {
    issuers: HashMap<String, TrustedIssuer>,
    /// The gateway's own URLs: an `authorization_details` entry naming one of them in its
    /// `locations` applies its own scope and patient here.
    locations: Vec<String>,
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[allow(dead_code)]
    iss: String,
    sub: Option<String>,
    exp: serde_json::Number,
    iat: Option<serde_json::Number>,
    jti: Option<String>,
    client_id: Option<String>,
    azp: Option<String>,
    scope: Option<serde_json::Value>,
    scp: Option<serde_json::Value>,
    patient: Option<serde_json::Value>,
    #[serde(rename = "fhirUser")]
    fhir_user: Option<String>,
    authorization_details: Option<serde_json::Value>,
    #[serde(rename = "fhirContext")]
    fhir_context: Option<serde_json::Value>,
}

impl TrustCore {
    /// The trust core of a configuration; with `[authorization_server]`, the gateway's own
    /// tokens are refused until [`TrustCore::with_own_keys`] gives their keys.
    pub fn new(cfg: &Config) -> anyhow::Result<Arc<TrustCore>> {
        TrustCore::with_own_keys(cfg, &[])
    }

    /// The trust core that also accepts the gateway's own tokens (`[authorization_server]`),
    /// verified with these public JWKs, exactly as every other issuer's are.
    pub fn with_own_keys(
        cfg: &Config,
        own_public_jwks: &[serde_json::Value],
    ) -> anyhow::Result<Arc<TrustCore>> {
        let http = reqwest::Client::builder()
            .timeout(cfg.limits.http_fetch_timeout)
            .connect_timeout(cfg.limits.http_fetch_timeout)
            // No redirect is followed by a client that carries a credential or a caller's token
            // (introspection, the gateway's own token): a 307 would re-post it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pacsgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut issuers = HashMap::new();
        for i in &cfg.issuers {
            let mut audiences = cfg.gateway.audiences.clone();
            if i.accept_ehr_audience
                && let Some(b) = &i.fhir_base_url
            {
                audiences.push(b.clone());
            }
            issuers.insert(
                i.issuer.clone(),
                TrustedIssuer {
                    keys: IssuerKeys::new(i.issuer.clone(), i.jwks_uri.clone(), http.clone()),
                    client: client::IssuerClient::new(i, http.clone())?,
                    cfg: i.clone(),
                    audiences,
                    own: false,
                },
            );
        }
        if let Some(a) = &cfg.authorization_server {
            let me = own_issuer(&a.issuer);
            issuers.insert(
                me.issuer.clone(),
                TrustedIssuer {
                    keys: IssuerKeys::fixed(me.issuer.clone(), own_public_jwks, http.clone()),
                    client: None,
                    cfg: me,
                    audiences: cfg.gateway.audiences.clone(),
                    own: true,
                },
            );
        }
        let mut locations = cfg.gateway.audiences.clone();
        locations.push(cfg.gateway.public_url.clone());
        locations.push(format!("{}/dicom-web", cfg.gateway.public_url));
        let locations = locations
            .into_iter()
            .map(|l| l.trim_end_matches('/').to_string())
            .collect();
        Ok(Arc::new(TrustCore { issuers, locations }))
    }

    /// The issuers trusted, as configured.
    pub fn issuer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.issuers.keys().cloned().collect();
        v.sort();
        v
    }

    /// The readiness check of one issuer, by what verifying its tokens needs: its key set
    /// fetched now, its introspection endpoint answering the gateway, or both.
    pub async fn probe_issuer(&self, issuer: &str) -> Result<(), String> {
        let ti = self
            .issuers
            .get(issuer)
            .ok_or_else(|| format!("{issuer} is not a configured issuer"))?;
        let introspection = || async {
            match &ti.client {
                Some(c) => c.probe().await,
                None => Err("no client credentials to introspect with".to_string()),
            }
        };
        match ti.cfg.verify {
            VerifyMode::Jwt => ti.keys.probe().await,
            VerifyMode::Introspection => introspection().await,
            VerifyMode::JwtAndIntrospection => {
                ti.keys.probe().await?;
                introspection().await
            }
        }
    }

    /// Verifies a token; on success, the principal it stands for.
    pub async fn verify(&self, token: &str) -> Result<Principal, TrustError> {
        let t0 = std::time::Instant::now();
        let r = self.verify_token(token).await;
        let result = match &r {
            Ok(_) => "valid",
            Err(e) if e.is_transient() => "unavailable",
            Err(_) => "refused",
        };
        crate::metrics::token_verified(result, t0.elapsed());
        r
    }

    async fn verify_token(&self, token: &str) -> Result<Principal, TrustError> {
        let token = token.trim_matches(|c: char| c.is_ascii_whitespace());
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(TrustError::Size);
        }
        let Some(Preflight { alg, header, iss }) = preflight(token)? else {
            return self.verify_opaque(token).await;
        };
        let ti = self
            .issuers
            .get(&iss)
            .ok_or_else(|| TrustError::UntrustedIssuer(iss.clone()))?;
        if ti.cfg.verify == VerifyMode::Introspection {
            // The issuer's answer decides; the JWT form of the token is not relied on.
            return self.verify_introspected(token, ti).await;
        }
        let alg = alg?;
        let header = header?;
        let typ = header.typ.clone().unwrap_or_default();
        if !ti
            .cfg
            .accept_typ
            .iter()
            .any(|t| t.eq_ignore_ascii_case(&typ))
        {
            return Err(TrustError::Type(header.typ));
        }
        // jku/x5u/jwk/x5c in the header are ignored: keys come only from the issuer's JWKS.
        let candidates = ti.keys.candidates(header.kid.as_deref(), alg).await?;

        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[ti.cfg.issuer.as_str()]);
        validation.set_audience(&ti.audiences);

        let mut claims = None;
        for key in &candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match e.kind() {
                        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => continue,
                        K::ExpiredSignature => return Err(TrustError::Expired),
                        K::ImmatureSignature => return Err(TrustError::NotYetValid),
                        K::InvalidAudience => return Err(TrustError::Audience),
                        K::InvalidIssuer => return Err(TrustError::UntrustedIssuer(iss)),
                        K::MissingRequiredClaim(c) if c == "aud" => {
                            return Err(TrustError::Audience);
                        }
                        K::MissingRequiredClaim(c) if c == "exp" => {
                            return Err(TrustError::Claim("exp"));
                        }
                        K::InvalidAlgorithm => {
                            return Err(TrustError::Algorithm(format!("{alg:?}")));
                        }
                        other => return Err(TrustError::Malformed(format!("{other:?}"))),
                    }
                }
            }
        }
        let claims = claims.ok_or(TrustError::Signature)?;
        let now = now_secs();
        let exp = number_secs(&claims.exp).ok_or(TrustError::Claim("exp"))?;
        if let Some(iat) = &claims.iat {
            let iat = number_secs(iat).ok_or(TrustError::Claim("iat"))?;
            if iat > now + LEEWAY_SECS {
                return Err(TrustError::IssuedInFuture);
            }
        }
        let client_id = claims.client_id.or(claims.azp);
        if !ti.cfg.allowed_client_ids.is_empty()
            && !client_id
                .as_ref()
                .is_some_and(|c| ti.cfg.allowed_client_ids.contains(c))
        {
            return Err(TrustError::Client);
        }
        let here = location_details(claims.authorization_details.as_ref(), &self.locations);
        let scope_text = here
            .as_ref()
            .and_then(|d| scope_string(d.get("scope")))
            .or_else(|| scope_string(claims.scope.as_ref()))
            .or_else(|| scope_string(claims.scp.as_ref()))
            .unwrap_or_default();
        let patient_claim = here
            .as_ref()
            .and_then(|d| d.get("patient"))
            .or(claims.patient.as_ref());
        let patient = patient_of(patient_claim, claims.sub.as_deref(), &ti.cfg)?;
        let launch_studies = launch_studies(
            here.as_ref()
                .and_then(|d| d.get("fhirContext"))
                .or(claims.fhir_context.as_ref()),
            &ti.cfg,
        );
        if ti.cfg.verify == VerifyMode::JwtAndIntrospection {
            // Signed and unexpired, but perhaps revoked: the issuer must still call it active.
            self.introspect(token, ti)
                .await?
                .ok_or(TrustError::Inactive)?;
        }
        // The signature was verified above, so the payload read again here is authentic.
        let raw: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| TrustError::Malformed(e.to_string()))?;
        let (granted, launch_studies) = if ti.own {
            // The gateway's own token: what it fixed when it issued it, nothing read anew.
            let g = own::Granted::read(&raw).ok_or(TrustError::Claim(own::CLAIM))?;
            let studies = g
                .studies
                .as_ref()
                .map(|v| v.iter().cloned().map(ContextStudy::Uid).collect());
            (Some(Arc::new(g)), studies)
        } else {
            (None, launch_studies)
        };
        Ok(Principal {
            issuer: ti.cfg.issuer.clone(),
            subject: claims.sub,
            client_id,
            fhir_user: claims.fhir_user,
            scopes: ScopeSet::parse(&scope_text),
            patient,
            expires_at: exp,
            jti: claims.jti,
            token_id: token_id(token),
            claims: Arc::new(raw),
            fhir_patient: None,
            launch_studies,
            bearer: Bearer::new(token),
            granted,
        })
    }

    /// Asks an issuer about a token: `Some(claims)` when active, `None` when not.
    async fn introspect(
        &self,
        token: &str,
        ti: &TrustedIssuer,
    ) -> Result<Option<Arc<serde_json::Value>>, TrustError> {
        let Some(c) = &ti.client else {
            return Err(TrustError::Mode);
        };
        let issuer = ti.cfg.issuer.as_str();
        match c.introspect(token).await {
            Ok(client::Introspected::Active(v)) => {
                crate::metrics::issuer_request(issuer, "introspection", "active");
                Ok(Some(v))
            }
            Ok(client::Introspected::Inactive) => {
                crate::metrics::issuer_request(issuer, "introspection", "inactive");
                Ok(None)
            }
            Err(e) => {
                crate::metrics::issuer_request(issuer, "introspection", "error");
                tracing::warn!(issuer = %ti.cfg.issuer, error = %e, "introspection failed; denying");
                Err(TrustError::Unavailable(e))
            }
        }
    }

    /// An opaque token: introspected at the one issuer configured for opaque tokens
    /// (`opaque_tokens`), never offered to several (each would learn the others' tokens).
    async fn verify_opaque(&self, token: &str) -> Result<Principal, TrustError> {
        let Some(ti) = self.issuers.values().find(|t| t.cfg.opaque_tokens) else {
            return Err(TrustError::Malformed(
                "not a JWT, and no issuer takes opaque tokens (opaque_tokens)".into(),
            ));
        };
        let claims = self
            .introspect(token, ti)
            .await?
            .ok_or(TrustError::Inactive)?;
        principal_from_introspection(&claims, ti, token, &self.locations)
    }

    async fn verify_introspected(
        &self,
        token: &str,
        ti: &TrustedIssuer,
    ) -> Result<Principal, TrustError> {
        let claims = self
            .introspect(token, ti)
            .await?
            .ok_or(TrustError::Inactive)?;
        principal_from_introspection(&claims, ti, token, &self.locations)
    }
}

/// The `authorization_details` entry (RFC 9396, SMART `smart_on_fhir`) whose `locations` name
/// this gateway, if any: its scope and patient apply here instead of the token's top-level ones.
fn location_details(
    details: Option<&serde_json::Value>,
    locations: &[String],
) -> Option<serde_json::Value> {
    details?.as_array()?.iter().find_map(|d| {
        let here = d.get("type").and_then(|t| t.as_str()) == Some("smart_on_fhir")
            && d.get("locations")?
                .as_array()?
                .iter()
                .filter_map(|l| l.as_str())
                .any(|l| {
                    let l = l.trim_end_matches('/');
                    locations.iter().any(|mine| mine == l)
                });
        here.then(|| d.clone())
    })
}

/// The patient in context: the `patient` claim (normalized), or, where the issuer is known to
/// put it there, a Patient reference in `sub`.
fn patient_of(
    claim: Option<&serde_json::Value>,
    sub: Option<&str>,
    issuer: &Issuer,
) -> Result<Option<String>, TrustError> {
    match claim {
        Some(serde_json::Value::String(p)) => Ok(Some(
            normalize_patient(p, issuer).ok_or(TrustError::Claim("patient"))?,
        )),
        Some(serde_json::Value::Null) | None => {
            if issuer.patient_in_sub
                && let Some(s) =
                    sub.filter(|s| s.starts_with("Patient/") || s.contains("/Patient/"))
            {
                return Ok(Some(
                    normalize_patient(s, issuer).ok_or(TrustError::Claim("sub"))?,
                ));
            }
            Ok(None)
        }
        Some(_) => Err(TrustError::Claim("patient")),
    }
}

/// What a token says of itself before any key is used: its algorithm, header and issuer.
pub struct Preflight {
    pub alg: Result<Algorithm, TrustError>,
    pub header: Result<jsonwebtoken::Header, TrustError>,
    pub iss: String,
}

/// Reads a token's unverified parts (the only parsing input reaches before a key decides):
/// `Ok(None)` for a token that is not a compact JWS (an opaque token). Which issuer decides
/// whose keys to use is read here, so unknown issuers are refused before any network call.
pub fn preflight(token: &str) -> Result<Option<Preflight>, TrustError> {
    if !looks_like_jws(token) {
        return Ok(None);
    }
    let alg = header_algorithm(token);
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TrustError::Malformed(e.to_string()));
    let unverified: UnverifiedClaims = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| TrustError::Malformed(e.to_string()))?;
    let iss = unverified.iss.ok_or(TrustError::Claim("iss"))?;
    Ok(Some(Preflight { alg, header, iss }))
}

/// Whether a token has the shape of a compact JWS (three base64url parts).
fn looks_like_jws(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

/// A principal from an introspection answer (RFC 7662, SMART 2.2): `iss` and `aud` are checked
/// when present; without `exp` the principal lasts as long as the answer may be cached.
fn principal_from_introspection(
    v: &serde_json::Value,
    ti: &TrustedIssuer,
    token: &str,
    locations: &[String],
) -> Result<Principal, TrustError> {
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    // The answer must be the asked issuer's about a token for this gateway.
    match v.get("iss") {
        None => {}
        Some(serde_json::Value::String(iss)) if *iss == ti.cfg.issuer => {}
        Some(serde_json::Value::String(iss)) => {
            return Err(TrustError::UntrustedIssuer(crate::logtext::clean(iss)));
        }
        Some(_) => return Err(TrustError::Claim("iss")),
    }
    match v.get("aud") {
        None if ti.cfg.introspection_aud_optional => {}
        None => return Err(TrustError::Audience),
        Some(aud) => {
            let auds: Vec<&str> = match aud {
                serde_json::Value::String(s) => vec![s.as_str()],
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
                _ => vec![],
            };
            if !auds
                .iter()
                .any(|a| ti.audiences.iter().any(|mine| mine == a))
            {
                return Err(TrustError::Audience);
            }
        }
    }
    // RFC 7662 token_type: only access tokens open the gateway (not refresh or ID tokens).
    match v.get("token_type") {
        None => {}
        Some(serde_json::Value::String(t)) if is_access_token_type(t) => {}
        Some(_) => return Err(TrustError::Claim("token_type")),
    }
    let now = now_secs();
    match v.get("nbf") {
        None => {}
        Some(serde_json::Value::Number(n)) => {
            let nbf = number_secs(n).ok_or(TrustError::Claim("nbf"))?;
            if nbf > now + LEEWAY_SECS {
                return Err(TrustError::NotYetValid);
            }
        }
        Some(_) => return Err(TrustError::Claim("nbf")),
    }
    let exp = match v.get("exp") {
        Some(serde_json::Value::Number(n)) => number_secs(n).ok_or(TrustError::Claim("exp"))?,
        None => now + ti.cfg.introspection_cache.as_secs(),
        Some(_) => return Err(TrustError::Claim("exp")),
    };
    let client_id = text("client_id").or_else(|| text("azp"));
    if !ti.cfg.allowed_client_ids.is_empty()
        && !client_id
            .as_ref()
            .is_some_and(|c| ti.cfg.allowed_client_ids.contains(c))
    {
        return Err(TrustError::Client);
    }
    let here = location_details(v.get("authorization_details"), locations);
    let scope_text = here
        .as_ref()
        .and_then(|d| scope_string(d.get("scope")))
        .or_else(|| scope_string(v.get("scope")))
        .or_else(|| scope_string(v.get("scp")))
        .unwrap_or_default();
    let patient_claim = here
        .as_ref()
        .and_then(|d| d.get("patient"))
        .or(v.get("patient"));
    let patient = patient_of(patient_claim, text("sub").as_deref(), &ti.cfg)?;
    let launch_studies = launch_studies(
        here.as_ref()
            .and_then(|d| d.get("fhirContext"))
            .or(v.get("fhirContext")),
        &ti.cfg,
    );
    Ok(Principal {
        issuer: ti.cfg.issuer.clone(),
        subject: text("sub"),
        client_id,
        fhir_user: text("fhirUser"),
        scopes: ScopeSet::parse(&scope_text),
        patient,
        expires_at: exp,
        jti: text("jti"),
        token_id: token_id(token),
        claims: Arc::new(v.clone()),
        fhir_patient: None,
        launch_studies,
        bearer: Bearer::new(token),
        granted: None,
    })
}

/// The gateway as an issuer of its own tokens: signed JWT access tokens (`at+jwt`) only,
/// never introspected, no vendor quirk.
fn own_issuer(issuer: &str) -> Issuer {
    Issuer {
        issuer: issuer.to_string(),
        verify: VerifyMode::Jwt,
        jwks_uri: None,
        introspection_endpoint: None,
        client_id: None,
        fhir_base_url: None,
        allowed_client_ids: Vec::new(),
        accept_ehr_audience: false,
        accept_typ: vec!["at+jwt".to_string()],
        patient_in_sub: false,
        introspection_from_token_endpoint: false,
        client_auth: None,
        client_scope: String::new(),
        introspection_cache: Duration::ZERO,
        launch_context_restricts: false,
        opaque_tokens: false,
        introspection_aud_optional: false,
    }
}

/// Whether an introspection answer's `token_type` names an access token (RFC 6749 7.1's
/// `Bearer`, or an access token type of RFC 8693).
fn is_access_token_type(t: &str) -> bool {
    t.eq_ignore_ascii_case("bearer")
        || t == "access_token"
        || t == "urn:ietf:params:oauth:token-type:access_token"
}

/// The ImagingStudy entries of a `fhirContext` claim, when the issuer treats launch context
/// as a restriction. Entries that name other resources are ignored; an entry that names a study
/// the gateway cannot identify, or a context it cannot read at all, stays in the list as
/// [`ContextStudy::Unknown`], so it narrows to nothing rather than widening.
fn launch_studies(ctx: Option<&serde_json::Value>, issuer: &Issuer) -> Option<Vec<ContextStudy>> {
    if !issuer.launch_context_restricts {
        return None;
    }
    let ctx = ctx.filter(|c| !c.is_null())?;
    let Some(entries) = ctx.as_array() else {
        return Some(vec![ContextStudy::Unknown]);
    };
    let mut out = Vec::new();
    for e in entries {
        // SMART 2.0 listed bare reference strings; 2.1 and later list objects.
        let (typ, reference, identifier) = match e {
            serde_json::Value::String(r) => (None, Some(r.as_str()), None),
            serde_json::Value::Object(_) => (
                e.get("type").and_then(|t| t.as_str()),
                e.get("reference").and_then(|r| r.as_str()),
                e.get("identifier"),
            ),
            _ => {
                out.push(ContextStudy::Unknown);
                continue;
            }
        };
        let dicom_uid = identifier.and_then(|i| {
            if i.get("system").and_then(|s| s.as_str()) != Some(scopes::DICOM_UID_SYSTEM) {
                return None;
            }
            i.get("value")?.as_str()
        });
        let names_study = typ == Some("ImagingStudy")
            || dicom_uid.is_some()
            || reference
                .is_some_and(|r| r.starts_with("ImagingStudy/") || r.contains("/ImagingStudy/"));
        if !names_study {
            continue;
        }
        let id = reference.and_then(|r| match r.strip_prefix("ImagingStudy/") {
            Some(id) => Some(id),
            None => issuer.fhir_base_url.as_deref().and_then(|b| {
                r.strip_prefix(b.trim_end_matches('/'))
                    .and_then(|x| x.strip_prefix("/ImagingStudy/"))
            }),
        });
        let valid_id = |id: &str| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        out.push(
            match (dicom_uid.and_then(|v| v.strip_prefix("urn:oid:")), id) {
                (Some(uid), _) => ContextStudy::Uid(uid.to_string()),
                (None, Some(id)) if dicom_uid.is_none() && valid_id(id) => {
                    ContextStudy::Reference(id.to_string())
                }
                _ => ContextStudy::Unknown,
            },
        );
    }
    (!out.is_empty()).then_some(out)
}

impl TrustCore {
    /// The issuer's FHIR base and the gateway's client there, for calls with its own token.
    pub(crate) fn ehr_client(&self, issuer: &str) -> Result<(&client::IssuerClient, &str), String> {
        let ti = self.issuers.get(issuer).ok_or("unknown issuer")?;
        match (&ti.client, &ti.cfg.fhir_base_url) {
            (Some(c), Some(b)) => Ok((c, b.as_str())),
            _ => Err("the issuer has no fhir_base_url or no gateway credentials".to_string()),
        }
    }

    /// The issuer's FHIR base, for calls with the caller's own token.
    pub(crate) fn fhir_base(&self, issuer: &str) -> Result<&str, String> {
        let ti = self.issuers.get(issuer).ok_or("unknown issuer")?;
        ti.cfg
            .fhir_base_url
            .as_deref()
            .ok_or_else(|| "the issuer has no fhir_base_url".to_string())
    }
}

pub use crate::crypto::token_id;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn number_secs(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn scope_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// Reads `alg` from the protected header and refuses `none`, HMAC and anything unknown, with a
/// precise reason (jsonwebtoken would only say "malformed").
fn header_algorithm(token: &str) -> Result<Algorithm, TrustError> {
    let first = token.split('.').next().unwrap_or_default();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first.trim_end_matches('='))
        .map_err(|_| TrustError::Malformed("header is not base64url".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|_| TrustError::Malformed("header is not JSON".into()))?;
    let alg = v
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or_else(|| TrustError::Malformed("header has no alg".into()))?;
    let parsed = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other => return Err(TrustError::Algorithm(other.chars().take(16).collect())),
    };
    Ok(parsed)
}

/// `Patient/123`, `123` and `{fhir base}/Patient/123` all become `123`; anything else is refused.
fn normalize_patient(p: &str, issuer: &Issuer) -> Option<String> {
    let id = if let Some(rest) = p.strip_prefix("Patient/") {
        rest
    } else if p.starts_with("http://") || p.starts_with("https://") {
        let bases = [
            issuer.fhir_base_url.as_deref(),
            Some(issuer.issuer.as_str()),
        ];
        bases.iter().flatten().find_map(|b| {
            p.strip_prefix(b.trim_end_matches('/'))
                .and_then(|r| r.strip_prefix("/Patient/"))
        })?
    } else {
        p
    };
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| id.to_string())
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "iss={} sub={} client_id={} token={}",
            self.issuer,
            self.subject.as_deref().unwrap_or("-"),
            self.client_id.as_deref().unwrap_or("-"),
            self.token_id
        )
    }
}

#[cfg(test)]
mod tests;
