//! DICOMweb answered by DIMSE, for a PACS without a DICOMweb service: a QIDO-RS search as the
//! keys of a C-FIND and its matches as DICOM JSON (PS3.18 F.2, with `RetrieveURL`), a WADO-RS
//! or WADO-URI retrieval as a C-GET whose instances become the parts of the answer, metadata
//! and frames taken from the retrieved instances as they stream, STOW-RS parts stored by
//! C-STORE.
//!
//! Owns: the mapping between the two protocols (query parameters to keys, Accept to transfer
//! syntaxes, data sets to JSON, instances to parts and frames). Must not decide: the handlers
//! ask the policy core before anything is asked of the PACS and judge every match and
//! instance exactly as on the relay path ([`super::checked`], the result judge). Must not know
//! the DIMSE exchange itself ([`crate::pacs::dimse`]).

use super::auth::ApiError;
use super::checked::{self, Check};
use super::multipart::{Piece, random_boundary};
use crate::dicom::head::{InstanceReader, part10_prefix};
use crate::dicom::reader::Encoding;
use crate::dicom::syntax;
use crate::pacs::dimse::{self, Dimse, DimseError, Key, Retrieved, Target};
use crate::policy::{InstanceId, QueryLevel};
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::InMemDicomObject;
use futures_util::Stream;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Matches one search returns at most (its `limit` may ask for fewer).
const MAX_MATCHES: usize = 10_000;
/// The most of an instance held to build its metadata: everything before its pixel data.
const MAX_METADATA_HEAD: usize = 16 * 1024 * 1024;
/// The most held for one metadata answer, every instance's attributes together (as on the
/// relay path).
const MAX_METADATA_TOTAL: usize = 256 * 1024 * 1024;
/// The largest frame held while it is cut out of an instance.
const MAX_FRAME: u64 = 512 * 1024 * 1024;

impl From<DimseError> for ApiError {
    fn from(e: DimseError) -> ApiError {
        match e {
            DimseError::Unreachable(why) => ApiError::Unavailable(why),
            DimseError::Refused(why) => ApiError::NotAcceptable(why),
            other => ApiError::Upstream(other.to_string()),
        }
    }
}

/// The return keys a QIDO-RS answer carries at each level (PS3.18 tables 6.7.1-2, -2a, -2b).
fn default_keys(level: QueryLevel) -> &'static [Tag] {
    match level {
        QueryLevel::Study | QueryLevel::Patient => &[
            tags::STUDY_DATE,
            tags::STUDY_TIME,
            tags::ACCESSION_NUMBER,
            tags::INSTANCE_AVAILABILITY,
            tags::MODALITIES_IN_STUDY,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::TIMEZONE_OFFSET_FROM_UTC,
            tags::STUDY_DESCRIPTION,
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::PATIENT_SEX,
            tags::STUDY_INSTANCE_UID,
            tags::STUDY_ID,
            tags::NUMBER_OF_STUDY_RELATED_SERIES,
            tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        ],
        QueryLevel::Series => &[
            tags::MODALITY,
            tags::TIMEZONE_OFFSET_FROM_UTC,
            tags::SERIES_DESCRIPTION,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SERIES_NUMBER,
            tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
            tags::PERFORMED_PROCEDURE_STEP_START_DATE,
            tags::PERFORMED_PROCEDURE_STEP_START_TIME,
        ],
        QueryLevel::Image => &[
            tags::SOP_CLASS_UID,
            tags::SOP_INSTANCE_UID,
            tags::INSTANCE_AVAILABILITY,
            tags::TIMEZONE_OFFSET_FROM_UTC,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::INSTANCE_NUMBER,
            tags::ROWS,
            tags::COLUMNS,
            tags::BITS_ALLOCATED,
            tags::NUMBER_OF_FRAMES,
        ],
    }
}

/// The attribute a QIDO-RS key names: a keyword or eight hex digits. Nested paths
/// (`Sequence.Attribute`) are not translated.
fn attribute(name: &str) -> Result<(Tag, VR), ApiError> {
    let dict = StandardDataDictionary;
    let tag = if name.len() == 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let g = u16::from_str_radix(&name[..4], 16).ok();
        let e = u16::from_str_radix(&name[4..], 16).ok();
        g.zip(e).map(|(g, e)| Tag(g, e))
    } else {
        dict.by_name(name).map(|e| e.tag_range().inner())
    };
    let unknown = || {
        ApiError::BadRequest(
            "a query key names no attribute the gateway knows (a keyword or eight hex digits; nested paths are not supported)".into(),
        )
    };
    let tag = tag.ok_or_else(unknown)?;
    let vr = dict
        .by_tag(tag)
        .map(|e| e.vr().relaxed())
        .ok_or_else(unknown)?;
    Ok((tag, vr))
}

/// Whether a tag may be a key of an identifier: no command, file meta, delimitation or
/// query-bookkeeping element.
fn returnable(tag: Tag) -> bool {
    !matches!(tag.group(), 0x0000 | 0x0002 | 0xFFFE)
        && tag != tags::QUERY_RETRIEVE_LEVEL
        && tag.group().is_multiple_of(2)
}

/// A search's keys and paging.
pub(crate) struct Search {
    keys: Vec<Key>,
    limit: usize,
    offset: usize,
    /// `fuzzymatching=true`: fuzzy semantic matching of person names is asked of the PACS.
    fuzzy: bool,
}

