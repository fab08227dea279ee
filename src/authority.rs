//! The gateway as the imaging system's authorization server (`[authorization_server]`): RFC
//! 8693 token exchange, an access token of a subject issuer in, a short-lived token of the
//! gateway's own out.
//!
//! Owns: the exchange request's parameters and their refusals (RFC 6749 5.2 error codes), the
//! subject issuers, the memory of subject tokens already exchanged (each one once, remembered
//! for its lifetime, across reloads), the lifetime of an issued token, its claims and its
//! signature, and the public key set. The subject token is verified by the trust core exactly
//! as on every other path, and what the issued token may carry is the policy core's decision
//! ([`crate::policy::exchange`]). Must not know HTTP beyond the status an answer carries, nor
//! DICOM.

use crate::config::{Config, TOKEN_KEY_ALGS};
use crate::crypto::SigningKey;
use crate::policy::Policy;
use crate::policy::exchange::{Carried, Refusal};
use crate::trust::own::{Granted, GrantedPatient};
use crate::trust::scopes::ScopeSet;
use crate::trust::{Principal, TrustCore};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// IHE IUA writes the access token type with a hyphen; both name the same thing.
const ACCESS_TOKEN_TYPE_IUA: &str = "urn:ietf:params:oauth:token-type:access-token";
/// Subject tokens remembered at most (the earliest to expire go first); when every one is
/// still live, exchanges wait for room (503) rather than forget one.
const MAX_REMEMBERED: usize = 200_000;

/// A refused exchange: an RFC 6749 5.2 error, with the HTTP status it is sent with. The
/// description names the cause and never holds a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl ExchangeError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> ExchangeError {
        ExchangeError {
            status,
            error,
            description: description.into(),
        }
    }
    fn request(d: impl Into<String>) -> ExchangeError {
        ExchangeError::new(400, "invalid_request", d)
    }
    fn grant(d: impl Into<String>) -> ExchangeError {
        ExchangeError::new(400, "invalid_grant", d)
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Value {
        json!({ "error": self.error, "error_description": self.description })
    }
}

/// A refused exchange, with the subject token's principal once it was verified (for the
/// audit record).
#[derive(Debug)]
pub struct Refused {
    pub error: ExchangeError,
    pub subject: Option<Box<Principal>>,
}

/// An issued token and what the answer says of it.
pub struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
    pub patient: Option<String>,
    /// The subject token's principal, for the audit record.
    pub subject: Principal,
}

impl Issued {
    /// The RFC 8693 2.2.1 answer, with SMART's `patient`.
    pub fn body(&self) -> Value {
        let mut v = json!({
            "access_token": self.access_token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        });
        if let Some(p) = &self.patient {
            v["patient"] = json!(p);
        }
        v
    }
}

/// The subject tokens already exchanged, by a digest of their issuer and `jti` (or of the
/// token, without a `jti`), each until it expires. Outlives configurations: a reload must not
/// let a token be exchanged again.
#[derive(Default)]
pub struct Exchanged {
    seen: Mutex<HashMap<[u8; 32], u64>>,
}

impl Exchanged {
    /// Remembers `key` until `until` (seconds since the epoch): `Ok(true)` when it is new,
    /// `Ok(false)` when it was seen, `Err` when the memory is full of live entries.
    fn remember(&self, key: [u8; 32], until: u64, now: u64) -> Result<bool, ()> {
        let mut seen = self.seen.lock().map_err(|_| ())?;
        if seen.get(&key).is_some_and(|&t| t > now) {
            return Ok(false);
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, t| *t > now);
            if seen.len() >= MAX_REMEMBERED {
                return Err(());
            }
        }
        seen.insert(key, until);
        Ok(true)
    }
}

