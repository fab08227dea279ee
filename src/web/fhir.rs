//! The FHIR side of SMART Imaging Access at `{public_url}/fhir` (`[fhir] enabled`): the
//! `ImagingStudy` search of the Argonaut SmartImagingStudy profile, the WADO-RS `Endpoint` its
//! studies point at (SmartWadoEndpoint), the CapabilityStatement and the smart-configuration.
//!
//! Owns: the FHIR search parameters, the mapping of DICOM JSON study and series matches to FHIR
//! resources, and FHIR's error form (OperationOutcome). Must not decide: every study and series
//! comes from [`super::qido::judged`], the one search path of the gateway (the policy core's
//! permit before, the result judge on every match after, the audit records), so study
//! restrictions, issuers, padding and case rules hold here exactly as on QIDO-RS and C-FIND.
//! The only check of its own is the Argonaut rule that the `patient` asked for is the token's
//! patient (403, never an empty Bundle).

use super::auth::ApiError;
use super::path::{self, Resource, SearchLevel};
use super::{WebCtx, qido};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::NaiveDate;
use serde_json::{Value, json};
use std::sync::Arc;

const FHIR_JSON: &str = "application/fhir+json";
/// Studies per page unless `_count` says otherwise, and the most `_count` may ask.
const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 200;
/// The one Endpoint: the gateway's own WADO-RS service.
const ENDPOINT_ID: &str = "dicom-wado-rs";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const REQUIRES_ACCESS_TOKEN: &str =
    "http://fhir.org/argonaut/smart-imaging/StructureDefinition/requires-access-token";
/// What the audit trail calls the searches of this module.
const SEARCH: crate::audit::Operation = crate::audit::Operation::FhirSearch;
/// How long a client is told to wait when the PACS is slow (the guide's 503 with Retry-After).
const RETRY_AFTER_SECS: &str = "30";

/// The search parameters understood; any other is 400 (a search never silently ignores one).
struct Params {
    patient: String,
    study: Option<String>,
    count: usize,
    offset: usize,
    include_endpoint: bool,
    /// `_lastUpdated` as a StudyDate range: the earliest and latest study date that may match.
    dates: DateRange,
}

/// Inclusive bounds on a study's date (`YYYYMMDD`), either open.
#[derive(Debug, Default, PartialEq)]
struct DateRange {
    from: Option<String>,
    to: Option<String>,
}

impl DateRange {
    /// The DICOM range matching value (PS3.4 C.2.2.2.5), or `None` when nothing bounds it.
    fn matching(&self) -> Option<String> {
        match (&self.from, &self.to) {
            (None, None) => None,
            (Some(f), Some(t)) if f == t => Some(f.clone()),
            (f, t) => Some(format!(
                "{}-{}",
                f.as_deref().unwrap_or(""),
                t.as_deref().unwrap_or("")
            )),
        }
    }

    /// Bounds that no date meets (`gt2025&lt2024`).
    fn is_empty(&self) -> bool {
        matches!((&self.from, &self.to), (Some(f), Some(t)) if f > t)
    }

    /// Narrowed by one `_lastUpdated` value.
    fn narrow(&mut self, value: &str) -> Result<(), &'static str> {
        let (from, to) = last_updated(value)?;
        if let Some(f) = from
            && self.from.as_ref().is_none_or(|old| &f > old)
        {
            self.from = Some(f);
        }
        if let Some(t) = to
            && self.to.as_ref().is_none_or(|old| &t < old)
        {
            self.to = Some(t);
        }
        Ok(())
    }
}

