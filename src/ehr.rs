//! The EHR adapter: the FHIR reads the policy core's [`EhrDirectory`] port asks for.
//!
//! Owns: `GET {fhir_base_url}/Patient/{id}` and `/ImagingStudy/{id}` with the gateway's own
//! token at the issuer (for `patients.map = "fhir"` and launch-context study references), the
//! ImagingStudy search with the caller's own token (`user_level = "ehr-check"`), their bounds
//! and their counts in the metrics. The caller's token goes only to the configured FHIR base:
//! no redirects are followed. Must not judge: the policy core reads the answers.

use crate::policy::{DirectoryFuture, EhrDirectory};
use crate::trust::client::{IssuerClient, read_json_max};
use crate::trust::{Bearer, Principal, TrustCore};
use serde_json::Value;
use std::sync::Arc;

/// The largest FHIR resource read.
const MAX_RESOURCE_BYTES: usize = 64 * 1024;
/// The largest FHIR search answer read (a Bundle of ImagingStudy resources with their series).
const MAX_SEARCH_BYTES: usize = 4 * 1024 * 1024;

/// The EHRs of the trusted issuers, as FHIR servers.
pub struct Ehr {
    trust: Arc<TrustCore>,
    /// For calls made with the caller's own token.
    caller_http: reqwest::Client,
}

impl Ehr {
    pub fn new(cfg: &crate::config::Config, trust: Arc<TrustCore>) -> anyhow::Result<Ehr> {
        let caller_http = reqwest::Client::builder()
            .timeout(cfg.limits.http_fetch_timeout)
            .connect_timeout(cfg.limits.http_fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pacsgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Ehr { trust, caller_http })
    }

    /// `GET {fhir_base}/{resource}/{id}` with the gateway's own token at the issuer.
    async fn read(&self, issuer: &str, resource: &str, id: &str) -> Result<Option<Value>, String> {
        let (client, base) = self.trust.ehr_client(issuer)?;
        fhir_read(client, base, resource, id).await
    }
}

/// `Ok(None)`: no such resource. `id` was checked to be a FHIR id by the caller.
async fn fhir_read(
    client: &IssuerClient,
    fhir_base: &str,
    resource: &str,
    id: &str,
) -> Result<Option<Value>, String> {
    let token = client.own_token().await?;
    let url = format!("{}/{resource}/{id}", fhir_base.trim_end_matches('/'));
    let resp = client
        .http()
        .get(&url)
        .bearer_auth(token)
        .header("accept", "application/fhir+json")
        .send()
        .await
        .map_err(|e| format!("{resource} look-up failed: {}", e.without_url()))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND || resp.status() == reqwest::StatusCode::GONE
    {
        return Ok(None);
    }
    read_json_max(resp, MAX_RESOURCE_BYTES).await.map(Some)
}

/// `GET {fhir_base}/ImagingStudy?identifier=urn:oid:{uid}[,..]&_count={n}` with the caller's own
/// token: what the EHR shows this caller. `Ok(None)` when the EHR refuses the caller (401 or
/// 403); any other failure is an error (the caller is then denied, and nothing is cached).
async fn caller_study_search(
    http: &reqwest::Client,
    fhir_base: &str,
    bearer: &Bearer,
    study_uids: &[String],
) -> Result<Option<Value>, String> {
    let url = format!("{}/ImagingStudy", fhir_base.trim_end_matches('/'));
    let identifiers = study_uids
        .iter()
        .map(|u| format!("urn:oid:{u}"))
        .collect::<Vec<_>>()
        .join(",");
    let resp = http
        .get(&url)
        .query(&[
            ("identifier", identifiers),
            ("_count", study_uids.len().max(1).to_string()),
        ])
        .bearer_auth(bearer.expose())
        .header("accept", "application/fhir+json")
        .send()
        .await
        .map_err(|e| format!("ImagingStudy search failed: {}", e.without_url()))?;
    if matches!(
        resp.status(),
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
    ) {
        return Ok(None);
    }
    read_json_max(resp, MAX_SEARCH_BYTES).await.map(Some)
}

/// Counts an EHR request's outcome and passes it on.
fn counted(
    issuer: &str,
    kind: &'static str,
    r: Result<Option<Value>, String>,
) -> Result<Option<Value>, String> {
    let result = match &r {
        Ok(Some(_)) => "ok",
        Ok(None) => "not_found_or_refused",
        Err(_) => "error",
    };
    crate::metrics::issuer_request(issuer, kind, result);
    r
}

impl EhrDirectory for Ehr {
    fn patient<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a> {
        Box::pin(async move { counted(issuer, "patient", self.read(issuer, "Patient", id).await) })
    }

    fn imaging_study<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a> {
        Box::pin(async move {
            counted(
                issuer,
                "imaging_study",
                self.read(issuer, "ImagingStudy", id).await,
            )
        })
    }

    fn studies_seen_by<'a>(
        &'a self,
        p: &'a Principal,
        study_uids: &'a [String],
    ) -> DirectoryFuture<'a> {
        Box::pin(async move {
            let base = self.trust.fhir_base(&p.issuer)?;
            counted(
                &p.issuer,
                "study_search",
                caller_study_search(&self.caller_http, base, &p.bearer, study_uids).await,
            )
        })
    }
}
