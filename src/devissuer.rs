//! `pacsgate dev-issuer`: a development authorization server for demos and tests. NOT FOR PRODUCTION.
//!
//! Owns: a signing key (generated, or loaded from a PEM file), the discovery documents, the JWKS,
//! minting of SMART access tokens (`POST /token`, and `mint` for the command line) and RFC 7662
//! introspection of its own tokens. It authenticates nobody: anyone who can reach it can mint a
//! token, which is exactly what a test needs and what production must never have. Must not know
//! the gateway's policy or DICOM.

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use axum::extract::{Form, State};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use axum::{Router, http::StatusCode};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A signing key of the development issuer.
pub struct DevKey {
    pub alg: Algorithm,
    pub kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_jwk: Value,
    pkcs8_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_der(text: &str) -> anyhow::Result<Vec<u8>> {
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .context("the key file is not PEM")
}

impl DevKey {
    /// Generates a fresh key for `alg` (ES256, ES384, RS256 or PS256 and the other RSA algorithms).
    pub fn generate(alg: Algorithm) -> anyhow::Result<DevKey> {
        let rng = SystemRandom::new();
        let der: Vec<u8> = match alg {
            Algorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("EC key generation failed"))?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::ES384 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("EC key generation failed"))?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
                kp.as_der()
                    .map_err(|_| anyhow::anyhow!("RSA key encoding failed"))?
                    .as_ref()
                    .to_vec()
            }
            other => bail!("the dev issuer signs with ES256, ES384, RS* or PS*, not {other:?}"),
        };
        DevKey::from_pkcs8(&der, alg)
    }

    /// Builds the key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8], alg: Algorithm) -> anyhow::Result<DevKey> {
        let pkcs8_pem = pem("PRIVATE KEY", der);
        let (encoding, public_jwk) = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let (sig_alg, crv) = if alg == Algorithm::ES256 {
                    (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256")
                } else {
                    (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384")
                };
                let kp = EcdsaKeyPair::from_pkcs8(sig_alg, der)
                    .map_err(|_| anyhow::anyhow!("not an EC {crv} PKCS#8 key"))?;
                let point = kp.public_key().as_ref();
                let n = (point.len() - 1) / 2;
                let jwk = json!({
                    "kty": "EC", "crv": crv,
                    "x": B64URL.encode(&point[1..1 + n]),
                    "y": B64URL.encode(&point[1 + n..]),
                });
                (EncodingKey::from_ec_pem(pkcs8_pem.as_bytes())?, jwk)
            }
            _ => {
                let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
                    .map_err(|_| anyhow::anyhow!("not an RSA PKCS#8 key"))?;
                let pk = kp.public_key();
                let jwk = json!({
                    "kty": "RSA",
                    "n": B64URL.encode(pk.modulus().big_endian_without_leading_zero()),
                    "e": B64URL.encode(pk.exponent().big_endian_without_leading_zero()),
                });
                (EncodingKey::from_rsa_pem(pkcs8_pem.as_bytes())?, jwk)
            }
        };
        // The kid is a thumbprint-like digest of the public key, so it changes when the key does.
        let kid = crate::trust::token_id(&public_jwk.to_string());
        let mut public_jwk = public_jwk;
        public_jwk["kid"] = json!(kid);
        public_jwk["use"] = json!("sig");
        public_jwk["alg"] = json!(format!("{alg:?}"));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(public_jwk.clone())?;
        let decoding = DecodingKey::from_jwk(&jwk)?;
        Ok(DevKey {
            alg,
            kid,
            encoding,
            decoding,
            public_jwk,
            pkcs8_pem,
        })
    }

    /// Loads a PKCS#8 PEM key written by [`DevKey::save`] (or by openssl).
    pub fn load(path: &Path, alg: Algorithm) -> anyhow::Result<DevKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        DevKey::from_pkcs8(&pem_der(&text)?, alg)
            .with_context(|| format!("key file {} does not hold a {alg:?} key", path.display()))
    }

    /// Loads the key file if it exists, otherwise generates one and writes it there.
    pub fn load_or_create(path: &Path, alg: Algorithm) -> anyhow::Result<DevKey> {
        if path.exists() {
            return DevKey::load(path, alg);
        }
        let k = DevKey::generate(alg)?;
        k.save(path)?;
        Ok(k)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, &self.pkcs8_pem)
            .with_context(|| format!("cannot write key file {}", path.display()))
    }

    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs claims as an RFC 9068 access token (`typ: at+jwt`).
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        self.sign_with_typ(claims, Some("at+jwt"))
    }

    pub fn sign_with_typ(&self, claims: &Value, typ: Option<&str>) -> anyhow::Result<String> {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        h.typ = typ.map(str::to_string);
        Ok(jsonwebtoken::encode(&h, claims, &self.encoding)?)
    }
}

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
}

/// The development issuer.
pub struct DevIssuer {
    pub issuer: String,
    pub key: DevKey,
    pub default_aud: String,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl DevIssuer {
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
            "jti": crate::trust::token_id(&format!("{iat}{}", rand_hex())),
            "client_id": client_id,
            "scope": req.scope.clone().unwrap_or_else(|| "patient/ImagingStudy.rs".into()),
        });
        if let Some(p) = req.patient.as_ref().filter(|p| !p.is_empty()) {
            c["patient"] = json!(p);
        }
        if let Some(u) = &req.fhir_user {
            c["fhirUser"] = json!(u);
        }
        c
    }

    pub fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        self.key.sign(&self.claims(req))
    }

    pub fn smart_configuration(&self) -> Value {
        let i = &self.issuer;
        json!({
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
        })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/.well-known/smart-configuration", get(well_known))
            .route("/.well-known/openid-configuration", get(well_known))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .route("/introspect", post(introspect))
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

async fn token(State(s): State<Arc<DevIssuer>>, Form(req): Form<MintRequest>) -> impl IntoResponse {
    match s.mint(&req) {
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

async fn introspect(State(s): State<Arc<DevIssuer>>, Form(f): Form<IntrospectForm>) -> Json<Value> {
    let mut v = Validation::new(s.key.alg);
    v.validate_aud = false;
    v.leeway = 0;
    v.set_issuer(&[s.issuer.as_str()]);
    match jsonwebtoken::decode::<Value>(f.token.trim(), &s.key.decoding, &v) {
        Ok(d) => {
            let mut out = d.claims;
            out["active"] = json!(true);
            Json(out)
        }
        Err(_) => Json(json!({"active": false})),
    }
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

/// Runs the development issuer until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    issuer: Arc<DevIssuer>,
) -> anyhow::Result<()> {
    axum::serve(listener, issuer.router()).await?;
    Ok(())
}