/// The study dates a `_lastUpdated` value may match. A PACS reached by DIMSE or QIDO-RS keeps
/// no time a study last changed, so a study's date stands for it: at day precision, the date
/// as written (a study's date carries no time zone), every bound taken inclusively where the
/// value's time falls inside a day, so that a client asking what is new since a moment sees
/// every study of that day too, never fewer.
fn last_updated(value: &str) -> Result<(Option<String>, Option<String>), &'static str> {
    const WHY: &str = "_lastUpdated is [eq|gt|ge|lt|le]YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]]";
    let (prefix, rest) = match value.get(..2) {
        Some(p @ ("eq" | "gt" | "ge" | "lt" | "le")) => (p, &value[2..]),
        Some("ne" | "sa" | "eb" | "ap") => {
            return Err("_lastUpdated takes the prefixes eq, gt, ge, lt and le");
        }
        _ => ("eq", value),
    };
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    if let Some(t) = time
        && !valid_time(t)
    {
        return Err(WHY);
    }
    let parts: Vec<&str> = date.split('-').collect();
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let day = |y: u32, m: u32, d: u32| NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d);
    let year = parts.first().and_then(|y| num(y, 4)).ok_or(WHY)?;
    let (first, last) = match parts[1..] {
        [] => (day(year, 1, 1), day(year, 12, 31)),
        [m] => {
            let m = num(m, 2).ok_or(WHY)?;
            let first = day(year, m, 1);
            let next = if m == 12 {
                day(year + 1, 1, 1)
            } else {
                day(year, m + 1, 1)
            };
            (first, next.and_then(|n| n.pred_opt()))
        }
        [m, d] => {
            let one = day(year, num(m, 2).ok_or(WHY)?, num(d, 2).ok_or(WHY)?);
            (one, one)
        }
        _ => return Err(WHY),
    };
    let (Some(first), Some(last)) = (first, last) else {
        return Err(WHY);
    };
    // A time is only meaningful on a whole date.
    if time.is_some() && parts.len() != 3 {
        return Err(WHY);
    }
    let da = |d: NaiveDate| d.format("%Y%m%d").to_string();
    let beyond = |d: Option<NaiveDate>| d.map(da).ok_or(WHY);
    Ok(match (prefix, time.is_some()) {
        ("eq", _) => (Some(da(first)), Some(da(last))),
        ("ge", _) => (Some(da(first)), None),
        ("le", _) => (None, Some(da(last))),
        // After a moment inside a day: that day may hold later studies.
        ("gt", true) => (Some(da(first)), None),
        ("lt", true) => (None, Some(da(last))),
        ("gt", false) => (Some(beyond(last.succ_opt())?), None),
        _ => (None, Some(beyond(first.pred_opt())?)),
    })
}

fn valid_time(t: &str) -> bool {
    let (clock, zone) = match t.find(['Z', '+', '-']) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let two = |s: &str, max: u32| {
        s.len() == 2
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|v| v <= max)
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((h, f)) => (h, Some(f)),
        None => (clock, None),
    };
    let fields: Vec<&str> = hms.split(':').collect();
    let clock_ok = match fields.as_slice() {
        [h, m] => two(h, 23) && two(m, 59) && fraction.is_none(),
        [h, m, s] => two(h, 23) && two(m, 59) && two(s, 60),
        _ => false,
    } && fraction
        .is_none_or(|f| !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()));
    let zone_ok = match zone {
        "" | "Z" => true,
        z => z[1..]
            .split_once(':')
            .is_some_and(|(h, m)| two(h, 14) && two(m, 59)),
    };
    clock_ok && zone_ok
}

fn params(pairs: &[(String, String)]) -> Result<Params, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(why.to_string());
    for (i, (k, _)) in pairs.iter().enumerate() {
        // Two `_lastUpdated` bound a range (`ge…&lt…`); every other parameter is said once.
        let repeats = pairs[..i].iter().filter(|(seen, _)| seen == k).count();
        if repeats > usize::from(k == "_lastUpdated") {
            return Err(bad("a search parameter is given twice"));
        }
    }
    let mut p = Params {
        patient: String::new(),
        study: None,
        count: DEFAULT_COUNT,
        offset: 0,
        include_endpoint: false,
        dates: DateRange::default(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "patient" | "subject" => {
                p.patient = v.strip_prefix("Patient/").unwrap_or(v).to_string();
            }
            "identifier" => {
                // `urn:oid:{uid}`, optionally as `urn:dicom:uid|urn:oid:{uid}`.
                let value = match v.split_once('|') {
                    Some(("urn:dicom:uid" | "", value)) => value,
                    Some(_) => return Err(bad("identifier's system is urn:dicom:uid")),
                    None => v.as_str(),
                };
                let uid = value
                    .strip_prefix("urn:oid:")
                    .filter(|u| path::is_uid(u))
                    .ok_or_else(|| bad("identifier is urn:oid: and a Study Instance UID"))?;
                p.study = Some(uid.to_string());
            }
            "_count" => {
                p.count = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_COUNT).contains(n))
                    .ok_or_else(|| bad("_count is a whole number from 1 to 200"))?;
            }
            "_offset" => {
                p.offset = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= 100_000)
                    .ok_or_else(|| bad("_offset is a whole number"))?;
            }
            "_lastUpdated" => p.dates.narrow(v).map_err(bad)?,
            "_include" if v == "ImagingStudy:endpoint" => p.include_endpoint = true,
            "_include" => return Err(bad("only _include=ImagingStudy:endpoint is supported")),
            "_format" if matches!(v.as_str(), "json" | "application/fhir+json") => {}
            _ => {
                return Err(bad(
                    "unsupported search parameter (patient, identifier, _lastUpdated, _count, _include and _offset are)",
                ));
            }
        }
    }
    if p.patient.is_empty() {
        return Err(ApiError::Forbidden(
            "the patient search parameter is required and must be the token's patient".into(),
        ));
    }
    Ok(p)
}

