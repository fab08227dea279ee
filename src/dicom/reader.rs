//! The strict reader: the one parser every DICOM byte from a peer goes through before the
//! gateway judges it or relays it (command sets, identifiers, query matches, instance heads and
//! their tails, file meta groups).
//!
//! Owns: the structural rules of PS3.5 chapter 7 as the gateway enforces them. Tags strictly
//! ascending and unique in every item and at the top level; items and delimiters only where
//! they belong; every declared length checked against the innermost container and, when the
//! whole input is known, against what follows, before anything is read into memory; undefined
//! lengths only for sequences and encapsulated pixel data; nesting at most
//! [`Limits::max_depth`] sequences; explicit VR headers with known VR codes and zero reserved
//! bytes; even lengths. It is a push parser: bytes are fed in whatever pieces they arrive, each
//! byte is looked at once, nothing is ever re-scanned, and memory does not grow with the input
//! (the stack is bounded by the depth limit; values are never buffered here). Top-level
//! elements are reported to a [`Sink`], which decides what it keeps.
//!
//! Must not know what attributes mean (that is [`super::values`]), transfer syntax UIDs
//! ([`super::syntax`]), policy, or any protocol.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// How a data set's elements are encoded (always little endian: the gateway refuses the
/// retired big endian syntax rather than read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ImplicitLittle,
    ExplicitLittle,
}

/// What kind of element list is being read; each admits its own groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A data set (identifier, match, instance): no command (0000) or file meta (0002)
    /// elements, at any level.
    DataSet,
    /// A DIMSE command set: group 0000 only, no sequences.
    Command,
    /// A Part 10 file meta group: group 0002 only, no sequences.
    FileMeta,
}

/// Bounds the reader enforces beyond the structure itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The deepest nesting of sequences accepted (`limits.max_sequence_depth`).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_depth: 16 }
    }
}

/// Why the reader refused its input. Every variant names the rule; the text never holds a
/// value, so it is safe in logs and error bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the data ends inside an element or an open sequence")]
    Truncated,
    #[error("{0} declares a length larger than what can follow")]
    LengthBeyondEnd(Tag),
    #[error("{tag} follows {prev}: tags must be in ascending order")]
    OutOfOrder { prev: Tag, tag: Tag },
    #[error("{0} appears twice")]
    Repeated(Tag),
    #[error("sequences are nested deeper than {0}")]
    TooDeep(usize),
    #[error(
        "{0} has an undefined length, which only sequences and encapsulated pixel data may have"
    )]
    UndefinedLength(Tag),
    #[error("{0} has an odd length")]
    OddLength(Tag),
    #[error("{0} has a VR code that is not a DICOM VR")]
    UnknownVr(Tag),
    #[error("{0}: the reserved bytes of its header are not zero")]
    ReservedBytes(Tag),
    #[error("{tag} is encoded as {found:?} but must be {expected:?}")]
    WrongVr { tag: Tag, found: VR, expected: VR },
    #[error("{0} found where a sequence item was expected")]
    NotAnItem(Tag),
    #[error("{0} is out of place")]
    StrayDelimiter(Tag),
    #[error("{0} does not belong in this kind of data set")]
    WrongGroup(Tag),
    #[error("{0} is not allowed here")]
    NotAllowed(Tag),
    #[error("{0}: {1}")]
    BadValue(Tag, &'static str),
    #[error("encapsulated pixel data in a transfer syntax that does not encapsulate")]
    Encapsulation,
    #[error("the transfer syntax is not one the gateway reads")]
    UnsupportedSyntax,
    #[error("{0} is larger than the gateway holds")]
    TooLarge(&'static str),
    #[error("bytes follow the end of the data set")]
    AfterEnd,
}

pub(crate) const ITEM: Tag = Tag(0xFFFE, 0xE000);
pub(crate) const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
pub(crate) const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
pub const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// A top-level element as the reader met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopElement {
    pub tag: Tag,
    /// The VR from the header (explicit encoding), `None` in implicit encoding.
    pub vr: Option<VR>,
    /// Offset of the element's header in the whole input.
    pub start: u64,
    /// Offset of its value.
    pub value_start: u64,
    /// A sequence or encapsulated pixel data (its value is items, not bytes).
    pub container: bool,
}