/// Whether an attribute belongs to another level than `level` (and is not one of the unique
/// keys above it): a PACS of the hierarchical query model refuses such a key (PS3.4
/// C.4.1.2.1), so it is neither matched on (400) nor asked back there. Attributes of no level
/// the gateway knows are left to the PACS.
fn off_level(tag: Tag, level: QueryLevel) -> bool {
    let rank = |l: QueryLevel| match l {
        QueryLevel::Patient | QueryLevel::Study => 0,
        QueryLevel::Series => 1,
        QueryLevel::Image => 2,
    };
    let unique = [
        (tags::STUDY_INSTANCE_UID, QueryLevel::Study),
        (tags::SERIES_INSTANCE_UID, QueryLevel::Series),
        (tags::SOP_INSTANCE_UID, QueryLevel::Image),
    ];
    if let Some((_, l)) = unique.iter().find(|(t, _)| *t == tag) {
        return rank(*l) > rank(level);
    }
    // Of every level.
    if [
        tags::TIMEZONE_OFFSET_FROM_UTC,
        tags::INSTANCE_AVAILABILITY,
        tags::SPECIFIC_CHARACTER_SET,
    ]
    .contains(&tag)
    {
        return false;
    }
    let patient = tag.group() == 0x0010;
    // Study Root: the study level holds the patient's attributes too.
    let own = default_keys(level).contains(&tag) || (patient && rank(level) == 0);
    let other = [QueryLevel::Study, QueryLevel::Series, QueryLevel::Image]
        .iter()
        .any(|l| rank(*l) != rank(level) && default_keys(*l).contains(&tag));
    !own && (other || patient)
}

/// Reads the QIDO-RS parameters `pairs` (as the gateway narrowed them) into C-FIND keys at
/// `level`, inside the study and series the path names. For a PACS of the hierarchical query
/// model (`hierarchical`), no key of another level is sent: matching on one is refused, and
/// included ones are not asked back.
pub(crate) fn search_keys(
    level: QueryLevel,
    path_study: Option<&str>,
    path_series: Option<&str>,
    pairs: &[(String, String)],
    hierarchical: bool,
) -> Result<Search, ApiError> {
    let mut keys: Vec<Key> = Vec::new();
    let mut limit = MAX_MATCHES;
    let mut offset = 0usize;
    let mut fuzzy = false;
    let mut returned: Vec<Tag> = default_keys(level).to_vec();
    let number = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| ApiError::BadRequest("limit and offset take a number".into()))
    };
    let set = |keys: &mut Vec<Key>, tag: Tag, vr: VR, value: Vec<u8>| {
        if keys.iter().any(|k| k.tag == tag) {
            return Err(ApiError::BadRequest(
                "an attribute is matched on twice; name it once (UIDs as a comma-separated list)"
                    .into(),
            ));
        }
        keys.push(Key { tag, vr, value });
        Ok(())
    };
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => limit = number(v)?.min(MAX_MATCHES),
            "offset" => offset = number(v)?,
            "fuzzymatching" if matches!(v.as_str(), "true" | "false") => fuzzy = v == "true",
            "fuzzymatching" => {
                return Err(ApiError::BadRequest(
                    "fuzzymatching is true or false".into(),
                ));
            }
            "includefield" => {
                for f in v.split(',').filter(|f| !f.is_empty()) {
                    if f == "all" {
                        returned.extend(default_keys(QueryLevel::Study));
                        returned.extend(default_keys(QueryLevel::Series));
                        returned.extend(default_keys(QueryLevel::Image));
                    } else {
                        let (tag, _) = attribute(f)?;
                        if !returnable(tag) {
                            return Err(ApiError::BadRequest(
                                "includefield names an attribute that is not returned".into(),
                            ));
                        }
                        returned.push(tag);
                    }
                }
            }
            name => {
                let (tag, vr) = attribute(name)?;
                // Text matching only: binary VRs would need their values encoded, sequences
                // are not translated.
                let text = !matches!(
                    vr,
                    VR::SQ
                        | VR::AT
                        | VR::FL
                        | VR::FD
                        | VR::SL
                        | VR::SS
                        | VR::UL
                        | VR::US
                        | VR::SV
                        | VR::UV
                        | VR::OB
                        | VR::OD
                        | VR::OF
                        | VR::OL
                        | VR::OV
                        | VR::OW
                        | VR::UN
                );
                if !text || !returnable(tag) {
                    return Err(ApiError::BadRequest(
                        "that attribute cannot be matched on".into(),
                    ));
                }
                if hierarchical && off_level(tag, level) {
                    return Err(ApiError::BadRequest(
                        "the PACS follows the hierarchical query model: search on the attributes of the level searched (and the UIDs above it)".into(),
                    ));
                }
                if v.len() > 1024 || v.bytes().any(|b| b < 0x20 || b == b'\\' || b == 0x7f) {
                    return Err(ApiError::BadRequest(
                        "a matching value holds characters that are not allowed".into(),
                    ));
                }
                let value = if vr == VR::UI {
                    // A UID list (PS3.18 8.3.4.1) is DIMSE list matching.
                    v.replace(',', "\\").into_bytes()
                } else {
                    v.clone().into_bytes()
                };
                set(&mut keys, tag, vr, value)?;
            }
        }
    }
    for (tag, uid) in [
        (tags::STUDY_INSTANCE_UID, path_study),
        (tags::SERIES_INSTANCE_UID, path_series),
    ] {
        if let Some(uid) = uid {
            if keys
                .iter()
                .any(|k| k.tag == tag && k.value != uid.as_bytes())
            {
                return Err(ApiError::BadRequest(
                    "a UID key differs from the UID the path names".into(),
                ));
            }
            keys.retain(|k| k.tag != tag);
            set(&mut keys, tag, VR::UI, uid.as_bytes().to_vec())?;
        }
    }
    let dict = StandardDataDictionary;
    for tag in returned {
        if keys.iter().any(|k| k.tag == tag) || (hierarchical && off_level(tag, level)) {
            continue;
        }
        let Some(vr) = dict.by_tag(tag).map(|e| e.vr().relaxed()) else {
            continue;
        };
        keys.push(Key {
            tag,
            vr,
            value: Vec::new(),
        });
    }
    Ok(Search {
        keys,
        limit,
        offset,
        fuzzy,
    })
}

