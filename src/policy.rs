//! The policy core: a [`Principal`] and an [`Action`] in, a [`Decision`] out. The one place that
//! allows or denies, for DIMSE and DICOMweb alike.
//!
//! Owns: what SMART scopes permit (imaging read = `r`+`s`, write = `c`, on ImagingStudy or `*`),
//! patient-level versus user/system-level access (`[policy] user_level`), token expiry on every
//! operation, the mapping of the token's patient to DICOM patient identities (`[patients] map`),
//! how a patient-scoped query is narrowed, and whether a PatientID found in data belongs to the
//! caller. Must not know sockets, PDUs or HTTP: front ends translate their protocol into an
//! `Action` and apply the `Decision`.

use crate::config::{Config, PatientMap, UserLevel};
use crate::trust::Principal;
use crate::trust::scopes::Level;
use std::fmt;
use std::time::SystemTime;

/// The FHIR resource type imaging access is expressed on.
const IMAGING: &str = "ImagingStudy";

/// One DICOM patient identity: PatientID, and IssuerOfPatientID where the mapping uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomPatient {
    pub patient_id: String,
    pub issuer: Option<String>,
}

/// Which patients' data the caller may see or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientFilter {
    /// Only these identities (patient-level access).
    Only(Vec<DicomPatient>),
    /// Any patient (user- or system-level access where configured).
    Any,
}

impl PatientFilter {
    /// Whether data carrying this PatientID belongs to an allowed patient. PatientID is an LO
    /// value: leading and trailing spaces are padding; the rest is compared byte for byte, never
    /// case-folded. Data without a PatientID is never admitted under a patient-level filter.
    pub fn admits(&self, patient_id: Option<&str>) -> bool {
        match self {
            PatientFilter::Any => true,
            PatientFilter::Only(ids) => match patient_id {
                None => false,
                Some(pid) => ids.iter().any(|p| lo_eq(&p.patient_id, pid)),
            },
        }
    }
}

/// Equality of two LO values: padding spaces removed, then byte for byte.
pub fn lo_eq(a: &str, b: &str) -> bool {
    a.trim_matches(' ').as_bytes() == b.trim_matches(' ').as_bytes()
}

/// What the caller asks to do, in protocol-neutral terms.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Open a session (DIMSE association): the token must grant some imaging access at all.
    Connect,
    /// Verification (C-ECHO).
    Echo,
    /// A query. `patient_id` is the PatientID matching key as the caller sent it: `None` when
    /// the key is absent, else its raw value (empty means universal matching).
    Query { patient_id: Option<&'a str> },
}

/// What the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denial),
}

/// An allowed action and the conditions the front end must apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// For queries: the PatientID matching value the query must carry upstream (`None`: leave
    /// the caller's key as it is).
    pub query_patient_id: Option<String>,
    /// Every result must pass this filter before it reaches the caller.
    pub filter: PatientFilter,
}

/// Why an action was refused. Safe to log; never holds a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Expired,
    /// No scope grants the imaging interaction needed (names what was needed).
    InsufficientScope(&'static str),
    /// Patient-level scopes but no patient in context.
    NoPatientContext,
    /// Only user- or system-level scopes, and `[policy] user_level` does not allow them.
    UserLevelNotAllowed,
    /// The request names another patient.
    ForeignPatient,
    /// The request uses a wildcard or several values on PatientID.
    PatientPattern,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Expired => write!(f, "token has expired"),
            Denial::InsufficientScope(s) => write!(f, "no scope grants {s}"),
            Denial::NoPatientContext => {
                write!(f, "patient-level scopes without a patient in context")
            }
            Denial::UserLevelNotAllowed => write!(
                f,
                "user/system-level access is not allowed (policy.user_level)"
            ),
            Denial::ForeignPatient => write!(f, "request names another patient"),
            Denial::PatientPattern => write!(
                f,
                "wildcard or multi-valued PatientID is not allowed for a patient-scoped caller"
            ),
        }
    }
}

/// What a principal's token permits, before any particular request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub patients: PatientFilter,
}

/// The policy core.
pub struct Policy {
    user_level: UserLevel,
    write: bool,
    map: PatientMap,
}

impl Policy {
    pub fn new(cfg: &Config) -> Policy {
        Policy {
            user_level: cfg.policy.user_level,
            write: cfg.policy.write,
            map: cfg.patients.map,
        }
    }

    /// The DICOM identities of the token's patient.
    fn map_patient(&self, patient: &str) -> Vec<DicomPatient> {
        match self.map {
            PatientMap::Same => vec![DicomPatient {
                patient_id: patient.to_string(),
                issuer: None,
            }],
        }
    }

