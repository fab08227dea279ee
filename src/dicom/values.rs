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
    /// The same, one value only.
    Single(usize),
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
        tags::QUERY_RETRIEVE_LEVEL => (VR::CS, Form::Single(16)),
        // A query may match a list of modalities.
        tags::MODALITY | tags::MODALITIES_IN_STUDY => (VR::CS, Form::Text(16)),
        tags::TIMEZONE_OFFSET_FROM_UTC => (VR::SH, Form::Single(16)),
        tags::ISSUER_OF_PATIENT_ID => (VR::LO, Form::Single(64)),
        // Several PatientIDs are refused by the policy core with its own answer.
        tags::PATIENT_ID => (VR::LO, Form::Text(64)),
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
        Form::Uids => check_uids(value).map_err(|why| Violation::BadValue(tag, why)),
        Form::Text(max) => text(value, max)
            .map(|_| ())
            .map_err(|why| Violation::BadValue(tag, why)),
        Form::Single(max) => match text(value, max) {
            Ok(t) if t.contains('\\') => Err(Violation::BadValue(
                tag,
                "several values where one is allowed",
            )),
            Ok(_) => Ok(()),
            Err(why) => Err(Violation::BadValue(tag, why)),
        },
    }
}

/// Checks a UI value in one pass, without allocating: UIDs as [`is_uid`] defines them,
/// separated by `\`, one trailing NUL the only padding; an empty value is an empty list.
pub(crate) fn check_uids(value: &[u8]) -> Result<(), &'static str> {
    let value = value.strip_suffix(b"\0").unwrap_or(value);
    if value.is_empty() {
        return Ok(());
    }
    const SHAPE: &str = "a UID has an empty component or one with a leading zero";
    // `prev`: the byte before, with `\\` standing for the start of a UID.
    let mut prev = b'\\';
    let mut len = 0usize;
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'1'..=b'9' => {}
            b'0' => {
                // A zero that starts a component must be the whole component.
                let starts = prev == b'.' || prev == b'\\';
                if starts && matches!(value.get(i + 1), Some(b'0'..=b'9')) {
                    return Err(SHAPE);
                }
            }
            b'.' | b'\\' => {
                if prev == b'.' || prev == b'\\' {
                    return Err(if b == b'\\' {
                        "an empty UID in a list"
                    } else {
                        SHAPE
                    });
                }
                if b == b'\\' {
                    len = 0;
                    prev = b;
                    continue;
                }
            }
            b' ' | 0 => return Err("a UID has padding other than one trailing NUL"),
            _ => return Err("a UID holds characters other than digits and dots"),
        }
        len += 1;
        if len > 64 {
            return Err("a UID is longer than 64 characters");
        }
        prev = b;
    }
    match prev {
        b'.' => Err(SHAPE),
        b'\\' => Err("an empty UID in a list"),
        _ => Ok(()),
    }
}

/// The UIDs of a UI value that [`check_uids`] accepted, its trailing NUL removed.
pub(crate) fn split_uids(value: &[u8]) -> Vec<&str> {
    let value = value.strip_suffix(b"\0").unwrap_or(value);
    match std::str::from_utf8(value) {
        Ok("") | Err(_) => Vec::new(),
        Ok(text) => text.split('\\').collect(),
    }
}

/// The UIDs of a UI value, its one trailing NUL removed. An empty value is an empty list.
pub(crate) fn uid_list(value: &[u8]) -> Result<Vec<&str>, &'static str> {
    check_uids(value)?;
    Ok(split_uids(value))
}

/// Whether `u` is a UID as PS3.5 9.1 defines it: 1 to 64 characters, components of digits
/// separated by single dots, no component with a leading zero.
pub fn is_uid(u: &str) -> bool {
    !u.is_empty() && !u.ends_with('\0') && !u.contains('\\') && check_uids(u.as_bytes()).is_ok()
}

/// A judged text value as a string: printable ASCII (space to tilde), each `\`-separated part
/// at most `max` bytes. Padding is left in place; [`trim_text`] removes it.
pub fn text(value: &[u8], max: usize) -> Result<&str, &'static str> {
    let mut part = 0usize;
    for &b in value {
        if !(0x20..=0x7E).contains(&b) {
            return Err("the value holds characters outside printable ASCII");
        }
        if b == b'\\' {
            part = 0;
        } else {
            part += 1;
            if part > max {
                return Err("the value is longer than its VR allows");
            }
        }
    }
    // Checked above: every byte is ASCII.
    std::str::from_utf8(value).map_err(|_| "the value is not text")
}

/// A text value without its padding (leading and trailing spaces, PS3.5 6.2).
pub fn trim_text(s: &str) -> &str {
    s.trim_matches(' ')
}

/// Encodes a value for writing: text padded with a space, UIDs with a NUL, to an even length.
pub(crate) fn padded(vr: VR, value: &[u8]) -> Vec<u8> {
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
        let long = "1.".repeat(32) + "1";
        assert_eq!(long.len(), 65);
        let bad: [&[u8]; 14] = [
            b" 1.2.3",
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
            long.as_bytes(),
        ];
        for v in bad {
            assert!(uid_list(v).is_err(), "{v:?} accepted");
        }
        assert!(is_uid("0.0") && is_uid("2.25.10"));
        // the one-pass check agrees with the list reading on every case
        let others: [&[u8]; 9] = [
            b"1.2.840.10008.1.2\0",
            b"1.2\\1.3",
            b"",
            b"\0",
            b"0",
            b"0.0",
            b"10.20",
            b"01",
            b"2.25.10",
        ];
        for v in others.iter().chain(bad.iter()) {
            assert_eq!(check_uids(v).is_ok(), uid_list(v).is_ok(), "{v:?}");
        }
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
