//! STOW-RS through the gateway (`POST /studies`, `POST /studies/{study}`).
//!
//! The multipart/related body is parsed as a stream. Each part is read by the strict reader as
//! a DICOM Part 10 file (file meta group and data set, which must name the same SOP Class and
//! Instance) until its SOP class and instance, PatientID, study and series are known; the
//! policy core decides exactly as for C-STORE (write scope, the caller's patient, a study,
//! series or SOP Instance UID the PACS already holds must be that patient's); a refused part is
//! read past and never reaches the PACS. An allowed part is streamed to the PACS as one STOW-RS
//! request of its own, framed with a random boundary nobody can know in advance, every chunk
//! read by the strict reader and scanned for that boundary before it goes on; a malformed part
//! ends the request (400) without its last bytes reaching the PACS. A part counts as stored
//! only when the PACS's answer names exactly the SOP Instance UID that was checked. The answer
//! lists every instance as stored (ReferencedSOPSequence) or failed with a reason
//! (FailedSOPSequence), with 200 (all stored), 202 (some), 409 (none) or 400 (a malformed part).

use super::WebCtx;
use super::auth::ApiError;
use super::multipart::{Delimiter, random_boundary};
use super::path::is_uid;
use crate::audit::{Operation, Outcome};
use crate::dicom::head::MAX_HEAD;
use crate::dicom::head::{InstanceReader, PREAMBLE};
use crate::dicom::reader::Violation;
use crate::pacs::dicomweb::read_bounded;
use crate::policy::{Action, Caller, StoreRequest};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;

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
    /// Set when a part was not a well-formed instance: the request ended there (400).
    malformed: bool,
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
    let on = match &path_study {
        Some(study) => format!("study={study}"),
        None => "request".to_string(),
    };
    let caller = ctx
        .authenticate(req.headers(), (Operation::Stow, &on))
        .await?;
    // Without write access no byte of the body needs to be read.
    if let Err(d) = ctx.policy.decide(&caller, Action::BeginStore).await {
        super::trail(Some(caller.principal())).record(
            Operation::Stow,
            &on,
            Outcome::Denied,
            &d.to_string(),
        );
        return Err(ApiError::from_denial(d));
    }
    let upstream = ctx.upstream();
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
        malformed: false,
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
        store_part(
            ctx,
            &caller,
            field,
            path_study.as_deref(),
            upstream,
            &mut out,
        )
        .await?;
        if out.malformed {
            break;
        }
    }
    if n == 0 {
        return Err(ApiError::BadRequest("the request holds no instance".into()));
    }
    Ok(answer(ctx, &out, path_study.as_deref()))
}

/// Records a part the strict reader refused: it ends the request.
fn malformed(ctx: &WebCtx, p: &crate::trust::Principal, out: &mut Outcomes, v: &Violation) {
    let _ = ctx;
    super::trail(Some(p)).record(
        Operation::Stow,
        "",
        Outcome::Denied,
        &format!("part refused by the strict reader: {v}"),
    );
    out.failed
        .push((String::new(), String::new(), REASON_CANNOT_UNDERSTAND));
    out.malformed = true;
}

