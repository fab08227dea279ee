//! The strict reader against the rules of PS3.5 chapter 7, one rule per test, in both
//! encodings, whole and fed in pieces.

use super::dataset::{DataSet, Edit};
use super::head::InstanceReader;
use super::reader::{Encoding, Limits, Reader, Scope, Validate, Violation};
use super::syntax;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};

const E: Encoding = Encoding::ExplicitLittle;
const I: Encoding = Encoding::ImplicitLittle;

fn tag_bytes(t: Tag) -> Vec<u8> {
    let mut v = t.0.to_le_bytes().to_vec();
    v.extend_from_slice(&t.1.to_le_bytes());
    v
}

/// An explicit VR element, any length field (`len: None` writes the value's length).
fn ex(t: Tag, vr: &[u8; 2], v: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut out = tag_bytes(t);
    out.extend_from_slice(vr);
    let long = super::reader::long_form(vr);
    let n = len.unwrap_or(v.len() as u32);
    if long {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.extend_from_slice(&(n as u16).to_le_bytes());
    }
    out.extend_from_slice(v);
    out
}

fn im(t: Tag, v: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut out = tag_bytes(t);
    out.extend_from_slice(&len.unwrap_or(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
    out
}

fn item(content: &[u8], undefined: bool) -> Vec<u8> {
    let mut out = tag_bytes(Tag(0xFFFE, 0xE000));
    if undefined {
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(content);
        out.extend_from_slice(&tag_bytes(Tag(0xFFFE, 0xE00D)));
        out.extend_from_slice(&[0; 4]);
    } else {
        out.extend_from_slice(&(content.len() as u32).to_le_bytes());
        out.extend_from_slice(content);
    }
    out
}

/// A sequence in either encoding; `undefined` for undefined lengths of the sequence.
fn sq(enc: Encoding, t: Tag, items: &[Vec<u8>], undefined: bool) -> Vec<u8> {
    let body: Vec<u8> = items.concat();
    let mut out = tag_bytes(t);
    if enc == E {
        out.extend_from_slice(b"SQ\0\0");
    }
    if undefined {
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag_bytes(Tag(0xFFFE, 0xE0DD)));
        out.extend_from_slice(&[0; 4]);
    } else {
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

fn lo(enc: Encoding, t: Tag, v: &[u8]) -> Vec<u8> {
    match enc {
        E => ex(t, b"LO", v, None),
        I => im(t, v, None),
    }
}

fn ui(enc: Encoding, t: Tag, v: &[u8]) -> Vec<u8> {
    match enc {
        E => ex(t, b"UI", v, None),
        I => im(t, v, None),
    }
}

fn whole(bytes: &[u8], enc: Encoding) -> Result<DataSet<'_>, Violation> {
    DataSet::read(bytes, enc, Limits::default())
}

/// Reads `bytes` fed in pieces of `step` bytes, without knowing the total.
fn pieces(bytes: &[u8], enc: Encoding, step: usize) -> Result<(), Violation> {
    let mut r = Reader::new(Scope::DataSet, enc, false, Limits::default());
    for c in bytes.chunks(step.max(1)) {
        r.feed(c, &mut Validate)?;
    }
    r.finish()
}

/// A query identifier with nested sequences of every length form.
fn nested(enc: Encoding) -> Vec<u8> {
    let inner = [
        lo(enc, tags::PATIENT_ID, b"INNER "),
        ui(enc, tags::STUDY_INSTANCE_UID, b"1.2.3\0"),
    ]
    .concat();
    let deeper = sq(
        enc,
        tags::REFERENCED_SERIES_SEQUENCE,
        &[item(&inner, true), item(&inner, false)],
        true,
    );
    [
        lo(enc, tags::SPECIFIC_CHARACTER_SET, b"ISO_IR 100"),
        match enc {
            E => ex(tags::QUERY_RETRIEVE_LEVEL, b"CS", b"STUDY ", None),
            I => im(tags::QUERY_RETRIEVE_LEVEL, b"STUDY ", None),
        },
        sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[
                item(&[deeper, inner.clone()].concat(), false),
                item(&[], true),
            ],
            false,
        ),
        lo(enc, tags::PATIENT_ID, b"PAT-A "),
        ui(enc, tags::STUDY_INSTANCE_UID, b"1.2.840.99"),
    ]
    .concat()
}

#[test]
fn well_formed_sets_read_alike_whole_and_in_pieces() {
    for enc in [E, I] {
        let b = nested(enc);
        let ds = whole(&b, enc).unwrap();
        assert_eq!(ds.text(tags::PATIENT_ID), Some("PAT-A "));
        assert_eq!(ds.uids(tags::STUDY_INSTANCE_UID), vec!["1.2.840.99"]);
        assert_eq!(ds.tags().count(), 5, "nested elements are not top-level");
        for step in [1, 2, 3, 7, 64, b.len()] {
            pieces(&b, enc, step).unwrap();
        }
    }
}

#[test]
fn what_dicom_rs_writes_reads_strictly() {
    let mut item = InMemDicomObject::new_empty();
    item.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from("X"),
    ));
    let mut o = InMemDicomObject::new_empty();
    o.put(DataElement::new(
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        PrimitiveValue::from("ISO_IR 100"),
    ));
    o.put(DataElement::new(
        tags::REFERENCED_STUDY_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item.clone(), item]),
    ));
    o.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from("PAT1"),
    ));
    o.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("1.2.3"),
    ));
    for (ts, enc) in [
        (EXPLICIT_VR_LITTLE_ENDIAN.erased(), E),
        (IMPLICIT_VR_LITTLE_ENDIAN.erased(), I),
    ] {
        let mut b = Vec::new();
        o.write_dataset_with_ts(&mut b, &ts).unwrap();
        let ds = whole(&b, enc).unwrap();
        assert_eq!(ds.text(tags::PATIENT_ID), Some("PAT1"));
        assert_eq!(ds.uids(tags::STUDY_INSTANCE_UID), vec!["1.2.3"]);
    }
}

