//! The gateway as a client of an authorization server: its own credentials (client_secret_basic,
//! or SMART Backend Services with a private_key_jwt assertion), its own access token (cached
//! until shortly before it expires), and RFC 7662 token introspection with a bounded cache.
//!
//! Owns: how the gateway authenticates itself to an issuer and what introspection answered.
//! Must not know DICOM or what a principal may do.

use super::keys::get_json;
use crate::config::{ClientAuth, Issuer};
use crate::crypto::SigningKey as DevKey;
use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

/// The largest introspection or token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A token judged inactive is not asked about again for this long.
const INACTIVE_CACHE: Duration = Duration::from_secs(10);
/// Introspection answers cached at most.
const CACHE_ENTRIES: u64 = 50_000;
/// The gateway's own token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30);

/// A private key the gateway signs client assertions with (RS384 for RSA, ES384 for P-384).
pub(crate) struct ClientKey(DevKey);

impl ClientKey {
    pub fn load(path: &Path) -> anyhow::Result<ClientKey> {
        DevKey::load_any(path, &crate::config::CLIENT_KEY_ALGS)
            .map(ClientKey)
            .with_context(|| format!("{} holds no RSA or EC P-384 private key", path.display()))
    }

    /// A client assertion (RFC 7523) for `client_id` toward `token_endpoint`.
    pub fn assertion(&self, client_id: &str, token_endpoint: &str) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut jti);
        let claims = json!({
            "iss": client_id, "sub": client_id, "aud": token_endpoint,
            "iat": now, "exp": now + 300,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        });
        self.0.sign_with_typ(&claims, Some("JWT"))
    }
}

/// What an introspection endpoint said of a token.
#[derive(Clone)]
pub(crate) enum Introspected {
    /// `active: true`, with the response's claims.
    Active(Arc<Value>),
    Inactive,
}

struct Cached {
    answer: Introspected,
    until: Instant,
}

/// The gateway's client at one issuer.
pub(crate) struct IssuerClient {
    issuer: String,
    client_id: String,
    auth: Auth,
    scope: String,
    configured_introspection: Option<String>,
    derive_introspection: bool,
    http: reqwest::Client,
    max_cache: Duration,
    endpoints: Mutex<Option<(Option<String>, Option<String>)>>,
    own_token: Mutex<Option<(String, Instant)>>,
    cache: moka::future::Cache<String, Arc<Cached>>,
}

