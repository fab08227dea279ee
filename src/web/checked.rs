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
use super::multipart::{Piece, Splitter, header_value, random_boundary};
use crate::audit::{Channel, Operation, Outcome, Trail};
use crate::dicom::head::InstanceReader;
use crate::dicom::head::MAX_HEAD;
use crate::dicom::reader::{Limits, Violation};
use crate::policy::{InstanceId, Permit};
use crate::trust::Principal;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;

/// What each check needs besides the answer.
#[derive(Clone)]
pub(crate) struct Check {
    pub allowed: Permit,
    pub principal: Principal,
    /// The request, for the audit trail (a streamed body is checked after the handler has
    /// returned, outside the request's scope, so the trail's facts are taken along).
    pub request_id: u64,
    pub client_cert: Option<std::sync::Arc<str>>,
    pub op: Operation,
    /// What the operation applies to, as the audit record names it.
    pub object: String,
    /// Bounds of the strict reader. (How long the PACS may take for its next chunk is the
    /// DICOMweb client's read timeout.)
    pub limits: Limits,
}

impl Check {
    pub(crate) fn anomaly(&self, why: &str) {
        Trail::new(Channel::Http, self.request_id, Some(&self.principal))
            .with_client_cert(self.client_cert.clone())
            .record(self.op, &self.object, Outcome::Anomaly, why);
    }
}

/// Why a part was not passed on.
enum Refused {
    /// The strict reader refused the part, or the multipart framing is broken.
    Malformed(String),
    /// The instance is not one the decision admits.
    Foreign,
    /// The PACS's answer broke off or stalled.
    Upstream(String),
}

impl Refused {
    fn reason(&self) -> String {
        match self {
            Refused::Malformed(v) => format!("the PACS sent a part the gateway refused: {v}"),
            Refused::Foreign => {
                "the PACS sent an instance the request does not reach; withheld".to_string()
            }
            Refused::Upstream(e) => format!("the PACS's answer broke off: {e}"),
        }
    }
}

fn malformed(v: Violation) -> Refused {
    Refused::Malformed(v.to_string())
}

/// The part being relayed.
enum Part {
    /// Its head is being read: chunks held until the instance is judged.
    Judging {
        reader: InstanceReader,
        held: Vec<Bytes>,
        held_len: usize,
        content_type: String,
    },
    /// Judged and admitted: every further chunk is read and passed on.
    Passing { reader: InstanceReader },
}

/// The PACS's answer as the relay reads it. One per answer in flight: the splitter's size
/// does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    /// An HTTP body: a multipart cut into pieces by the splitter, or (`None`) one instance.
    Chunks(
        Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>,
        Option<Splitter>,
    ),
    /// Parts already delimited (instances received over DIMSE).
    Pieces(Pin<Box<dyn Stream<Item = Result<Piece, String>> + Send>>),
}

/// One item of the PACS's answer.
enum Item {
    Chunk(Result<Bytes, String>),
    Piece(Result<Piece, String>),
}

impl Source {
    async fn next(&mut self) -> Option<Item> {
        match self {
            Source::Chunks(s, _) => s.next().await.map(Item::Chunk),
            Source::Pieces(s) => s.next().await.map(Item::Piece),
        }
    }
}

/// The relay of one answer: pulls the PACS's chunks, cuts them into parts (or takes the whole
/// answer as one instance), checks each, and yields what may go to the client. It runs in the
/// response body's own polling: no task, no copy of instance data.
struct Relay {
    upstream: Source,
    /// The answer is a multipart of instances (not one instance alone).
    multipart: bool,
    /// Pieces cut from the last chunk (kept to reuse its allocation).
    pieces: Vec<Piece>,
    part: Option<Part>,
    out: VecDeque<Bytes>,
    /// The gateway's boundary toward the client.
    ours: String,
    sent_parts: usize,
    /// Bytes of the part being relayed so far.
    part_bytes: u64,
    /// The answer is complete (the closing delimiter is queued).
    done: bool,
    /// The answer was refused: the body ends with an error, no closing delimiter.
    failed: Option<Refused>,
    check: Check,
}

impl Relay {
    fn new(resp: reqwest::Response, splitter: Option<Splitter>, check: Check) -> Relay {
        let chunks = resp
            .bytes_stream()
            .map(|c| c.map_err(|e| e.without_url().to_string()));
        Relay::of(Source::Chunks(Box::pin(chunks), splitter), check)
    }

    fn of(upstream: Source, check: Check) -> Relay {
        let multipart = !matches!(upstream, Source::Chunks(_, None));
        let mut r = Relay {
            upstream,
            multipart,
            pieces: Vec::new(),
            part: None,
            out: VecDeque::new(),
            ours: random_boundary(),
            sent_parts: 0,
            part_bytes: 0,
            done: false,
            failed: None,
            check,
        };
        if !multipart {
            r.part = Some(r.judging("application/dicom".into()));
        }
        r
    }

    fn judging(&self, content_type: String) -> Part {
        Part::Judging {
            reader: InstanceReader::part10(self.check.limits),
            held: Vec::new(),
            held_len: 0,
            content_type,
        }
    }