#[test]
fn repeated_and_out_of_order_tags_are_refused_at_every_level() {
    for enc in [E, I] {
        let pid = |v: &[u8]| lo(enc, tags::PATIENT_ID, v);
        let study = ui(enc, tags::STUDY_INSTANCE_UID, b"1.2\0");
        let twice = [pid(b"PAT-B "), pid(b"PAT-A ")].concat();
        assert_eq!(
            whole(&twice, enc).unwrap_err(),
            Violation::Repeated(tags::PATIENT_ID)
        );
        let backwards = [study.clone(), pid(b"A ")].concat();
        assert!(matches!(
            whole(&backwards, enc),
            Err(Violation::OutOfOrder { .. })
        ));
        // inside an item, defined and undefined lengths
        for undefined in [false, true] {
            let inner = [pid(b"B "), pid(b"A ")].concat();
            let b = sq(
                enc,
                tags::REFERENCED_STUDY_SEQUENCE,
                &[item(&inner, undefined)],
                undefined,
            );
            assert_eq!(
                whole(&b, enc).unwrap_err(),
                Violation::Repeated(tags::PATIENT_ID)
            );
            assert_eq!(
                pieces(&b, enc, 5).unwrap_err(),
                Violation::Repeated(tags::PATIENT_ID)
            );
        }
        // each item starts afresh: the same tag in two items is fine
        let one = item(&pid(b"A "), false);
        let b = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[one.clone(), one],
            false,
        );
        whole(&b, enc).unwrap();
        // a repeat after a long value, found when streaming
        let pixels = match enc {
            E => ex(tags::PIXEL_DATA, b"OB", &[0u8; 4096], None),
            I => im(tags::PIXEL_DATA, &[0u8; 4096], None),
        };
        let tail = [pid(b"A "), pixels, pid(b"B ")].concat();
        assert!(matches!(
            pieces(&tail, enc, 1000),
            Err(Violation::OutOfOrder { .. })
        ));
    }
}