/// The authorization server of one configuration.
pub struct Authority {
    issuer: String,
    key: SigningKey,
    lifetime: Duration,
    subject_issuers: Vec<String>,
    audiences: Vec<String>,
    /// What `resource` and `audience` may name: the gateway's audiences and its services.
    targets: Vec<String>,
    exchanged: Arc<Exchanged>,
    verify_timeout: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authority {
    /// The authorization server `[authorization_server]` configures, with its key loaded (or
    /// created, when its file does not exist yet); `None` when it is not enabled.
    pub fn load(cfg: &Config, exchanged: Arc<Exchanged>) -> anyhow::Result<Option<Arc<Authority>>> {
        let Some(a) = &cfg.authorization_server else {
            return Ok(None);
        };
        let path = &a.signing_key_file;
        let key = if path.exists() {
            SigningKey::load_any(path, &TOKEN_KEY_ALGS)?
        } else {
            let k = SigningKey::load_or_create(path, jsonwebtoken::Algorithm::ES256)?;
            tracing::info!(file = %path.display(), kid = %k.kid, "created the signing key of the gateway's own tokens");
            k
        };
        let public = cfg.gateway.public_url.trim_end_matches('/');
        let mut targets: Vec<String> = cfg
            .gateway
            .audiences
            .iter()
            .map(|a| a.trim_end_matches('/').to_string())
            .collect();
        targets.extend([
            public.to_string(),
            format!("{public}/dicom-web"),
            format!("{public}/fhir"),
        ]);
        Ok(Some(Arc::new(Authority {
            issuer: a.issuer.clone(),
            key,
            lifetime: a.token_lifetime,
            subject_issuers: a.subject_issuers.clone(),
            audiences: cfg.gateway.audiences.clone(),
            targets,
            exchanged,
            verify_timeout: cfg.limits.token_verify_timeout,
        })))
    }

    /// The public half of the signing key, as the JWK set publishes it and the trust core
    /// verifies with.
    pub fn public_jwks(&self) -> Vec<Value> {
        vec![self.key.public_jwk().clone()]
    }

    /// `iss` of the tokens it signs.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// What a token request's form says, each parameter once (RFC 6749 3.2: none may be
    /// repeated); parameters RFC 8693 does not define are ignored, as RFC 6749 asks.
    fn parameters(form: &[(String, String)]) -> Result<HashMap<&str, &str>, ExchangeError> {
        let mut m = HashMap::new();
        for (k, v) in form {
            if m.insert(k.as_str(), v.as_str()).is_some() {
                return Err(ExchangeError::request(format!(
                    "parameter {k} is given more than once"
                )));
            }
        }
        Ok(m)
    }

    /// One token exchange: the request's form, answered with a token or a refusal.
    pub async fn exchange(
        &self,
        form: &[(String, String)],
        trust: &TrustCore,
        policy: &Policy,
    ) -> Result<Issued, Refused> {
        let no = |error: ExchangeError| Refused {
            error,
            subject: None,
        };
        let by = |error: ExchangeError, p: &Principal| Refused {
            error,
            subject: Some(Box::new(p.clone())),
        };
        let m = Self::parameters(form).map_err(no)?;
        match m.get("grant_type") {
            Some(&GRANT_TYPE) => {}
            Some(other) => {
                return Err(no(ExchangeError::new(
                    400,
                    "unsupported_grant_type",
                    format!("grant_type {other:?} is not served here; use {GRANT_TYPE}"),
                )));
            }
            None => return Err(no(ExchangeError::request("grant_type is missing"))),
        }
        let token = match m.get("subject_token") {
            Some(t) if !t.is_empty() => *t,
            _ => return Err(no(ExchangeError::request("subject_token is missing"))),
        };
        match m.get("subject_token_type") {
            Some(&ACCESS_TOKEN_TYPE) | Some(&ACCESS_TOKEN_TYPE_IUA) => {}
            Some(other) => {
                return Err(no(ExchangeError::request(format!(
                    "subject_token_type {other:?} is not exchanged here; only access tokens ({ACCESS_TOKEN_TYPE}) are"
                ))));
            }
            None => return Err(no(ExchangeError::request("subject_token_type is missing"))),
        }
        if let Some(t) = m.get("requested_token_type")
            && *t != ACCESS_TOKEN_TYPE
            && *t != ACCESS_TOKEN_TYPE_IUA
        {
            return Err(no(ExchangeError::request(format!(
                "requested_token_type {t:?} cannot be issued; only {ACCESS_TOKEN_TYPE}"
            ))));
        }
        if m.contains_key("actor_token") || m.contains_key("actor_token_type") {
            return Err(no(ExchangeError::request(
                "delegation (actor_token) is not supported; exchange the subject token alone",
            )));
        }
        for p in ["resource", "audience"] {
            if let Some(t) = m.get(p)
                && !self.targets.iter().any(|x| x == t.trim_end_matches('/'))
            {
                return Err(no(ExchangeError::new(
                    400,
                    "invalid_target",
                    format!(
                        "{p} names no service of this gateway; its tokens are for {}",
                        self.targets.join(", ")
                    ),
                )));
            }
        }
        let requested = match m.get("scope") {
            None => None,
            Some(s) if s.trim().is_empty() => {
                return Err(no(ExchangeError::new(
                    400,
                    "invalid_scope",
                    "scope is empty",
                )));
            }
            Some(s) => Some(ScopeSet::parse(s)),
        };

        // The subject token, verified exactly as every request's token is.
        let subject = match tokio::time::timeout(self.verify_timeout, trust.verify(token)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) if e.is_transient() => {
                return Err(no(ExchangeError::new(
                    503,
                    "temporarily_unavailable",
                    format!("the subject token cannot be checked now: {e}"),
                )));
            }
            Ok(Err(e)) => {
                return Err(no(ExchangeError::grant(format!(
                    "the subject token is refused: {e}"
                ))));
            }
            Err(_) => {
                return Err(no(ExchangeError::new(
                    503,
                    "temporarily_unavailable",
                    "the subject token's issuer did not answer in time",
                )));
            }
        };
        if !self.subject_issuers.contains(&subject.issuer) {
            return Err(by(
                ExchangeError::grant(format!(
                    "tokens of {} are not exchanged here (authorization_server.subject_issuers)",
                    subject.issuer
                )),
                &subject,
            ));
        }
        let caller = policy.caller(subject).await;
        let carried = match policy.carried(&caller, requested.as_ref()) {
            Ok(c) => c,
            Err(r) => {
                let e = match r {
                    Refusal::Scope(why) => ExchangeError::new(400, "invalid_scope", why),
                    Refusal::Grant(d) => ExchangeError::grant(format!(
                        "the subject token opens no imaging access here: {d}"
                    )),
                };
                return Err(by(e, caller.principal()));
            }
        };
        let subject = caller.principal().clone();
        let now = now_secs();
        let exp = (now + self.lifetime.as_secs().max(1)).min(subject.expires_at);
        if exp <= now {
            return Err(by(
                ExchangeError::grant("the subject token has expired"),
                &subject,
            ));
        }
        // Each subject token once: a token that leaked cannot be turned into fresh ones.
        let key = replay_key(&subject);
        match self
            .exchanged
            .remember(key, subject.expires_at + crate::trust::LEEWAY_SECS, now)
        {
            Ok(true) => {}
            Ok(false) => {
                return Err(by(
                    ExchangeError::grant(
                        "the subject token was exchanged already; each is exchanged once",
                    ),
                    &subject,
                ));
            }
            Err(()) => {
                return Err(by(
                    ExchangeError::new(
                        503,
                        "temporarily_unavailable",
                        "too many exchanges are remembered now; try again shortly",
                    ),
                    &subject,
                ));
            }
        }
        let (claims, scope, patient) = self.claims(&subject, &carried, now, exp);
        let access_token = match self.key.sign(&claims) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "the gateway's token could not be signed");
                return Err(by(
                    ExchangeError::new(500, "server_error", "the token could not be signed"),
                    &subject,
                ));
            }
        };
        Ok(Issued {
            access_token,
            expires_in: exp - now,
            scope,
            patient,
            subject,
        })
    }

    /// The issued token's claims (RFC 9068 and SMART's, and [`Granted`]), its scope text and
    /// its `patient`.
    fn claims(
        &self,
        subject: &Principal,
        carried: &Carried,
        now: u64,
        exp: u64,
    ) -> (Value, String, Option<String>) {
        let mut jti = [0u8; 16];
        crate::crypto::random(&mut jti);
        let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
        let granted = Granted {
            subject_issuer: subject.issuer.clone(),
            patients: carried.patients.as_ref().map(|ps| {
                ps.iter()
                    .map(|p| GrantedPatient {
                        id: p.patient_id.clone(),
                        issuer: p.issuer.clone(),
                    })
                    .collect()
            }),
            studies: carried.studies.clone(),
        };
        // SMART's `patient` is a FHIR id at this server: the first PatientID, where it is one.
        let patient = carried
            .patients
            .as_ref()
            .and_then(|ps| ps.first())
            .map(|p| p.patient_id.clone())
            .filter(|id| {
                id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            });
        let scope = carried.scopes.to_string();
        let mut c = json!({
            "iss": self.issuer,
            "aud": self.audiences,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": jti,
            "scope": scope,
            crate::trust::own::CLAIM: granted.to_claim(),
        });
        if let Some(s) = subject.subject.as_ref().or(subject.client_id.as_ref()) {
            c["sub"] = json!(s);
        }
        if let Some(id) = &subject.client_id {
            c["client_id"] = json!(id);
        }
        if let Some(u) = &subject.fhir_user {
            c["fhirUser"] = json!(u);
        }
        if let Some(p) = &patient {
            c["patient"] = json!(p);
        }
        (c, scope, patient)
    }
}

