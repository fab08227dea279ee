//! Instances read as they stream: the attributes an instance is judged by (its head), taken
//! from the strict reader as fragments arrive, and the rest of the instance checked by the
//! same reader as it passes, so a repeated or out-of-order tag after the pixel data is caught
//! before the last byte goes on.
//!
//! Owns: [`InstanceReader`] for a bare data set (C-STORE, C-GET and C-MOVE sub-operations)
//! and for a DICOM Part 10 file (STOW-RS parts, WADO responses), whose file meta group is read
//! strictly too and must agree with the data set (SOP Class and Instance UIDs). Memory is the
//! judged values (a few hundred bytes) and, for Part 10, the file meta group (at most
//! [`MAX_META`]); the instance itself is never held here. Must not know policy or protocols.

use super::reader::{Limits, Reader, Scope, Sink, TopElement, Violation};
use super::syntax::{self, Syntax};
use super::values;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

/// The most of an instance held before its PatientID and UIDs are known. They sit at the
/// start (groups 0008 to 0020), so only instances with huge early elements come near it.
pub(crate) const MAX_HEAD: usize = 1024 * 1024;

/// The longest judged value held (instance UIDs and identifiers are far shorter).
const MAX_JUDGED_BYTES: usize = 1024;
/// The largest file meta group accepted.
pub(crate) const MAX_META: usize = 64 * 1024;
/// The Part 10 preamble before the `DICM` prefix (PS3.10 7.1).
pub(crate) const PREAMBLE: usize = 128;
/// Judged attributes of an instance sit up to here; past it, the head is known.
const LAST_JUDGED: Tag = tags::SERIES_INSTANCE_UID;

/// What an instance says about itself, every value validated. UIDs carry no padding; text
/// values keep theirs (policy compares them as LO values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceHead {
    pub sop_class: Option<String>,
    pub sop_instance: Option<String>,
    pub patient_id: Option<String>,
    /// IssuerOfPatientID.
    pub issuer: Option<String>,
    pub study: Option<String>,
    pub series: Option<String>,
    pub modality: Option<String>,
    pub study_date: Option<String>,
}

/// The file meta group of a Part 10 file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    /// Where the data set begins in the file (after the preamble and the meta group).
    pub data_set_start: usize,
}

/// Keeps the judged top-level values (validated) of what the reader reads.
#[derive(Default)]
struct Judged {
    values: Vec<(Tag, Vec<u8>)>,
    current: Option<(Tag, Option<VR>, Vec<u8>)>,
    /// Where the top-level Pixel Data element begins, once met.
    pixel_data: Option<TopElement>,
}

impl Sink for Judged {
    fn begin(&mut self, e: &TopElement) -> Result<bool, Violation> {
        if e.tag == tags::PIXEL_DATA {
            self.pixel_data = Some(*e);
        }
        if values::judged(e.tag).is_none() {
            return Ok(false);
        }
        if e.container {
            return Err(Violation::NotAllowed(e.tag));
        }
        self.current = Some((e.tag, e.vr, Vec::new()));
        Ok(true)
    }
    fn value(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        if let Some((tag, _, v)) = &mut self.current {
            if v.len() + bytes.len() > MAX_JUDGED_BYTES {
                return Err(Violation::BadValue(
                    *tag,
                    "the value is longer than its VR allows",
                ));
            }
            v.extend_from_slice(bytes);
        }
        Ok(())
    }
    fn end(&mut self, _: u64) -> Result<(), Violation> {
        if let Some((tag, vr, v)) = self.current.take() {
            values::check(tag, vr, &v)?;
            self.values.push((tag, v));
        }
        Ok(())
    }
}

impl Judged {
    fn raw(&self, tag: Tag) -> Option<&[u8]> {
        self.values
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    }

    /// A single UID (an instance names one study, series, instance, class).
    fn uid(&self, tag: Tag) -> Result<Option<String>, Violation> {
        let Some(v) = self.raw(tag) else {
            return Ok(None);
        };
        // Checked when it was read (every judged value is).
        let list = values::split_uids(v);
        match list.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.to_string())),
            _ => Err(Violation::BadValue(
                tag,
                "several UIDs where one is allowed",
            )),
        }
    }

    fn text(&self, tag: Tag) -> Option<String> {
        // Validated as printable ASCII when it was read.
        self.raw(tag)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

// One per instance in flight, so the size of the reading state does not matter.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Collecting the preamble and file meta group of a Part 10 file.
    Meta(Vec<u8>),
    Body {
        reader: Reader,
        judged: Judged,
        meta: Option<FileMeta>,
        syntax: Syntax,
    },
}