#[test]
fn nesting_is_bounded_without_recursion() {
    for enc in [E, I] {
        let mut b = lo(enc, tags::PATIENT_ID, b"A ");
        for _ in 0..16 {
            b = sq(
                enc,
                tags::REFERENCED_STUDY_SEQUENCE,
                &[item(&b, true)],
                true,
            );
        }
        whole(&b, enc).unwrap();
        let deeper = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[item(&b, true)],
            true,
        );
        assert_eq!(whole(&deeper, enc).unwrap_err(), Violation::TooDeep(16));
        // 2000 levels: refused at level 17, no stack used per level
        let mut open = Vec::new();
        for _ in 0..2000 {
            open.extend(tag_bytes(tags::REFERENCED_STUDY_SEQUENCE));
            if enc == E {
                open.extend_from_slice(b"SQ\0\0");
            }
            open.extend_from_slice(&u32::MAX.to_le_bytes());
            open.extend(tag_bytes(Tag(0xFFFE, 0xE000)));
            open.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        assert_eq!(whole(&open, enc).unwrap_err(), Violation::TooDeep(16));
        let limits = Limits { max_depth: 2 };
        let two = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[item(
                &sq(enc, tags::REFERENCED_SERIES_SEQUENCE, &[], false),
                false,
            )],
            false,
        );
        DataSet::read(&two, enc, limits).unwrap();
    }
}

#[test]
fn declared_lengths_are_checked_before_anything_is_read() {
    // 34 bytes whose element declares 0xFFFFFFF0 bytes
    let mut b = ex(tags::QUERY_RETRIEVE_LEVEL, b"CS", b"STUDY ", None);
    b.extend(ex(tags::PATIENT_NAME, b"UT", b"", Some(0xFFFF_FFF0)));
    b.extend_from_slice(&[b'x'; 8]);
    assert_eq!(b.len(), 34);
    assert_eq!(
        whole(&b, E).unwrap_err(),
        Violation::LengthBeyondEnd(tags::PATIENT_NAME)
    );
    // streamed, the same input holds nothing and ends truncated
    assert_eq!(pieces(&b, E, 3).unwrap_err(), Violation::Truncated);
    let b = im(tags::PATIENT_NAME, b"AB", Some(0xFFFF_FFF0));
    assert_eq!(
        whole(&b, I).unwrap_err(),
        Violation::LengthBeyondEnd(tags::PATIENT_NAME)
    );
    // an item longer than its sequence, an element longer than its item
    for enc in [E, I] {
        let inner = lo(enc, tags::PATIENT_ID, b"AB");
        let mut s = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[item(&inner, false)],
            false,
        );
        let at = if enc == E { 12 } else { 8 } + 4;
        let n = u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
        s[at..at + 4].copy_from_slice(&(n + 2).to_le_bytes());
        s.extend_from_slice(&[0, 0]);
        assert!(matches!(whole(&s, enc), Err(Violation::LengthBeyondEnd(_))));
        let mut elem = inner.clone();
        let len_at = if enc == E { 6 } else { 4 };
        elem[len_at] = 4;
        let s = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[item(&elem, false)],
            true,
        );
        assert!(matches!(whole(&s, enc), Err(Violation::LengthBeyondEnd(_))));
        // a header that straddles the end of its item
        let s = sq(
            enc,
            tags::REFERENCED_STUDY_SEQUENCE,
            &[item(&inner[..6], false)],
            true,
        );
        assert!(whole(&s, enc).is_err());
    }
    // every truncation of a good set is refused, unless it ends between top-level elements
    let good = nested(E);
    let full = whole(&good, E).unwrap();
    let boundaries: Vec<usize> = (0..=good.len())
        .filter(|n| {
            let kept: Vec<Tag> = full.tags().collect();
            (0..=kept.len()).any(|k| {
                let keep: Vec<_> = kept[k..].iter().map(|t| Edit::Remove(*t)).collect();
                full.rewrite(&keep).len() == *n
            })
        })
        .collect();
    for n in 0..good.len() {
        assert_eq!(
            whole(&good[..n], E).is_ok(),
            boundaries.contains(&n),
            "prefix {n}"
        );
    }
}