    /// Queues the framing of a new part toward the client (none for a single instance).
    fn frame(&mut self, content_type: &str) {
        if self.multipart {
            let sep = if self.sent_parts == 0 { "" } else { "\r\n" };
            self.out.push_back(Bytes::from(format!(
                "{sep}--{}\r\nContent-Type: {content_type}\r\n\r\n",
                self.ours
            )));
        }
        self.sent_parts += 1;
    }

    /// Judges the head once it is known; an admitted part then passes (its held chunks queued).
    fn judge(&mut self, ended: bool) -> Result<(), Refused> {
        let Some(Part::Judging { reader, .. }) = &mut self.part else {
            return Ok(());
        };
        if ended {
            reader.finish().map_err(malformed)?;
        }
        let head = match reader.head().map_err(malformed)? {
            Some(h) => h,
            None if ended => return Err(malformed(Violation::Truncated)),
            None => return Ok(()),
        };
        if !self.check.allowed.admits_instance(&InstanceId::of(&head)) {
            return Err(Refused::Foreign);
        }
        let Some(Part::Judging {
            reader,
            held,
            content_type,
            ..
        }) = self.part.take()
        else {
            return Ok(());
        };
        self.frame(&content_type);
        self.out.extend(held);
        self.part = Some(Part::Passing { reader });
        Ok(())
    }

    fn data(&mut self, b: Bytes) -> Result<(), Refused> {
        self.part_bytes += b.len() as u64;
        match &mut self.part {
            Some(Part::Judging {
                reader,
                held,
                held_len,
                ..
            }) => {
                reader.feed(&b).map_err(malformed)?;
                *held_len += b.len();
                held.push(b);
                let too_large = *held_len >= MAX_HEAD;
                self.judge(false)?;
                if too_large && matches!(self.part, Some(Part::Judging { .. })) {
                    return Err(malformed(Violation::TooLarge("the instance's head")));
                }
                Ok(())
            }
            Some(Part::Passing { reader }) => {
                reader.feed(&b).map_err(malformed)?;
                self.out.push_back(b);
                Ok(())
            }
            None => Err(Refused::Malformed("data outside a part".into())),
        }
    }

    fn part_end(&mut self) -> Result<(), Refused> {
        self.judge(true)?;
        match self.part.take() {
            Some(Part::Passing { mut reader }) => {
                reader.finish().map_err(malformed)?;
                let bytes = std::mem::take(&mut self.part_bytes);
                crate::metrics::relayed("dicomweb", "retrieve", bytes);
                Ok(())
            }
            _ => Err(Refused::Malformed(
                "a part ended before its instance".into(),
            )),
        }
    }

    fn piece(&mut self, p: Piece) -> Result<(), Refused> {
        match p {
            // A part still open is an instance cut short: never followed by another, never
            // ended as if whole.
            Piece::Start(_) | Piece::End if self.part.is_some() => Err(Refused::Malformed(
                "an instance ended before its data did".into(),
            )),
            Piece::Start(_) if !self.multipart && self.sent_parts > 0 => Err(Refused::Malformed(
                "more than the one instance asked for".into(),
            )),
            Piece::Start(headers) => {
                let given = header_value(&headers, "content-type")
                    .and_then(|v| v.parse::<mime::Mime>().ok());
                if given
                    .as_ref()
                    .is_none_or(|m| m.essence_str() != "application/dicom")
                {
                    return Err(Refused::Malformed("a part that is not DICOM".into()));
                }
                self.part_bytes = 0;
                self.part = Some(self.judging(part_type(given.as_ref())));
                Ok(())
            }
            Piece::Data(b) => self.data(b),
            Piece::PartEnd => self.part_end(),
            Piece::End if !self.multipart => {
                if self.sent_parts == 0 {
                    return Err(Refused::Malformed("no instance".into()));
                }
                self.done = true;
                Ok(())
            }
            Piece::End => {
                let end = if self.sent_parts == 0 {
                    format!("--{}--\r\n", self.ours)
                } else {
                    format!("\r\n--{}--\r\n", self.ours)
                };
                self.out.push_back(Bytes::from(end));
                self.done = true;
                Ok(())
            }
        }
    }

    /// Reads the next chunk of the PACS's answer and works it through.
    async fn pull(&mut self) -> Result<(), Refused> {
        // The PACS client's read timeout bounds each wait.
        let next = self.upstream.next().await;
        self.take(next)
    }

    /// Works one item of the PACS's answer through (`None`: the answer ended).
    fn take(&mut self, next: Option<Item>) -> Result<(), Refused> {
        match next {
            Some(Item::Chunk(Ok(chunk))) => match &mut self.upstream {
                Source::Chunks(_, Some(sp)) => {
                    let mut pieces = std::mem::take(&mut self.pieces);
                    sp.push(chunk, &mut pieces)
                        .map_err(|e| Refused::Malformed(e.to_string()))?;
                    let r = pieces.drain(..).try_for_each(|p| self.piece(p));
                    self.pieces = pieces;
                    r
                }
                _ => self.data(chunk),
            },
            Some(Item::Piece(Ok(p))) => self.piece(p),
            Some(Item::Chunk(Err(e)) | Item::Piece(Err(e))) => Err(Refused::Upstream(e)),
            None if !self.multipart => {
                self.part_end()?;
                self.done = true;
                Ok(())
            }
            None => Err(Refused::Malformed(
                "the multipart answer ended without its closing delimiter".into(),
            )),
        }
    }