/// The C-FIND level of a QIDO-RS search.
fn level_name(level: QueryLevel) -> &'static str {
    match level {
        QueryLevel::Patient => "PATIENT",
        QueryLevel::Study => "STUDY",
        QueryLevel::Series => "SERIES",
        QueryLevel::Image => "IMAGE",
    }
}

/// Runs a search by C-FIND; the matches as DICOM JSON objects with their `RetrieveURL`
/// under `public_base`.
/// The matches of a search as DICOM JSON, and whether fuzzy matching was asked for and the
/// PACS did not agree to it (its matching was literal: PS3.18 8.3.4.1's warning is due).
pub(crate) async fn search(
    pacs: &Dimse,
    level: QueryLevel,
    s: Search,
    public_base: &str,
) -> Result<(Vec<Value>, bool), ApiError> {
    let want = s.offset.saturating_add(s.limit).min(MAX_MATCHES);
    let matches = pacs.find(level_name(level), s.keys, want, s.fuzzy).await?;
    let mut out = Vec::with_capacity(matches.sets.len());
    for set in matches.sets.iter().skip(s.offset).take(s.limit) {
        out.push(to_json(set, matches.encoding, level, public_base)?);
    }
    Ok((out, s.fuzzy && !matches.fuzzy))
}

fn read_object(bytes: &[u8], enc: Encoding) -> Result<InMemDicomObject, ApiError> {
    let ts = match enc {
        Encoding::ImplicitLittle => {
            dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased()
        }
        Encoding::ExplicitLittle => {
            dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased()
        }
    };
    InMemDicomObject::read_dataset_with_ts(bytes, &ts).map_err(|e| {
        // The decoder's words may quote values: logged, not answered.
        tracing::warn!(reason = %e, "a data set from the PACS could not be decoded");
        ApiError::Upstream("a data set from the PACS could not be decoded".into())
    })
}

/// An object as DICOM JSON, IS and DS values as JSON numbers (PS3.18 table F.2.3-1), as
/// DICOMweb servers write them and viewers read them.
fn json_of(obj: &InMemDicomObject) -> Result<Value, ApiError> {
    let mut v = dicom_json::to_value(obj)
        .map_err(|_| ApiError::Upstream("cannot encode a data set as DICOM JSON".into()))?;
    numbers(&mut v);
    Ok(v)
}

fn numbers(v: &mut Value) {
    let Some(o) = v.as_object_mut() else { return };
    for attr in o.values_mut() {
        let is_number = matches!(attr.get("vr").and_then(Value::as_str), Some("IS" | "DS"));
        let Some(values) = attr.get_mut("Value").and_then(Value::as_array_mut) else {
            continue;
        };
        for x in values.iter_mut() {
            if is_number {
                let t = x.as_str().map(str::trim).unwrap_or("");
                if let Ok(i) = t.parse::<i64>() {
                    *x = Value::from(i);
                } else if let Some(n) = t.parse::<f64>().ok().and_then(serde_json::Number::from_f64)
                {
                    *x = Value::Number(n);
                }
            } else if x.is_object() {
                numbers(x);
            }
        }
    }
}

/// A match (read strictly before) as a DICOM JSON object.
fn to_json(bytes: &[u8], enc: Encoding, level: QueryLevel, base: &str) -> Result<Value, ApiError> {
    let mut obj = read_object(bytes, enc)?;
    // The query's bookkeeping, and the PACS's own AE title: not the client's business.
    for t in [
        tags::QUERY_RETRIEVE_LEVEL,
        tags::RETRIEVE_AE_TITLE,
        tags::SPECIFIC_CHARACTER_SET,
    ] {
        obj.remove_element(t);
    }
    let mut v = json_of(&obj)?;
    let uid = |t: &str| super::qido::first_text(&v, t);
    let url = match level {
        QueryLevel::Patient | QueryLevel::Study => {
            uid("0020000D").map(|st| format!("{base}/studies/{st}"))
        }
        QueryLevel::Series => uid("0020000D")
            .zip(uid("0020000E"))
            .map(|(st, se)| format!("{base}/studies/{st}/series/{se}")),
        QueryLevel::Image => match (uid("0020000D"), uid("0020000E"), uid("00080018")) {
            (Some(st), Some(se), Some(i)) => {
                Some(format!("{base}/studies/{st}/series/{se}/instances/{i}"))
            }
            _ => None,
        },
    };
    if let (Some(url), Some(o)) = (url, v.as_object_mut()) {
        o.insert(
            "00081190".into(),
            serde_json::json!({"vr": "UR", "Value": [url]}),
        );
    }
    Ok(v)
}

/// The transfer syntaxes a retrieval of instances may take, from the Accept header (PS3.18
/// 8.7.3): `transfer-syntax=*` takes any; none named is Explicit VR Little Endian; a named one
/// the gateway cannot read is not acceptable.
pub(crate) fn accepted_syntaxes(accept: Option<&HeaderValue>) -> Result<Vec<String>, ApiError> {
    let text = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    let mut any_dicom = text.is_empty();
    for item in text.split(',') {
        let Ok(m) = item.trim().parse::<mime::Mime>() else {
            continue;
        };
        let is_dicom = match m.essence_str() {
            "application/dicom" => true,
            "multipart/related" => m
                .get_param("type")
                .is_some_and(|t| t.as_str() == "application/dicom"),
            "*/*" | "multipart/*" => true,
            _ => false,
        };
        if !is_dicom {
            continue;
        }
        any_dicom = true;
        match m
            .get_param("transfer-syntax")
            .map(|t| t.as_str().to_string())
        {
            Some(t) if t == "*" => return Ok(dimse::any_syntax()),
            Some(t) if syntax::readable(&t).is_some() => {
                if !out.contains(&t) {
                    out.push(t)
                }
            }
            Some(_) => {}
            None => {
                let t = syntax::EXPLICIT_VR_LITTLE_ENDIAN.to_string();
                if !out.contains(&t) {
                    out.push(t)
                }
            }
        }
    }
    if out.is_empty() {
        if any_dicom && !text.contains("transfer-syntax") {
            return Ok(vec![syntax::EXPLICIT_VR_LITTLE_ENDIAN.to_string()]);
        }
        return Err(ApiError::NotAcceptable(
            "no media type the request accepts can be served (application/dicom with a transfer syntax the gateway reads)".into(),
        ));
    }
    Ok(out)
}