#[test]
fn headers_and_lengths_follow_the_encoding_rules() {
    let mut bad_vr = ex(tags::PATIENT_ID, b"LO", b"AB", None);
    bad_vr[4..6].copy_from_slice(b"ZZ");
    assert_eq!(
        whole(&bad_vr, E).unwrap_err(),
        Violation::UnknownVr(tags::PATIENT_ID)
    );
    let mut reserved = ex(tags::PATIENT_NAME, b"UT", b"AB", None);
    reserved[6] = 1;
    assert_eq!(
        whole(&reserved, E).unwrap_err(),
        Violation::ReservedBytes(tags::PATIENT_NAME)
    );
    let undefined = ex(tags::PATIENT_NAME, b"UT", b"", Some(u32::MAX));
    assert_eq!(
        whole(&undefined, E).unwrap_err(),
        Violation::UndefinedLength(tags::PATIENT_NAME)
    );
    // in implicit VR, a known non-sequence of undefined length; a private one is a sequence
    let text = im(tags::PATIENT_NAME, b"", Some(u32::MAX));
    assert_eq!(
        whole(&text, I).unwrap_err(),
        Violation::UndefinedLength(tags::PATIENT_NAME)
    );
    let private = [
        im(Tag(0x0009, 0x0010), b"PRIVATE ", None),
        sq(
            I,
            Tag(0x0009, 0x1001),
            &[item(&im(tags::PATIENT_ID, b"AB", None), true)],
            true,
        ),
    ]
    .concat();
    whole(&private, I).unwrap();
    let odd = ex(tags::PATIENT_NAME, b"PN", b"ABC", None);
    assert_eq!(
        whole(&odd, E).unwrap_err(),
        Violation::OddLength(tags::PATIENT_NAME)
    );
    // a stray delimiter, an item at the top level, a non-item inside a sequence
    let stray = im(Tag(0xFFFE, 0xE00D), b"", None);
    assert!(matches!(
        whole(&stray, I),
        Err(Violation::StrayDelimiter(_))
    ));
    let mut notitem = sq(E, tags::REFERENCED_STUDY_SEQUENCE, &[], true);
    let end = notitem.len() - 8;
    notitem.splice(end..end, lo(E, tags::PATIENT_ID, b"AB"));
    assert!(matches!(whole(&notitem, E), Err(Violation::NotAnItem(_))));
    // command and file meta groups do not belong in a data set
    let meta = ui(E, tags::TRANSFER_SYNTAX_UID, b"1.2.840.10008.1.2\0");
    assert!(matches!(whole(&meta, E), Err(Violation::WrongGroup(_))));
    let cmd = im(Tag(0x0000, 0x0100), &[0x20, 0], None);
    assert!(matches!(whole(&cmd, I), Err(Violation::WrongGroup(_))));
    // a UN of undefined length is an implicit VR sequence (PS3.5 6.2.2)
    let inner = im(tags::PATIENT_ID, b"AB", None);
    let mut un = tag_bytes(tags::REFERENCED_STUDY_SEQUENCE);
    un.extend_from_slice(b"UN\0\0");
    un.extend_from_slice(&u32::MAX.to_le_bytes());
    un.extend(item(&[inner.clone(), inner].concat(), false));
    un.extend(tag_bytes(Tag(0xFFFE, 0xE0DD)));
    un.extend_from_slice(&[0; 4]);
    assert_eq!(
        whole(&un, E).unwrap_err(),
        Violation::Repeated(tags::PATIENT_ID)
    );
}

#[test]
fn judged_values_are_checked() {
    let wrong_vr = ex(tags::PATIENT_ID, b"UN", b"AB", None);
    assert!(matches!(
        whole(&wrong_vr, E),
        Err(Violation::WrongVr { .. })
    ));
    for bad in [&b" 1.2.3"[..], b"1.2.3 ", b"1.2.33\0\0", b"1.2.x\0"] {
        let b = ex(tags::STUDY_INSTANCE_UID, b"UI", bad, None);
        assert!(
            matches!(whole(&b, E), Err(Violation::BadValue(..))),
            "{bad:?}"
        );
    }
    let b = ex(tags::PATIENT_ID, b"LO", b"A\nB ", None);
    assert!(matches!(whole(&b, E), Err(Violation::BadValue(..))));
    // the query level is one value
    let b = ex(tags::QUERY_RETRIEVE_LEVEL, b"CS", b"STUDY\\SERIES", None);
    assert!(matches!(whole(&b, E), Err(Violation::BadValue(..))));
    // a judged attribute as a sequence
    let b = sq(E, tags::PATIENT_ID, &[], false);
    assert!(whole(&b, E).is_err());
    // nested judged tags are not judged (the policy reads the top level only)
    let inner = ex(tags::STUDY_INSTANCE_UID, b"UI", b"1.2 ", None);
    let b = sq(
        E,
        tags::REFERENCED_STUDY_SEQUENCE,
        &[item(&inner, false)],
        false,
    );
    whole(&b, E).unwrap();
}