    /// The next bytes for the client; `None` at the end. A refusal is audited and ends the
    /// body with an error (the client sees a broken response, never a complete one).
    async fn next_out(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(Ok(b));
            }
            if self.done {
                return None;
            }
            if let Some(r) = self.failed.take() {
                self.check.anomaly(&r.reason());
                self.done = true;
                // Let the connection write what was judged before the error breaks it off.
                tokio::task::yield_now().await;
                return Some(Err(std::io::Error::other("retrieval ended by the gateway")));
            }
            let mut r = self.pull().await;
            // Take what the PACS has already sent while it is at hand, so the client's side
            // writes several chunks at once instead of one per wake-up.
            let mut more = 0;
            while r.is_ok() && !self.done && more < 16 {
                let polled = futures_util::poll!(std::pin::pin!(self.upstream.next()));
                match polled {
                    std::task::Poll::Ready(next) => r = self.take(next),
                    std::task::Poll::Pending => break,
                }
                more += 1;
            }
            // What is queued belongs to instances already judged: it goes out, then the error.
            if let Err(r) = r {
                self.failed = Some(r);
            }
        }
    }

    /// Works the answer until the first instance is judged (or the answer ends), so that a
    /// refusal of the first can still be an HTTP status.
    async fn prime(&mut self) -> Result<(), Refused> {
        while self.sent_parts == 0 && !self.done && self.failed.is_none() {
            match self.pull().await {
                Ok(()) => {}
                // A refusal after the first instance passed ends the response later.
                Err(r) if self.sent_parts > 0 => self.failed = Some(r),
                Err(r) => return Err(r),
            }
        }
        Ok(())
    }
}

/// The body of a checked answer.
fn body(relay: Relay) -> Body {
    // Boxed: the stream hands its state from one item to the next, and a pointer is cheaper to
    // move than the relay.
    Body::from_stream(futures_util::stream::unfold(
        Box::new(relay),
        |mut r| async move { r.next_out().await.map(|item| (item, r)) },
    ))
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

/// A multipart/related answer of DICOM instances, checked part by part (see the module doc).
pub async fn instances(resp: reqwest::Response, check: Check) -> Result<Response, ApiError> {
    let boundary = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .filter(|m| m.essence_str() == "multipart/related")
        .and_then(|m| m.get_param(mime::BOUNDARY).map(|b| b.as_str().to_string()))
        .filter(|b| !b.is_empty() && b.len() <= 70);
    let Some(boundary) = boundary else {
        check.anomaly("the PACS answered a retrieval with something other than multipart/related");
        return Err(ApiError::Upstream(
            "the PACS's answer is not multipart/related".into(),
        ));
    };
    let relay = Relay::new(resp, Some(Splitter::new(&boundary)), check);
    multipart(relay).await
}

/// Instances received as delimited parts (over DIMSE), checked part by part like a PACS's
/// multipart answer.
pub(crate) async fn pieces(
    parts: impl Stream<Item = Result<Piece, String>> + Send + 'static,
    check: Check,
) -> Result<Response, ApiError> {
    multipart(Relay::of(Source::Pieces(Box::pin(parts)), check)).await
}

async fn multipart(mut relay: Relay) -> Result<Response, ApiError> {
    if let Err(r) = relay.prime().await {
        relay.check.anomaly(&r.reason());
        return Err(ApiError::Upstream(
            "the PACS's answer held data the request does not reach, or could not be read".into(),
        ));
    }
    let content_type = format!(
        "multipart/related; type=\"application/dicom\"; boundary={}",
        relay.ours
    );
    let mut r = Response::new(body(relay));
    *r.status_mut() = StatusCode::OK;
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// A single `application/dicom` answer (WADO-URI), checked like one part.
pub(crate) async fn single(resp: reqwest::Response, check: Check) -> Result<Response, ApiError> {
    single_of(Relay::new(resp, None, check)).await
}

/// One instance received as delimited parts (over DIMSE), answered as a single
/// `application/dicom` body and checked as it streams. More than one instance is refused.
pub(crate) async fn single_piece(
    parts: impl Stream<Item = Result<Piece, String>> + Send + 'static,
    check: Check,
) -> Result<Response, ApiError> {
    let mut relay = Relay::of(Source::Pieces(Box::pin(parts)), check);
    relay.multipart = false;
    single_of(relay).await
}

async fn single_of(mut relay: Relay) -> Result<Response, ApiError> {
    if let Err(r) = relay.prime().await {
        relay.check.anomaly(&r.reason());
        return Err(ApiError::Upstream(
            "the PACS's answer held data the request does not reach, or could not be read".into(),
        ));
    }
    let mut r = Response::new(body(relay));
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
