//! QIDO-RS through the gateway.
//!
//! The caller's PatientID matching key (if any) goes to the policy core exactly as a C-FIND's
//! does; the query sent to the PACS carries the PatientID the decision names (decoded once,
//! re-encoded the way the PACS understands) and always asks for PatientID back; every result
//! is checked again (PatientID compared as an LO value, byte for byte) before it goes out,
//! because PACS matching differs (Orthanc's QIDO folds case).

use super::WebCtx;
use super::auth::ApiError;
use super::path::{self, Resource};
use crate::audit::{self, Outcome};
use crate::policy::{Action, Decision};
use crate::pacs::dicomweb::DicomWeb;
use crate::trust::Principal;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::SystemTime;

/// The largest QIDO response read from the PACS.
const MAX_QIDO_BYTES: usize = 64 * 1024 * 1024;

fn is_patient_id_key(k: &str) -> bool {
    k == "PatientID" || k == "00100020"
}

pub async fn search(
    ctx: &WebCtx,
    p: &Principal,
    resource: &Resource,
    query: &str,
    upstream: &DicomWeb,
) -> Result<Response, ApiError> {
    let mut pairs = path::decode_query(query).map_err(ApiError::BadRequest)?;
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
    let decision = ctx.policy.decide(
        p,
        Action::Query {
            patient_id: requested.as_deref(),
        },
        SystemTime::now(),
    );
    let allowed = match decision {
        Decision::Deny(d) => {
            audit::record(
                "http",
                super::request_id(),
                Some(p),
                "QIDO-RS",
                Outcome::Denied,
                &d.to_string(),
            );
            return Err(ApiError::from_denial(d));
        }
        Decision::Allow(a) => a,
    };
    // A search inside a study or series is a look into that study: it must be the caller's
    // patient's, like a retrieval (403 for another patient's or an unknown one).
    if let Resource::Search {
        study: Some(study),
        series,
        ..
    } = resource
    {
        let req = crate::policy::RetrieveRequest {
            level: Some(if series.is_some() {
                crate::policy::UidLevel::Series
            } else {
                crate::policy::UidLevel::Study
            }),
            patient_id: None,
            study_uids: vec![study.clone()],
            series_uids: series.iter().cloned().collect(),
            instance_uids: Vec::new(),
        };
        if let Decision::Deny(d) = ctx
            .policy
            .decide_retrieve(p, &req, &*ctx.lookup, &*ctx.trust, SystemTime::now())
            .await
        {
            audit::record(
                "http",
                super::request_id(),
                Some(p),
                "QIDO-RS",
                Outcome::Denied,
                &d.to_string(),
            );
            return Err(ApiError::from_denial(d));
        }
    }
    // One upstream search per PatientID the caller may see (usually one).
    let pids: Vec<Option<String>> = if allowed.query_patient_ids.is_empty() {
        vec![None]
    } else {
        allowed
            .query_patient_ids
            .iter()
            .cloned()
            .map(Some)
            .collect()
    };
    pairs.retain(|(k, _)| allowed.query_patient_ids.is_empty() || !is_patient_id_key(k));
    pairs.push(("includefield".into(), "00100020".into()));
    if allowed.filter.compares_issuer() {
        pairs.push(("includefield".into(), "00100021".into()));
        pairs.push(("includefield".into(), "0020000D".into()));
    }
    let gated = !matches!(allowed.studies, crate::policy::StudyGate::Open);
    if gated {
        pairs.push(("includefield".into(), "0020000D".into()));
    }
    // Study results carry what a granular scope is judged on: no look-up per study.
    // Trusted only when the caller did not match on them: a PACS may echo a matching value
    // back instead of the study's own.
    // Any spelling of the attribute counts (keyword, tag, tag with a comma), and a timezone
    // offset too (it may shift the dates the PACS answers with).
    let matched_on_facts = pairs.iter().any(|(k, _)| {
        let k: String = k
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        matches!(
            k.as_str(),
            "modalitiesinstudy"
                | "00080061"
                | "studydate"
                | "00080020"
                | "timezoneoffsetfromutc"
                | "00080201"
        )
    });
    let study_facts = allowed.wants_study_facts()
        && !matched_on_facts
        && matches!(
            resource,
            Resource::Search {
                level: path::SearchLevel::Studies,
                ..
            }
        );
    if study_facts {
        pairs.push(("includefield".into(), "00080061".into()));
        pairs.push(("includefield".into(), "00080020".into()));
    }
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut read_so_far = 0usize;
    for pid in pids {
        let mut q = pairs.clone();
        if let Some(pid) = pid {
            q.push(("PatientID".into(), pid));
        }
        let target = format!("{}?{}", resource.upstream_path(), path::encode_query(&q));
        // One budget for all the searches of a request.
        let (part, read) = upstream
            .search(&target, MAX_QIDO_BYTES.saturating_sub(read_so_far))
            .await?;
        read_so_far += read;
        results.extend(part);
    }
    let total = results.len();
    // A search inside a study is about that study even if a result leaves its UID out.
    let path_study = match resource {
        Resource::Search { study, .. } => study.clone(),
        _ => None,
    };
    let mut kept: Vec<serde_json::Value> = Vec::with_capacity(results.len());
    for r in results {
        let pid = patient_id(&r);
        let admitted = if !allowed.filter.compares_issuer() {
            allowed.filter.admits(pid.as_deref(), None)
        } else {
            // A result must say its issuer (present without a value says "none"). Orthanc
            // leaves an absent one out even when asked: then the study's owner, as the
            // gateway's own C-FIND finds it, says it; failing that the result is withheld.
            let said = match issuer(&r) {
                Some(i) => Some(i),
                None => match study_uid(&r).or_else(|| path_study.clone()) {
                    Some(st) => ctx.policy.study_issuer(&*ctx.lookup, &st).await,
                    None => None,
                },
            };
            said.is_some_and(|i| allowed.filter.admits(pid.as_deref(), i.as_deref()))
        };
        if admitted {
            kept.push(r);
        }
    }
    let (kept, outside) = if gated {
        let mut inside = Vec::with_capacity(kept.len());
        let mut outside = 0usize;
        let mut memo = crate::policy::StudyMemo::default();
        // With ehr-check, ask the EHR about all these studies in a few batched searches.
        let uids: Vec<String> = kept
            .iter()
            .filter_map(|r| study_uid(r).or_else(|| path_study.clone()))
            .collect();
        ctx.policy
            .prefetch_ehr(p, &allowed, &uids, &memo, &*ctx.trust)
            .await;
        for mut r in kept {
            let study = study_uid(&r).or_else(|| path_study.clone());
            let facts = study_facts.then(|| crate::policy::StudyFacts {
                modalities: r
                    .get("00080061")
                    .and_then(|e| e.get("Value"))
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| m.as_str())
                            .map(|m| m.trim_matches(' ').to_string())
                            .filter(|m| !m.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                study_date: first_text(&r, "00080020"),
            });
            if ctx
                .policy
                .admits_result(
                    p,
                    &allowed,
                    crate::policy::ResultStudy {
                        uid: study.as_deref(),
                        facts: facts.as_ref(),
                    },
                    &mut memo,
                    &*ctx.lookup,
                    &*ctx.trust,
                )
                .await
            {
                // Patient-wide counts would tell of studies outside the restriction.
                if let Some(o) = r.as_object_mut() {
                    for t in ["00201200", "00201202", "00201204"] {
                        o.remove(t);
                    }
                }
                inside.push(r);
            } else {
                outside += 1;
            }
        }
        if let Some(why) = memo.stopped {
            tracing::warn!(
                reason = why,
                "study judging stopped; remaining results withheld"
            );
        }
        (inside, outside)
    } else {
        (kept, 0)
    };
    let total = total - outside;
    if outside > 0 {
        audit::record(
            "http",
            super::request_id(),
            Some(p),
            "QIDO-RS",
            Outcome::Allowed,
            &format!("{outside} result(s) outside the token's study restriction withheld"),
        );
    }
    if kept.len() < total {
        audit::record(
            "http",
            super::request_id(),
            Some(p),
            "QIDO-RS",
            Outcome::Anomaly,
            &format!(
                "{} PACS result(s) for other patients were withheld",
                total - kept.len()
            ),
        );
    }
    audit::record(
        "http",
        super::request_id(),
        Some(p),
        "QIDO-RS",
        Outcome::Allowed,
        &format!("{} result(s)", kept.len()),
    );
    let text = serde_json::to_string(&kept)
        .map_err(|_| ApiError::Upstream("cannot encode the results".into()))?;
    Ok(json_response(ctx.rewrite_urls(&text).into_bytes()))
}

/// The first text value of an attribute of a DICOM JSON object.
fn first_text(obj: &serde_json::Value, tag: &str) -> Option<String> {
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

pub fn json_response(body: Vec<u8>) -> Response {
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
