//! The strict DICOM reader, three ways:
//! - `DataSet::read` (whole, length known) in both encodings;
//! - the push `Reader` with the length known, fed whole, against the same reader without it,
//!   fed in pieces (sizes from the first input byte): they must agree on accept/refuse and,
//!   when both accept, on every top-level element reported;
//! - `InstanceReader::part10` (and `::dataset`) fed whole and in pieces: same verdict, same
//!   head, and a head known early must be the head at the end.
//!
//! Input: byte 0 = split seed, byte 1 = flags (bit 0 explicit VR, bit 1 encapsulated, bits
//! 2-3 scope, bits 4-7 depth limit variant), the rest = the bytes read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::dicom::dataset::{DataSet, Edit};
use pacsgate::dicom::head::{InstanceHead, InstanceReader};
use pacsgate::dicom::reader::{Encoding, Limits, Reader, Scope, Violation};
use pacsgate::dicom::syntax::{self, Syntax};
use pacsgate_fuzz::{Record, Splitter};

fn whole_vs_streamed(
    seed: u8,
    scope: Scope,
    enc: Encoding,
    encap: bool,
    limits: Limits,
    data: &[u8],
) {
    let mut whole = Reader::with_length(scope, enc, encap, limits, data.len() as u64);
    let mut w = Record::default();
    let whole_ok = whole.feed(data, &mut w).and_then(|()| whole.finish());

    let mut streamed = Reader::new(scope, enc, encap, limits);
    let mut s = Record::default();
    let mut streamed_ok = Ok(());
    for piece in Splitter::new(seed).split(data) {
        streamed_ok = streamed.feed(piece, &mut s);
        if streamed_ok.is_err() {
            break;
        }
        assert!(streamed.position() <= data.len() as u64);
    }
    if streamed_ok.is_ok() {
        streamed_ok = streamed.finish();
    }
    if pacsgate_fuzz::verbose() {
        eprintln!(
            "Reader {scope:?} {enc:?} encapsulated {encap}: whole {whole_ok:?}, streamed {streamed_ok:?}"
        );
    }
    assert_eq!(
        whole_ok.is_ok(),
        streamed_ok.is_ok(),
        "whole and streamed reading disagree: whole {whole_ok:?}, streamed {streamed_ok:?} \
         ({scope:?}, {enc:?}, encapsulated {encap})"
    );
    if whole_ok.is_ok() {
        assert_eq!(
            w.seen, s.seen,
            "whole and streamed reading report different elements"
        );
        assert_eq!(whole.position(), data.len() as u64);
        assert_eq!(streamed.position(), data.len() as u64);
        // top-level elements tile the input, in strictly ascending tag order
        let mut at = 0u64;
        let mut prev = None;
        for e in &w.seen {
            assert_eq!(
                e.element.start, at,
                "a gap or overlap between top-level elements"
            );
            at = e.end.expect("an accepted element has an end");
            assert!(prev < Some(e.element.tag));
            prev = Some(e.element.tag);
            if !e.element.container {
                assert_eq!(e.element.value_start + e.value.len() as u64, at);
            }
        }
        assert_eq!(at, data.len() as u64);
        // a reader that accepted says so again, and refuses nothing more
        assert!(whole.finish().is_ok());
    } else {
        // the first violation sticks
        assert!(streamed.feed(b"\0\0\0\0\0\0\0\0", &mut s).is_err());
        assert!(streamed.finish().is_err());
    }
}

fn dataset(enc: Encoding, limits: Limits, data: &[u8]) {
    // DataSet::read is the length-known reader with value checks: same verdict as Record.
    let mut r = Reader::with_length(Scope::DataSet, enc, false, limits, data.len() as u64);
    let mut rec = Record::default();
    let direct = r.feed(data, &mut rec).and_then(|()| r.finish());
    let set = DataSet::read(data, enc, limits);
    if pacsgate_fuzz::verbose() {
        eprintln!(
            "DataSet::read {enc:?}: {:?}",
            set.as_ref().map(|s| s.tags().count())
        );
    }
    assert_eq!(
        set.is_ok(),
        direct.is_ok(),
        "DataSet::read {:?} vs reader {direct:?}",
        set.as_ref().err()
    );
    let Ok(set) = set else { return };
    let tags: Vec<_> = set.tags().collect();
    let seen: Vec<_> = rec.seen.iter().map(|s| s.element.tag).collect();
    assert_eq!(tags, seen);
    assert_eq!(set.rewrite(&[]), data, "an unedited rewrite is the input");
    for s in &rec.seen {
        if !s.element.container {
            assert_eq!(set.value(s.element.tag), Some(&s.value[..]));
        }
    }
    // The gateway's edits keep the set readable and do what they say.
    use dicom_dictionary_std::tags;
    use pacsgate::dicom::values;
    let edited = set.rewrite(&[
        Edit::Set(tags::PATIENT_ID, dicom_core::VR::LO, b"FUZZ1"),
        Edit::Remove(tags::ISSUER_OF_PATIENT_ID),
    ]);
    let again = DataSet::read(&edited, enc, limits)
        .unwrap_or_else(|v| panic!("the gateway's own edit is refused: {v}"));
    assert_eq!(
        again.text(tags::PATIENT_ID).map(values::trim_text),
        Some("FUZZ1")
    );
    assert!(!again.contains(tags::ISSUER_OF_PATIENT_ID));
    for t in set.tags() {
        if t != tags::PATIENT_ID && t != tags::ISSUER_OF_PATIENT_ID {
            assert_eq!(again.value(t), set.value(t));
        }
    }
}