/// Reads one instance strictly as it streams.
pub struct InstanceReader {
    limits: Limits,
    state: State,
    finished: bool,
    /// The first violation: every later call refuses with it, so no caller can go on past it.
    failed: Option<Violation>,
}

impl InstanceReader {
    /// An instance as a bare data set in a negotiated transfer syntax.
    pub fn dataset(syntax: Syntax, limits: Limits) -> InstanceReader {
        InstanceReader {
            limits,
            state: State::Body {
                reader: Reader::new(Scope::DataSet, syntax.encoding, syntax.encapsulated, limits),
                judged: Judged::default(),
                meta: None,
                syntax,
            },
            finished: false,
            failed: None,
        }
    }

    /// An instance as a Part 10 file: preamble, `DICM`, file meta group, data set.
    pub fn part10(limits: Limits) -> InstanceReader {
        InstanceReader {
            limits,
            state: State::Meta(Vec::new()),
            finished: false,
            failed: None,
        }
    }

    /// Remembers the first violation of `r`.
    fn latch<T>(&mut self, r: Result<T, Violation>) -> Result<T, Violation> {
        if let Err(v) = &r {
            self.failed.get_or_insert_with(|| v.clone());
        }
        r
    }

    /// Reads the next piece of the instance.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        if self.finished && !chunk.is_empty() {
            return self.latch(Err(Violation::AfterEnd));
        }
        let r = self.feed_inner(chunk);
        self.latch(r)
    }

    fn feed_inner(&mut self, chunk: &[u8]) -> Result<(), Violation> {
        match &mut self.state {
            State::Body { reader, judged, .. } => reader.feed(chunk, judged),
            State::Meta(buf) => {
                buf.extend_from_slice(chunk);
                let Some((meta, start)) = read_meta(buf, self.limits)? else {
                    return Ok(());
                };
                let syntax =
                    syntax::readable(&meta.transfer_syntax).ok_or(Violation::UnsupportedSyntax)?;
                let rest = buf.split_off(start);
                let mut reader = Reader::new(
                    Scope::DataSet,
                    syntax.encoding,
                    syntax.encapsulated,
                    self.limits,
                );
                let mut judged = Judged::default();
                reader.feed(&rest, &mut judged)?;
                self.state = State::Body {
                    reader,
                    judged,
                    meta: Some(meta),
                    syntax,
                };
                Ok(())
            }
        }
    }

    /// The instance has ended: it must be complete.
    pub fn finish(&mut self) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        let r = match &mut self.state {
            State::Body { reader, .. } => reader.finish(),
            State::Meta(_) => Err(Violation::Truncated),
        };
        if r.is_ok() {
            self.finished = true;
        }
        self.latch(r)
    }

    /// The data set's transfer syntax, once known.
    pub fn syntax(&self) -> Option<Syntax> {
        match &self.state {
            State::Body { syntax, .. } => Some(*syntax),
            State::Meta(_) => None,
        }
    }

    /// The top-level Pixel Data element's header, once the reader met it (offsets in the data
    /// set; for a Part 10 file, counted from the data set's start).
    pub fn pixel_data(&self) -> Option<TopElement> {
        match &self.state {
            State::Body { judged, .. } => judged.pixel_data,
            State::Meta(_) => None,
        }
    }

    /// The file meta group of a Part 10 instance, once read.
    pub fn meta(&self) -> Option<&FileMeta> {
        match &self.state {
            State::Body { meta, .. } => meta.as_ref(),
            State::Meta(_) => None,
        }
    }

    /// The instance's head once every judged attribute is known (`Ok(None)`: read more).
    pub fn head(&mut self) -> Result<Option<InstanceHead>, Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        let r = self.head_inner();
        self.latch(r)
    }

    fn head_inner(&self) -> Result<Option<InstanceHead>, Violation> {
        let State::Body {
            reader,
            judged,
            meta,
            ..
        } = &self.state
        else {
            return Ok(None);
        };
        let known =
            self.finished || matches!(reader.top_level_progress(), (Some(t), _) if t > LAST_JUDGED);
        if !known {
            return Ok(None);
        }
        let head = InstanceHead {
            sop_class: judged.uid(tags::SOP_CLASS_UID)?,
            sop_instance: judged.uid(tags::SOP_INSTANCE_UID)?,
            patient_id: judged.text(tags::PATIENT_ID),
            issuer: judged.text(tags::ISSUER_OF_PATIENT_ID),
            study: judged.uid(tags::STUDY_INSTANCE_UID)?,
            series: judged.uid(tags::SERIES_INSTANCE_UID)?,
            modality: judged.text(tags::MODALITY),
            study_date: judged.text(tags::STUDY_DATE),
        };
        if let Some(m) = meta {
            if head.sop_instance.as_deref() != Some(m.sop_instance.as_str()) {
                return Err(Violation::BadValue(
                    tags::MEDIA_STORAGE_SOP_INSTANCE_UID,
                    "differs from the data set's SOP Instance UID",
                ));
            }
            if head.sop_class.as_deref() != Some(m.sop_class.as_str()) {
                return Err(Violation::BadValue(
                    tags::MEDIA_STORAGE_SOP_CLASS_UID,
                    "differs from the data set's SOP Class UID",
                ));
            }
        }
        Ok(Some(head))
    }
}