enum Auth {
    Secret(String),
    Key(ClientKey),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IssuerClient {
    /// The client of an issuer configured with credentials; `None` without them.
    pub fn new(cfg: &Issuer, http: reqwest::Client) -> anyhow::Result<Option<IssuerClient>> {
        let (Some(auth), Some(client_id)) = (&cfg.client_auth, &cfg.client_id) else {
            return Ok(None);
        };
        let auth = match auth {
            ClientAuth::Secret(s) => Auth::Secret(s.clone()),
            ClientAuth::PrivateKeyJwt(f) => Auth::Key(ClientKey::load(Path::new(f))?),
        };
        Ok(Some(IssuerClient {
            issuer: cfg.issuer.trim_end_matches('/').to_string(),
            client_id: client_id.clone(),
            auth,
            scope: cfg.client_scope.clone(),
            configured_introspection: cfg.introspection_endpoint.clone(),
            derive_introspection: cfg.introspection_from_token_endpoint,
            http,
            max_cache: cfg.introspection_cache,
            endpoints: Mutex::new(None),
            own_token: Mutex::new(None),
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .time_to_live(cfg.introspection_cache.max(INACTIVE_CACHE))
                .build(),
        }))
    }

    /// (token endpoint, introspection endpoint), from the issuer's metadata.
    async fn endpoints(&self) -> Result<(Option<String>, Option<String>), String> {
        let mut g = self.endpoints.lock().await;
        if let Some(e) = g.as_ref() {
            return Ok(e.clone());
        }
        let mut last = String::new();
        for doc in [
            "smart-configuration",
            "openid-configuration",
            "oauth-authorization-server",
        ] {
            match get_json(&self.http, &format!("{}/.well-known/{doc}", self.issuer)).await {
                Ok(v) => {
                    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
                    let token = s("token_endpoint");
                    // Vendor quirk: some servers introspect at `.../introspect` next to
                    // `.../token` without advertising it.
                    let derived = token
                        .as_deref()
                        .filter(|_| self.derive_introspection)
                        .and_then(|t| t.strip_suffix("/token"))
                        .map(|base| format!("{base}/introspect"));
                    let e = (
                        token.clone(),
                        self.configured_introspection
                            .clone()
                            .or(derived)
                            .or_else(|| s("introspection_endpoint")),
                    );
                    *g = Some(e.clone());
                    return Ok(e);
                }
                Err(e) => last = e,
            }
        }
        Err(format!("the issuer's metadata cannot be read: {last}"))
    }

    /// The HTTP client toward this issuer (its timeouts; no redirects).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The gateway's own access token (SMART Backend Services), cached until shortly before
    /// it expires.
    pub(crate) async fn own_token(&self) -> Result<String, String> {
        let mut g = self.own_token.lock().await;
        if let Some((t, until)) = g.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token_endpoint, _) = self.endpoints().await?;
        let token_endpoint = token_endpoint.ok_or("the issuer names no token_endpoint")?;
        let rq = match &self.auth {
            Auth::Key(key) => {
                let assertion = key
                    .assertion(&self.client_id, &token_endpoint)
                    .map_err(|e| e.to_string())?;
                self.http.post(&token_endpoint).form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", self.scope.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                ])
            }
            Auth::Secret(secret) => {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{secret}", self.client_id));
                self.http
                    .post(&token_endpoint)
                    .header("authorization", format!("Basic {basic}"))
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("scope", self.scope.as_str()),
                    ])
            }
        };
        let resp = rq
            .send()
            .await
            .map_err(|e| format!("token request failed: {}", e.without_url()))?;
        let v = read_json(resp).await?;
        let token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .ok_or("the token response has no access_token")?;
        let lifetime = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(300);
        let until = Instant::now() + Duration::from_secs(lifetime).saturating_sub(RENEW_BEFORE);
        *g = Some((token.to_string(), until));
        Ok(token.to_string())
    }

    /// Asks the issuer about a token (RFC 7662), with a cache keyed by a digest of the token.
    pub async fn introspect(&self, token: &str) -> Result<Introspected, String> {
        let key = super::token_id(token);
        if let Some(c) = self.cache.get(&key).await
            && Instant::now() < c.until
        {
            crate::metrics::cache("introspection", true);
            return Ok(c.answer.clone());
        }
        crate::metrics::cache("introspection", false);
        let (answer, until) = self.ask(token).await?;
        self.cache
            .insert(
                key,
                Arc::new(Cached {
                    answer: answer.clone(),
                    until,
                }),
            )
            .await;
        Ok(answer)
    }

    /// The readiness check: the introspection endpoint answers a well-formed RFC 7662 reply
    /// (to a token that cannot be active) with the gateway's client authentication.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        self.ask("pacsgate-readiness-check").await.map(|_| ())
    }

    /// One introspection request, uncached: the answer and how long it may be reused.
    async fn ask(&self, token: &str) -> Result<(Introspected, Instant), String> {
        let (_, endpoint) = self.endpoints().await?;
        let endpoint = endpoint
            .ok_or("the issuer names no introspection_endpoint; set introspection_endpoint")?;
        let mut rq = self
            .http
            .post(&endpoint)
            .form(&[("token", token)])
            .header("accept", "application/json");
        rq = match &self.auth {
            Auth::Secret(secret) => {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{secret}", self.client_id));
                rq.header("authorization", format!("Basic {basic}"))
            }
            Auth::Key(_) => rq.bearer_auth(self.own_token().await?),
        };
        let resp = rq
            .send()
            .await
            .map_err(|e| format!("introspection failed: {}", e.without_url()))?;
        let v = read_json(resp).await?;
        let active = v
            .get("active")
            .and_then(|a| a.as_bool())
            .ok_or("the introspection answer has no boolean active")?;
        let now = now_secs();
        let exp = v.get("exp").and_then(|e| e.as_u64());
        let (answer, until) = if active && exp.is_none_or(|e| e > now) {
            // Never cached past the token's own expiry.
            let ttl = exp
                .map(|e| Duration::from_secs(e - now))
                .unwrap_or(self.max_cache)
                .min(self.max_cache);
            (Introspected::Active(Arc::new(v)), Instant::now() + ttl)
        } else {
            (Introspected::Inactive, Instant::now() + INACTIVE_CACHE)
        };
        Ok((answer, until))
    }
}

async fn read_json(resp: reqwest::Response) -> Result<Value, String> {
    read_json_max(resp, MAX_RESPONSE_BYTES).await
}

/// Reads a JSON answer of at most `max` bytes; a non-success status is an error.
pub(crate) async fn read_json_max(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Value, String> {
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading the answer failed: {}", e.without_url()))?
    {
        if body.len() + c.len() > max {
            return Err("the answer is too large".into());
        }
        body.extend_from_slice(&c);
    }
    if !status.is_success() {
        return Err(format!("the issuer answered {}", status.as_u16()));
    }
    serde_json::from_slice(&body).map_err(|_| "the answer is not JSON".to_string())
}