#[test]
fn encapsulated_pixel_data_only_where_the_syntax_encapsulates() {
    let mut px = tag_bytes(tags::PIXEL_DATA);
    px.extend_from_slice(b"OB\0\0");
    px.extend_from_slice(&u32::MAX.to_le_bytes());
    px.extend(item(&[], false));
    px.extend(item(&[1, 2, 3, 4], false));
    px.extend(tag_bytes(Tag(0xFFFE, 0xE0DD)));
    px.extend_from_slice(&[0; 4]);
    let head = ui(E, tags::STUDY_INSTANCE_UID, b"1.2\0");
    let b = [head, px].concat();
    assert_eq!(whole(&b, E).unwrap_err(), Violation::Encapsulation);
    let jpeg = syntax::readable("1.2.840.10008.1.2.4.50").unwrap();
    let mut r = Reader::new(
        Scope::DataSet,
        jpeg.encoding,
        jpeg.encapsulated,
        Limits::default(),
    );
    for c in b.chunks(5) {
        r.feed(c, &mut Validate).unwrap();
    }
    r.finish().unwrap();
}

#[test]
fn rewriting_copies_what_it_does_not_edit() {
    for (enc, ts) in [
        (E, EXPLICIT_VR_LITTLE_ENDIAN.erased()),
        (I, IMPLICIT_VR_LITTLE_ENDIAN.erased()),
    ] {
        let b = nested(enc);
        let ds = whole(&b, enc).unwrap();
        let out = ds.rewrite(&[
            Edit::Set(tags::PATIENT_ID, VR::LO, b"PAT-B"),
            Edit::Set(tags::ISSUER_OF_PATIENT_ID, VR::LO, b""),
            Edit::Set(tags::MODALITIES_IN_STUDY, VR::CS, b""),
            Edit::Remove(tags::SPECIFIC_CHARACTER_SET),
        ]);
        let again = whole(&out, enc).unwrap();
        assert_eq!(again.text(tags::PATIENT_ID), Some("PAT-B "));
        assert!(
            again.contains(tags::ISSUER_OF_PATIENT_ID)
                && !again.contains(tags::SPECIFIC_CHARACTER_SET)
        );
        assert_eq!(again.uids(tags::STUDY_INSTANCE_UID), vec!["1.2.840.99"]);
        let obj = InMemDicomObject::read_dataset_with_ts(&out[..], &ts).unwrap();
        assert_eq!(
            obj.get(tags::PATIENT_ID).unwrap().to_str().unwrap().trim(),
            "PAT-B"
        );
        assert_eq!(ds.rewrite(&[]), b);
    }
}

fn instance(enc: Encoding, tail: &[u8]) -> Vec<u8> {
    [
        ui(enc, tags::SOP_CLASS_UID, b"1.2.840.10008.5.1.4.1.1.7\0"),
        ui(enc, tags::SOP_INSTANCE_UID, b"1.2.3.4\0"),
        match enc {
            E => ex(tags::MODALITY, b"CS", b"OT", None),
            I => im(tags::MODALITY, b"OT", None),
        },
        lo(enc, tags::PATIENT_ID, b"PAT-A "),
        ui(enc, tags::STUDY_INSTANCE_UID, b"1.2.3\0"),
        ui(enc, tags::SERIES_INSTANCE_UID, b"1.2.3.1\0"),
        lo(enc, Tag(0x0020, 0x0011), b"1 "),
        tail.to_vec(),
    ]
    .concat()
}