fn replay_key(p: &Principal) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(p.issuer.as_bytes());
    h.update([0]);
    match &p.jti {
        Some(j) => {
            h.update(b"jti");
            h.update(j.as_bytes());
        }
        None => h.update(p.bearer.digest()),
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_token_is_remembered_until_it_expires_and_memory_is_bounded() {
        let x = Exchanged::default();
        assert_eq!(x.remember([1; 32], 100, 10), Ok(true));
        assert_eq!(x.remember([1; 32], 100, 50), Ok(false));
        assert_eq!(
            x.remember([1; 32], 200, 100),
            Ok(true),
            "expired: may be seen anew"
        );
        let mut k = [0u8; 32];
        for i in 0..MAX_REMEMBERED - 1 {
            k[..8].copy_from_slice(&(i as u64 + 10).to_le_bytes());
            assert_eq!(x.remember(k, 1000, 100), Ok(true));
        }
        assert_eq!(
            x.remember([2; 32], 1000, 100),
            Err(()),
            "full of live entries"
        );
        assert_eq!(
            x.remember([2; 32], 2000, 1000),
            Ok(true),
            "room once they expire"
        );
    }

    #[test]
    fn a_repeated_parameter_is_refused() {
        let f = vec![
            ("grant_type".to_string(), GRANT_TYPE.to_string()),
            ("scope".to_string(), "a".to_string()),
            ("scope".to_string(), "b".to_string()),
        ];
        assert_eq!(
            Authority::parameters(&f).err().map(|e| e.error),
            Some("invalid_request")
        );
    }
}