/// A retrieval's items as the parts of a multipart answer: each instance a Part 10 file.
fn as_pieces(
    first: Retrieved,
    rx: mpsc::Receiver<Retrieved>,
) -> impl Stream<Item = Result<Piece, String>> + Send {
    futures_util::stream::unfold(
        (
            rx,
            VecDeque::<Result<Piece, String>>::new(),
            false,
            Some(first),
        ),
        |(mut rx, mut queue, mut ended, mut first)| async move {
            loop {
                if let Some(p) = queue.pop_front() {
                    return Some((p, (rx, queue, ended, first)));
                }
                if ended {
                    return None;
                }
                let next = match first.take() {
                    Some(f) => Some(f),
                    None => rx.recv().await,
                };
                match next {
                    Some(Retrieved::Instance {
                        sop_class,
                        sop_instance,
                        transfer_syntax,
                    }) => {
                        let headers = format!(
                            "Content-Type: application/dicom; transfer-syntax={transfer_syntax}"
                        );
                        queue.push_back(Ok(Piece::Start(headers.into_bytes())));
                        queue.push_back(Ok(Piece::Data(Bytes::from(part10_prefix(
                            &sop_class,
                            &sop_instance,
                            &transfer_syntax,
                        )))));
                    }
                    Some(Retrieved::Data { bytes, last }) => {
                        queue.push_back(Ok(Piece::Data(bytes)));
                        if last {
                            queue.push_back(Ok(Piece::PartEnd));
                        }
                    }
                    Some(Retrieved::Done { .. }) => {
                        queue.push_back(Ok(Piece::End));
                        ended = true;
                    }
                    Some(Retrieved::Failed(e)) => {
                        queue.push_back(Err(e.to_string()));
                        ended = true;
                    }
                    None => {
                        queue.push_back(Err("the retrieval ended without its last answer".into()));
                        ended = true;
                    }
                }
            }
        },
    )
}

/// The first item of a retrieval: an answer without any instance is 404, a failure before
/// any is the failure.
async fn first(rx: &mut mpsc::Receiver<Retrieved>) -> Result<Retrieved, ApiError> {
    match rx.recv().await {
        Some(Retrieved::Done { .. }) => Err(ApiError::NotFound),
        Some(Retrieved::Failed(e)) => Err(e.into()),
        None => Err(ApiError::Upstream("the retrieval broke off".into())),
        Some(item) => Ok(item),
    }
}

/// WADO-RS instances by C-GET: every instance checked as it streams, as on the relay path.
pub(crate) async fn instances(
    pacs: &Arc<Dimse>,
    target: Target,
    syntaxes: Vec<String>,
    check: Check,
) -> Result<Response, ApiError> {
    let mut rx = pacs.retrieve(target, syntaxes);
    let f = first(&mut rx).await?;
    checked::pieces(as_pieces(f, rx), check).await
}

/// WADO-URI's `application/dicom`: the one instance, checked as it streams.
pub(crate) async fn single(
    pacs: &Arc<Dimse>,
    target: Target,
    syntaxes: Vec<String>,
    check: Check,
) -> Result<Response, ApiError> {
    let mut rx = pacs.retrieve(target, syntaxes);
    let f = first(&mut rx).await?;
    checked::single_piece(as_pieces(f, rx), check).await
}

/// One received instance's start: its identity and a strict reader for its data set.
struct Receiving {
    class: String,
    instance: String,
    syntax_uid: String,
    reader: InstanceReader,
    /// The data set up to its pixel data (the whole of it when it has none).
    head: Vec<u8>,
    /// The pixel data began: nothing further is kept.
    cut: Option<usize>,
    /// Bytes of the data set read so far.
    read: u64,
}

impl Receiving {
    fn new(
        class: String,
        instance: String,
        syntax_uid: String,
        check: &Check,
    ) -> Result<Receiving, ApiError> {
        let syntax = syntax::readable(&syntax_uid).ok_or_else(|| {
            ApiError::Upstream(
                "the PACS sent an instance in a syntax the gateway does not read".into(),
            )
        })?;
        Ok(Receiving {
            class,
            instance,
            syntax_uid,
            reader: InstanceReader::dataset(syntax, check.limits),
            head: Vec::new(),
            cut: None,
            read: 0,
        })
    }