/// Where the reader reports top-level elements. Nested elements are checked but not reported.
pub trait Sink {
    /// A top-level element begins. `Ok(true)` asks for its value bytes through [`Sink::value`]
    /// (only for plain values; containers report no bytes).
    fn begin(&mut self, e: &TopElement) -> Result<bool, Violation>;
    /// A piece of the value of the element that began last (only when asked for).
    fn value(&mut self, bytes: &[u8]) -> Result<(), Violation>;
    /// The element that began last is complete; `end` is the offset just past it.
    fn end(&mut self, end: u64) -> Result<(), Violation>;
}

/// A sink that keeps nothing: the reader then only validates.
pub struct Validate;

impl Sink for Validate {
    fn begin(&mut self, _: &TopElement) -> Result<bool, Violation> {
        Ok(false)
    }
    fn value(&mut self, _: &[u8]) -> Result<(), Violation> {
        Ok(())
    }
    fn end(&mut self, _: u64) -> Result<(), Violation> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Root,
    Item,
    Sequence,
    Pixels,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// Offset just past a defined-length container; `None`: it ends at a delimiter.
    end: Option<u64>,
    /// The tightest end of this frame and every frame around it: nothing inside may pass it.
    bound: Option<u64>,
    /// The last element tag seen in an item or at the top level.
    last: Option<Tag>,
    /// The encoding of the elements inside (a UN sequence of undefined length holds implicit
    /// VR elements, PS3.5 6.2.2).
    enc: Encoding,
}

#[derive(Debug, Clone, Copy)]
enum Want {
    /// The next element, item or delimiter header.
    Header,
    /// The rest of a value: `top` values go to the sink when it asked for them.
    Value {
        remaining: u64,
        top: bool,
        keep: bool,
    },
}

/// The strict reader. Feed it bytes with [`Reader::feed`] and end with [`Reader::finish`].
pub struct Reader {
    scope: Scope,
    limits: Limits,
    /// Undefined-length pixel data is read as encapsulated fragments (encapsulated transfer
    /// syntaxes only).
    encapsulated: bool,
    stack: Vec<Frame>,
    want: Want,
    /// Bytes consumed so far.
    pos: u64,
    hdr: [u8; 12],
    hdr_len: usize,
    /// Sequences open now (the depth limit counts these).
    depth: usize,
    /// Set on the first violation: the reader refuses every later call with it.
    failed: Option<Violation>,
    /// The last top-level tag seen (its header complete).
    last_top: Option<Tag>,
    /// A top-level element is being read (begun, not yet ended).
    in_top: bool,
}

impl Reader {
    /// A reader for input that arrives in pieces (its total length unknown).
    pub fn new(scope: Scope, encoding: Encoding, encapsulated: bool, limits: Limits) -> Reader {
        Reader {
            scope,
            limits,
            encapsulated,
            stack: vec![Frame {
                kind: Kind::Root,
                end: None,
                bound: None,
                last: None,
                enc: encoding,
            }],
            want: Want::Header,
            pos: 0,
            hdr: [0; 12],
            hdr_len: 0,
            depth: 0,
            failed: None,
            last_top: None,
            in_top: false,
        }
    }

