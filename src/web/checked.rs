//! WADO answers checked instance by instance as they stream from the PACS to the client: the
//! second line of defence behind the ownership look-up, as C-GET and C-MOVE have it.
//!
//! Owns: reading a PACS's multipart/related answer of DICOM instances part by part, each part
//! read by the strict reader as a Part 10 file; a part goes on only once its head (PatientID,
//! IssuerOfPatientID, study, series and instance UIDs) passed the decision's
//! `admits_instance`, and its tail passed the reader, re-framed under the gateway's own random
//! boundary. The first part is checked before the response starts (a foreign one is a 502);
//! a later foreign or malformed part ends the response without the closing delimiter, so the
//! client can never take a partial study for a complete one (Argonaut). The same for a single
//! `application/dicom` answer (WADO-URI) and for DICOM JSON metadata. Frames, bulk data and
//! rendered images carry no identity and pass unchanged. Must not decide: the decision comes
//! in; this file applies it.

use super::auth::ApiError;
use super::multipart::random_boundary;
use crate::audit::{self, Outcome};
use crate::dicom::head::InstanceReader;
use crate::dicom::reader::{Limits, Violation};
use crate::dimse::instance::MAX_HEAD;
use crate::policy::{Allowed, InstanceId};
use crate::trust::Principal;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;

/// Chunks in flight between the PACS's answer and the client's.
const QUEUE: usize = 8;

/// What each check needs besides the answer.
#[derive(Clone)]
pub struct Check {
    pub allowed: Allowed,
    pub principal: Principal,
    /// The request, for the audit trail.
    pub request_id: u64,
    pub action: String,
    pub limits: Limits,
    /// How long the PACS may take for its next chunk.
    pub wait: Duration,
}

impl Check {
    fn anomaly(&self, why: &str) {
        audit::record(
            "http",
            self.request_id,
            Some(&self.principal),
            &self.action,
            Outcome::Anomaly,
            why,
        );
    }
}

/// Why a part was not passed on.
enum Refused {
    /// The strict reader refused the part.
    Malformed(Violation),
    /// The instance is not one the decision admits.
    Foreign,
    /// The PACS's answer broke off or stalled.
    Upstream(String),
}

impl Refused {
    fn reason(&self) -> String {
        match self {
            Refused::Malformed(v) => format!("the PACS sent a part the strict reader refused: {v}"),
            Refused::Foreign => {
                "the PACS sent an instance the request does not reach; withheld".to_string()
            }
            Refused::Upstream(e) => format!("the PACS's answer broke off: {e}"),
        }
    }
}

/// A part whose head passed, with what is left to stream.
struct Passed {
    head: Vec<u8>,
    reader: InstanceReader,
    ended: bool,
}

/// Reads the head of one instance from `next` (chunks of its bytes) and judges it.
async fn judge_head<S, E>(chunks: &mut S, check: &Check) -> Result<Passed, Refused>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut reader = InstanceReader::part10(check.limits);
    let mut head = Vec::new();
    loop {
        let next = tokio::time::timeout(check.wait, chunks.next())
            .await
            .map_err(|_| Refused::Upstream("no data in time".into()))?;
        let (step, ended) = match next {
            Some(Ok(c)) => {
                head.extend_from_slice(&c);
                (reader.feed(&c), false)
            }
            Some(Err(e)) => return Err(Refused::Upstream(e.to_string())),
            None => (reader.finish(), true),
        };
        match step.and_then(|()| reader.head()) {
            Err(v) => return Err(Refused::Malformed(v)),
            Ok(Some(h)) => {
                if !check.allowed.admits_instance(&InstanceId::of(&h)) {
                    return Err(Refused::Foreign);
                }
                return Ok(Passed {
                    head,
                    reader,
                    ended,
                });
            }
            Ok(None) if ended => return Err(Refused::Malformed(Violation::Truncated)),
            Ok(None) if head.len() >= MAX_HEAD => {
                return Err(Refused::Malformed(Violation::TooLarge(
                    "the instance's head",
                )));
            }
            Ok(None) => {}
        }
    }
}

