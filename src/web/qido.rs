//! QIDO-RS through the gateway.
//!
//! The search goes to the policy core as a query exactly as a C-FIND's does (its PatientID key
//! in any spelling, the study and series it searches inside, whether it matches on a study's
//! facts); the search sent to the PACS carries the PatientID the permit names (decoded once,
//! re-encoded the way the PACS understands) and includes the attributes the plan needs; every
//! result is put to the policy core's result judge before it goes out, because PACS matching
//! differs (Orthanc's QIDO folds case).

use super::WebCtx;
use super::auth::ApiError;
use super::path::{self, Resource};
use super::translate;
use crate::audit::{Operation, Outcome};
use crate::policy::query::PATIENT_COUNTS;
use crate::policy::{Action, Caller, MatchView, QueryLevel, QueryRequest, ResultKey, Verdict};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The largest QIDO response read from the PACS.
const MAX_QIDO_BYTES: usize = 64 * 1024 * 1024;

/// A query key as the PACS may read it: letters and digits only, lower case, so that every
/// spelling of an attribute (keyword, tag, tag with a comma, any case) is known as one.
fn key_name(k: &str) -> String {
    k.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a query key names PatientID, in any spelling the PACS might accept.
fn is_patient_id_key(k: &str) -> bool {
    matches!(key_name(k).as_str(), "patientid" | "00100020")
}

/// The UIDs the keys spelled `names` match on: every value of every such key, lists split at
/// `,` or `\`. A value that is not a list of UIDs is refused: UID matching takes no wildcards
/// (PS3.4 C.2.2.2.2), and a look into what it names could not be made.
fn named_uids<'q>(pairs: &'q [(String, String)], names: &[&str]) -> Result<Vec<&'q str>, ApiError> {
    let mut out = Vec::new();
    for (_, v) in pairs
        .iter()
        .filter(|(k, _)| names.contains(&key_name(k).as_str()))
    {
        if v.is_empty() {
            continue;
        }
        for uid in v.split([',', '\\']) {
            if !path::is_uid(uid) {
                return Err(ApiError::BadRequest(
                    "a UID matching key takes UIDs (digits and dots), a list separated by commas"
                        .into(),
                ));
            }
            out.push(uid);
        }
    }
    Ok(out)
}

/// The tag of a return key, as QIDO-RS includefield names it.
fn include(key: ResultKey) -> String {
    let t = key.tag();
    format!("{:04X}{:04X}", t.group(), t.element())
}

pub async fn search(
    ctx: &WebCtx,
    caller: &Caller,
    resource: &Resource,
    query: &str,
    upstream: super::Upstream<'_>,
) -> Result<Response, ApiError> {
    let pairs = path::decode_query(query).map_err(ApiError::BadRequest)?;
    let found = judged(ctx, caller, resource, pairs, upstream, Operation::Qido).await?;
    let text = serde_json::to_string(&found.matches)
        .map_err(|_| ApiError::Upstream("cannot encode the results".into()))?;
    let mut r = json_response(ctx.rewrite_urls(&text).into_bytes());
    if found.literal_only {
        r.headers_mut().insert(
            axum::http::header::WARNING,
            axum::http::HeaderValue::from_static(
                "299 pacsgate \"The fuzzymatching parameter is not supported. Only literal matching has been performed.\"",
            ),
        );
    }
    Ok(r)
}

/// What a search found, every match admitted by the result judge.
pub(crate) struct Found {
    /// DICOM JSON objects, as the PACS or the translation wrote them (URLs not yet rewritten).
    pub matches: Vec<serde_json::Value>,
    /// Fuzzy matching was asked for and only literal matching was done.
    pub literal_only: bool,
}

