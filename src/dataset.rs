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
    fn garbage_is_an_error_or_absent() {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        assert!(patient_id(&[0x10, 0x00, 0x20, 0x00, b'L', b'O', 0xff, 0x7f], &ts).is_err());
        assert_eq!(patient_id(&[], &ts).unwrap(), None);
    }
}