/// Streams the rest of a passed part into `tx`, each chunk read strictly first.
async fn stream_rest<S, E>(
    chunks: &mut S,
    passed: &mut Passed,
    check: &Check,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), Refused>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    while !passed.ended {
        let next = tokio::time::timeout(check.wait, chunks.next())
            .await
            .map_err(|_| Refused::Upstream("no data in time".into()))?;
        match next {
            Some(Ok(c)) => {
                passed.reader.feed(&c).map_err(Refused::Malformed)?;
                if tx.send(Ok(c)).await.is_err() {
                    return Err(Refused::Upstream("the client went away".into()));
                }
            }
            Some(Err(e)) => return Err(Refused::Upstream(e.to_string())),
            None => {
                passed.reader.finish().map_err(Refused::Malformed)?;
                passed.ended = true;
            }
        }
    }
    Ok(())
}

/// A body fed by a channel: an `Err` item ends the response abruptly (no closing chunk).
fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// The media type of a part as passed on: `application/dicom`, with a `transfer-syntax`
/// parameter when the PACS gave a well-formed one.
fn part_type(given: Option<&mime::Mime>) -> String {
    let ts = given
        .and_then(|m| m.get_param("transfer-syntax"))
        .map(|t| t.as_str().to_string())
        .filter(|t| crate::dicom::values::is_uid(t));
    match ts {
        Some(t) => format!("application/dicom; transfer-syntax={t}"),
        None => "application/dicom".to_string(),
    }
}

/// The next part of a multipart answer, bounded in time.
async fn next_part(
    mp: &mut multer::Multipart<'static>,
    wait: Duration,
) -> Result<Option<multer::Field<'static>>, Refused> {
    match tokio::time::timeout(wait, mp.next_field()).await {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(e)) => Err(Refused::Upstream(e.to_string())),
        Err(_) => Err(Refused::Upstream("no data in time".into())),
    }
}

/// A multipart/related answer of DICOM instances, checked part by part (see the module doc).
pub async fn instances(resp: reqwest::Response, check: Check) -> Result<Response, ApiError> {
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok());
    let Some(boundary) = ct
        .as_ref()
        .filter(|m| m.essence_str() == "multipart/related")
        .and_then(|m| m.get_param(mime::BOUNDARY))
        .map(|b| b.as_str().to_string())
    else {
        check.anomaly("the PACS answered a retrieval with something other than multipart/related");
        return Err(ApiError::Upstream(
            "the PACS's answer is not multipart/related".into(),
        ));
    };
    let mut mp = multer::Multipart::new(resp.bytes_stream(), boundary);
    // The first part is judged before the response starts: a refusal can still be a status.
    let first = match next_part(&mut mp, check.wait).await {
        Ok(f) => f,
        Err(r) => {
            check.anomaly(&r.reason());
            return Err(ApiError::Upstream(
                "the PACS's answer could not be read".into(),
            ));
        }
    };
    let mut first = match first {
        None => None,
        Some(mut field) => {
            let given = field.content_type().cloned();
            if given
                .as_ref()
                .is_none_or(|m| m.essence_str() != "application/dicom")
            {
                check.anomaly("the PACS answered a retrieval with a part that is not DICOM");
                return Err(ApiError::Upstream(
                    "the PACS's answer holds a part that is not DICOM".into(),
                ));
            }
            match judge_head(&mut field, &check).await {
                Ok(p) => Some((field, given, p)),
                Err(r) => {
                    check.anomaly(&r.reason());
                    return Err(ApiError::Upstream(
                        "the PACS's answer held data the request does not reach".into(),
                    ));
                }
            }
        }
    };
    let ours = random_boundary();
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let out_boundary = ours.clone();
    let task_check = check.clone();
    tokio::spawn(async move {
        let check = task_check;
        let mut n = 0usize;
        let result: Result<(), Refused> = async {
            loop {
                let (mut field, given, mut passed) = match first.take() {
                    Some(x) => x,
                    None => {
                        let Some(mut field) = next_part(&mut mp, check.wait).await? else {
                            return Ok(());
                        };
                        let given = field.content_type().cloned();
                        if given
                            .as_ref()
                            .is_none_or(|m| m.essence_str() != "application/dicom")
                        {
                            return Err(Refused::Malformed(Violation::UnsupportedSyntax));
                        }
                        let passed = judge_head(&mut field, &check).await?;
                        (field, given, passed)
                    }
                };
                let sep = if n == 0 { "" } else { "\r\n" };
                let framing = format!(
                    "{sep}--{out_boundary}\r\nContent-Type: {}\r\n\r\n",
                    part_type(given.as_ref())
                );
                n += 1;
                let head = std::mem::take(&mut passed.head);
                for b in [Bytes::from(framing), Bytes::from(head)] {
                    if tx.send(Ok(b)).await.is_err() {
                        return Err(Refused::Upstream("the client went away".into()));
                    }
                }
                stream_rest(&mut field, &mut passed, &check, &tx).await?;
            }
        }
        .await;
        match result {
            Ok(()) => {
                let end = if n == 0 {
                    format!("--{out_boundary}--\r\n")
                } else {
                    format!("\r\n--{out_boundary}--\r\n")
                };
                let _ = tx.send(Ok(Bytes::from(end))).await;
            }
            Err(r) => {
                check.anomaly(&r.reason());
                let _ = tx
                    .send(Err(std::io::Error::other("retrieval ended by the gateway")))
                    .await;
            }
        }
    });
    let mut r = Response::new(channel_body(rx));
    *r.status_mut() = StatusCode::OK;
    if let Ok(v) = HeaderValue::from_str(&format!(
        "multipart/related; type=\"application/dicom\"; boundary={ours}"
    )) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// A single `application/dicom` answer (WADO-URI), checked like one part.
