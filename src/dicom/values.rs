//! The values the gateway judges, and their one normalisation.
//!
//! Owns: which attributes decisions are made on (the [`judged`] table: PatientID,
//! IssuerOfPatientID, the UIDs, the query level, the study facts), the VR each must have, and
//! what a well-formed value of each is. UIDs follow PS3.5 9.1 (digits and dots, components
//! without leading zeros, at most 64 characters, one trailing NUL as the only padding); judged
//! text is printable ASCII within its VR's length, so no character set can make two readers
//! see two different values. Must not know policy: it says whether a value is well formed,
//! never whose it is.

use super::reader::Violation;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

/// What a judged attribute's value must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// One or more UIDs separated by `\`; empty means "any" in a query.
    Uids,
    /// Printable ASCII text, each `\`-separated value at most this many bytes.
    Text(usize),
}

/// The VR and form of an attribute the gateway judges; `None` for every other attribute.
pub fn judged(tag: Tag) -> Option<(VR, Form)> {
    Some(match tag {
        tags::MEDIA_STORAGE_SOP_CLASS_UID
        | tags::MEDIA_STORAGE_SOP_INSTANCE_UID
        | tags::TRANSFER_SYNTAX_UID
        | tags::SOP_CLASS_UID
        | tags::SOP_INSTANCE_UID
        | tags::STUDY_INSTANCE_UID
        | tags::SERIES_INSTANCE_UID => (VR::UI, Form::Uids),
        tags::STUDY_DATE => (VR::DA, Form::Text(18)),
        tags::QUERY_RETRIEVE_LEVEL | tags::MODALITY | tags::MODALITIES_IN_STUDY => {
            (VR::CS, Form::Text(16))
        }
        tags::TIMEZONE_OFFSET_FROM_UTC => (VR::SH, Form::Text(16)),
        tags::PATIENT_ID | tags::ISSUER_OF_PATIENT_ID => (VR::LO, Form::Text(64)),
        _ => return None,
    })
}

/// Checks a top-level element's VR (when the encoding states one) and value against the
/// [`judged`] table; every other element passes.
pub fn check(tag: Tag, vr: Option<VR>, value: &[u8]) -> Result<(), Violation> {
    let Some((expected, form)) = judged(tag) else {
        return Ok(());
    };
    if let Some(found) = vr
        && found != expected
    {
        return Err(Violation::WrongVr {
            tag,
            found,
            expected,
        });
    }
    match form {
        Form::Uids => uid_list(value)
            .map(|_| ())
            .map_err(|why| Violation::BadValue(tag, why)),
        Form::Text(max) => text(value, max)
            .map(|_| ())
            .map_err(|why| Violation::BadValue(tag, why)),
    }
}

/// The UIDs of a UI value, its one trailing NUL removed. An empty value is an empty list.
pub fn uid_list(value: &[u8]) -> Result<Vec<&str>, &'static str> {
    let value = value.strip_suffix(b"\0").unwrap_or(value);
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(value).map_err(|_| "a UID must be digits and dots")?;
    text.split('\\')
        .map(|u| {
            if is_uid(u) {
                Ok(u)
            } else {
                Err(uid_problem(u))
            }
        })
        .collect()
}

/// Whether `u` is a UID as PS3.5 9.1 defines it: 1 to 64 characters, components of digits
/// separated by single dots, no component with a leading zero.
pub fn is_uid(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && u.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

fn uid_problem(u: &str) -> &'static str {
    if u.is_empty() {
        "an empty UID in a list"
    } else if u.len() > 64 {
        "a UID is longer than 64 characters"
    } else if u.bytes().any(|b| b == b' ' || b == 0) {
        "a UID has padding other than one trailing NUL"
    } else if u.bytes().any(|b| !b.is_ascii_digit() && b != b'.') {
        "a UID holds characters other than digits and dots"
    } else {
        "a UID has an empty component or one with a leading zero"
    }
}

/// A judged text value as a string: printable ASCII (space to tilde), each `\`-separated part
/// at most `max` bytes. Padding is left in place; [`trim_text`] removes it.
pub fn text(value: &[u8], max: usize) -> Result<&str, &'static str> {
    if !value.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err("the value holds characters outside printable ASCII");
    }
    // Checked above: every byte is ASCII.
    let s = std::str::from_utf8(value).map_err(|_| "the value is not text")?;
    if s.split('\\').any(|part| part.len() > max) {
        return Err("the value is longer than its VR allows");
    }
    Ok(s)
}

/// A text value without its padding (leading and trailing spaces, PS3.5 6.2).
pub fn trim_text(s: &str) -> &str {
    s.trim_matches(' ')
}

/// Encodes a value for writing: text padded with a space, UIDs with a NUL, to an even length.
pub fn padded(vr: VR, value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == VR::UI { 0 } else { b' ' });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_follow_ps3_5_9_1() {
        assert_eq!(
            uid_list(b"1.2.840.10008.1.2\0").unwrap(),
            vec!["1.2.840.10008.1.2"]
        );
        assert_eq!(uid_list(b"1.2\\1.3").unwrap(), vec!["1.2", "1.3"]);
        assert!(uid_list(b"").unwrap().is_empty());
        assert!(uid_list(b"\0").unwrap().is_empty());
        for bad in [
            &b" 1.2.3"[..],
            b"1.2.3 ",
            b"1.2.3\0\0",
            b"1.2.\0",
            b".1.2",
            b"1..2",
            b"1.02",
            b"1.2\\",
            b"1.2\\\\1.3",
            b"1.2a",
            b"*",
            b"1.2\x001",
            "1.2\u{fe0f}".as_bytes(),
        ] {
            assert!(uid_list(bad).is_err(), "{bad:?} accepted");
        }
        let long = "1.".repeat(32) + "1";
        assert_eq!(long.len(), 65);
        assert!(uid_list(long.as_bytes()).is_err());
        assert!(is_uid("0.0") && is_uid("2.25.10"));
    }

    #[test]
    fn judged_text_is_printable_ascii_within_its_length() {
        assert_eq!(text(b"PAT-A ", 64).unwrap(), "PAT-A ");
        assert_eq!(trim_text(" PAT-A  "), "PAT-A");
        assert!(text(b"PAT\nA", 64).is_err());
        assert!(text(b"PAT\0", 64).is_err());
        assert!(text(b"PAT\x1b(B", 64).is_err());
        assert!(text("PÄT".as_bytes(), 64).is_err());
        assert!(text(&[b'A'; 65], 64).is_err());
        assert!(text(b"CT\\MR", 16).is_ok());
    }

    #[test]
    fn judged_attributes_must_have_their_vr() {
        assert!(check(tags::PATIENT_ID, Some(VR::LO), b"A ").is_ok());
        assert!(check(tags::PATIENT_ID, None, b"A ").is_ok());
        assert!(matches!(
            check(tags::PATIENT_ID, Some(VR::UN), b"A "),
            Err(Violation::WrongVr { .. })
        ));
        assert!(check(tags::STUDY_INSTANCE_UID, Some(VR::UI), b" 1.2").is_err());
        assert!(check(tags::PATIENT_NAME, Some(VR::UN), b"\x01\x02").is_ok());
        assert_eq!(padded(VR::UI, b"1.2.3"), b"1.2.3\0");
        assert_eq!(padded(VR::LO, b"ABC"), b"ABC ");
    }
}
