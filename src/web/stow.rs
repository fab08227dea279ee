//! STOW-RS through the gateway (`POST /studies`, `POST /studies/{study}`).
//!
//! The multipart/related body is parsed as a stream. For each part, the head of the instance
//! is read until its SOP class and instance, PatientID, study and series are known; the policy
//! core decides exactly as for C-STORE (write scope, the caller's patient, a study or series the
//! PACS already holds must be that patient's); a refused part is read past and never reaches the
//! PACS. An allowed part is streamed to the PACS as one STOW-RS request of its own, and counts as
//! stored only when the PACS confirmed it. The answer lists every instance as stored
//! (ReferencedSOPSequence) or failed with a reason (FailedSOPSequence), with 200 (all stored),
//! 202 (some) or 409 (none).

use super::WebCtx;
use super::auth::ApiError;
use super::path::is_uid;
use super::qido::read_bounded;
use crate::audit::{self, Outcome};
use crate::dataset::{part10_dataset, scan_prefix};
use crate::dimse::instance::MAX_HEAD;
use crate::policy::{Decision, Denial, StoreRequest};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::SystemTime;

/// The most one request may carry, and one instance.
const MAX_REQUEST_BYTES: u64 = 16 * 1024 * 1024 * 1024;
const MAX_PART_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Instances one request may carry (the answer lists each of them).
const MAX_PARTS: usize = 10_000;
/// Chunks in flight toward the PACS per instance.
const FORWARD_QUEUE: usize = 8;

/// STOW-RS failure reasons (PS3.18 table of Failure Reason values).
const REASON_NOT_AUTHORIZED: u16 = 0x0124;
const REASON_STUDY_MISMATCH: u16 = 0xA900;
const REASON_CANNOT_UNDERSTAND: u16 = 0xC000;
const REASON_PROCESSING: u16 = 0x0110;

/// A part's next chunk, bounded in time: a client that stops sending cannot hold the request.
async fn chunk(
    field: &mut multer::Field<'_>,
    wait: std::time::Duration,
) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout(wait, field.chunk()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!(
            "the multipart body broke off: {e}"
        ))),
        Err(_) => Err(ApiError::BadRequest(format!(
            "the client sent nothing for {wait:?}"
        ))),
    }
}

struct Outcomes {
    stored: Vec<(String, String)>,
    failed: Vec<(String, String, u16)>,
}

pub async fn handle(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    match stow(&ctx, req).await {
        Ok(r) => r,
        Err(e) => ctx.challenge.respond(e),
    }
}

async fn stow(ctx: &WebCtx, req: Request) -> Result<Response, ApiError> {
    let path_study = match req.uri().path().strip_prefix("/dicom-web/studies") {
        Some("") => None,
        Some(rest) => {
            let uid = rest.strip_prefix('/').unwrap_or("");
            if !is_uid(uid) {
                return Err(ApiError::BadRequest(
                    "the study UID in the path is not valid".into(),
                ));
            }
            Some(uid.to_string())
        }
        None => return Err(ApiError::NotFound),
    };
    let p = ctx.authenticate(req.headers()).await?;
    // Without write access no byte of the body needs to be read.
    match ctx.policy.access(&p) {
        Ok(a) if a.write.is_some() => {}
        Ok(_) => return Err(ApiError::from_denial(Denial::NoWrite)),
        Err(d) => return Err(ApiError::from_denial(d)),
    }
    let Some(upstream) = ctx.upstream_base.clone() else {
        return Err(ApiError::Unavailable(
            "DICOMweb is not configured: set pacs.dicomweb_url".into(),
        ));
    };
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mime: mime::Mime = ct.parse().map_err(|_| {
        ApiError::BadRequest(
            "Content-Type must be multipart/related; type=\"application/dicom\"".into(),
        )
    })?;
    let part_type = mime.get_param("type").map(|t| t.as_str().to_string());
    if mime.essence_str() != "multipart/related"
        || part_type
            .as_deref()
            .is_some_and(|t| t != "application/dicom")
    {
        return Err(ApiError::BadRequest(
            "only multipart/related; type=\"application/dicom\" is accepted".into(),
        ));
    }
    let boundary = mime
        .get_param(mime::BOUNDARY)
        .map(|b| b.as_str().to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| ApiError::BadRequest("the multipart boundary is missing".into()))?;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(MAX_REQUEST_BYTES)
            .per_field(MAX_PART_BYTES),
    );
    let mut mp = multer::Multipart::with_constraints(
        req.into_body().into_data_stream(),
        boundary,
        constraints,
    );
    let mut out = Outcomes {
        stored: Vec::new(),
        failed: Vec::new(),
    };
    let mut n = 0usize;
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::BadRequest(format!(
                    "the multipart body is malformed: {e}"
                )));
            }
        };
        n += 1;
        if n > MAX_PARTS {
            return Err(ApiError::BadRequest(format!(
                "more than {MAX_PARTS} instances in one request; send them in several"
            )));
        }
        store_part(ctx, &p, field, path_study.as_deref(), &upstream, &mut out).await?;
    }
    if n == 0 {
        return Err(ApiError::BadRequest("the request holds no instance".into()));
    }
    Ok(answer(ctx, &out, path_study.as_deref()))
}

