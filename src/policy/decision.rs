//! Decisions: what the policy core answers.
//!
//! Owns: [`Permit`] (built only here, with the conditions a front end must apply, and the
//! per-instance check of a retrieval), [`Denial`] and its [`DenialKind`], which each front end
//! maps to its wire once.

#[allow(unused_imports)]
use super::*;

/// What the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow(Permit),
    Deny(Denial),
}

/// An allowed action and the conditions the front end must apply. Only the policy core builds
/// one (its fields are private to it), so a front end cannot act on a decision it did not get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// For queries: the PatientID matching values the query must carry upstream, one query per
    /// value (empty: leave the caller's key as it is).
    pub(in crate::policy) query_patient_ids: Vec<String>,
    /// Every result must pass this filter before it reaches the caller.
    pub(in crate::policy) filter: PatientFilter,
    /// And every result's study this gate.
    pub(in crate::policy) studies: StudyGate,
    /// For retrievals: what the request named. Every instance that flows back must be one of
    /// them (its study, series or instance UID), not merely the caller's patient's.
    pub(in crate::policy) retrieval: Option<Named>,
    /// For queries: what the query must ask for back, and how its matches are judged.
    pub(in crate::policy) plan: Box<query::QueryPlan>,
    /// For stores: where the instance goes, which the PACS holds once it confirms the store
    /// ([`Policy::stored`]).
    pub(in crate::policy) stores: Option<Box<Placement>>,
}

/// Where a decided store puts its instance: what a confirmed store proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::policy) struct Placement {
    pub patient_id: String,
    pub issuer: Option<String>,
    pub study: String,
    pub series: String,
    pub instance: String,
}

/// The UIDs a retrieval named, by level (empty: that level was not named).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Named {
    pub studies: Vec<String>,
    pub series: Vec<String>,
    pub instances: Vec<String>,
}

/// An instance as it flows back from the PACS (a C-GET or C-MOVE sub-operation, a WADO part
/// or metadata object): what it says of itself. UIDs without padding.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstanceId<'a> {
    pub patient_id: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub study: Option<&'a str>,
    pub series: Option<&'a str>,
    pub instance: Option<&'a str>,
}

impl<'a> InstanceId<'a> {
    /// What an instance read by the strict reader says of itself.
    pub fn of(h: &'a crate::dicom::head::InstanceHead) -> InstanceId<'a> {
        InstanceId {
            patient_id: h.patient_id.as_deref(),
            issuer: h.issuer.as_deref(),
            study: h.study.as_deref(),
            series: h.series.as_deref(),
            instance: h.sop_instance.as_deref(),
        }
    }
}

impl Permit {
    pub(super) fn new(filter: PatientFilter) -> Permit {
        Permit {
            query_patient_ids: Vec::new(),
            filter,
            studies: StudyGate::Open,
            retrieval: None,
            plan: Box::default(),
            stores: None,
        }
    }

    /// The patients this permit is about, for the audit trail: the DICOM PatientIDs the caller
    /// may reach (empty under user- or system-level access, which names no patient).
    pub fn audited_patients(&self) -> Vec<String> {
        if let Some(p) = &self.stores {
            return vec![p.patient_id.clone()];
        }
        match &self.filter {
            PatientFilter::Only(ps) => {
                let mut v: Vec<String> = ps.iter().map(|p| p.patient_id.clone()).collect();
                v.dedup();
                v
            }
            PatientFilter::Any => Vec::new(),
        }
    }

