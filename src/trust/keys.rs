//! Signing keys of one trusted issuer: discovery, JWKS fetch, cache and rotation.
//!
//! Owns: where an issuer's keys live (`jwks_uri` from config, else discovered from
//! `/.well-known/smart-configuration`, then `/.well-known/openid-configuration`), the cached key
//! set, and how often the network may be asked (an unknown `kid` triggers at most one refetch per
//! minute per issuer). Must not know tokens' claims or DICOM.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

/// The largest metadata or JWKS document read from an issuer.
const MAX_DOCUMENT_BYTES: usize = 512 * 1024;
/// Keys are refetched after this long even when every `kid` is known, to see revocations.
const KEY_MAX_AGE: Duration = Duration::from_secs(3600);
/// At most one fetch per this interval per issuer once keys are known.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// While no key could ever be fetched, retry no more often than this.
const MIN_RETRY_WITHOUT_KEYS: Duration = Duration::from_secs(5);

/// The kind of a public key; it fixes which algorithms may be verified with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyKind {
    /// The algorithm allow-list, bound to the key type: never `none`, never HMAC.
    pub(crate) fn allows(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::EcP256, Algorithm::ES256)
                | (KeyKind::EcP384, Algorithm::ES384)
        )
    }
}

/// One verification key.
pub(crate) struct VerifyKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The `alg` the JWK pins, if it names one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no key of issuer {issuer} matches kid {kid:?} and algorithm {alg:?}")]
    NoMatchingKey {
        issuer: String,
        kid: Option<String>,
        alg: Algorithm,
    },
    #[error("keys of issuer {issuer} could not be fetched: {reason}")]
    Unavailable { issuer: String, reason: String },
}

#[derive(Default)]
struct KeyState {
    keys: Vec<Arc<VerifyKey>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    jwks_uri: Option<String>,
}

/// The key cache of one issuer.
pub(crate) struct IssuerKeys {
    issuer: String,
    configured_jwks_uri: Option<String>,
    http: reqwest::Client,
    state: RwLock<KeyState>,
    /// Serializes fetches so a burst of tokens with a new `kid` causes one request.
    fetch_lock: Mutex<()>,
    /// The gateway's own key (its `[authorization_server]`): known, never fetched.
    fixed: bool,
}

impl IssuerKeys {
    pub fn new(issuer: String, jwks_uri: Option<String>, http: reqwest::Client) -> Self {
        IssuerKeys {
            issuer,
            configured_jwks_uri: jwks_uri,
            http,
            state: RwLock::new(KeyState::default()),
            fetch_lock: Mutex::new(()),
            fixed: false,
        }
    }

    /// The keys of the gateway's own tokens: given, never fetched nor refreshed.
    pub fn fixed(issuer: String, public_jwks: &[serde_json::Value], http: reqwest::Client) -> Self {
        let keys = public_jwks
            .iter()
            .filter_map(parse_jwk)
            .map(Arc::new)
            .collect();
        IssuerKeys {
            issuer,
            configured_jwks_uri: None,
            http,
            state: RwLock::new(KeyState {
                keys,
                fetched_at: Some(Instant::now()),
                ..KeyState::default()
            }),
            fetch_lock: Mutex::new(()),
            fixed: true,
        }
    }