/// Reads one part's head, asks the policy core, and streams the part to the PACS if allowed.
async fn store_part(
    ctx: &WebCtx,
    p: &crate::trust::Principal,
    mut field: multer::Field<'_>,
    path_study: Option<&str>,
    upstream: &str,
    out: &mut Outcomes,
) -> Result<(), ApiError> {
    let wanted = [
        tags::SOP_CLASS_UID,
        tags::SOP_INSTANCE_UID,
        tags::STUDY_DATE,
        tags::MODALITY,
        tags::PATIENT_ID,
        tags::ISSUER_OF_PATIENT_ID,
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
    ];
    let wait = ctx.cfg.limits.idle_timeout;
    let mut head: Vec<u8> = Vec::new();
    let mut ended = false;
    let values = loop {
        match chunk(&mut field, wait).await? {
            Some(c) => head.extend_from_slice(&c),
            None => ended = true,
        }
        let parsed = match part10_dataset(&head) {
            Ok(Some((ts_uid, start))) => match TransferSyntaxRegistry.get(&ts_uid) {
                Some(ts) => match scan_prefix(&head[start..], ts, &wanted, ended) {
                    Ok(pre) if pre.complete => Some(Ok(pre.values)),
                    Ok(_) => None,
                    Err(_) => Some(Err(())),
                },
                None => Some(Err(())),
            },
            Ok(None) => None,
            Err(_) => Some(Err(())),
        };
        match parsed {
            Some(r) => break r,
            None if ended || head.len() >= MAX_HEAD => break Err(()),
            None => continue,
        }
    };
    let Ok(values) = values else {
        drain(&mut field, ended, wait).await?;
        out.failed
            .push((String::new(), String::new(), REASON_CANNOT_UNDERSTAND));
        return Ok(());
    };
    let text = |v: &Option<String>| {
        v.as_deref()
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    let (class, instance) = (text(&values[0]), text(&values[1]));
    let study = text(&values[6]);
    if path_study.is_some_and(|s| s != study) {
        drain(&mut field, ended, wait).await?;
        out.failed.push((class, instance, REASON_STUDY_MISMATCH));
        return Ok(());
    }
    let req = StoreRequest {
        patient_id: values[4].as_deref(),
        issuer: values[5].as_deref(),
        study_uid: values[6].as_deref(),
        series_uid: values[7].as_deref(),
        study_date: values[2].as_deref(),
        modality: values[3].as_deref(),
    };
    let action = format!("STOW-RS study={study}");
    if let Decision::Deny(d) = ctx
        .policy
        .decide_store(p, &req, &*ctx.lookup, &*ctx.trust, SystemTime::now())
        .await
    {
        audit::record(
            "http",
            super::request_id(),
            Some(p),
            &action,
            Outcome::Denied,
            &d.to_string(),
        );
        drain(&mut field, ended, wait).await?;
        out.failed.push((class, instance, REASON_NOT_AUTHORIZED));
        return Ok(());
    }
    let patient = values[4].clone().unwrap_or_default();
    let issuer = values[5].clone();
    let series = values[7]
        .as_deref()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string());

    // Stream the part to the PACS as a STOW-RS request of its own.
    let boundary = format!("pacsgate-{}", crate::trust::token_id(&instance));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(FORWARD_QUEUE);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let request = ctx
        .http
        .post(format!("{upstream}/studies"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(header::ACCEPT, "application/dicom+json")
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let feed = async {
        let send = |b: Bytes| tx.send(Ok(b));
        send(Bytes::from(format!(
            "--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
        )))
        .await
        .ok();
        send(Bytes::from(head)).await.ok();
        let mut ended = ended;
        while !ended {
            match chunk(&mut field, wait).await {
                Ok(Some(c)) => {
                    if tx.send(Ok(c)).await.is_err() {
                        return Err(ApiError::Upstream(
                            "the PACS stopped reading the instance".into(),
                        ));
                    }
                }
                Ok(None) => ended = true,
                Err(e) => {
                    // The PACS must not keep a truncated instance: break its request off.
                    let _ = tx
                        .send(Err(std::io::Error::other("client broke off")))
                        .await;
                    return Err(e);
                }
            }
        }
        send(Bytes::from(format!("\r\n--{boundary}--\r\n")))
            .await
            .ok();
        drop(tx);
        Ok(())
    };
    let (fed, answer) = tokio::join!(feed, request);
    fed?;
    let stored = match answer {
        Ok(resp) if resp.status().is_success() => {
            let body = read_bounded(resp, 16 * 1024 * 1024)
                .await
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            v.get("00081199")
                .and_then(|s| s.get("Value"))
                .and_then(|a| a.as_array())
                .is_some_and(|a| !a.is_empty())
        }
        Ok(_) => false,
        Err(_) => false,
    };
    if stored {
        ctx.policy
            .remember_stored(
                &study,
                series.as_deref(),
                patient.trim_matches(' '),
                issuer.as_deref(),
            )
            .await;
        audit::record(
            "http",
            super::request_id(),
            Some(p),
            &action,
            Outcome::Allowed,
            "stored by the PACS",
        );
        out.stored.push((class, instance));
    } else {
        audit::record(
            "http",
            super::request_id(),
            Some(p),
            &action,
            Outcome::Denied,
            "the PACS did not store the instance",
        );
        out.failed.push((class, instance, REASON_PROCESSING));
    }
    Ok(())
}

/// Reads past the rest of a part that will not be stored.
async fn drain(
    field: &mut multer::Field<'_>,
    ended: bool,
    wait: std::time::Duration,
) -> Result<(), ApiError> {
    if ended {
        return Ok(());
    }
    while chunk(field, wait).await?.is_some() {}
    Ok(())
}

fn ui(v: &str) -> Value {
    json!({"vr": "UI", "Value": [v]})
}

/// The STOW-RS response (PS3.18 10.5.3): stored instances with their URLs, failed ones with a
/// reason; 200 when all were stored, 202 when some, 409 when none.
fn answer(ctx: &WebCtx, out: &Outcomes, path_study: Option<&str>) -> Response {
    let mut body = serde_json::Map::new();
    if let Some(s) = path_study {
        body.insert(
            "00081190".into(),
            json!({"vr": "UR", "Value": [format!("{}/studies/{s}", ctx.public_base)]}),
        );
    }
    if !out.failed.is_empty() {
        let items: Vec<Value> = out
            .failed
            .iter()
            .map(|(c, i, reason)| {
                let mut item = serde_json::Map::new();
                if !c.is_empty() {
                    item.insert("00081150".into(), ui(c));
                }
                if !i.is_empty() {
                    item.insert("00081155".into(), ui(i));
                }
                item.insert("00081197".into(), json!({"vr": "US", "Value": [reason]}));
                Value::Object(item)
            })
            .collect();
        body.insert("00081198".into(), json!({"vr": "SQ", "Value": items}));
    }
    if !out.stored.is_empty() {
        let items: Vec<Value> = out
            .stored
            .iter()
            .map(|(c, i)| json!({"00081150": ui(c), "00081155": ui(i)}))
            .collect();
        body.insert("00081199".into(), json!({"vr": "SQ", "Value": items}));
    }
    let status = if out.failed.is_empty() {
        StatusCode::OK
    } else if out.stored.is_empty() {
        StatusCode::CONFLICT
    } else {
        StatusCode::ACCEPTED
    };
    let mut r = (status, Body::from(Value::Object(body).to_string())).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
