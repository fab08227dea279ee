//! Discovery documents: `{public_url}/dicom-web/.well-known/smart-configuration` (SMART App Launch
//! 2.2, with the `smart-imaging-access` capability) and `/.well-known/oauth-protected-resource`
//! (RFC 9728), so an app can learn how to get a token for this gateway.
//!
//! Owns: composing them from the configuration and the first trusted issuer's own metadata
//! (fetched once, cached, bounded), or, with `[authorization_server]`, from the gateway's own
//! authorization server. Must not decide access.

use super::WebCtx;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Json, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The issuer's metadata is fetched again after this long.
const METADATA_TTL: Duration = Duration::from_secs(3600);

/// The first issuer's metadata, when it could be fetched.
#[derive(Default)]
pub(crate) struct Cache {
    inner: Mutex<Option<(Instant, Value)>>,
}

pub(crate) const SCOPES: [&str; 6] = [
    "patient/ImagingStudy.rs",
    "patient/ImagingStudy.read",
    "patient/ImagingStudy.c",
    "user/ImagingStudy.rs",
    "launch/patient",
    "openid",
];

async fn issuer_metadata(ctx: &WebCtx) -> Value {
    let mut g = ctx.discovery.inner.lock().await;
    if let Some((t, v)) = g.as_ref()
        && t.elapsed() < METADATA_TTL
    {
        return v.clone();
    }
    let Some(issuer) = ctx.cfg.issuers.first() else {
        return Value::Null;
    };
    let url = format!(
        "{}/.well-known/smart-configuration",
        issuer.issuer.trim_end_matches('/')
    );
    let v = crate::trust::keys::get_json(&ctx.http, &url)
        .await
        .unwrap_or(Value::Null);
    *g = Some((Instant::now(), v.clone()));
    v
}

pub(crate) async fn smart_configuration(State(ctx): State<Arc<WebCtx>>) -> Response {
    if let Some(a) = &ctx.authority {
        return with_json_headers(Json(own_configuration(&ctx, a.issuer())).into_response());
    }
    let meta = issuer_metadata(&ctx).await;
    let issuer = ctx
        .cfg
        .issuers
        .first()
        .map(|i| i.issuer.clone())
        .unwrap_or_default();
    let mut doc = json!({
        "issuer": issuer,
        "capabilities": [
            "smart-imaging-access",
            "http://fhir.org/argonaut/smart-imaging/capabilities/app-launch",
            "permission-patient",
            "permission-v1",
            "permission-v2",
        ],
        "scopes_supported": SCOPES,
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code"],
    });
    // Endpoints come from the authorization server itself; only absolute URLs are copied.
    for key in [
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "token_endpoint_auth_methods_supported",
        "grant_types_supported",
        "code_challenge_methods_supported",
    ] {
        if let Some(v) = meta.get(key) {
            let absolute = v
                .as_str()
                .is_none_or(|s| s.starts_with("https://") || s.starts_with("http://"));
            if absolute {
                doc[key] = v.clone();
            }
        }
    }
    with_json_headers(Json(doc).into_response())
}

/// With `[authorization_server]`: the gateway is the imaging server's authorization server.
/// An app gets its token here by exchanging its EHR access token (SMART multi-server
/// authentication, token exchange by access token); an EHR token is still accepted as it is.
fn own_configuration(ctx: &WebCtx, issuer: &str) -> Value {
    let public = ctx.cfg.gateway.public_url.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{public}/token"),
        "jwks_uri": format!("{public}/.well-known/jwks.json"),
        "grant_types_supported": [crate::authority::GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["none"],
        "capabilities": [
            "smart-imaging-access",
            "token-exchange-accesstoken",
            "permission-patient",
            "permission-v1",
            "permission-v2",
        ],
        "scopes_supported": SCOPES,
        "code_challenge_methods_supported": ["S256"],
    })
}

pub(crate) async fn protected_resource(State(ctx): State<Arc<WebCtx>>) -> Response {
    let mut servers: Vec<String> = ctx.cfg.issuers.iter().map(|i| i.issuer.clone()).collect();
    if let Some(a) = &ctx.authority {
        servers.insert(0, a.issuer().to_string());
    }
    let doc = json!({
        "resource": ctx.public_base,
        "authorization_servers": servers,
        "scopes_supported": SCOPES,
        "bearer_methods_supported": ["header"],
        "resource_name": "pacsgate DICOMweb",
    });
    with_json_headers(Json(doc).into_response())
}

fn with_json_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}
