//! CORS for browser viewers: preflights are answered without a token, and responses to allowed
//! origins carry the headers a browser needs (`Authorization` and `Accept` allowed,
//! `WWW-Authenticate` exposed). Credentials are never allowed: tokens travel in the
//! Authorization header, not in cookies.
//!
//! Owns: the per-origin allow-list check. Must not decide access.

use super::WebCtx;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

fn allowed(ctx: &WebCtx, origin: &str) -> bool {
    ctx.cfg
        .gateway
        .cors_origins
        .iter()
        .any(|o| o == "*" || o == origin)
}

pub async fn layer(State(ctx): State<Arc<WebCtx>>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let Some(origin) = origin.filter(|o| allowed(&ctx, o)) else {
        if req.method() == Method::OPTIONS {
            return StatusCode::FORBIDDEN.into_response();
        }
        return next.run(req).await;
    };
    let origin_value =
        HeaderValue::from_str(&origin).unwrap_or_else(|_| HeaderValue::from_static("null"));
    if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin_value);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Accept, Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return r;
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin_value);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("WWW-Authenticate, Content-Type, Content-Length, Retry-After"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    r
}