/// `GET {public_url}/fhir/ImagingStudy`.
pub async fn imaging_study(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    let Ok(_slot) = tokio::time::timeout(super::SLOT_WAIT, ctx.slots.acquire()).await else {
        return outcome(
            &ctx,
            ApiError::Unavailable("too many requests at once".into()),
        )
        .await;
    };
    let limit = ctx.cfg.limits.upstream_timeout * 2;
    let (headers, uri) = (req.headers().clone(), req.uri().clone());
    match tokio::time::timeout(limit, search(&ctx, &headers, &uri)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => outcome(&ctx, e).await,
        Err(_) => {
            outcome(
                &ctx,
                ApiError::Unavailable(format!("the PACS did not answer within {limit:?}")),
            )
            .await
        }
    }
}

async fn search(
    ctx: &WebCtx,
    headers: &axum::http::HeaderMap,
    uri: &axum::http::Uri,
) -> Result<Response, ApiError> {
    let caller = ctx
        .authenticate(headers, (crate::audit::Operation::HttpRequest, uri.path()))
        .await?;
    let pairs = path::decode_query(uri.query().unwrap_or("")).map_err(ApiError::BadRequest)?;
    let p = params(&pairs)?;
    // SMART Imaging Access: the patient searched for is the token's patient, or 403.
    match caller.principal().patient.as_deref() {
        Some(own) if own == p.patient => {}
        Some(_) => {
            return Err(ApiError::Forbidden(
                "the patient search parameter must be the token's patient".into(),
            ));
        }
        // Which patient a user may look at is the EHR's to say, not a search parameter's.
        None => {
            return Err(ApiError::Forbidden(
                "the ImagingStudy search needs a token with a patient in context; \
                 a user- or system-level token searches the studies with QIDO-RS"
                    .into(),
            ));
        }
    }
    let upstream = ctx.upstream();
    let mut keys = vec![
        (
            "includefield".to_string(),
            "00080020,00080030,00080050,00080061,00081030,00201206,00201208".to_string(),
        ),
        ("limit".to_string(), (p.count + 1).to_string()),
        ("offset".to_string(), p.offset.to_string()),
    ];
    if let Some(uid) = &p.study {
        keys.push(("StudyInstanceUID".to_string(), uid.clone()));
    }
    if let Some(range) = p.dates.matching() {
        keys.push(("StudyDate".to_string(), range));
    }
    let studies_at = Resource::Search {
        level: SearchLevel::Studies,
        study: None,
        series: None,
    };
    let mut studies = if p.dates.is_empty() {
        Vec::new()
    } else {
        qido::judged(ctx, &caller, &studies_at, keys, upstream, SEARCH)
            .await?
            .matches
    };
    let more = studies.len() > p.count;
    studies.truncate(p.count);
    let fhir_base = format!("{}/fhir", ctx.cfg.gateway.public_url.trim_end_matches('/'));
    let mut entries = Vec::with_capacity(studies.len() + 1);
    for study in &studies {
        let Some(uid) = qido::first_text(study, "0020000D") else {
            continue;
        };
        let series_at = Resource::Search {
            level: SearchLevel::Series,
            study: Some(uid.clone()),
            series: None,
        };
        let keys = vec![(
            "includefield".to_string(),
            "0008103E,00080060,00200011,00201209".to_string(),
        )];
        let series = qido::judged(ctx, &caller, &series_at, keys, upstream, SEARCH)
            .await?
            .matches;
        entries.push(json!({
            "fullUrl": format!("{fhir_base}/ImagingStudy/{uid}"),
            "resource": resource(study, &uid, &series, &p.patient),
            "search": {"mode": "match"},
        }));
    }
    if p.include_endpoint && !entries.is_empty() {
        entries.push(json!({
            "fullUrl": format!("{fhir_base}/Endpoint/{ENDPOINT_ID}"),
            "resource": endpoint(ctx),
            "search": {"mode": "include"},
        }));
    }
    let page = |offset: usize| {
        let mut q: Vec<(String, String)> = pairs
            .iter()
            .filter(|(k, _)| k != "_offset")
            .cloned()
            .collect();
        if offset > 0 {
            q.push(("_offset".into(), offset.to_string()));
        }
        format!("{fhir_base}/ImagingStudy?{}", path::encode_query(&q))
    };
    let mut links = vec![json!({"relation": "self", "url": page(p.offset)})];
    if more {
        links.push(json!({"relation": "next", "url": page(p.offset + p.count)}));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    // The whole answer is on this page: its size is the total.
    if p.offset == 0 && !more {
        bundle["total"] = json!(studies.len());
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// An ImagingStudy of the SmartImagingStudy profile from a study match and its series.
fn resource(study: &Value, uid: &str, series: &[Value], patient: &str) -> Value {
    let text = |obj: &Value, tag: &str| qido::first_text(obj, tag);
    let number = |obj: &Value, tag: &str| {
        obj.get(tag)?
            .get("Value")?
            .as_array()?
            .first()
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
    };
    let mut modalities: Vec<String> = study
        .get("00080061")
        .and_then(|e| e.get("Value"))
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    // A PACS that does not answer ModalitiesInStudy: the series say it.
    for s in series {
        if let Some(m) = text(s, "00080060")
            && !modalities.contains(&m)
        {
            modalities.push(m);
        }
    }
    let mut identifier =
        vec![json!({"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")})];
    if let Some(acc) = text(study, "00080050").filter(|a| !a.is_empty()) {
        identifier.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": acc,
        }));
    }
    let mut r = json!({
        "resourceType": "ImagingStudy",
        "id": uid,
        "identifier": identifier,
        "status": "available",
        "subject": {"reference": format!("Patient/{patient}")},
        "modality": modalities.iter().map(|m| json!({"system": DCM, "code": m})).collect::<Vec<_>>(),
        "endpoint": [{"reference": format!("Endpoint/{ENDPOINT_ID}")}],
        "series": series.iter().filter_map(|s| {
            let suid = text(s, "0020000E")?;
            let mut e = json!({"uid": suid});
            if let Some(m) = text(s, "00080060") {
                e["modality"] = json!({"system": DCM, "code": m});
            }
            if let Some(n) = number(s, "00200011") {
                e["number"] = json!(n);
            }
            if let Some(n) = number(s, "00201209") {
                e["numberOfInstances"] = json!(n);
            }
            if let Some(d) = text(s, "0008103E").filter(|d| !d.is_empty()) {
                e["description"] = json!(d);
            }
            Some(e)
        }).collect::<Vec<_>>(),
    });
    if let Some(d) = text(study, "00080020").and_then(|d| fhir_date(&d)) {
        r["started"] = json!(d);
    }
    if let Some(n) = number(study, "00201206") {
        r["numberOfSeries"] = json!(n);
    } else {
        r["numberOfSeries"] = json!(series.len());
    }
    if let Some(n) = number(study, "00201208") {
        r["numberOfInstances"] = json!(n);
    }
    if let Some(d) = text(study, "00081030").filter(|d| !d.is_empty()) {
        r["description"] = json!(d);
    }
    r
}