#[test]
fn instance_heads_are_known_early_and_tails_still_checked() {
    let ele = syntax::readable(syntax::EXPLICIT_VR_LITTLE_ENDIAN).unwrap();
    let pixels = ex(tags::PIXEL_DATA, b"OB", &[7u8; 10_000], None);
    let b = instance(E, &pixels);
    for step in [1, 9, 100, 4096, b.len()] {
        let mut r = InstanceReader::dataset(ele, Limits::default());
        let mut head = None;
        let mut fed = 0;
        for c in b.chunks(step) {
            r.feed(c).unwrap();
            fed += c.len();
            if head.is_none()
                && let Some(h) = r.head().unwrap()
            {
                head = Some((h, fed));
            }
        }
        r.finish().unwrap();
        let (h, at) = head.unwrap();
        let head_len = b.len() - pixels.len();
        assert!(
            at <= head_len + step,
            "known early ({at} bytes, step {step})"
        );
        assert_eq!(h.patient_id.as_deref(), Some("PAT-A "));
        assert_eq!(h.study.as_deref(), Some("1.2.3"));
        assert_eq!(h.series.as_deref(), Some("1.2.3.1"));
        assert_eq!(h.sop_instance.as_deref(), Some("1.2.3.4"));
        assert_eq!(h.modality.as_deref(), Some("OT"));
    }
    // a second PatientID after the pixel data: refused while streaming
    let bad = instance(
        E,
        &[pixels.clone(), lo(E, tags::PATIENT_ID, b"PAT-B ")].concat(),
    );
    let mut r = InstanceReader::dataset(ele, Limits::default());
    let err = bad.chunks(512).try_for_each(|c| r.feed(c));
    assert!(matches!(err, Err(Violation::OutOfOrder { .. })));
    // a truncated instance does not finish
    let mut r = InstanceReader::dataset(ele, Limits::default());
    r.feed(&b[..b.len() - 1]).unwrap();
    assert_eq!(r.finish().unwrap_err(), Violation::Truncated);
    // two StudyInstanceUIDs in one value: an instance has one
    let two = [
        lo(E, tags::PATIENT_ID, b"A "),
        ui(E, tags::STUDY_INSTANCE_UID, b"1.2\\1.3\0"),
        ui(E, tags::SERIES_INSTANCE_UID, b"1.2.1\0"),
        lo(E, Tag(0x0020, 0x0011), b"1 "),
    ]
    .concat();
    let mut r = InstanceReader::dataset(ele, Limits::default());
    r.feed(&two).unwrap();
    assert!(r.head().is_err());
}

fn part10(meta_instance: &[u8], ts: &[u8], body: &[u8]) -> Vec<u8> {
    let meta = [
        ex(Tag(0x0002, 0x0001), b"OB", &[0, 1], None),
        ex(
            tags::MEDIA_STORAGE_SOP_CLASS_UID,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
            None,
        ),
        ex(
            tags::MEDIA_STORAGE_SOP_INSTANCE_UID,
            b"UI",
            meta_instance,
            None,
        ),
        ex(tags::TRANSFER_SYNTAX_UID, b"UI", ts, None),
    ]
    .concat();
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend(ex(
        Tag(0x0002, 0x0000),
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
        None,
    ));
    out.extend(meta);
    out.extend_from_slice(body);
    out
}