    /// Reads the next fragment; the bytes kept of it are those before the pixel data.
    fn feed(&mut self, b: &[u8], last: bool) -> Result<(), ApiError> {
        let bad = |v: crate::dicom::reader::Violation| {
            ApiError::Upstream(format!(
                "the PACS sent an instance the gateway refused: {v}"
            ))
        };
        self.reader.feed(b).map_err(bad)?;
        if last {
            self.reader.finish().map_err(bad)?;
        }
        let start = self.read;
        self.read += b.len() as u64;
        if self.cut.is_none() {
            match self.reader.pixel_data() {
                Some(p) => {
                    // The data set is held from its first byte: the cut is exact even when the
                    // Pixel Data header began in an earlier fragment.
                    let keep = (p.start.saturating_sub(start) as usize).min(b.len());
                    self.head.extend_from_slice(&b[..keep]);
                    self.head.truncate(p.start as usize);
                    self.cut = Some(self.head.len());
                }
                None => self.head.extend_from_slice(b),
            }
            if self.head.len() > MAX_METADATA_HEAD {
                return Err(ApiError::Upstream(
                    "an instance's attributes are larger than the gateway holds".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether the request reaches this instance (judged on what the strict reader read).
    fn admitted(&mut self, check: &Check) -> Result<bool, ApiError> {
        let head = self
            .reader
            .head()
            .map_err(|v| {
                ApiError::Upstream(format!(
                    "the PACS sent an instance the gateway refused: {v}"
                ))
            })?
            .ok_or_else(|| ApiError::Upstream("an instance ended before its identity".into()))?;
        Ok(check.allowed.admits_instance(&InstanceId::of(&head))
            && head.sop_instance.as_deref() == Some(self.instance.as_str()))
    }
}

impl Receiving {
    /// Once the pixel data began: the attributes before it, where its value starts, and how
    /// its frames lie there. `Err` when its frames cannot be cut out (encapsulated or
    /// single-bit pixel data, a frame larger than the gateway holds).
    fn plan(&self) -> Result<Option<(InMemDicomObject, u64, Layout)>, ApiError> {
        let (Some(_), Some(p)) = (self.cut, self.reader.pixel_data()) else {
            return Ok(None);
        };
        let enc = self
            .reader
            .syntax()
            .map(|s| s.encoding)
            .unwrap_or(Encoding::ExplicitLittle);
        let head = read_object(&self.head, enc)?;
        let l = layout(&head).ok_or_else(|| {
            ApiError::NotAcceptable(
                "the instance's frames cannot be cut out (no or single-bit native pixel data)"
                    .into(),
            )
        })?;
        if l.frame_size > MAX_FRAME {
            return Err(ApiError::Upstream(
                "a frame is larger than the gateway holds".into(),
            ));
        }
        // Every frame's end must be an offset (no wrap-around).
        if p.value_start
            .checked_add(l.frame_size.saturating_mul(l.frames))
            .is_none()
        {
            return Err(ApiError::Upstream(
                "the instance's frames do not fit its pixel data".into(),
            ));
        }
        Ok(Some((head, p.value_start, l)))
    }
}

fn past_last_frame() -> ApiError {
    ApiError::BadRequest("a frame number is past the instance's last frame".into())
}

/// Withholds an answer that held an instance the request does not reach (audited).
fn foreign(check: &Check) -> ApiError {
    check.anomaly("the PACS sent an instance the request does not reach; withheld");
    ApiError::Upstream("the PACS's answer held data the request does not reach".into())
}

/// WADO-RS metadata by C-GET: each instance read strictly up to its pixel data, judged, and
/// written as DICOM JSON (pixel data as a `BulkDataURI`); what follows its pixel data is not
/// held.
pub(crate) async fn metadata(
    pacs: &Arc<Dimse>,
    target: Target,
    check: Check,
    public_base: &str,
) -> Result<Response, ApiError> {
    let mut rx = pacs.retrieve(target.clone(), dimse::any_syntax());
    let mut out: Vec<Value> = Vec::new();
    let mut held = 0usize;
    let mut current: Option<Receiving> = None;
    loop {
        match rx.recv().await {
            Some(Retrieved::Instance {
                sop_class,
                sop_instance,
                transfer_syntax,
            }) => {
                current = Some(Receiving::new(
                    sop_class,
                    sop_instance,
                    transfer_syntax,
                    &check,
                )?);
            }
            Some(Retrieved::Data { bytes, last }) => {
                let Some(r) = current.as_mut() else {
                    return Err(ApiError::Upstream("data outside an instance".into()));
                };
                r.feed(&bytes, last)?;
                if last {
                    let mut r = current.take().ok_or(ApiError::NotFound)?;
                    if !r.admitted(&check)? {
                        return Err(foreign(&check));
                    }
                    held += r.head.len();
                    if held > MAX_METADATA_TOTAL {
                        return Err(ApiError::Upstream(
                            "the metadata is larger than the gateway holds".into(),
                        ));
                    }
                    out.push(instance_json(&r, public_base, &target)?);
                    r.head.clear();
                }
            }
            Some(Retrieved::Done { .. }) => break,
            Some(Retrieved::Failed(e)) => return Err(e.into()),
            None => return Err(ApiError::Upstream("the retrieval broke off".into())),
        }
    }
    if out.is_empty() {
        return Err(ApiError::NotFound);
    }
    let text = serde_json::to_vec(&out)
        .map_err(|_| ApiError::Upstream("cannot encode the metadata".into()))?;
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    Ok(r)
}

/// An instance's attributes as DICOM JSON, its pixel data referenced by URL.
fn instance_json(r: &Receiving, base: &str, target: &Target) -> Result<Value, ApiError> {
    let enc = syntax::readable(&r.syntax_uid)
        .map(|s| s.encoding)
        .unwrap_or(Encoding::ExplicitLittle);
    let mut obj = read_object(&r.head, enc)?;
    obj.remove_element(tags::SPECIFIC_CHARACTER_SET);
    let mut v = json_of(&obj)?;
    let series = super::qido::first_text(&v, "0020000E").unwrap_or_default();
    if let (Some(p), Some(o)) = (r.reader.pixel_data(), v.as_object_mut()) {
        let vr = match p.vr {
            Some(VR::OB) => "OB",
            _ if r.reader.syntax().is_some_and(|s| s.encapsulated) => "OB",
            _ => "OW",
        };
        o.insert(
            "7FE00010".into(),
            serde_json::json!({
                "vr": vr,
                "BulkDataURI": format!(
                    "{base}/studies/{}/series/{series}/instances/{}/bulk/7fe00010",
                    target.study, r.instance
                ),
            }),
        );
    }
    let _ = &r.class;
    Ok(v)
}

/// How the frames of a native (uncompressed) instance lie in its pixel data.
struct Layout {
    frame_size: u64,
    frames: u64,
}

fn layout(obj: &InMemDicomObject) -> Option<Layout> {
    let int = |t: Tag| obj.element(t).ok().and_then(|e| e.to_int::<u64>().ok());
    let rows = int(tags::ROWS)?;
    let cols = int(tags::COLUMNS)?;
    let samples = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits = int(tags::BITS_ALLOCATED)?;
    let frames = obj
        .element(tags::NUMBER_OF_FRAMES)
        .ok()
        .and_then(|e| e.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()))
        .unwrap_or(1);
    // Single-bit frames need not start on a byte boundary: not cut here.
    if bits == 0 || bits % 8 != 0 || rows == 0 || cols == 0 || samples == 0 || frames == 0 {
        return None;
    }
    let frame_size = rows
        .checked_mul(cols)?
        .checked_mul(samples)?
        .checked_mul(bits / 8)?;
    // Every frame's end must be computable.
    frame_size.checked_mul(frames)?;
    Some(Layout { frame_size, frames })
}

/// The frame numbers of a frame list (`1,3,5`), each at least 1.
pub(crate) fn frame_list(list: &str) -> Result<Vec<u64>, ApiError> {
    let bad =
        || ApiError::BadRequest("a frame list is frame numbers from 1, separated by commas".into());
    let frames: Vec<u64> = list
        .split(',')
        .map(|f| f.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    if frames.is_empty() || frames.len() > 10_000 {
        return Err(bad());
    }
    Ok(frames)
}

/// WADO-RS frames by C-GET of the instance: the frames cut from its native pixel data as it
/// streams, each a part of the answer as soon as it is complete (one frame held at a time).
/// The answer begins once the first frame is cut, so a refusal before is an HTTP status.
pub(crate) async fn frames(
    pacs: &Arc<Dimse>,
    target: Target,
    list: &str,
    check: Check,
) -> Result<Response, ApiError> {
    let wanted = frame_list(list)?;
    let mut sorted = wanted.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted != wanted {
        return Err(ApiError::BadRequest(
            "the gateway serves frame lists in ascending order without repeats".into(),
        ));
    }
    cut_out(pacs, target, Some(wanted), check).await
}

/// WADO-RS bulk data by C-GET of the instance, for its pixel data (the `BulkDataURI` its
/// metadata names): the native pixel data's value as one part, streamed as it arrives (no
/// frame held). Other bulk data paths are not served by translation.
pub(crate) async fn bulk(
    pacs: &Arc<Dimse>,
    target: Target,
    path: &[String],
    check: Check,
) -> Result<Response, ApiError> {
    if !matches!(path, [t] if t.eq_ignore_ascii_case("7fe00010")) {
        return Err(ApiError::NotAcceptable(
            "by translation to DIMSE, bulk data is served for the pixel data (bulk/7fe00010)"
                .into(),
        ));
    }
    cut_out(pacs, target, None, check).await
}

/// Frames `wanted` (all of the pixel data as one part when `None`) of the one instance of a
/// C-GET, as a multipart answer.
async fn cut_out(
    pacs: &Arc<Dimse>,
    target: Target,
    wanted: Option<Vec<u64>>,
    check: Check,
) -> Result<Response, ApiError> {
    let syntaxes = vec![
        syntax::EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
        syntax::IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
    ];
    let rx = pacs.retrieve(target, syntaxes);
    let boundary = random_boundary();
    let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    let cutter = Cutter {
        whole: wanted.is_none().then_some(0),
        wanted: wanted.unwrap_or_default(),
        next: 0,
        plan: None,
        frame: Vec::new(),
        boundary: boundary.clone(),
        body: body_tx,
        first: Some(first_tx),
    };
    tokio::spawn(cutter.run(rx, check));
    match first_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ApiError::Upstream("the retrieval broke off".into())),
    }
    let body = Body::from_stream(futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    if let Ok(v) = HeaderValue::from_str(&format!(
        "multipart/related; type=\"application/octet-stream\"; boundary={boundary}"
    )) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// Cuts the wanted frames out of one instance as its fragments arrive.
struct Cutter {
    /// Frame numbers, ascending.
    wanted: Vec<u64>,
    /// All of the pixel data as one part, streamed: the bytes of it sent so far.
    whole: Option<u64>,
    /// The index in `wanted` of the frame being cut.
    next: usize,
    /// Where the pixel data's value starts in the data set, and the frames' layout.
    plan: Option<(u64, Layout)>,
    frame: Vec<u8>,
    boundary: String,
    body: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// Answered once: the first frame is ready, or why there is none.
    first: Option<tokio::sync::oneshot::Sender<Result<(), ApiError>>>,
}

impl Cutter {
    async fn run(mut self, rx: mpsc::Receiver<Retrieved>, check: Check) {
        if let Err(e) = self.cut(rx, &check).await {
            match self.first.take() {
                Some(first) => {
                    let _ = first.send(Err(e));
                }
                // Frames already went out: the answer breaks off instead of ending.
                None => {
                    let _ = self
                        .body
                        .send(Err(std::io::Error::other("retrieval ended by the gateway")))
                        .await;
                }
            }
        }
    }

    /// Sends a completed frame as a part; `Err` when the client went away.
    async fn emit(&mut self) -> Result<(), ApiError> {
        let sep = if self.first.is_some() { "" } else { "\r\n" };
        let head = Bytes::from(format!(
            "{sep}--{}\r\nContent-Type: application/octet-stream; transfer-syntax={}\r\n\r\n",
            self.boundary,
            syntax::EXPLICIT_VR_LITTLE_ENDIAN
        ));
        let frame = Bytes::from(std::mem::take(&mut self.frame));
        let gone = || ApiError::Upstream("the client went away".into());
        self.body.send(Ok(head)).await.map_err(|_| gone())?;
        self.body.send(Ok(frame)).await.map_err(|_| gone())?;
        if let Some(first) = self.first.take() {
            first.send(Ok(())).map_err(|_| gone())?;
        }
        self.next += 1;
        Ok(())
    }

    async fn cut(
        &mut self,
        mut rx: mpsc::Receiver<Retrieved>,
        check: &Check,
    ) -> Result<(), ApiError> {
        let mut r: Option<Receiving> = None;
        let mut judged = false;
        loop {
            match rx.recv().await {
                Some(Retrieved::Instance {
                    sop_class,
                    sop_instance,
                    transfer_syntax,
                }) => {
                    if r.is_some() {
                        return Err(ApiError::Upstream(
                            "the PACS sent more than the one instance".into(),
                        ));
                    }
                    r = Some(Receiving::new(
                        sop_class,
                        sop_instance,
                        transfer_syntax,
                        check,
                    )?);
                }
                Some(Retrieved::Data { bytes, last }) => {
                    let Some(rec) = r.as_mut() else {
                        return Err(ApiError::Upstream("data outside an instance".into()));
                    };
                    let start = rec.read;
                    rec.feed(&bytes, last)?;
                    if !judged && (rec.cut.is_some() || last) {
                        if !rec.admitted(check)? {
                            return Err(foreign(check));
                        }
                        judged = true;
                    }
                    if self.plan.is_none()
                        && let Some((_, value_start, l)) = rec.plan()?
                    {
                        if self.wanted.last().is_some_and(|f| *f > l.frames) {
                            return Err(past_last_frame());
                        }
                        self.plan = Some((value_start, l));
                    }
                    self.take(start, &bytes).await?;
                }
                Some(Retrieved::Done { .. }) => break,
                Some(Retrieved::Failed(e)) => return Err(e.into()),
                None => return Err(ApiError::Upstream("the retrieval broke off".into())),
            }
        }
        if r.is_none() {
            return Err(ApiError::NotFound);
        }
        let short = match (self.whole, &self.plan) {
            (Some(sent), Some((_, l))) => sent < l.frame_size * l.frames,
            (Some(_), None) => true,
            (None, _) => self.next < self.wanted.len(),
        };
        if short {
            return Err(ApiError::NotAcceptable(
                "the instance's frames cannot be cut out (no native pixel data)".into(),
            ));
        }
        let end = Bytes::from(format!("\r\n--{}--\r\n", self.boundary));
        self.body
            .send(Ok(end))
            .await
            .map_err(|_| ApiError::Upstream("the client went away".into()))
    }

    /// Keeps the bytes of a fragment (`start`: its offset in the data set) that lie in the
    /// wanted frames; each frame completed goes out.
    async fn take(&mut self, start: u64, bytes: &[u8]) -> Result<(), ApiError> {
        let Some((value_start, frame_size)) = self.plan.as_ref().map(|(v, l)| (*v, l.frame_size))
        else {
            return Ok(());
        };
        let end = start + bytes.len() as u64;
        if let (Some(sent), Some((_, l))) = (self.whole, &self.plan) {
            let (a, b) = (
                start.max(value_start + sent),
                end.min(value_start + l.frame_size * l.frames),
            );
            if a < b {
                self.frame = bytes[(a - start) as usize..(b - start) as usize].to_vec();
                self.whole = Some(sent + (b - a));
                // The part's header goes with its first bytes only.
                if sent == 0 {
                    self.emit().await?;
                } else {
                    let piece = Bytes::from(std::mem::take(&mut self.frame));
                    self.body
                        .send(Ok(piece))
                        .await
                        .map_err(|_| ApiError::Upstream("the client went away".into()))?;
                }
            }
            return Ok(());
        }
        let mut pos = start;
        while self.next < self.wanted.len() && pos < end {
            let f0 = value_start + (self.wanted[self.next] - 1) * frame_size;
            let f1 = f0 + frame_size;
            if end <= f0 {
                break;
            }
            let (a, b) = (pos.max(f0), end.min(f1));
            if a < b {
                self.frame
                    .extend_from_slice(&bytes[(a - start) as usize..(b - start) as usize]);
            }
            if b == f1 {
                self.emit().await?;
            }
            pos = b;
        }
        Ok(())
    }
}

/// What the next instance of a retrieval gives for rendering.
enum Still {
    /// The instance's attributes before its pixel data, and the one frame asked for.
    Frame(InMemDicomObject, Vec<u8>),
    /// Why it gives no picture (no pixel data, compressed, not rendered faithfully).
    Not(ApiError),
}

/// Takes one frame of each instance a retrieval brings, each instance judged before a byte of
/// its pixel data is held, and only that frame held; the rest of an instance is read past.
struct Stills {
    rx: mpsc::Receiver<Retrieved>,
    /// The frame number taken of each instance, from 1.
    number: u64,
    check: Check,
    /// The instance whose frame was taken has data still to come.
    skipping: bool,
}

impl Stills {
    /// The next instance's frame; `None` once the retrieval ended.
    async fn next(&mut self) -> Result<Option<Still>, ApiError> {
        let broke = || ApiError::Upstream("the retrieval broke off".into());
        while self.skipping {
            match self.rx.recv().await {
                Some(Retrieved::Data { last, .. }) => self.skipping = !last,
                Some(Retrieved::Failed(e)) => return Err(e.into()),
                _ => return Err(ApiError::Upstream("an instance ended early".into())),
            }
        }
        let mut rec: Option<Receiving> = None;
        let mut judged = false;
        let mut decided: Option<Still> = None;
        // The attributes, and where the frame lies in the data set.
        let mut want: Option<(InMemDicomObject, u64, u64)> = None;
        let mut frame = Vec::new();
        loop {
            match self.rx.recv().await {
                Some(Retrieved::Instance {
                    sop_class,
                    sop_instance,
                    transfer_syntax,
                }) => {
                    if rec.is_some() {
                        return Err(ApiError::Upstream(
                            "an instance began inside another".into(),
                        ));
                    }
                    rec = Some(Receiving::new(
                        sop_class,
                        sop_instance,
                        transfer_syntax,
                        &self.check,
                    )?);
                }
                Some(Retrieved::Data { bytes, last }) => {
                    let Some(r) = rec.as_mut() else {
                        return Err(ApiError::Upstream("data outside an instance".into()));
                    };
                    if decided.is_none() {
                        let start = r.read;
                        r.feed(&bytes, last)?;
                        if !judged && (r.cut.is_some() || last) {
                            if !r.admitted(&self.check)? {
                                return Err(foreign(&self.check));
                            }
                            judged = true;
                        }
                        if want.is_none() {
                            match r.plan() {
                                Ok(Some((head, value_start, l))) => {
                                    if let Some(why) = super::render::unrenderable(&head) {
                                        decided =
                                            Some(Still::Not(ApiError::NotAcceptable(why.into())));
                                    } else if self.number > l.frames {
                                        decided = Some(Still::Not(past_last_frame()));
                                    } else {
                                        let f0 = value_start + (self.number - 1) * l.frame_size;
                                        want = Some((head, f0, f0 + l.frame_size));
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => decided = Some(Still::Not(e)),
                            }
                        }
                        if let Some((_, f0, f1)) = &want {
                            let end = start + bytes.len() as u64;
                            let (a, b) = (start.max(*f0), end.min(*f1));
                            if a < b {
                                frame.extend_from_slice(
                                    &bytes[(a - start) as usize..(b - start) as usize],
                                );
                            }
                            if b == *f1
                                && let Some((head, _, _)) = want.take()
                            {
                                self.skipping = !last;
                                return Ok(Some(Still::Frame(head, std::mem::take(&mut frame))));
                            }
                        }
                    }
                    if last {
                        let not = if r.reader.pixel_data().is_none() {
                            ApiError::NotAcceptable("the instance has no pixel data".into())
                        } else {
                            ApiError::Upstream(
                                "the instance's pixel data is shorter than its frames".into(),
                            )
                        };
                        return Ok(Some(decided.unwrap_or(Still::Not(not))));
                    }
                }
                Some(Retrieved::Done { .. }) if rec.is_none() => return Ok(None),
                Some(Retrieved::Failed(e)) => return Err(e.into()),
                _ => return Err(broke()),
            }
        }
    }
}

/// WADO-RS rendered and thumbnail by C-GET (PS3.18 9.5, 10.4): a picture made from one frame
/// (`frame`, else the first) of native pixel data. An instance or a frame is one picture; a
/// study's or series's thumbnail is its first instance that gives one (the retrieval then
/// stops); a study or series rendered is a multipart answer of each instance's first frame,
/// those that give no picture left out. Each instance is judged before its frame is held,
/// and one frame is held at a time.
pub(crate) async fn rendered(
    pacs: &Arc<Dimse>,
    target: Target,
    frame: Option<u64>,
    thumbnail: bool,
    opts: super::render::Options,
    media: super::render::Media,
    check: Check,
) -> Result<Response, ApiError> {
    use super::render::render;
    let one_instance = target.instance.is_some();
    let every = !one_instance && !thumbnail;
    let syntaxes = vec![
        syntax::EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
        syntax::IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
    ];
    let mut stills = Stills {
        rx: pacs.retrieve(target, syntaxes),
        number: frame.unwrap_or(1),
        check,
        skipping: false,
    };
    let mut refusal = None;
    let (head, bytes) = loop {
        match stills.next().await? {
            Some(Still::Frame(head, bytes)) => break (head, bytes),
            Some(Still::Not(e)) if one_instance => return Err(e),
            Some(Still::Not(e)) => {
                refusal.get_or_insert(e);
            }
            None => return Err(refusal.unwrap_or(ApiError::NotFound)),
        }
    };
    let picture = render(head, bytes, opts.clone(), media).await?;
    if !every {
        // A thumbnail's retrieval stops here: the association is given up, not drained.
        drop(stills);
        let mut r = Response::new(Body::from(picture));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(media.content_type()),
        );
        return Ok(r);
    }
    let boundary = random_boundary();
    let (tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let part = move |b: &str, first: bool| {
        Bytes::from(format!(
            "{}--{b}\r\nContent-Type: {}\r\n\r\n",
            if first { "" } else { "\r\n" },
            media.content_type()
        ))
    };
    let b = boundary.clone();
    tokio::spawn(async move {
        let send = async |item: Result<Bytes, std::io::Error>| tx.send(item).await.is_ok();
        if !(send(Ok(part(&b, true))).await && send(Ok(Bytes::from(picture))).await) {
            return;
        }
        loop {
            let item = match stills.next().await {
                Ok(Some(Still::Frame(head, bytes))) => {
                    render(head, bytes, opts.clone(), media).await
                }
                Ok(Some(Still::Not(_))) => continue,
                Ok(None) => {
                    send(Ok(Bytes::from(format!("\r\n--{b}--\r\n")))).await;
                    return;
                }
                Err(e) => Err(e),
            };
            let ok = match item {
                Ok(p) => send(Ok(part(&b, false))).await && send(Ok(Bytes::from(p))).await,
                // Parts already went out: the answer breaks off instead of ending.
                Err(_) => {
                    send(Err(std::io::Error::other("retrieval ended by the gateway"))).await;
                    return;
                }
            };
            if !ok {
                return;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "multipart/related; type=\"{}\"; boundary={boundary}",
        media.content_type()
    )) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}