    /// The studies this permit names, for the audit trail: what a retrieval named, or where a
    /// store goes.
    pub fn audited_studies(&self) -> Vec<String> {
        match (&self.stores, &self.retrieval) {
            (Some(p), _) => vec![p.study.clone()],
            (None, Some(n)) => n.studies.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// For queries: the PatientID each query sent upstream must carry, one query per value
    /// (empty: the caller's key stays as it is). For a PATIENT-level retrieval: the one
    /// PatientID it retrieves.
    pub fn query_patient_ids(&self) -> &[String] {
        &self.query_patient_ids
    }

    /// Whether judging results needs each study's Modality and StudyDate facts (a result that
    /// carries them — a STUDY-level match with ModalitiesInStudy and StudyDate — can be judged
    /// without a look-up).
    pub(crate) fn wants_study_facts(&self) -> bool {
        matches!(&self.studies, StudyGate::Check(rule) if rule.needs_facts())
    }

    /// Whether judging results asks the EHR (`user_level = "ehr-check"`): worth batching.
    pub(crate) fn asks_ehr(&self) -> bool {
        matches!(&self.studies, StudyGate::Check(rule) if rule.ehr)
    }

    /// Whether an instance met during an allowed retrieval (a C-GET or C-MOVE sub-operation,
    /// a WADO part) may reach the caller: its patient must pass the filter, its study the
    /// gate, and it must be one of what the retrieval named.
    pub(crate) fn admits_instance(&self, id: &InstanceId<'_>) -> bool {
        let named = |list: &[String], uid: Option<&str>| {
            list.is_empty() || uid.is_some_and(|u| list.iter().any(|x| x == u))
        };
        self.filter.admits(id.patient_id, id.issuer)
            && match &self.studies {
                StudyGate::Open => true,
                StudyGate::Within(uids) => id.study.is_some_and(|u| uids.iter().any(|x| x == u)),
                // Sub-operations come only from retrievals, which are judged per study.
                StudyGate::Check(_) => false,
            }
            && self.retrieval.as_ref().is_some_and(|r| {
                named(&r.studies, id.study)
                    && named(&r.series, id.series)
                    && named(&r.instances, id.instance)
            })
    }
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
    /// A UID the request names is another patient's, or unknown to the PACS (the caller is
    /// told the same either way, so nobody can probe which UIDs exist).
    NotOwned(UidLevel),
    /// A series or instance named under a study (or series) it does not belong to.
    Hierarchy,
    /// The request lacks the unique key its level needs, or names too many UIDs.
    BadIdentifier(&'static str),
    /// Ownership could not be established (the PACS lookup failed): fail closed.
    LookupFailed,
    /// The PACS holds one UID under more than one patient (or issuer): neither is trusted.
    /// A retry cannot help, so this is a refusal, not an unavailable PACS.
    OwnerConflict,
    /// Writing is switched off (`policy.write = false`) or the token has no write scope.
    NoWrite,
    /// The instance's study or series already belongs to another patient in the PACS.
    ForeignStudy,
    /// The instance's SOP Instance UID is already held by the PACS under another patient,
    /// study or series.
    ForeignInstance,
    /// The token's patient maps to no DICOM identity.
    Unmapped,
    /// A study the request reaches is outside what the token allows (granular scope
    /// constraints, launch context, or what the EHR shows the caller).
    OutsideStudies,
    /// The EHR could not be asked whether the caller may see a study: fail closed.
    EhrUnavailable,
}

/// How a front end answers a refusal: each front end maps these to its wire once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// The token no longer authenticates the caller (it expired).
    Unauthenticated,
    /// The caller may not do this.
    Forbidden,
    /// The request cannot be decided as it stands (a missing unique key, too many UIDs).
    BadRequest,
    /// What the decision needs could not be asked (the PACS's or the EHR's answer): a retry
    /// may succeed. Fail closed.
    Unavailable,
}

impl Denial {
    pub fn kind(&self) -> DenialKind {
        match self {
            Denial::Expired => DenialKind::Unauthenticated,
            Denial::BadIdentifier(_) => DenialKind::BadRequest,
            Denial::LookupFailed | Denial::EhrUnavailable => DenialKind::Unavailable,
            _ => DenialKind::Forbidden,
        }
    }

    /// The scope that would have granted the action, when the lack of one is the reason.
    pub(crate) fn needed_scope(&self) -> Option<&'static str> {
        match self {
            Denial::InsufficientScope(s) => Some(s),
            Denial::NoWrite => Some("patient/ImagingStudy.c"),
            _ => None,
        }
    }
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
            Denial::NotOwned(l) => write!(
                f,
                "a {l:?} UID of the request is not the caller's patient's (or unknown)"
            ),
            Denial::Hierarchy => write!(
                f,
                "a UID does not belong to the study or series it is named under"
            ),
            Denial::BadIdentifier(why) => write!(f, "identifier: {why}"),
            Denial::LookupFailed => {
                write!(f, "ownership could not be established (PACS lookup failed)")
            }
            Denial::OwnerConflict => write!(
                f,
                "the PACS holds a UID of the request under more than one patient"
            ),
            Denial::NoWrite => write!(
                f,
                "no write access (scope patient/ImagingStudy.c, policy.write)"
            ),
            Denial::ForeignStudy => write!(
                f,
                "the instance's study or series belongs to another patient"
            ),
            Denial::ForeignInstance => write!(
                f,
                "the SOP Instance UID is already held under another patient, study or series"
            ),
            Denial::Unmapped => write!(
                f,
                "the token's patient maps to no DICOM patient (patients.map)"
            ),
            Denial::OutsideStudies => write!(
                f,
                "a study of the request is outside the token's restrictions (scope constraints, launch context or EHR)"
            ),
            Denial::EhrUnavailable => write!(
                f,
                "the EHR could not be asked whether the caller may see the study"
            ),
        }
    }
}