#[test]
fn part10_files_are_read_with_their_meta_group() {
    let body = instance(E, &ex(tags::PIXEL_DATA, b"OB", &[1u8; 64], None));
    let good = part10(b"1.2.3.4\0", b"1.2.840.10008.1.2.1\0", &body);
    for step in [1, 13, good.len()] {
        let mut r = InstanceReader::part10(Limits::default());
        for c in good.chunks(step) {
            r.feed(c).unwrap();
        }
        r.finish().unwrap();
        assert_eq!(
            r.head().unwrap().unwrap().patient_id.as_deref(),
            Some("PAT-A ")
        );
        assert_eq!(r.meta().unwrap().transfer_syntax, "1.2.840.10008.1.2.1");
    }
    let read = |b: &[u8]| {
        let mut r = InstanceReader::part10(Limits::default());
        r.feed(b)?;
        r.finish()?;
        r.head().map(|_| ())
    };
    // the meta group names another instance than the data set
    assert!(read(&part10(b"1.2.3.5\0", b"1.2.840.10008.1.2.1\0", &body)).is_err());
    // deflated, big endian, private: never read as another syntax
    for ts in [
        &b"1.2.840.10008.1.2.1.99"[..],
        b"1.2.840.10008.1.2.2\0",
        b"1.2.3.4.5.6\0",
    ] {
        assert_eq!(
            read(&part10(b"1.2.3.4\0", ts, &body)).unwrap_err(),
            Violation::UnsupportedSyntax
        );
    }
    // a repeated meta element, a meta group with a data set element
    let mut twice = part10(b"1.2.3.4\0", b"1.2.840.10008.1.2.1\0", &body);
    let dup = ex(
        tags::TRANSFER_SYNTAX_UID,
        b"UI",
        b"1.2.840.10008.1.2\0",
        None,
    );
    let meta_len = u32::from_le_bytes([twice[140], twice[141], twice[142], twice[143]]) as usize;
    twice.splice(144 + meta_len..144 + meta_len, dup.clone());
    twice[140..144].copy_from_slice(&((meta_len + dup.len()) as u32).to_le_bytes());
    assert_eq!(
        read(&twice).unwrap_err(),
        Violation::Repeated(tags::TRANSFER_SYNTAX_UID)
    );
    let mut no_dicm = good.clone();
    no_dicm[128] = b'X';
    assert!(read(&no_dicm).is_err());
}

#[test]
fn a_refused_instance_stays_refused() {
    // Found by fuzzing: after the first bytes of the data set were refused, a later piece
    // started a fresh data set.
    let body = instance(E, &ex(tags::PIXEL_DATA, b"OB", &[1u8; 64], None));
    let file = part10(b"1.2.3.4\0", b"1.2.840.10008.1.2.1\0", &body);
    let meta_end = 144 + u32::from_le_bytes([file[140], file[141], file[142], file[143]]) as usize;
    let first = 8 + u16::from_le_bytes([file[meta_end + 6], file[meta_end + 7]]) as usize;
    let mut bad = file[..meta_end + first].to_vec();
    bad.extend_from_slice(&file[meta_end..meta_end + first]);
    let mut r = InstanceReader::part10(Limits::default());
    assert!(r.feed(&bad).is_err());
    assert!(r.feed(&file[meta_end..]).is_err());
    assert!(r.finish().is_err());
    assert!(r.head().is_err());
    // a violation only the head finds (the meta group names another instance) stays too
    let other = part10(b"1.2.3.5\0", b"1.2.840.10008.1.2.1\0", &body);
    let mut r = InstanceReader::part10(Limits::default());
    r.feed(&other).unwrap();
    assert!(r.head().is_err());
    assert!(r.feed(&[]).is_err() && r.finish().is_err());
    // nothing after the end
    let mut r = InstanceReader::part10(Limits::default());
    r.feed(&file).unwrap();
    r.finish().unwrap();
    assert_eq!(r.feed(&[0, 0]).unwrap_err(), Violation::AfterEnd);
}

#[test]
fn fuzz_and_differential_regressions_are_refused() {
    // Implicit VR: PatientName of undefined length holding an item with another PatientID,
    // then the top-level PatientID (DCMTK refuses the file; the reader must too).
    let b = [
        0x10, 0x00, 0x10, 0x00, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff,
        0xff, 0x10, 0x00, 0x20, 0x00, 0x04, 0x00, 0x00, 0x00, b'E', b'V', b'I', b'L', 0xfe, 0xff,
        0x0d, 0xe0, 0x00, 0x00, 0x00, 0x00, 0xfe, 0xff, 0xdd, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x10,
        0x00, 0x20, 0x00, 0x06, 0x00, 0x00, 0x00, b'P', b'A', b'T', b'-', b'A', b' ',
    ];
    assert_eq!(
        whole(&b, I).unwrap_err(),
        Violation::UndefinedLength(tags::PATIENT_NAME)
    );
}