    /// A reader for input whose total length is known: every declared length is checked
    /// against what follows as soon as its header is read.
    pub fn with_length(
        scope: Scope,
        encoding: Encoding,
        encapsulated: bool,
        limits: Limits,
        total: u64,
    ) -> Reader {
        let mut r = Reader::new(scope, encoding, encapsulated, limits);
        r.stack[0].end = Some(total);
        r.stack[0].bound = Some(total);
        r
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The last top-level tag whose header was read, and whether that element is complete.
    /// Tags ascend, so once a tag above `t` was seen, every element up to `t` is known.
    pub(crate) fn top_level_progress(&self) -> (Option<Tag>, bool) {
        (self.last_top, !self.in_top)
    }

    /// Reads the next piece of input.
    pub fn feed(&mut self, mut data: &[u8], sink: &mut impl Sink) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        while !data.is_empty() {
            let r = match self.want {
                Want::Value {
                    remaining,
                    top,
                    keep,
                } => {
                    let n = remaining.min(data.len() as u64) as usize;
                    let (now, rest) = data.split_at(n);
                    data = rest;
                    self.pos += n as u64;
                    let left = remaining - n as u64;
                    self.want = Want::Value {
                        remaining: left,
                        top,
                        keep,
                    };
                    let mut r = if keep { sink.value(now) } else { Ok(()) };
                    if r.is_ok() && left == 0 {
                        self.want = Want::Header;
                        r = self.element_done(top, sink);
                    }
                    r
                }
                // A whole header at hand (the common case): one fixed-size copy.
                Want::Header if self.hdr_len == 0 && data.len() >= self.hdr.len() => {
                    self.hdr.copy_from_slice(&data[..12]);
                    self.hdr_len = 12;
                    let need = self.header_size();
                    self.hdr_len = 0;
                    data = &data[need..];
                    let start = self.pos;
                    self.pos += need as u64;
                    self.header(start, need, sink)
                }
                Want::Header => {
                    let need = self.header_size();
                    let take = (need - self.hdr_len).min(data.len());
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[..take]);
                    self.hdr_len += take;
                    data = &data[take..];
                    // The size may grow once the VR is seen (explicit VR long form).
                    if self.hdr_len == need && self.header_size() == need {
                        let start = self.pos;
                        self.pos += need as u64;
                        self.hdr_len = 0;
                        self.header(start, need, sink)
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(v) = r {
                self.failed = Some(v.clone());
                return Err(v);
            }
        }
        Ok(())
    }

    /// The input has ended: it must end between top-level elements, with every container closed.
    pub fn finish(&mut self) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        let clean = self.stack.len() == 1 && self.hdr_len == 0 && matches!(self.want, Want::Header);
        let complete = self.stack[0].end.is_none_or(|e| e == self.pos);
        if clean && complete {
            Ok(())
        } else {
            self.failed = Some(Violation::Truncated);
            Err(Violation::Truncated)
        }
    }

    fn frame(&self) -> &Frame {
        // The root frame is never popped.
        &self.stack[self.stack.len() - 1]
    }

    /// How many header bytes the next header needs, given what has been read of it.
    fn header_size(&self) -> usize {
        if self.hdr_len < 4 {
            return 8.max(self.hdr_len);
        }
        let group = u16::from_le_bytes([self.hdr[0], self.hdr[1]]);
        let f = self.frame();
        if group == 0xFFFE
            || matches!(f.kind, Kind::Sequence | Kind::Pixels)
            || f.enc == Encoding::ImplicitLittle
        {
            return 8;
        }
        if self.hdr_len < 6 {
            return 8;
        }
        if long_form(&[self.hdr[4], self.hdr[5]]) {
            12
        } else {
            8
        }
    }

    /// Checks that something ending at `end` fits every container around it.
    fn fits(&self, tag: Tag, end: u64) -> Result<(), Violation> {
        match self.frame().bound {
            Some(b) if end > b => Err(Violation::LengthBeyondEnd(tag)),
            _ => Ok(()),
        }
    }

    fn push(&mut self, kind: Kind, end: Option<u64>, enc: Encoding) {
        let outer = self.frame().bound;
        let bound = match (end, outer) {
            (Some(e), Some(o)) => Some(e.min(o)),
            (Some(e), None) => Some(e),
            (None, o) => o,
        };
        self.stack.push(Frame {
            kind,
            end,
            bound,
            last: None,
            enc,
        });
    }

    /// One complete header at `start` of `size` bytes.
    fn header(&mut self, start: u64, size: usize, sink: &mut impl Sink) -> Result<(), Violation> {
        let h = self.hdr;
        let tag = Tag(
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        );
        let frame = *self.frame();
        self.fits(tag, self.pos)?;
        match frame.kind {
            Kind::Sequence | Kind::Pixels => {
                let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                return self.item_header(tag, len, frame, sink);
            }
            Kind::Item | Kind::Root => {}
        }
        if tag.0 == 0xFFFE {
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if tag == ITEM_END && frame.kind == Kind::Item && frame.end.is_none() && len == 0 {
                self.stack.pop();
                return self.after_container(sink);
            }
            return Err(Violation::StrayDelimiter(tag));
        }
        if let Some(last) = frame.last {
            if tag == last {
                return Err(Violation::Repeated(tag));
            }
            if tag < last {
                return Err(Violation::OutOfOrder { prev: last, tag });
            }
        }
        self.check_group(tag)?;
        let top = frame.kind == Kind::Root;
        let n = self.stack.len() - 1;
        self.stack[n].last = Some(tag);
        let (vr, len) = match frame.enc {
            Encoding::ExplicitLittle => {
                let code = [h[4], h[5]];
                let vr = vr_of(code).ok_or(Violation::UnknownVr(tag))?;
                if size == 12 {
                    if h[6] != 0 || h[7] != 0 {
                        return Err(Violation::ReservedBytes(tag));
                    }
                    (Some(vr), u32::from_le_bytes([h[8], h[9], h[10], h[11]]))
                } else {
                    (Some(vr), u16::from_le_bytes([h[6], h[7]]) as u32)
                }
            }
            Encoding::ImplicitLittle => (None, u32::from_le_bytes([h[4], h[5], h[6], h[7]])),
        };
        let sequence = match vr {
            Some(VR::SQ) => true,
            Some(_) => false,
            None => dictionary_sq(tag),
        };
        let pixels = tag == PIXEL_DATA && len == UNDEFINED;
        let container = sequence || pixels || (len == UNDEFINED && vr.is_none_or(|v| v == VR::UN));
        if container && self.scope != Scope::DataSet {
            return Err(Violation::NotAllowed(tag));
        }
        if top {
            self.last_top = Some(tag);
            self.in_top = true;
        }
        let keep = if top {
            sink.begin(&TopElement {
                tag,
                vr,
                start,
                value_start: self.pos,
                container,
            })?
        } else {
            false
        };
        if len == UNDEFINED {
            if pixels {
                if !self.encapsulated || !matches!(vr, Some(VR::OB | VR::OW)) {
                    return Err(Violation::Encapsulation);
                }
                self.push(Kind::Pixels, None, frame.enc);
                return Ok(());
            }
            let inner = match vr {
                Some(VR::SQ) => frame.enc,
                // PS3.5 6.2.2: a UN of undefined length holds an implicit VR sequence.
                Some(VR::UN) => Encoding::ImplicitLittle,
                // In implicit VR only an element not known to be something else may be a
                // sequence of undefined length (a private one); a known text or binary element
                // of undefined length would be read two ways.
                None if sequence || !dictionary_known(tag) => Encoding::ImplicitLittle,
                _ => return Err(Violation::UndefinedLength(tag)),
            };
            return self.open_sequence(None, inner, sink);
        }
        if !len.is_multiple_of(2) {
            return Err(Violation::OddLength(tag));
        }
        let end = self.pos + len as u64;
        self.fits(tag, end)?;
        if sequence {
            return self.open_sequence(Some(end), frame.enc, sink);
        }
        if len == 0 {
            return self.element_done(top, sink);
        }
        self.want = Want::Value {
            remaining: len as u64,
            top,
            keep: keep && top,
        };
        Ok(())
    }

    fn open_sequence(
        &mut self,
        end: Option<u64>,
        enc: Encoding,
        sink: &mut impl Sink,
    ) -> Result<(), Violation> {
        if self.depth >= self.limits.max_depth {
            return Err(Violation::TooDeep(self.limits.max_depth));
        }
        self.depth += 1;
        self.push(Kind::Sequence, end, enc);
        // An empty defined-length sequence ends at once.
        self.after_container(sink)
    }

    fn item_header(
        &mut self,
        tag: Tag,
        len: u32,
        frame: Frame,
        sink: &mut impl Sink,
    ) -> Result<(), Violation> {
        if tag == SEQUENCE_END {
            if len != 0 || frame.end.is_some() {
                return Err(Violation::StrayDelimiter(tag));
            }
            self.stack.pop();
            if frame.kind == Kind::Sequence {
                self.depth -= 1;
            }
            if self.stack.len() == 1 {
                self.in_top = false;
                sink.end(self.pos)?;
            }
            return self.after_container(sink);
        }
        if tag != ITEM {
            return Err(Violation::NotAnItem(tag));
        }
        if frame.kind == Kind::Pixels {
            // A fragment: its bytes are opaque.
            if len == UNDEFINED {
                return Err(Violation::UndefinedLength(tag));
            }
            if !len.is_multiple_of(2) {
                return Err(Violation::OddLength(tag));
            }
            self.fits(tag, self.pos + len as u64)?;
            if len > 0 {
                self.want = Want::Value {
                    remaining: len as u64,
                    top: false,
                    keep: false,
                };
            }
            return Ok(());
        }
        if len == UNDEFINED {
            self.push(Kind::Item, None, frame.enc);
            return Ok(());
        }
        if !len.is_multiple_of(2) {
            return Err(Violation::OddLength(tag));
        }
        let end = self.pos + len as u64;
        self.fits(tag, end)?;
        self.push(Kind::Item, Some(end), frame.enc);
        self.after_container(sink)
    }

    /// A value element ended; it may also end defined-length containers around it.
    fn element_done(&mut self, top: bool, sink: &mut impl Sink) -> Result<(), Violation> {
        if top {
            self.in_top = false;
            sink.end(self.pos)?;
        }
        self.after_container(sink)
    }

    /// Pops every defined-length frame that ends here; a sequence closing at the top level
    /// completes a top-level element.
    fn after_container(&mut self, sink: &mut impl Sink) -> Result<(), Violation> {
        loop {
            let f = *self.frame();
            if f.kind == Kind::Root {
                return Ok(());
            }
            let parent_is_root = self.stack.len() == 2;
            match f.end {
                Some(e) if e == self.pos => {
                    self.stack.pop();
                    if f.kind == Kind::Sequence {
                        self.depth -= 1;
                    }
                    if parent_is_root && matches!(f.kind, Kind::Sequence | Kind::Pixels) {
                        self.in_top = false;
                        sink.end(self.pos)?;
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn check_group(&self, tag: Tag) -> Result<(), Violation> {
        let g = tag.0;
        match self.scope {
            Scope::Command if g != 0x0000 => Err(Violation::WrongGroup(tag)),
            Scope::FileMeta if g != 0x0002 => Err(Violation::WrongGroup(tag)),
            Scope::DataSet
                if g == 0x0000 || g == 0x0002 || (g % 2 == 1 && g <= 0x0007) || g == 0xFFFF =>
            {
                Err(Violation::WrongGroup(tag))
            }
            _ => Ok(()),
        }
    }
}

/// VRs whose explicit header has two reserved bytes and a 4-byte length (PS3.5 7.1.2).
pub(crate) fn long_form(code: &[u8; 2]) -> bool {
    matches!(
        code,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

fn vr_of(code: [u8; 2]) -> Option<VR> {
    use VR::*;
    Some(match &code {
        b"AE" => AE,
        b"AS" => AS,
        b"AT" => AT,
        b"CS" => CS,
        b"DA" => DA,
        b"DS" => DS,
        b"DT" => DT,
        b"FL" => FL,
        b"FD" => FD,
        b"IS" => IS,
        b"LO" => LO,
        b"LT" => LT,
        b"OB" => OB,
        b"OD" => OD,
        b"OF" => OF,
        b"OL" => OL,
        b"OV" => OV,
        b"OW" => OW,
        b"PN" => PN,
        b"SH" => SH,
        b"SL" => SL,
        b"SQ" => SQ,
        b"SS" => SS,
        b"ST" => ST,
        b"SV" => SV,
        b"TM" => TM,
        b"UC" => UC,
        b"UI" => UI,
        b"UL" => UL,
        b"UN" => UN,
        b"UR" => UR,
        b"US" => US,
        b"UT" => UT,
        b"UV" => UV,
        _ => return None,
    })
}

/// Whether the standard dictionary knows the element (as anything).
fn dictionary_known(tag: Tag) -> bool {
    super::values::judged(tag).is_some() || StandardDataDictionary.by_tag(tag).is_some()
}

/// In implicit VR, whether the standard dictionary says the element is a sequence. The
/// elements every query and instance carries are answered without a dictionary look-up.
fn dictionary_sq(tag: Tag) -> bool {
    use dicom_dictionary_std::tags;
    if tag.1 == 0x0000
        || super::values::judged(tag).is_some()
        || matches!(
            tag,
            tags::SPECIFIC_CHARACTER_SET
                | tags::INSTANCE_CREATION_DATE
                | tags::INSTANCE_CREATION_TIME
                | tags::STUDY_TIME
                | tags::ACCESSION_NUMBER
                | tags::RETRIEVE_AE_TITLE
                | tags::REFERRING_PHYSICIAN_NAME
                | tags::STUDY_DESCRIPTION
                | tags::SERIES_DESCRIPTION
                | tags::PATIENT_NAME
                | tags::PATIENT_BIRTH_DATE
                | tags::PATIENT_SEX
                | tags::STUDY_ID
                | tags::SERIES_NUMBER
                | tags::INSTANCE_NUMBER
                | tags::NUMBER_OF_STUDY_RELATED_SERIES
                | tags::NUMBER_OF_STUDY_RELATED_INSTANCES
                | tags::NUMBER_OF_SERIES_RELATED_INSTANCES
                | tags::PIXEL_DATA
        )
    {
        return false;
    }
    // The dictionary look-up hashes; the few other tags a stream carries repeat, so a small
    // direct-mapped cache per thread answers them (bounded: 256 entries).
    thread_local! {
        static SQ_CACHE: [std::cell::Cell<(u32, bool)>; 256] =
            const { [const { std::cell::Cell::new((u32::MAX, false)) }; 256] };
    }
    let key = ((tag.0 as u32) << 16) | tag.1 as u32;
    let slot = ((tag.0 ^ tag.1 ^ (tag.1 >> 8)) & 0xFF) as usize;
    SQ_CACHE.with(|table| {
        let (k, sq) = table[slot].get();
        if k == key {
            return sq;
        }
        let sq = matches!(
            StandardDataDictionary.by_tag(tag).map(|e| e.vr()),
            Some(VirtualVr::Exact(VR::SQ))
        );
        table[slot].set((key, sq));
        sq
    })
}

#[cfg(test)]
mod sq_cache {
    use super::dictionary_sq;
    use dicom_core::Tag;
    use dicom_dictionary_std::tags;

    #[test]
    fn answers_stay_right_when_tags_share_a_slot() {
        // (0008,1115) is a sequence and (0008,0105) is not, and both take cache slot 0x0C:
        // every answer must still be the dictionary's, in any order, repeatedly.
        let cases = [
            (tags::REFERENCED_SERIES_SEQUENCE, true),
            (Tag(0x0008, 0x0105), false),
            (tags::PROCEDURE_CODE_SEQUENCE, true),
            (tags::INSTITUTION_NAME, false),
            (tags::REQUEST_ATTRIBUTES_SEQUENCE, true),
        ];
        for _ in 0..3 {
            for (tag, sq) in cases {
                assert_eq!(dictionary_sq(tag), sq, "{tag}");
            }
            for (tag, sq) in cases.iter().rev() {
                assert_eq!(dictionary_sq(*tag), *sq, "{tag}");
            }
        }
    }
}