    /// What the principal may do at all, or why it may do nothing.
    pub fn access(&self, p: &Principal) -> Result<Access, Denial> {
        let patient_perms = p.scopes.granted(Level::Patient, IMAGING);
        let mut user_perms = p.scopes.granted(Level::User, IMAGING);
        let system_perms = p.scopes.granted(Level::System, IMAGING);
        user_perms.read |= system_perms.read;
        user_perms.search |= system_perms.search;
        user_perms.create |= system_perms.create;

        // Patient-level scopes apply to the patient in context, and to nobody else.
        if let Some(patient) = &p.patient {
            let read = patient_perms.read && patient_perms.search;
            let write = self.write && patient_perms.create;
            if read || write {
                if self.user_level == UserLevel::Allow && (user_perms.read && user_perms.search) {
                    // A clinician tool with user scopes and a patient selected: user-level access
                    // is what the configuration allows it.
                    return Ok(Access {
                        read: true,
                        write: write || (self.write && user_perms.create),
                        patients: PatientFilter::Any,
                    });
                }
                return Ok(Access {
                    read,
                    write,
                    patients: PatientFilter::Only(self.map_patient(patient)),
                });
            }
        }
        let user_read = user_perms.read && user_perms.search;
        let user_write = self.write && user_perms.create;
        if user_read || user_write {
            return match self.user_level {
                UserLevel::Allow => Ok(Access {
                    read: user_read,
                    write: user_write,
                    patients: PatientFilter::Any,
                }),
                UserLevel::Deny => Err(Denial::UserLevelNotAllowed),
            };
        }
        let patient_level_grant =
            (patient_perms.read && patient_perms.search) || patient_perms.create;
        if p.patient.is_none() && patient_level_grant {
            return Err(Denial::NoPatientContext);
        }
        Err(Denial::InsufficientScope(
            "imaging access (patient/ImagingStudy.rs or .c)",
        ))
    }

    /// Decides one action at time `now`.
    pub fn decide(&self, p: &Principal, action: Action<'_>, now: SystemTime) -> Decision {
        if p.is_expired_at(now) {
            return Decision::Deny(Denial::Expired);
        }
        let access = match self.access(p) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        match action {
            Action::Connect | Action::Echo => Decision::Allow(Allowed {
                query_patient_id: None,
                filter: access.patients,
            }),
            Action::Query { patient_id } => {
                if !access.read {
                    return Decision::Deny(Denial::InsufficientScope(
                        "imaging read (patient/ImagingStudy.rs)",
                    ));
                }
                match &access.patients {
                    PatientFilter::Any => Decision::Allow(Allowed {
                        query_patient_id: None,
                        filter: PatientFilter::Any,
                    }),
                    PatientFilter::Only(ids) => narrow_query(ids, patient_id, &access.patients),
                }
            }
        }
    }
}