/// Reads one part's head strictly, asks the policy core, and streams the part to the PACS if
/// allowed.
async fn store_part(
    ctx: &WebCtx,
    caller: &Caller,
    mut field: multer::Field<'_>,
    path_study: Option<&str>,
    upstream: super::Upstream<'_>,
    out: &mut Outcomes,
) -> Result<(), ApiError> {
    let p = caller.principal();
    let wait = ctx.cfg.limits.idle_timeout;
    let mut reader = InstanceReader::part10(ctx.cfg.limits.reader());
    let mut head: Vec<u8> = Vec::new();
    let mut ended = false;
    let read = loop {
        let step = match chunk(&mut field, wait).await? {
            Some(c) => {
                head.extend_from_slice(&c);
                reader.feed(&c)
            }
            None => {
                ended = true;
                reader.finish()
            }
        };
        match step.and_then(|()| reader.head()) {
            Err(v) => break Err(v),
            Ok(Some(h)) => break Ok(h),
            Ok(None) if ended => break Err(Violation::Truncated),
            Ok(None) if head.len() >= MAX_HEAD => {
                break Err(Violation::TooLarge("the instance's head"));
            }
            Ok(None) => continue,
        }
    };
    let h = match read {
        Ok(h) => h,
        Err(v) => {
            drain(&mut field, ended, wait).await?;
            malformed(ctx, p, out, &v);
            return Ok(());
        }
    };
    // The 128-byte preamble is the sender's to fill (PS3.10 7.1) and nothing the reader judges:
    // a PACS may read it as something else (Orthanc takes a body opening with a ZIP signature
    // for a ZIP archive of other instances). What goes on carries zeros there.
    if let Some(preamble) = head.get_mut(..PREAMBLE) {
        preamble.fill(0);
    }
    let class = h.sop_class.clone().unwrap_or_default();
    let instance = h.sop_instance.clone().unwrap_or_default();
    let study = h.study.clone().unwrap_or_default();
    if path_study.is_some_and(|s| s != study) {
        super::trail(Some(p)).record(
            Operation::Stow,
            &format!("study={study} instance={instance}"),
            Outcome::Denied,
            "the instance is not of the study the path names",
        );
        drain(&mut field, ended, wait).await?;
        out.failed.push((class, instance, REASON_STUDY_MISMATCH));
        return Ok(());
    }
    let req = StoreRequest::of(&h);
    let on = format!("study={study} instance={instance}");
    let permit = match ctx.policy.decide(caller, Action::Store(req)).await {
        Ok(permit) => permit,
        Err(d) => {
            let outcome = match d.kind() {
                crate::policy::DenialKind::Unavailable => Outcome::Failed,
                _ => Outcome::Denied,
            };
            super::trail(Some(p))
                .about(Vec::new(), vec![study.clone()])
                .record(Operation::Stow, &on, outcome, &d.to_string());
            drain(&mut field, ended, wait).await?;
            out.failed.push((class, instance, REASON_NOT_AUTHORIZED));
            return Ok(());
        }
    };

    // Stream the part to the PACS as a STOW-RS request of its own, under a boundary nobody
    // can know, each chunk read strictly and scanned for that boundary before it goes on.
    let boundary = random_boundary();
    let mut delimiter = Delimiter::new(&boundary);
    if delimiter.found_in(&head) {
        drain(&mut field, ended, wait).await?;
        malformed(
            ctx,
            p,
            out,
            &Violation::BadValue(
                dicom_dictionary_std::tags::PIXEL_DATA,
                "the part holds the relay's multipart delimiter",
            ),
        );
        return Ok(());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(FORWARD_QUEUE);
    // Over DIMSE the data set goes alone (the C-STORE names class, instance and syntax); over
    // DICOMweb the part goes whole, framed by the relay's own boundary.
    let syntax_uid = reader
        .meta()
        .map(|m| m.transfer_syntax.clone())
        .unwrap_or_default();
    let data_set_start = reader.meta().map(|m| m.data_set_start).unwrap_or(0);
    let framed = matches!(upstream, super::Upstream::Web(_));
    let request = async {
        match upstream {
            super::Upstream::Web(web) => {
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                });
                match web
                    .store(&boundary, reqwest::Body::wrap_stream(stream))
                    .await
                {
                    Ok(resp) if resp.status().is_success() => {
                        let body = read_bounded(resp, 16 * 1024 * 1024)
                            .await
                            .unwrap_or_default();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        judge_answer(&v, &instance)
                    }
                    Ok(_) | Err(_) => (false, false),
                }
            }
            super::Upstream::Dimse(dimse) => {
                match dimse.store(&class, &instance, &syntax_uid, rx).await {
                    Ok(status) => (crate::dicom::command::is_stored(status), false),
                    Err(e) => {
                        tracing::warn!(reason = %e, "the PACS did not store a STOW-RS instance");
                        (false, false)
                    }
                }
            }
        }
    };
    let head = if framed {
        head
    } else {
        head.get(data_set_start..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    };
    let mut bytes = head.len() as u64;
    let feed = async {
        let send = |b: Bytes| tx.send(Ok(b));
        if framed {
            send(Bytes::from(format!(
                "--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
            )))
            .await
            .ok();
        }
        send(Bytes::from(head)).await.ok();
        let mut ended = ended;
        while !ended {
            let next = chunk(&mut field, wait).await;
            let checked = match &next {
                Ok(Some(c)) => reader.feed(c).and_then(|()| {
                    if delimiter.found_in(c) {
                        Err(Violation::BadValue(
                            dicom_dictionary_std::tags::PIXEL_DATA,
                            "the part holds the relay's multipart delimiter",
                        ))
                    } else {
                        Ok(())
                    }
                }),
                Ok(None) => reader.finish(),
                Err(_) => Ok(()),
            };
            if let Err(v) = checked {
                // The PACS must not store what the reader refused: break its request off
                // before the part's last bytes.
                let _ = tx.send(Err(std::io::Error::other("part refused"))).await;
                return Err(Some(v));
            }
            match next {
                Ok(Some(c)) => {
                    bytes += c.len() as u64;
                    if tx.send(Ok(c)).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(None) => ended = true,
                Err(e) => {
                    // The PACS must not keep a truncated instance: break its request off.
                    let _ = tx
                        .send(Err(std::io::Error::other("client broke off")))
                        .await;
                    return Ok(Err(e));
                }
            }
        }
        if framed {
            send(Bytes::from(format!("\r\n--{boundary}--\r\n")))
                .await
                .ok();
        }
        drop(tx);
        Ok(Ok(()))
    };
    let (fed, answer) = tokio::join!(feed, request);
    match fed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(Some(v)) => {
            drain(&mut field, false, wait).await?;
            malformed(ctx, p, out, &v);
            return Ok(());
        }
        // The PACS stopped reading (it refused the instance's class or syntax, or failed):
        // this instance failed, the rest of it is read past, the request goes on.
        Err(None) => drain(&mut field, false, wait).await?,
    }
    // Stored means: the PACS's answer names exactly the instance the gateway checked.
    let (stored, anomaly) = answer;
    if anomaly {
        super::trail(Some(p)).record(
            Operation::Stow,
            &on,
            Outcome::Anomaly,
            "the PACS's STOW-RS answer names another instance than the one relayed",
        );
    }
    if stored {
        crate::metrics::relayed("dicomweb", "store", bytes);
        ctx.policy.stored(&permit).await;
        super::trail(Some(p)).about_permit(&permit).record(
            Operation::Stow,
            &on,
            Outcome::Allowed,
            "stored by the PACS",
        );
        out.stored.push((class, instance));
    } else {
        super::trail(Some(p)).about_permit(&permit).record(
            Operation::Stow,
            &on,
            Outcome::Failed,
            "the PACS did not store the instance",
        );
        out.failed.push((class, instance, REASON_PROCESSING));
    }
    Ok(())
}

/// Whether a PACS's STOW-RS answer says it stored exactly `instance`, and whether it named any
/// other instance (an anomaly). The ReferencedSOPSequence must hold that instance alone.
fn judge_answer(v: &Value, instance: &str) -> (bool, bool) {
    let uids = |seq: &str| -> Vec<Option<String>> {
        v.get(seq)
            .and_then(|s| s.get("Value"))
            .and_then(|a| a.as_array())
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        i.get("00081155")
                            .and_then(|e| e.get("Value"))
                            .and_then(|a| a.get(0))
                            .and_then(|u| u.as_str())
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let referenced = uids("00081199");
    let failed = uids("00081198");
    let other = referenced
        .iter()
        .chain(failed.iter())
        .any(|u| u.as_deref() != Some(instance));
    let stored =
        referenced.len() == 1 && referenced[0].as_deref() == Some(instance) && failed.is_empty();
    (stored, other)
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
    let status = if out.malformed {
        StatusCode::BAD_REQUEST
    } else if out.failed.is_empty() {
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