/// A DICOM DA (`YYYYMMDD`) as a FHIR date. The time is left out: a FHIR dateTime with a time
/// needs a time zone, which a study's date and time do not carry.
fn fhir_date(da: &str) -> Option<String> {
    let d = da.trim();
    (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..]))
}

/// The SmartWadoEndpoint: the gateway's WADO-RS, which needs the same access token.
fn endpoint(ctx: &WebCtx) -> Value {
    json!({
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "extension": [{"url": REQUIRES_ACCESS_TOKEN, "valueBoolean": true}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
            "code": "none",
        }]}],
        "payloadMimeType": ["application/dicom"],
        "address": ctx.public_base,
    })
}

/// `GET {public_url}/fhir/Endpoint/dicom-wado-rs`, for an app that follows the reference.
pub async fn read_endpoint(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    let (headers, path) = (req.headers().clone(), req.uri().path().to_string());
    let authed = ctx
        .authenticate(&headers, (crate::audit::Operation::HttpRequest, &path))
        .await;
    match authed {
        Ok(_) => fhir_json(StatusCode::OK, &endpoint(&ctx)),
        Err(e) => outcome(&ctx, e).await,
    }
}

/// `GET {public_url}/fhir/metadata`: what this FHIR server does (no token needed).
pub async fn metadata(State(ctx): State<Arc<WebCtx>>) -> Response {
    let mut doc = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-04",
        "kind": "instance",
        "software": {"name": "pacsgate", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "pacsgate: the imaging server of SMART Imaging Access",
            "url": format!("{}/fhir", ctx.cfg.gateway.public_url.trim_end_matches('/')),
        },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }]}],
                "description": "SMART access tokens with patient/ImagingStudy.rs (or .read); the patient searched for is the token's",
            },
            "resource": [
                {
                    "type": "ImagingStudy",
                    "supportedProfile": ["http://fhir.org/argonaut/smart-imaging/StructureDefinition/smart-imaging-study"],
                    "interaction": [{"code": "search-type"}],
                    "searchInclude": ["ImagingStudy:endpoint"],
                    "searchParam": [
                        {"name": "patient", "type": "reference"},
                        {"name": "identifier", "type": "token"},
                        {"name": "_lastUpdated", "type": "date", "documentation": "matched on the study's date (a PACS keeps no time of a study's last change), at day precision, bounds inclusive"},
                        {"name": "_count", "type": "number"},
                    ],
                },
                {"type": "Endpoint", "interaction": [{"code": "read"}]},
            ],
        }],
    });
    if ctx.authority.is_some() {
        // The gateway's own token endpoint (token exchange), as SMART's oauth-uris says it.
        let public = ctx.cfg.gateway.public_url.trim_end_matches('/');
        doc["rest"][0]["security"]["extension"] = json!([{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": format!("{public}/token")}],
        }]);
    }
    fhir_json(StatusCode::OK, &doc)
}