/// Narrows a query to the caller's patient: absent, empty or `*` becomes the caller's id; the
/// caller's own id (padding aside) is kept; anything else is refused.
fn narrow_query(ids: &[DicomPatient], requested: Option<&str>, filter: &PatientFilter) -> Decision {
    let Some(own) = ids.first() else {
        return Decision::Deny(Denial::NoPatientContext);
    };
    let allow = |pid: &str| {
        Decision::Allow(Allowed {
            query_patient_id: Some(pid.to_string()),
            filter: filter.clone(),
        })
    };
    let value = requested.map(|v| v.trim_matches(' ')).unwrap_or("");
    if value.is_empty() || value == "*" {
        return allow(&own.patient_id);
    }
    if value.contains('\\') || value.contains('*') || value.contains('?') {
        return Decision::Deny(Denial::PatientPattern);
    }
    match ids.iter().find(|p| lo_eq(&p.patient_id, value)) {
        Some(p) => allow(&p.patient_id),
        None => Decision::Deny(Denial::ForeignPatient),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::scopes::ScopeSet;
    use std::time::{Duration, UNIX_EPOCH};

    fn cfg(user_level: &str) -> Config {
        Config::parse(&format!(
            r#"
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:11112"
public_url = "http://127.0.0.1:8080"
[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"
[[issuers]]
issuer = "http://127.0.0.1:9400"
[policy]
user_level = "{user_level}"
"#
        ))
        .unwrap()
    }

    fn principal(scope: &str, patient: Option<&str>) -> Principal {
        Principal {
            issuer: "http://127.0.0.1:9400".into(),
            subject: None,
            client_id: None,
            fhir_user: None,
            scopes: ScopeSet::parse(scope),
            patient: patient.map(str::to_string),
            expires_at: (SystemTime::now() + Duration::from_secs(3600))
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            jti: None,
            token_id: "t".into(),
        }
    }

    fn query(pol: &Policy, p: &Principal, pid: Option<&str>) -> Decision {
        pol.decide(p, Action::Query { patient_id: pid }, SystemTime::now())
    }

    #[test]
    fn patient_query_is_narrowed_or_refused() {
        let pol = Policy::new(&cfg("deny"));
        let p = principal("patient/ImagingStudy.rs", Some("PAT1"));
        for req in [
            None,
            Some(""),
            Some("*"),
            Some("  "),
            Some("PAT1"),
            Some(" PAT1  "),
        ] {
            match query(&pol, &p, req) {
                Decision::Allow(a) => {
                    assert_eq!(a.query_patient_id.as_deref(), Some("PAT1"), "{req:?}")
                }
                d => panic!("{req:?}: {d:?}"),
            }
        }
        assert_eq!(
            query(&pol, &p, Some("PAT2")),
            Decision::Deny(Denial::ForeignPatient)
        );
        assert_eq!(
            query(&pol, &p, Some("pat1")),
            Decision::Deny(Denial::ForeignPatient),
            "case matters"
        );
        for pattern in ["PAT*", "PAT?", "*1", "PAT1\\PAT2", "PAT1\\"] {
            assert_eq!(
                query(&pol, &p, Some(pattern)),
                Decision::Deny(Denial::PatientPattern),
                "{pattern}"
            );
        }
    }

    #[test]
    fn filter_compares_lo_values() {
        let f = PatientFilter::Only(vec![DicomPatient {
            patient_id: "SPACE01".into(),
            issuer: None,
        }]);
        assert!(f.admits(Some("SPACE01")));
        assert!(f.admits(Some("SPACE01   ")));
        assert!(f.admits(Some(" SPACE01")));
        assert!(!f.admits(Some("space01")));
        assert!(!f.admits(Some("SPACE01\0")));
        assert!(!f.admits(Some("SPACE011")));
        assert!(!f.admits(Some("")));
        assert!(!f.admits(None));
        assert!(PatientFilter::Any.admits(None));
    }

    #[test]
    fn scopes_decide_access() {
        let pol = Policy::new(&cfg("deny"));
        // imaging read in its many spellings
        for s in [
            "patient/ImagingStudy.rs",
            "patient/*.read",
            "patient/*.*",
            "patient/ImagingStudy.r patient/ImagingStudy.s",
        ] {
            assert!(
                matches!(
                    query(&pol, &principal(s, Some("A")), None),
                    Decision::Allow(_)
                ),
                "{s}"
            );
        }
        // no imaging scope at all
        for s in [
            "patient/Observation.rs",
            "openid fhirUser",
            "patient/ImagingStudy.r",
            "patient/ImagingStudy.rs?modality=CT",
        ] {
            let d = pol.decide(&principal(s, Some("A")), Action::Connect, SystemTime::now());
            assert!(
                matches!(d, Decision::Deny(Denial::InsufficientScope(_))),
                "{s}: {d:?}"
            );
        }
        // write-only token may connect but not query
        let w = principal("patient/ImagingStudy.c", Some("A"));
        assert!(matches!(
            pol.decide(&w, Action::Connect, SystemTime::now()),
            Decision::Allow(_)
        ));
        assert!(matches!(
            query(&pol, &w, None),
            Decision::Deny(Denial::InsufficientScope(_))
        ));
    }

    #[test]
    fn patient_scope_without_patient_is_denied() {
        let pol = Policy::new(&cfg("allow"));
        let d = pol.decide(
            &principal("patient/ImagingStudy.rs", None),
            Action::Connect,
            SystemTime::now(),
        );
        assert_eq!(d, Decision::Deny(Denial::NoPatientContext));
    }

    #[test]
    fn user_level_follows_policy() {
        let p = principal("user/ImagingStudy.rs", None);
        let deny = Policy::new(&cfg("deny"));
        assert_eq!(
            deny.decide(&p, Action::Connect, SystemTime::now()),
            Decision::Deny(Denial::UserLevelNotAllowed)
        );
        let allow = Policy::new(&cfg("allow"));
        match query(&allow, &p, Some("ANYONE")) {
            Decision::Allow(a) => {
                assert_eq!(a.filter, PatientFilter::Any);
                assert_eq!(a.query_patient_id, None);
            }
            d => panic!("{d:?}"),
        }
        // system scopes count as user-level
        let s = principal("system/ImagingStudy.rs", None);
        assert_eq!(
            deny.decide(&s, Action::Connect, SystemTime::now()),
            Decision::Deny(Denial::UserLevelNotAllowed)
        );
        // user scopes never widen a patient-level token under "deny"
        let both = principal("patient/ImagingStudy.rs user/ImagingStudy.rs", Some("A"));
        match query(&deny, &both, None) {
            Decision::Allow(a) => assert!(matches!(a.filter, PatientFilter::Only(_))),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn expiry_is_checked_on_every_action() {
        let pol = Policy::new(&cfg("deny"));
        let p = principal("patient/ImagingStudy.rs", Some("A"));
        let later = UNIX_EPOCH + Duration::from_secs(p.expires_at);
        assert_eq!(
            pol.decide(&p, Action::Echo, later),
            Decision::Deny(Denial::Expired)
        );
        assert_eq!(
            query(&pol, &p, None).clone(),
            pol.decide(&p, Action::Query { patient_id: None }, SystemTime::now())
        );
        assert_eq!(
            pol.decide(&p, Action::Query { patient_id: None }, later),
            Decision::Deny(Denial::Expired)
        );
    }
}