/// A QIDO-RS search (`resource` and its decoded query `pairs`) through the policy core: the
/// permit before, the search of the PACS (relayed or translated), the result judge on every
/// match after, and the audit records. The one path for every search the gateway answers
/// over HTTP (QIDO-RS and the FHIR ImagingStudy search alike); `op` names it in the audit trail.
pub(crate) async fn judged(
    ctx: &WebCtx,
    caller: &Caller,
    resource: &Resource,
    mut pairs: Vec<(String, String)>,
    upstream: super::Upstream<'_>,
    op: Operation,
) -> Result<Found, ApiError> {
    let p = caller.principal();
    let asked: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| is_patient_id_key(k))
        .map(|(_, v)| v.clone())
        .collect();
    // Two PatientID keys are two values: a pattern the policy refuses.
    let requested = match asked.len() {
        0 => None,
        1 => Some(asked[0].clone()),
        _ => Some(asked.join("\\")),
    };
    let (level, path_study, path_series) = match resource {
        Resource::Search {
            level,
            study,
            series,
        } => (
            match level {
                path::SearchLevel::Studies => QueryLevel::Study,
                path::SearchLevel::Series => QueryLevel::Series,
                path::SearchLevel::Instances => QueryLevel::Image,
            },
            study.as_deref(),
            series.as_deref(),
        ),
        _ => return Err(ApiError::NotFound),
    };
    // Below the study level the studies (and at the instance level the series) a search
    // names, in its path or as keys, are searched inside: each is looked into.
    let mut studies: Vec<&str> = path_study.into_iter().collect();
    let mut series: Vec<&str> = path_series.into_iter().collect();
    if level != QueryLevel::Study {
        studies.extend(named_uids(&pairs, &["studyinstanceuid", "0020000d"])?);
    }
    if level == QueryLevel::Image {
        series.extend(named_uids(&pairs, &["seriesinstanceuid", "0020000e"])?);
    }
    // A study in the path and as a key is one study searched inside.
    for uids in [&mut studies, &mut series] {
        let mut seen: Vec<&str> = Vec::new();
        uids.retain(|u| {
            let new = !seen.contains(u);
            seen.push(u);
            new
        });
    }
    let request = QueryRequest {
        level,
        patient_root: false,
        by_dimse: matches!(upstream, super::Upstream::Dimse(_)),
        patient_id: requested.as_deref(),
        inside_studies: &studies,
        inside_series: &series,
        // Any key present counts: a QIDO-RS key has no "return key" form.
        matches_on_facts: pairs.iter().any(|(k, _)| {
            matches!(
                key_name(k).as_str(),
                "modalitiesinstudy"
                    | "00080061"
                    | "studydate"
                    | "00080020"
                    | "timezoneoffsetfromutc"
                    | "00080201"
            )
        }),
    };
    let permit = ctx
        .permit(
            caller,
            Action::Query(request),
            (op, ""),
            "patient scope applied",
            studies.iter().map(|s| s.to_string()).collect(),
        )
        .await?;
    // One upstream search per PatientID the caller may see (usually one). QIDO-RS answers
    // carry the PACS's default attributes as well as those included, so what the gateway
    // includes is not stripped again.
    let pids: Vec<Option<String>> = if permit.query_patient_ids().is_empty() {
        vec![None]
    } else {
        permit
            .query_patient_ids()
            .iter()
            .cloned()
            .map(Some)
            .collect()
    };
    pairs.retain(|(k, _)| permit.query_patient_ids().is_empty() || !is_patient_id_key(k));
    // A PACS may echo a matching value back instead of the record's own: the issuer a result
    // is judged by is never one the caller chose.
    if permit.result_keys().contains(&ResultKey::IssuerOfPatientId) {
        pairs.retain(|(k, _)| !matches!(key_name(k).as_str(), "issuerofpatientid" | "00100021"));
    }
    for key in permit.result_keys() {
        pairs.push(("includefield".into(), include(*key)));
    }
    // Fuzzy matching asked for by translation and refused by the PACS: its matching was literal.
    let mut literal_only = false;
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut read_so_far = 0usize;
    for pid in pids {
        let mut q = pairs.clone();
        if let Some(pid) = pid {
            q.push(("PatientID".into(), pid));
        }
        match upstream {
            super::Upstream::Web(web) => {
                let target = format!("{}?{}", resource.upstream_path(), path::encode_query(&q));
                // One budget for all the searches of a request.
                let (part, read) = web
                    .search(&target, MAX_QIDO_BYTES.saturating_sub(read_so_far))
                    .await?;
                read_so_far += read;
                results.extend(part);
            }
            super::Upstream::Dimse(dimse) => {
                let hierarchical =
                    ctx.cfg.pacs.query_model == crate::config::QueryModel::Hierarchical;
                let keys =
                    translate::search_keys(level, path_study, path_series, &q, hierarchical)?;
                let (found, literal) =
                    translate::search(dimse, level, keys, &ctx.public_base).await?;
                literal_only |= literal;
                results.extend(found);
            }
        }
    }
    let mut judge = ctx.policy.judge(caller, &permit);
    let views: Vec<MatchView> = results.iter().map(view_of).collect();
    let mut verdicts = Vec::with_capacity(views.len());
    for batch in views.chunks(judge.batch()) {
        verdicts.extend(judge.judge(batch).await);
    }
    let counts: Vec<String> = if judge.strips_patient_counts() {
        PATIENT_COUNTS
            .iter()
            .map(|t| format!("{:04X}{:04X}", t.group(), t.element()))
            .collect()
    } else {
        Vec::new()
    };
    let mut kept: Vec<serde_json::Value> = Vec::with_capacity(results.len());
    for (mut r, v) in results.into_iter().zip(verdicts) {
        if v != Verdict::Admit {
            continue;
        }
        if let Some(o) = r.as_object_mut() {
            for t in &counts {
                o.remove(t);
            }
        }
        kept.push(r);
    }
    let tally = judge.tally();
    if let Some(why) = judge.stopped() {
        tracing::warn!(
            reason = why,
            "study judging stopped; remaining results withheld"
        );
    }
    if tally.outside > 0 {
        super::trail(Some(p)).record(
            op,
            "",
            Outcome::Allowed,
            &format!(
                "{} result(s) outside the token's study restriction withheld",
                tally.outside
            ),
        );
    }
    if tally.other_patient > 0 {
        super::trail(Some(p)).record(
            op,
            "",
            Outcome::Anomaly,
            &format!(
                "{} PACS result(s) for other patients were withheld",
                tally.other_patient
            ),
        );
    }
    super::trail(Some(p)).record(
        op,
        "",
        Outcome::Allowed,
        &format!("{} result(s)", kept.len()),
    );
    Ok(Found {
        matches: kept,
        literal_only,
    })
}

