//! Small data sets read whole (query identifiers, retrieval identifiers, query matches): read
//! once by the strict reader, kept as the byte ranges of their top-level elements, and
//! re-encoded by copying those ranges with the gateway's edits.
//!
//! Owns: access to top-level values of a validated data set and its re-encoding. A set read
//! here has passed every structural rule and every judged value check, so the bytes relayed
//! unedited are the bytes that were judged, and an edited set differs only where the gateway
//! edited it. Must not know what the values mean to policy.

use super::reader::{Encoding, Limits, Reader, Scope, Sink, TopElement, Violation};
use super::values;
use dicom_core::{Tag, VR};

/// One top-level element of a data set read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub tag: Tag,
    pub vr: Option<VR>,
    start: usize,
    value_start: usize,
    end: usize,
    container: bool,
}

/// A data set that passed the strict reader, with its top-level elements in tag order.
#[derive(Debug, Clone)]
pub struct DataSet<'a> {
    bytes: &'a [u8],
    encoding: Encoding,
    elements: Vec<Span>,
}

struct Spans<'a> {
    bytes: &'a [u8],
    out: Vec<Span>,
}

impl Sink for Spans<'_> {
    fn begin(&mut self, e: &TopElement) -> Result<bool, Violation> {
        self.out.push(Span {
            tag: e.tag,
            vr: e.vr,
            start: e.start as usize,
            value_start: e.value_start as usize,
            end: e.value_start as usize,
            container: e.container,
        });
        Ok(false)
    }
    fn value(&mut self, _: &[u8]) -> Result<(), Violation> {
        Ok(())
    }
    fn end(&mut self, end: u64) -> Result<(), Violation> {
        let Some(s) = self.out.last_mut() else {
            return Ok(());
        };
        s.end = end as usize;
        if !s.container {
            values::check(s.tag, s.vr, &self.bytes[s.value_start..s.end])?;
        } else if values::judged(s.tag).is_some() {
            // A judged attribute is never a sequence.
            return Err(Violation::NotAllowed(s.tag));
        }
        Ok(())
    }
}

/// An edit of a top-level element.
pub enum Edit<'e> {
    /// Set the element to this value (added when absent), padded as its VR requires.
    Set(Tag, VR, &'e [u8]),
    Remove(Tag),
}

impl<'a> DataSet<'a> {
    /// Reads a whole data set strictly.
    pub fn read(
        bytes: &'a [u8],
        encoding: Encoding,
        limits: Limits,
    ) -> Result<DataSet<'a>, Violation> {
        Self::read_as(Scope::DataSet, bytes, encoding, limits)
    }

    /// Reads a whole element list of any kind strictly (a command set, a file meta group).
    pub(crate) fn read_as(
        scope: Scope,
        bytes: &'a [u8],
        encoding: Encoding,
        limits: Limits,
    ) -> Result<DataSet<'a>, Violation> {
        let mut r = Reader::with_length(scope, encoding, false, limits, bytes.len() as u64);
        let mut sink = Spans {
            bytes,
            // Most sets hold a few dozen elements of at least 8 bytes each.
            out: Vec::with_capacity((bytes.len() / 16).min(64)),
        };
        r.feed(bytes, &mut sink)?;
        r.finish()?;
        Ok(DataSet {
            bytes,
            encoding,
            elements: sink.out,
        })
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The encoded bytes, exactly as read.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn tags(&self) -> impl Iterator<Item = Tag> + '_ {
        self.elements.iter().map(|s| s.tag)
    }

    fn span(&self, tag: Tag) -> Option<&Span> {
        self.elements
            .binary_search_by(|s| s.tag.cmp(&tag))
            .ok()
            .map(|i| &self.elements[i])
    }

    pub fn contains(&self, tag: Tag) -> bool {
        self.span(tag).is_some()
    }

    /// The raw value of a top-level element (`None` when absent or a sequence).
    pub fn value(&self, tag: Tag) -> Option<&'a [u8]> {
        let s = self.span(tag)?;
        (!s.container).then(|| &self.bytes[s.value_start..s.end])
    }

    /// A judged text value (validated printable ASCII), padding kept.
    pub fn text(&self, tag: Tag) -> Option<&'a str> {
        let max = match values::judged(tag) {
            Some((_, values::Form::Text(max) | values::Form::Single(max))) => max,
            _ => usize::MAX,
        };
        values::text(self.value(tag)?, max).ok()
    }

    /// The UIDs of a judged UI element (validated), without padding; empty when absent.
    pub fn uids(&self, tag: Tag) -> Vec<&'a str> {
        match (values::judged(tag), self.value(tag)) {
            // A judged UI value was checked when it was read.
            (Some((_, values::Form::Uids)), Some(v)) => values::split_uids(v),
            (_, Some(v)) => values::uid_list(v).unwrap_or_default(),
            (_, None) => Vec::new(),
        }
    }

    /// Whether the element is present with an empty value (a return key, not a matching key).
    pub fn is_empty(&self, tag: Tag) -> bool {
        self.value(tag)
            .is_some_and(|v| v.iter().all(|b| *b == b' ' || *b == 0))
    }

    /// The data set with `edits` applied, in the same encoding. Unedited elements are copied
    /// byte for byte; set elements are encoded with the VR given (explicit encoding).
    pub fn rewrite(&self, edits: &[Edit<'_>]) -> Vec<u8> {
        let mut added: Vec<(Tag, Vec<u8>)> = Vec::new();
        let mut removed: Vec<Tag> = Vec::new();
        for e in edits {
            match e {
                Edit::Set(tag, vr, value) => {
                    removed.push(*tag);
                    added.push((*tag, encode_element(self.encoding, *tag, *vr, value)));
                }
                Edit::Remove(tag) => removed.push(*tag),
            }
        }
        added.sort_by_key(|(t, _)| *t);
        let mut out =
            Vec::with_capacity(self.bytes.len() + added.iter().map(|a| a.1.len()).sum::<usize>());
        let mut new = added.into_iter().peekable();
        for s in &self.elements {
            while let Some((t, _)) = new.peek() {
                if *t < s.tag {
                    if let Some((_, bytes)) = new.next() {
                        out.extend_from_slice(&bytes);
                    }
                } else {
                    break;
                }
            }
            if !removed.contains(&s.tag) {
                out.extend_from_slice(&self.bytes[s.start..s.end]);
            }
        }
        for (_, bytes) in new {
            out.extend_from_slice(&bytes);
        }
        out
    }
}

/// One element encoded in `encoding`, its value padded to an even length.
pub(crate) fn encode_element(encoding: Encoding, tag: Tag, vr: VR, value: &[u8]) -> Vec<u8> {
    let value = values::padded(vr, value);
    let mut out = Vec::with_capacity(12 + value.len());
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    match encoding {
        Encoding::ImplicitLittle => out.extend_from_slice(&(value.len() as u32).to_le_bytes()),
        Encoding::ExplicitLittle => {
            out.extend_from_slice(&vr.to_bytes());
            if super::reader::long_form(&vr.to_bytes()) {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            } else {
                out.extend_from_slice(&(value.len() as u16).to_le_bytes());
            }
        }
    }
    out.extend_from_slice(&value);
    out
}
