//! The token endpoint of the gateway's own authorization server (`{public_url}/token`, RFC
//! 8693 token exchange) and its public key set (`{public_url}/.well-known/jwks.json`).
//!
//! Owns: reading the form (bounded, `application/x-www-form-urlencoded` only), the answer's
//! form (RFC 6749 5.1 and 5.2: JSON, `Cache-Control: no-store`) and the audit record of each
//! exchange. Every rule of the exchange is [`crate::authority`]'s. Must not decide.

use super::{WebCtx, trail};
use crate::audit::{Operation, Outcome};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde_json::{Value, json};
use std::sync::Arc;

/// The largest token request read: a subject token of the largest size accepted, encoded.
const MAX_FORM_BYTES: usize = 3 * crate::trust::MAX_TOKEN_BYTES;

fn answer(status: StatusCode, body: Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn refused(e: &crate::authority::ExchangeError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = answer(status, e.body());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

/// `POST /token`.
pub(crate) async fn token(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    let Some(authority) = ctx.authority.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(_slot) = tokio::time::timeout(super::SLOT_WAIT, ctx.slots.acquire()).await else {
        return refused(&crate::authority::ExchangeError {
            status: 503,
            error: "temporarily_unavailable",
            description: "too many requests at once".into(),
        });
    };
    let form_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    let invalid = |why: &str| {
        let e = crate::authority::ExchangeError {
            status: 400,
            error: "invalid_request",
            description: why.to_string(),
        };
        trail(None).record(Operation::TokenExchange, "", Outcome::Denied, why);
        refused(&e)
    };
    if !form_type {
        return invalid(
            "a token request is a form (Content-Type: application/x-www-form-urlencoded)",
        );
    }
    let body = match axum::body::to_bytes(Body::new(req.into_body()), MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => return invalid("the token request is larger than a token request can be"),
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    // The subject token's check is bounded by its own timeout; the patient look-ups the
    // mapping may need, by this.
    let limit = ctx.cfg.limits.token_verify_timeout + ctx.cfg.limits.upstream_timeout;
    let exchanged = tokio::time::timeout(limit, authority.exchange(&form, &ctx.trust, &ctx.policy))
        .await
        .unwrap_or_else(|_| {
            Err(crate::authority::Refused {
                error: crate::authority::ExchangeError {
                    status: 503,
                    error: "temporarily_unavailable",
                    description: format!("the exchange did not complete within {limit:?}"),
                },
                subject: None,
            })
        });
    match exchanged {
        Ok(issued) => {
            trail(Some(&issued.subject)).record(
                Operation::TokenExchange,
                &format!("scope={}", issued.scope),
                Outcome::Allowed,
                &format!("issued a token for {} s", issued.expires_in),
            );
            answer(StatusCode::OK, issued.body())
        }
        Err(crate::authority::Refused { error: e, subject }) => {
            let outcome = if e.status >= 500 {
                Outcome::Failed
            } else {
                Outcome::Denied
            };
            trail(subject.as_deref()).record(
                Operation::TokenExchange,
                "",
                outcome,
                &format!("{}: {}", e.error, e.description),
            );
            refused(&e)
        }
    }
}

/// `GET /.well-known/jwks.json`: the public key the gateway's tokens are signed with.
pub(crate) async fn jwks(State(ctx): State<Arc<WebCtx>>) -> Response {
    let Some(authority) = &ctx.authority else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut r = Json(json!({ "keys": authority.public_jwks() })).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}