/// The preamble, `DICM` and file meta group of a Part 10 file for an instance received as a
/// bare data set (PS3.10 7.1): what a DICOMweb client expects before the data set.
pub fn part10_prefix(sop_class: &str, sop_instance: &str, transfer_syntax: &str) -> Vec<u8> {
    use super::dataset::encode_element;
    use super::reader::Encoding::ExplicitLittle;
    let mut group = Vec::with_capacity(256);
    group.extend(encode_element(
        ExplicitLittle,
        tags::FILE_META_INFORMATION_VERSION,
        VR::OB,
        &[0, 1],
    ));
    group.extend(encode_element(
        ExplicitLittle,
        tags::MEDIA_STORAGE_SOP_CLASS_UID,
        VR::UI,
        sop_class.as_bytes(),
    ));
    group.extend(encode_element(
        ExplicitLittle,
        tags::MEDIA_STORAGE_SOP_INSTANCE_UID,
        VR::UI,
        sop_instance.as_bytes(),
    ));
    group.extend(encode_element(
        ExplicitLittle,
        tags::TRANSFER_SYNTAX_UID,
        VR::UI,
        transfer_syntax.as_bytes(),
    ));
    group.extend(encode_element(
        ExplicitLittle,
        tags::IMPLEMENTATION_CLASS_UID,
        VR::UI,
        super::negotiation::IMPLEMENTATION_CLASS_UID.as_bytes(),
    ));
    group.extend(encode_element(
        ExplicitLittle,
        tags::IMPLEMENTATION_VERSION_NAME,
        VR::SH,
        super::negotiation::IMPLEMENTATION_VERSION_NAME.as_bytes(),
    ));
    let mut out = vec![0u8; PREAMBLE];
    out.extend_from_slice(b"DICM");
    out.extend(encode_element(
        ExplicitLittle,
        tags::FILE_META_INFORMATION_GROUP_LENGTH,
        VR::UL,
        &(group.len() as u32).to_le_bytes(),
    ));
    out.extend(group);
    out
}

/// Reads the preamble and file meta group when all of it is at hand: `Ok(None)` asks for more.
/// On success, the meta values and where the data set starts.
fn read_meta(buf: &[u8], limits: Limits) -> Result<Option<(FileMeta, usize)>, Violation> {
    const GROUP_LENGTH: Tag = Tag(0x0002, 0x0000);
    if buf.len() < 144 {
        return Ok(None);
    }
    if &buf[PREAMBLE..PREAMBLE + 4] != b"DICM" {
        return Err(Violation::BadValue(
            GROUP_LENGTH,
            "not a DICOM file (no DICM prefix)",
        ));
    }
    if buf[132..140] != [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00] {
        return Err(Violation::BadValue(
            GROUP_LENGTH,
            "the file meta group does not start with its group length",
        ));
    }
    let group = u32::from_le_bytes([buf[140], buf[141], buf[142], buf[143]]) as usize;
    if group > MAX_META {
        return Err(Violation::TooLarge("the file meta group"));
    }
    let end = 144 + group;
    if buf.len() < end {
        return Ok(None);
    }
    let meta = &buf[132..end];
    let mut reader = Reader::with_length(
        Scope::FileMeta,
        super::reader::Encoding::ExplicitLittle,
        false,
        limits,
        meta.len() as u64,
    );
    let mut judged = Judged::default();
    reader.feed(meta, &mut judged)?;
    reader.finish()?;
    let required = |tag: Tag| {
        judged
            .uid(tag)?
            .ok_or(Violation::BadValue(tag, "the file meta group lacks it"))
    };
    Ok(Some((
        FileMeta {
            sop_class: required(tags::MEDIA_STORAGE_SOP_CLASS_UID)?,
            sop_instance: required(tags::MEDIA_STORAGE_SOP_INSTANCE_UID)?,
            transfer_syntax: required(tags::TRANSFER_SYNTAX_UID)?,
            data_set_start: end,
        },
        end,
    )))
}