pub async fn single(resp: reqwest::Response, check: Check) -> Result<Response, ApiError> {
    let mut chunks = Box::pin(resp.bytes_stream());
    let mut passed = match judge_head(&mut chunks, &check).await {
        Ok(p) => p,
        Err(r) => {
            check.anomaly(&r.reason());
            return Err(ApiError::Upstream(
                "the PACS's answer held data the request does not reach".into(),
            ));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let head = std::mem::take(&mut passed.head);
    tokio::spawn(async move {
        if tx.send(Ok(Bytes::from(head))).await.is_err() {
            return;
        }
        if let Err(r) = stream_rest(&mut chunks, &mut passed, &check, &tx).await {
            check.anomaly(&r.reason());
            let _ = tx
                .send(Err(std::io::Error::other("retrieval ended by the gateway")))
                .await;
        }
    });
    let mut r = Response::new(channel_body(rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom"),
    );
    Ok(r)
}

/// The identity of a DICOM JSON object (PS3.18 F.2): single string values only; several
/// values are joined with `\` so they never match.
fn json_text(obj: &serde_json::Value, tag: &str) -> Option<String> {
    let values = obj.get(tag)?.get("Value")?.as_array()?;
    let texts: Option<Vec<&str>> = values.iter().map(|v| v.as_str()).collect();
    Some(texts?.join("\\"))
}

/// Checks every object of a DICOM JSON metadata answer; `Err` when one is not admitted.
pub fn metadata(body: &[u8], check: &Check) -> Result<(), ApiError> {
    let refused = |why: &str| {
        check.anomaly(why);
        ApiError::Upstream("the PACS's answer held data the request does not reach".into())
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| refused("the PACS's metadata is not JSON"))?;
    let objects = v
        .as_array()
        .ok_or_else(|| refused("the PACS's metadata is not a JSON array"))?;
    for o in objects {
        let (p, i, st, se, sop) = (
            json_text(o, "00100020"),
            json_text(o, "00100021"),
            json_text(o, "0020000D"),
            json_text(o, "0020000E"),
            json_text(o, "00080018"),
        );
        let id = InstanceId {
            patient_id: p.as_deref(),
            issuer: i.as_deref(),
            study: st.as_deref(),
            series: se.as_deref(),
            instance: sop.as_deref(),
        };
        if !check.allowed.admits_instance(&id) {
            return Err(refused(
                "the PACS's metadata held an instance the request does not reach; withheld",
            ));
        }
    }
    Ok(())
}
