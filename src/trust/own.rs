//! The gateway's own access tokens (`[authorization_server]`): what an exchanged token says
//! beyond RFC 9068, in the one claim the gateway writes when it signs one and reads back when
//! one is presented.
//!
//! Owns: that claim's format and its bounds. What a token carries was decided when it was
//! issued (the patient as the gateway mapped it, the launch-context studies that restrict it);
//! reading it back never maps or decides again. Must not know how an exchange is decided,
//! DICOM, or HTTP.

use serde::{Deserialize, Serialize};

/// The claim that holds a [`Granted`].
pub const CLAIM: &str = "pacsgate";
/// The most patient identities, and studies, one token carries.
pub const MAX_PATIENTS: usize = 16;
pub const MAX_STUDIES: usize = 1000;

/// What the gateway fixed when it issued a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Granted {
    /// The issuer of the token that was exchanged (the audit trail names it).
    pub subject_issuer: String,
    /// The patient identities (PatientID, and IssuerOfPatientID where the mapping knew it)
    /// the subject token's patient mapped to; `None`: the token had no patient in context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<Vec<GrantedPatient>>,
    /// The launch-context studies (Study Instance UIDs) that restrict the token; `None`: no
    /// such restriction. An empty list admits no study.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub studies: Option<Vec<String>>,
}

/// One patient identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedPatient {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl Granted {
    /// The claim of a verified token of the gateway's own, or `None` when it is missing,
    /// malformed or out of bounds (such a token is refused: it grants nothing).
    pub fn read(claims: &serde_json::Value) -> Option<Granted> {
        let g: Granted = serde_json::from_value(claims.get(CLAIM)?.clone()).ok()?;
        let text_ok = |s: &str| !s.is_empty() && s.len() <= 64 && !s.contains('\\');
        let patients_ok = g.patients.as_ref().is_none_or(|ps| {
            ps.len() <= MAX_PATIENTS
                && ps
                    .iter()
                    .all(|p| text_ok(&p.id) && p.issuer.as_deref().is_none_or(text_ok))
        });
        let studies_ok = g
            .studies
            .as_ref()
            .is_none_or(|s| s.len() <= MAX_STUDIES && s.iter().all(|u| text_ok(u)));
        (patients_ok && studies_ok && !g.subject_issuer.is_empty()).then_some(g)
    }

    /// The claim as it is written into a token.
    pub fn to_claim(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_is_written_reads_back_the_same() {
        let g = Granted {
            subject_issuer: "http://ehr".into(),
            patients: Some(vec![GrantedPatient {
                id: "PAT-A".into(),
                issuer: Some("HOSP_A".into()),
            }]),
            studies: Some(vec!["1.2.3".into()]),
        };
        assert_eq!(Granted::read(&json!({ CLAIM: g.to_claim() })), Some(g));
        let none = Granted {
            subject_issuer: "http://ehr".into(),
            patients: None,
            studies: None,
        };
        assert_eq!(
            Granted::read(&json!({ CLAIM: none.to_claim() })),
            Some(none)
        );
    }

    #[test]
    fn a_malformed_or_oversized_claim_is_no_grant() {
        for bad in [
            json!({}),
            json!({ CLAIM: "PAT-A" }),
            json!({ CLAIM: {"subject_issuer": ""} }),
            json!({ CLAIM: {"subject_issuer": "x", "patients": [{"id": ""}]} }),
            json!({ CLAIM: {"subject_issuer": "x", "patients": [{"id": "A\\B"}]} }),
            json!({ CLAIM: {"subject_issuer": "x", "extra": 1} }),
            json!({ CLAIM: {"subject_issuer": "x", "patients": (0..17).map(|i| json!({"id": format!("P{i}")})).collect::<Vec<_>>()} }),
        ] {
            assert_eq!(Granted::read(&bad), None, "{bad}");
        }
    }
}
