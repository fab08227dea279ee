//! Reading the few attributes access decisions need from an encoded data set, without building
//! the whole object.
//!
//! Owns: a token scan of a data set in a given transfer syntax that stops as soon as the answer
//! is known (PatientID sits near the start: only group 0008 precedes it). Must not know policy
//! or protocols.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntax;
use dicom_parser::dataset::DataToken;
use dicom_parser::dataset::read::DataSetReader;

/// The data set could not be read far enough to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data set cannot be parsed: {0}")]
pub struct ScanError(pub String);

/// The top-level value of `tag` as text (multiple values joined by `\`), `None` when the data
/// set has no such element. Elements inside sequences are not considered. Data sets are
/// ordered by tag, so the scan stops at the first top-level element after `tag`; a data set
/// out of order therefore looks as if it lacked the element, which callers treat as a refusal.
pub fn top_level_text(
    data: &[u8],
    ts: &TransferSyntax,
    tag: Tag,
) -> Result<Option<String>, ScanError> {
    let reader = DataSetReader::new_with_ts(data, ts).map_err(|e| ScanError(e.to_string()))?;
    let mut depth = 0usize;
    let mut wanted = false;
    for token in reader {
        let token = token.map_err(|e| ScanError(e.to_string()))?;
        if wanted {
            return Ok(Some(match token {
                DataToken::PrimitiveValue(v) => v.to_str().into_owned(),
                // an empty element may come without a value token
                _ => String::new(),
            }));
        }
        match token {
            DataToken::SequenceStart { tag: t, .. } => {
                if depth == 0 && t > tag {
                    return Ok(None);
                }
                depth += 1;
            }
            DataToken::PixelSequenceStart => {
                if depth == 0 {
                    return Ok(None);
                }
                depth += 1;
            }
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ElementHeader(h) if depth == 0 => {
                if h.tag == tag {
                    if h.len.0 == 0 {
                        return Ok(Some(String::new()));
                    }
                    wanted = true;
                } else if h.tag > tag {
                    return Ok(None);
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// What a scan of the start of a data set found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    /// The top-level text values of the wanted tags, in the order asked.
    pub values: Vec<Option<String>>,
    /// True when the scan got past the last wanted tag (or to a clean end of the data), so the
    /// values are final; false when the bytes ended first.
    pub complete: bool,
}

/// Scans the start of a data set for the top-level values of `wanted` (ascending tags). Works on
/// a prefix: when the bytes end before the answer is known, `complete` is false and the caller
/// reads more. With `at_end` the bytes are the whole data set, and running out is not an error.
pub fn scan_prefix(
    data: &[u8],
    ts: &TransferSyntax,
    wanted: &[Tag],
    at_end: bool,
) -> Result<Prefix, ScanError> {
    let mut values: Vec<Option<String>> = vec![None; wanted.len()];
    let Some(&last) = wanted.iter().max() else {
        return Ok(Prefix {
            values,
            complete: true,
        });
    };
    let reader = match DataSetReader::new_with_ts(data, ts) {
        Ok(r) => r,
        Err(e) if at_end => return Err(ScanError(e.to_string())),
        Err(_) => {
            return Ok(Prefix {
                values,
                complete: false,
            });
        }
    };
    let mut depth = 0usize;
    let mut current: Option<usize> = None;
    for token in reader {
        let token = match token {
            Ok(t) => t,
            // A truncated prefix fails inside an element; more bytes may complete it.
            Err(e) if at_end => return Err(ScanError(e.to_string())),
            Err(_) => {
                return Ok(Prefix {
                    values,
                    complete: false,
                });
            }
        };
        if let Some(i) = current.take() {
            values[i] = Some(match token {
                DataToken::PrimitiveValue(v) => v.to_str().into_owned(),
                _ => String::new(),
            });
            if wanted[i] == last {
                return Ok(Prefix {
                    values,
                    complete: true,
                });
            }
            continue;
        }
        match token {
            DataToken::SequenceStart { tag: t, .. } => {
                if depth == 0 && t > last {
                    return Ok(Prefix {
                        values,
                        complete: true,
                    });
                }
                depth += 1;
            }
            DataToken::PixelSequenceStart => {
                if depth == 0 {
                    return Ok(Prefix {
                        values,
                        complete: true,
                    });
                }
                depth += 1;
            }
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ElementHeader(h) if depth == 0 => {
                if h.tag > last {
                    return Ok(Prefix {
                        values,
                        complete: true,
                    });
                }
                if let Some(i) = wanted.iter().position(|t| *t == h.tag) {
                    if h.len.0 == 0 {
                        values[i] = Some(String::new());
                        if h.tag == last {
                            return Ok(Prefix {
                                values,
                                complete: true,
                            });
                        }
                    } else {
                        current = Some(i);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Prefix {
        values,
        complete: at_end,
    })
}

/// Where the data set of a DICOM Part 10 file starts, and its transfer syntax UID, read from
/// the file meta information. `Ok(None)`: more bytes are needed.
pub fn part10_dataset(bytes: &[u8]) -> Result<Option<(String, usize)>, ScanError> {
    if bytes.len() < 144 {
        return Ok(None);
    }
    if &bytes[128..132] != b"DICM" {
        return Err(ScanError(
            "not a DICOM Part 10 file (no DICM prefix)".into(),
        ));
    }
    // (0002,0000) UL, explicit VR little endian: the length of the rest of the meta group.
    if bytes[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return Err(ScanError(
            "file meta information does not start with its group length".into(),
        ));
    }
    let group_len = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as usize;
    if group_len > 64 * 1024 {
        return Err(ScanError(
            "file meta information is implausibly long".into(),
        ));
    }
    let start = 144 + group_len;
    if bytes.len() < start {
        return Ok(None);
    }
    let mut i = 144;
    let mut ts = None;
    while i + 8 <= start {
        let group = u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let element = u16::from_le_bytes([bytes[i + 2], bytes[i + 3]]);
        let vr = &bytes[i + 4..i + 6];
        let (len, head) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            if i + 12 > start {
                return Err(ScanError("truncated file meta element".into()));
            }
            (
                u32::from_le_bytes([bytes[i + 8], bytes[i + 9], bytes[i + 10], bytes[i + 11]])
                    as usize,
                12,
            )
        } else {
            (u16::from_le_bytes([bytes[i + 6], bytes[i + 7]]) as usize, 8)
        };
        if group != 0x0002 || i + head + len > start {
            return Err(ScanError("malformed file meta information".into()));
        }
        if element == 0x0010 {
            let v = &bytes[i + head..i + head + len];
            ts = Some(
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .to_string(),
            );
        }
        i += head + len;
    }
    match ts {
        Some(t) => Ok(Some((t, start))),
        None => Err(ScanError(
            "file meta information names no transfer syntax".into(),
        )),
    }
}

/// PatientID (0010,0020) of a data set.
pub fn patient_id(data: &[u8], ts: &TransferSyntax) -> Result<Option<String>, ScanError> {
    top_level_text(data, ts, tags::PATIENT_ID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::{
        EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    };

    fn encode(obj: &InMemDicomObject, ts: &TransferSyntax) -> Vec<u8> {
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    fn sample(pid: Option<&str>) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from("ISO_IR 100"),
        ));
        o.put(DataElement::new(
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            PrimitiveValue::from("STUDY"),
        ));
        // a sequence before PatientID whose items hold a PatientID of their own
        let mut item = InMemDicomObject::new_empty();
        item.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from("INNER"),
        ));
        o.put(DataElement::new(
            tags::REFERENCED_STUDY_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![item]),
        ));
        o.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("Doe^Ann"),
        ));
        if let Some(p) = pid {
            o.put(DataElement::new(
                tags::PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(p),
            ));
        }
        o.put(DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3"),
        ));
        o
    }

    #[test]
    fn finds_top_level_patient_id_in_both_little_endian_syntaxes() {
        for ts in [
            EXPLICIT_VR_LITTLE_ENDIAN.erased(),
            IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        ] {
            let d = encode(&sample(Some("PAT1")), &ts);
            assert_eq!(
                patient_id(&d, &ts).unwrap().as_deref().map(str::trim_end),
                Some("PAT1")
            );
            let d = encode(&sample(None), &ts);
            assert_eq!(
                patient_id(&d, &ts).unwrap(),
                None,
                "the PatientID inside a sequence does not count"
            );
            let d = encode(&sample(Some("")), &ts);
            assert_eq!(patient_id(&d, &ts).unwrap().as_deref(), Some(""));
            let d = encode(&sample(Some("A\\B")), &ts);
            assert_eq!(
                patient_id(&d, &ts).unwrap().as_deref().map(str::trim_end),
                Some("A\\B")
            );
        }
    }

    #[test]
    fn prefix_scan_asks_for_more_until_it_knows() {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        let d = encode(&sample(Some("PAT1")), &ts);
        let wanted = [tags::PATIENT_ID, tags::STUDY_INSTANCE_UID];
        let full = scan_prefix(&d, &ts, &wanted, true).unwrap();
        assert!(full.complete);
        assert_eq!(full.values[0].as_deref().map(str::trim_end), Some("PAT1"));
        assert_eq!(
            full.values[1].as_deref().map(|v| v.trim_end_matches('\0')),
            Some("1.2.3")
        );
        // every strict prefix either is incomplete or already has the right answer
        for n in 0..d.len() {
            let p = scan_prefix(&d[..n], &ts, &wanted, false).unwrap();
            if p.complete {
                assert_eq!(p.values, full.values, "prefix of {n} bytes");
            }
        }
        // the whole data set given as final but cut short is an error, not a guess
        assert!(scan_prefix(&d[..d.len() - 3], &ts, &wanted, true).is_err());
        // an absent tag is known absent once a later tag is seen
        let no_pid = encode(&sample(None), &ts);
        let p = scan_prefix(&no_pid, &ts, &wanted, true).unwrap();
        assert!(p.complete && p.values[0].is_none());
    }

    #[test]
    fn part10_meta_is_read() {
        use dicom_object::meta::FileMetaTableBuilder;
        let obj = sample(Some("PAT1"));
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
            .media_storage_sop_instance_uid("1.2.3.4")
            .transfer_syntax("1.2.840.10008.1.2.1")
            .build()
            .unwrap();
        let file = obj.with_exact_meta(meta);
        let mut bytes = Vec::new();
        file.write_all(&mut bytes).unwrap();
        let (ts, start) = part10_dataset(&bytes).unwrap().unwrap();
        assert_eq!(ts, "1.2.840.10008.1.2.1");
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        assert_eq!(
            patient_id(&bytes[start..], &ts)
                .unwrap()
                .as_deref()
                .map(str::trim_end),
            Some("PAT1")
        );
        for n in 0..start {
            assert!(
                matches!(part10_dataset(&bytes[..n]), Ok(None) | Err(_)),
                "prefix {n}"
            );
        }
        let mut bad = bytes.clone();
        bad[128] = b'X';
        assert!(part10_dataset(&bad).is_err());
    }

    #[test]
    fn garbage_is_an_error_or_absent() {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        assert!(patient_id(&[0x10, 0x00, 0x20, 0x00, b'L', b'O', 0xff, 0x7f], &ts).is_err());
        assert_eq!(patient_id(&[], &ts).unwrap(), None);
    }
}
