//! Bearer tokens in, principals out; and every refusal of the HTTP front end in the shape RFC 6750
//! and the Argonaut rules prescribe.
//!
//! Owns: taking the token from `Authorization: Bearer`, asking the trust core, and turning trust
//! and policy refusals into HTTP statuses and `WWW-Authenticate` headers. Error bodies carry no
//! PHI and no token. Must not decide access.

use crate::pacs::dicomweb::DicomWebError;
use crate::policy::{Denial, DenialKind};
use crate::trust::{Principal, TrustCore};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

/// A refusal or failure of a DICOMweb request.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// No token: 401 with a bare `Bearer` challenge.
    NoToken,
    /// The token is not acceptable: 401 `invalid_token`.
    InvalidToken(String),
    /// The token lacks the scope: 403 `insufficient_scope`.
    InsufficientScope(&'static str),
    /// The policy refused (another patient's data, unknown UIDs...): 403.
    Forbidden(String),
    /// A malformed path, UID or query: 400.
    BadRequest(String),
    /// The route exists nowhere: 404.
    NotFound,
    /// The PACS or an authorization server is unreachable: 502, or 503 with Retry-After.
    Upstream(String),
    Unavailable(String),
    /// No representation the client accepts can be served: 406.
    NotAcceptable(String),
}

impl ApiError {
    /// Maps a policy denial to its HTTP form (RFC 6750 section 3.1 for the token's faults; 503
    /// with Retry-After when the PACS or the EHR could not be asked).
    pub(crate) fn from_denial(d: Denial) -> ApiError {
        match (d.kind(), d.needed_scope()) {
            (DenialKind::Unauthenticated, _) => ApiError::InvalidToken(d.to_string()),
            (DenialKind::Forbidden, Some(scope)) => ApiError::InsufficientScope(scope),
            (DenialKind::Forbidden, None) => ApiError::Forbidden(d.to_string()),
            (DenialKind::BadRequest, _) => ApiError::BadRequest(d.to_string()),
            (DenialKind::Unavailable, _) => ApiError::Unavailable(d.to_string()),
        }
    }
}

impl From<DicomWebError> for ApiError {
    /// What the PACS's DICOMweb answer means to the caller: its 404 is ours, its other refusals
    /// are the request's fault, anything else is the PACS's (502). Its body is never passed on.
    fn from(e: DicomWebError) -> ApiError {
        match e {
            DicomWebError::Status(404) => ApiError::NotFound,
            DicomWebError::Status(s) if (400..500).contains(&s) => {
                ApiError::BadRequest(format!("the PACS refused the request ({s})"))
            }
            DicomWebError::NoWadoUri => ApiError::Unavailable(e.to_string()),
            other => ApiError::Upstream(other.to_string()),
        }
    }
}

/// Builds challenges and bodies with the gateway's realm and metadata URL.
#[derive(Clone)]
pub struct Challenge {
    pub realm: String,
    pub resource_metadata: String,
}

impl Challenge {
    fn bearer(&self, extra: &str) -> HeaderValue {
        let v = format!(
            "Bearer realm=\"{}\", resource_metadata=\"{}\"{extra}",
            self.realm, self.resource_metadata
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    pub(crate) fn respond(&self, e: ApiError) -> Response {
        let (status, challenge, code, text) = match &e {
            ApiError::NoToken => (
                StatusCode::UNAUTHORIZED,
                Some(self.bearer("")),
                "invalid_request",
                "a bearer token is required".to_string(),
            ),
            ApiError::InvalidToken(why) => (
                StatusCode::UNAUTHORIZED,
                Some(self.bearer(", error=\"invalid_token\"")),
                "invalid_token",
                why.clone(),
            ),
            ApiError::InsufficientScope(scope) => (
                StatusCode::FORBIDDEN,
                Some(self.bearer(&format!(
                    ", error=\"insufficient_scope\", scope=\"{scope}\""
                ))),
                "insufficient_scope",
                format!("the token needs {scope}"),
            ),
            ApiError::Forbidden(why) => (StatusCode::FORBIDDEN, None, "forbidden", why.clone()),
            ApiError::BadRequest(why) => {
                (StatusCode::BAD_REQUEST, None, "bad_request", why.clone())
            }
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                None,
                "not_found",
                "no such resource".to_string(),
            ),
            ApiError::Upstream(why) => (StatusCode::BAD_GATEWAY, None, "bad_gateway", why.clone()),
            ApiError::NotAcceptable(why) => (
                StatusCode::NOT_ACCEPTABLE,
                None,
                "not_acceptable",
                why.clone(),
            ),
            ApiError::Unavailable(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "unavailable",
                why.clone(),
            ),
        };
        let body = serde_json::json!({ "error": code, "error_description": text }).to_string();
        let mut r = (status, body).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(c) = challenge {
            h.insert(header::WWW_AUTHENTICATE, c);
        }
        if matches!(e, ApiError::Unavailable(_)) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        }
        r
    }
}

/// The bearer token of a request, if it carries one (the scheme is case-insensitive).
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::NoToken);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::InvalidToken("malformed Authorization header".into()))?;
    let (scheme, token) = v.split_once(' ').ok_or(ApiError::NoToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::NoToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::NoToken);
    }
    Ok(token)
}

/// Verifies the request's token.
pub(crate) async fn principal(
    trust: &TrustCore,
    headers: &HeaderMap,
    wait: Duration,
) -> Result<Principal, ApiError> {
    let token = bearer(headers)?;
    match tokio::time::timeout(wait, trust.verify(token)).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) if e.is_transient() => Err(ApiError::Unavailable(
            "the token's issuer cannot be reached to check it".into(),
        )),
        Ok(Err(e)) => Err(ApiError::InvalidToken(e.to_string())),
        Err(_) => Err(ApiError::Unavailable("token verification timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_extraction() {
        let mut h = HeaderMap::new();
        assert!(matches!(bearer(&h), Err(ApiError::NoToken)));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def.ghi"),
        );
        assert_eq!(bearer(&h).unwrap(), "abc.def.ghi");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  xyz "),
        );
        assert_eq!(bearer(&h).unwrap(), "xyz");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert!(matches!(bearer(&h), Err(ApiError::NoToken)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(matches!(bearer(&h), Err(ApiError::NoToken)));
    }

    #[test]
    fn responses_follow_rfc_6750() {
        let c = Challenge {
            realm: "pacsgate".into(),
            resource_metadata: "http://gw/.well-known/oauth-protected-resource".into(),
        };
        let r = c.respond(ApiError::NoToken);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let w = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(w.starts_with("Bearer realm=\"pacsgate\", resource_metadata=\"http://gw/"));
        assert!(!w.contains("error="));
        let r = c.respond(ApiError::InvalidToken("expired".into()));
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("error=\"invalid_token\"")
        );
        let r = c.respond(ApiError::InsufficientScope("patient/ImagingStudy.rs"));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        let r = c.respond(ApiError::Unavailable("down".into()));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "30");
        assert_eq!(
            c.respond(ApiError::Forbidden("x".into())).headers()[header::CACHE_CONTROL],
            "no-store"
        );
    }
}