fn fhir_json(status: StatusCode, v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}

/// An error as FHIR says it: an OperationOutcome, with the status and the bearer challenge
/// the gateway's DICOMweb answer would carry.
async fn outcome(ctx: &WebCtx, e: ApiError) -> Response {
    let plain = ctx.challenge.respond(e);
    let status = plain.status();
    let challenge = plain.headers().get(header::WWW_AUTHENTICATE).cloned();
    let body = axum::body::to_bytes(plain.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let why = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("error_description")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "the request was refused".into());
    let code = match status.as_u16() {
        401 => "login",
        403 => "forbidden",
        400 => "invalid",
        404 => "not-found",
        406 => "not-supported",
        503 => "transient",
        _ => "exception",
    };
    let doc = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": why}],
    });
    let mut r = fhir_json(status, &doc);
    if let Some(c) = challenge {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<Params, ApiError> {
        params(&path::decode_query(s).unwrap_or_default())
    }

    #[test]
    fn search_parameters_are_read_strictly() {
        let p = q(
            "patient=Patient/123&identifier=urn:oid:1.2.3&_count=5&_include=ImagingStudy:endpoint",
        )
        .unwrap_or_else(|_| panic!());
        assert_eq!(
            (p.patient.as_str(), p.study.as_deref(), p.count),
            ("123", Some("1.2.3"), 5)
        );
        assert!(p.include_endpoint);
        let p =
            q("patient=123&identifier=urn:dicom:uid%7Curn:oid:1.2.3").unwrap_or_else(|_| panic!());
        assert_eq!(p.study.as_deref(), Some("1.2.3"));
        for bad in [
            "patient=1&patient=2",
            "patient=1&identifier=1.2.3",
            "patient=1&identifier=urn:oid:1.2.3%20",
            "patient=1&identifier=urn:ietf:x%7Curn:oid:1.2",
            "patient=1&_count=0",
            "patient=1&_count=1000",
            "patient=1&_include=ImagingStudy:subject",
            "patient=1&_lastUpdated=ne2024",
            "patient=1&_lastUpdated=gt2024-13",
            "patient=1&_lastUpdated=gt2024-02-30",
            "patient=1&_lastUpdated=gt2024-02T10:00",
            "patient=1&_lastUpdated=gt2024-02-01T25:00",
            "patient=1&_lastUpdated=gt2024-02-01T10:00+1:00",
            "patient=1&_lastUpdated=gt2024-02-01%20",
            "patient=1&_lastUpdated=gt24",
            "patient=1&_lastUpdated=ge2024&_lastUpdated=le2025&_lastUpdated=lt2026",
            "patient=1&modality=CT",
        ] {
            assert!(matches!(q(bad), Err(ApiError::BadRequest(_))), "{bad}");
        }
        assert!(
            matches!(q("_count=5"), Err(ApiError::Forbidden(_))),
            "no patient is 403"
        );
    }

    #[test]
    fn last_updated_is_a_study_date_range_never_narrower() {
        let range = |s: &str| {
            let p = q(&format!("patient=1&{s}")).unwrap_or_else(|_| panic!("{s}"));
            (p.dates.matching(), p.dates.is_empty())
        };
        let some = |v: &str| (Some(v.to_string()), false);
        assert_eq!(range("_count=1"), (None, false));
        assert_eq!(range("_lastUpdated=2024-02"), some("20240201-20240229"));
        assert_eq!(range("_lastUpdated=eq2023-02-03"), some("20230203"));
        assert_eq!(range("_lastUpdated=gt2024"), some("20250101-"));
        assert_eq!(range("_lastUpdated=gt2024-12-31"), some("20250101-"));
        assert_eq!(range("_lastUpdated=ge2024-03"), some("20240301-"));
        assert_eq!(range("_lastUpdated=lt2024-03-01"), some("-20240229"));
        assert_eq!(range("_lastUpdated=lt2024"), some("-20231231"));
        assert_eq!(range("_lastUpdated=le2024-03"), some("-20240331"));
        // A moment inside a day: that whole day may match.
        assert_eq!(
            range("_lastUpdated=gt2024-03-05T10:15:00Z"),
            some("20240305-")
        );
        assert_eq!(
            range("_lastUpdated=lt2024-03-05T10:15:00.123%2B02:00"),
            some("-20240305")
        );
        assert_eq!(
            range("_lastUpdated=ge2024-01-10&_lastUpdated=lt2024-02"),
            some("20240110-20240131")
        );
        assert!(
            range("_lastUpdated=gt2025&_lastUpdated=lt2024").1,
            "bounds no date meets"
        );
    }

    #[test]
    fn a_study_match_becomes_a_smart_imaging_study() {
        let study = json!({
            "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
            "00080020": {"vr": "DA", "Value": ["20240102"]},
            "00080050": {"vr": "SH", "Value": ["ACC1"]},
            "00201208": {"vr": "IS", "Value": [3]},
        });
        let series = [json!({
            "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00200011": {"vr": "IS", "Value": [2]},
            "00201209": {"vr": "IS", "Value": ["3"]},
        })];
        let r = resource(&study, "1.2.3", &series, "p1");
        assert_eq!(
            r["identifier"][0],
            json!({"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"})
        );
        assert_eq!(r["identifier"][1]["value"], "ACC1");
        assert_eq!(r["subject"]["reference"], "Patient/p1");
        assert_eq!(r["started"], "2024-01-02");
        assert_eq!(
            r["modality"],
            json!([{"system": DCM, "code": "CT"}]),
            "from the series"
        );
        assert_eq!(
            (
                r["numberOfSeries"].as_u64(),
                r["numberOfInstances"].as_u64()
            ),
            (Some(1), Some(3))
        );
        assert_eq!(r["series"][0]["numberOfInstances"], 3);
        assert_eq!(r["series"][0]["number"], 2);
        assert_eq!(r["endpoint"][0]["reference"], "Endpoint/dicom-wado-rs");
        assert_eq!(fhir_date("2024010"), None);
    }
}