/// What the result judge needs of a DICOM JSON match.
fn view_of(r: &serde_json::Value) -> MatchView {
    MatchView {
        patient_id: patient_id(r),
        issuer: issuer(r),
        study: study_uid(r),
        several_studies: r
            .get("0020000D")
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.len() > 1),
        modalities: r
            .get("00080061")
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        study_date: first_text(r, "00080020"),
    }
}

/// The first text value of an attribute of a DICOM JSON object.
pub(crate) fn first_text(obj: &serde_json::Value, tag: &str) -> Option<String> {
    obj.get(tag)?
        .get("Value")?
        .as_array()?
        .first()?
        .as_str()
        .map(str::to_string)
}

/// StudyInstanceUID of a DICOM JSON object.
fn study_uid(obj: &serde_json::Value) -> Option<String> {
    first_text(obj, "0020000D")
}

/// IssuerOfPatientID of a DICOM JSON object: `None` when the attribute is absent,
/// `Some(None)` when it has no value, several values joined by `\\` (so they never match).
fn issuer(obj: &serde_json::Value) -> Option<Option<String>> {
    let attr = obj.get("00100021")?;
    let Some(values) = attr.get("Value").and_then(|v| v.as_array()) else {
        return Some(None);
    };
    let texts: Option<Vec<&str>> = values.iter().map(|v| v.as_str()).collect();
    Some(Some(texts?.join("\\")))
}

/// PatientID of a DICOM JSON object (several values joined by `\`, so they never match).
pub fn patient_id(obj: &serde_json::Value) -> Option<String> {
    let values = obj.get("00100020")?.get("Value")?.as_array()?;
    let texts: Vec<&str> = values
        .iter()
        .map(|v| v.as_str())
        .collect::<Option<Vec<_>>>()?;
    Some(texts.join("\\"))
}

pub(crate) fn json_response(body: Vec<u8>) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patient_id_of_dicom_json() {
        assert_eq!(
            patient_id(&json!({"00100020": {"vr": "LO", "Value": ["A"]}})).as_deref(),
            Some("A")
        );
        assert_eq!(
            patient_id(&json!({"00100020": {"vr": "LO", "Value": ["A", "B"]}})).as_deref(),
            Some("A\\B")
        );
        assert_eq!(patient_id(&json!({"00100020": {"vr": "LO"}})), None);
        assert_eq!(patient_id(&json!({})), None);
        assert_eq!(
            patient_id(&json!({"00100020": {"vr": "LO", "Value": [7]}})),
            None
        );
    }
}