/// Feeds an instance and asks for its head after every piece, as the front ends do.
/// Returns the verdict, the first head seen, and the head at the end. An instance refused by
/// `feed`, `finish` or `head` stays refused whatever comes after (the reader keeps its first
/// violation; see fuzz/regressions/strict_reader/ for the two cases this once missed).
fn instance(
    mut reader: InstanceReader,
    pieces: &[&[u8]],
) -> (
    Result<(), Violation>,
    Option<InstanceHead>,
    Option<InstanceHead>,
) {
    let (r, _from_head) = instance_inner(&mut reader, pieces);
    if r.0.is_err() {
        for p in pieces {
            let again = reader.feed(p);
            assert!(
                again.is_err(),
                "a refused instance ({:?}) reads on: {again:?}",
                r.0
            );
        }
        assert!(reader.finish().is_err(), "a refused instance finishes");
        assert!(reader.head().is_err(), "a refused instance has a head");
    }
    r
}

type Verdict = (
    Result<(), Violation>,
    Option<InstanceHead>,
    Option<InstanceHead>,
);

/// The verdict, and whether the refusal came from `head()`.
fn instance_inner(reader: &mut InstanceReader, pieces: &[&[u8]]) -> (Verdict, bool) {
    let mut early = None;
    for p in pieces {
        if let Err(v) = reader.feed(p) {
            return ((Err(v), early, None), false);
        }
        match reader.head() {
            Err(v) => return ((Err(v), early, None), true),
            Ok(Some(h)) if early.is_none() => early = Some(h),
            Ok(_) => {}
        }
    }
    if let Err(v) = reader.finish() {
        return ((Err(v), early, None), false);
    }
    match reader.head() {
        Err(v) => ((Err(v), early, None), true),
        Ok(h) => ((Ok(()), early, h), false),
    }
}

fn instances(seed: u8, limits: Limits, data: &[u8], syntax: Syntax) {
    for make in [
        &(|| InstanceReader::part10(limits)) as &dyn Fn() -> InstanceReader,
        &(|| InstanceReader::dataset(syntax, limits)),
    ] {
        let (whole, _, whole_head) = instance(make(), &[data]);
        let pieces = Splitter::new(seed).split(data);
        let (streamed, early, streamed_head) = instance(make(), &pieces);
        if pacsgate_fuzz::verbose() {
            eprintln!("instance: {whole:?} {whole_head:?}");
        }
        assert_eq!(
            whole.is_ok(),
            streamed.is_ok(),
            "instance read whole {whole:?}, in pieces {streamed:?}"
        );
        if whole.is_ok() {
            assert!(whole_head.is_some(), "a finished instance has a head");
            assert_eq!(whole_head, streamed_head);
            if let Some(e) = early {
                assert_eq!(
                    Some(e),
                    streamed_head,
                    "the head judged early is not the instance's"
                );
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let (seed, flags, data) = (input[0], input[1], &input[2..]);
    let enc = if flags & 1 == 1 {
        Encoding::ExplicitLittle
    } else {
        Encoding::ImplicitLittle
    };
    let encap = flags & 2 == 2;
    let scope = match (flags >> 2) & 3 {
        1 => Scope::Command,
        2 => Scope::FileMeta,
        _ => Scope::DataSet,
    };
    let limits = match flags >> 4 {
        0 => Limits { max_depth: 0 },
        1 => Limits { max_depth: 1 },
        2 => Limits { max_depth: 3 },
        _ => Limits::default(),
    };
    whole_vs_streamed(seed, scope, enc, encap, limits, data);
    dataset(Encoding::ImplicitLittle, limits, data);
    dataset(Encoding::ExplicitLittle, limits, data);
    let syntax = syntax::readable(match (enc, encap) {
        (Encoding::ImplicitLittle, _) => "1.2.840.10008.1.2",
        (Encoding::ExplicitLittle, false) => "1.2.840.10008.1.2.1",
        (Encoding::ExplicitLittle, true) => "1.2.840.10008.1.2.4.50",
    })
    .expect("readable");
    instances(seed, limits, data, syntax);
});