    /// Keys that may verify a token with this `kid` and `alg`, fetching if the cache has none.
    pub(crate) async fn candidates(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerifyKey>>, KeyError> {
        let (found, stale) = {
            let st = self.state.read().await;
            let stale = st.fetched_at.is_none_or(|t| t.elapsed() > KEY_MAX_AGE);
            (select(&st.keys, kid, alg), stale)
        };
        if self.fixed {
            return match found.is_empty() {
                false => Ok(found),
                true => Err(KeyError::NoMatchingKey {
                    issuer: self.issuer.clone(),
                    kid: kid.map(str::to_string),
                    alg,
                }),
            };
        }
        let hit = !found.is_empty() && !stale;
        crate::metrics::cache("keys", hit);
        if hit {
            return Ok(found);
        }
        // Unknown kid, no keys yet, or keys too old: refetch, rate-limited.
        let fetch_err = self.refresh().await.err();
        let st = self.state.read().await;
        let found = select(&st.keys, kid, alg);
        if !found.is_empty() {
            return Ok(found);
        }
        match (fetch_err, st.keys.is_empty()) {
            (Some(reason), true) => Err(KeyError::Unavailable {
                issuer: self.issuer.clone(),
                reason,
            }),
            _ => Err(KeyError::NoMatchingKey {
                issuer: self.issuer.clone(),
                kid: kid.map(str::to_string),
                alg,
            }),
        }
    }

    /// Fetches the key set unless a fetch happened too recently. Old keys stay on failure.
    async fn refresh(&self) -> Result<(), String> {
        let _guard = self.fetch_lock.lock().await;
        {
            let st = self.state.read().await;
            let min = if st.keys.is_empty() {
                MIN_RETRY_WITHOUT_KEYS
            } else {
                MIN_REFRESH_INTERVAL
            };
            if st.last_attempt.is_some_and(|t| t.elapsed() < min) {
                return Err("a fetch was attempted moments ago".into());
            }
        }
        self.fetch_and_keep().await
    }

    /// The readiness check: fetches the key set now (the gateway's own cadence, not a token's
    /// request, so the rate limit does not apply); a failure keeps the old keys.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        if self.fixed {
            return Ok(());
        }
        let _guard = self.fetch_lock.lock().await;
        self.fetch_and_keep().await
    }

    /// Fetches the key set and keeps it; the caller holds `fetch_lock`.
    async fn fetch_and_keep(&self) -> Result<(), String> {
        let jwks_uri = {
            let known = self.state.read().await.jwks_uri.clone();
            match known.or_else(|| self.configured_jwks_uri.clone()) {
                Some(u) => Ok(u),
                None => self.discover_jwks_uri().await,
            }
        };
        let result = match jwks_uri {
            Ok(uri) => self.fetch_jwks(&uri).await.map(|keys| (uri, keys)),
            Err(e) => Err(e),
        };
        let mut st = self.state.write().await;
        st.last_attempt = Some(Instant::now());
        match result {
            Ok((uri, keys)) => {
                tracing::info!(issuer = %self.issuer, jwks_uri = %uri, keys = keys.len(), "issuer keys fetched");
                st.keys = keys;
                st.fetched_at = Some(Instant::now());
                crate::metrics::keys_fetched(&self.issuer);
                st.jwks_uri = Some(uri);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "issuer keys could not be fetched");
                Err(e)
            }
        }
    }

    async fn discover_jwks_uri(&self) -> Result<String, String> {
        let base = self.issuer.trim_end_matches('/');
        let mut reasons = Vec::new();
        for doc in ["smart-configuration", "openid-configuration"] {
            let url = format!("{base}/.well-known/{doc}");
            match get_json(&self.http, &url).await {
                Ok(v) => match v.get("jwks_uri").and_then(|u| u.as_str()) {
                    Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
                        return Ok(u.to_string());
                    }
                    _ => reasons.push(format!("{url} names no absolute jwks_uri")),
                },
                Err(e) => reasons.push(e),
            }
        }
        Err(format!(
            "no jwks_uri found ({}); set jwks_uri for this issuer",
            reasons.join("; ")
        ))
    }

    async fn fetch_jwks(&self, uri: &str) -> Result<Vec<Arc<VerifyKey>>, String> {
        let doc = get_json(&self.http, uri).await?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| format!("{uri} is not a JWK set (no \"keys\" array)"))?;
        let parsed: Vec<Arc<VerifyKey>> = keys.iter().filter_map(parse_jwk).map(Arc::new).collect();
        if parsed.is_empty() {
            return Err(format!(
                "{uri} holds no usable RSA or EC P-256/P-384 signing key"
            ));
        }
        Ok(parsed)
    }
}

fn select(keys: &[Arc<VerifyKey>], kid: Option<&str>, alg: Algorithm) -> Vec<Arc<VerifyKey>> {
    keys.iter()
        .filter(|k| match kid {
            Some(kid) => k.kid.as_deref() == Some(kid),
            None => true,
        })
        .filter(|k| k.kind.allows(alg) && k.alg.is_none_or(|a| a == alg))
        .cloned()
        .collect()
}

/// Turns one JWK into a verification key; symmetric, encryption-only and unknown keys are skipped.
pub(crate) fn parse_jwk(v: &serde_json::Value) -> Option<VerifyKey> {
    let jwk: Jwk = serde_json::from_value(v.clone()).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::EcP256,
            EllipticCurve::P384 => KeyKind::EcP384,
            _ => return None,
        },
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(ka.to_string().parse::<Algorithm>().ok()?),
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        kind,
        alg,
        key,
    })
}

/// GET a JSON document with a size cap.
pub(crate) async fn get_json(
    http: &reqwest::Client,
    url: &str,
) -> Result<serde_json::Value, String> {
    let mut resp = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {url} failed: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url} answered {}", resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|l| l as usize > MAX_DOCUMENT_BYTES)
    {
        return Err(format!(
            "GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("GET {url} failed while reading: {e}"))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
}
