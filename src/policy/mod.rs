//! The policy core: a [`Principal`] and an [`Action`] in, a [`Decision`] out. The one place that
//! allows or denies, for DIMSE and DICOMweb alike.
//!
//! Owns: what SMART scopes permit (imaging read = `r`+`s`, write = `c`, on ImagingStudy or `*`),
//! patient-level versus user/system-level access (`[policy] user_level`), token expiry on every
//! operation, the mapping of the token's patient to DICOM patient identities (`[patients] map`),
//! how a patient-scoped query is narrowed, whether a PatientID found in data belongs to the
//! caller, and which studies the caller may reach (granular scope constraints judged on a study's
//! Modality and StudyDate, launch-context studies, and for `user_level = "ehr-check"` the EHR's
//! answer to the caller's own token, cached per token and study). Must not know sockets, PDUs
//! or HTTP: front ends translate their protocol into an `Action` and apply the `Decision`.

pub mod mapping;
pub mod query;

pub use query::{MatchView, ResultJudge, ResultKey, Tally, Verdict};

use crate::config::{Config, PatientMap, UserLevel};
use crate::trust::scopes::{Constraint, Level};
use crate::trust::{ContextStudy, Principal};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The FHIR resource type imaging access is expressed on.
const IMAGING: &str = "ImagingStudy";

/// One DICOM patient identity: PatientID, and IssuerOfPatientID where the mapping uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DicomPatient {
    pub patient_id: String,
    /// The issuer as the mapping found it (a CX assigning authority, a FHIR identifier system,
    /// the table's issuer column).
    pub issuer: Option<String>,
    /// With `patients.use_issuer`: the IssuerOfPatientID values data of this patient carries
    /// (empty: data must carry none). `None`: the issuer is not compared.
    pub issuer_match: Option<Vec<String>>,
}

impl DicomPatient {
    fn matches(&self, patient_id: &str, issuer: Option<&str>) -> bool {
        lo_eq(&self.patient_id, patient_id)
            && match &self.issuer_match {
                None => true,
                Some(names) => match issuer
                    .map(|i| i.trim_matches(' '))
                    .filter(|i| !i.is_empty())
                {
                    None => names.is_empty(),
                    Some(i) => names.iter().any(|n| n == i),
                },
            }
    }
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
    /// Whether data carrying this PatientID and IssuerOfPatientID belongs to an allowed
    /// patient. Both are LO values: leading and trailing spaces are padding; the rest is
    /// compared byte for byte, never case-folded. The issuer counts only where the mapping says
    /// so (`patients.use_issuer`). Data without a PatientID is never admitted under a
    /// patient-level filter.
    pub fn admits(&self, patient_id: Option<&str>, issuer: Option<&str>) -> bool {
        match self {
            PatientFilter::Any => true,
            PatientFilter::Only(ids) => match patient_id {
                None => false,
                Some(pid) => ids.iter().any(|p| p.matches(pid, issuer)),
            },
        }
    }

    /// Whether results must carry IssuerOfPatientID to be judged.
    pub fn compares_issuer(&self) -> bool {
        match self {
            PatientFilter::Any => false,
            PatientFilter::Only(ids) => ids.iter().any(|p| p.issuer_match.is_some()),
        }
    }
}

/// Equality of two LO values: padding spaces removed, then byte for byte.
pub fn lo_eq(a: &str, b: &str) -> bool {
    a.trim_matches(' ').as_bytes() == b.trim_matches(' ').as_bytes()
}

/// The level of a DICOM unique identifier in the patient/study/series/instance hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UidLevel {
    Study,
    Series,
    Instance,
}

/// What a study restriction is judged on, as the PACS holds it for a study.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StudyFacts {
    /// ModalitiesInStudy (or, for an instance being stored, its Modality).
    pub modalities: Vec<String>,
    /// StudyDate, `YYYYMMDD`.
    pub study_date: Option<String>,
}

/// Who a study, series or instance belongs to, as the PACS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub patient_id: String,
    pub issuer: Option<String>,
    pub study_uid: String,
    pub series_uid: Option<String>,
    /// Whether the PACS said anything about IssuerOfPatientID (an empty value counts); without
    /// it the issuer cannot be compared.
    pub issuer_known: bool,
    /// The study's facts, when the look-up was at study level.
    pub facts: Option<StudyFacts>,
}

/// Which studies a caller may reach, beyond its patient filter: the granular constraints of
/// its scopes, the studies of its launch context, and (for `user_level = "ehr-check"`) what the
/// EHR shows the caller's own token. All that apply must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StudyRule {
    /// Every group must be met by one of its alternatives, and an alternative by all of its
    /// constraints (one group per interaction needed: a read needs `r` and `s`, which may come
    /// from different scopes). No groups: the scopes restrict nothing.
    pub scope_groups: Vec<Vec<Vec<Constraint>>>,
    /// The launch context's studies, when the issuer treats launch context as a restriction.
    pub context: Option<Vec<String>>,
    /// The EHR must return the study to the caller's own token.
    pub ehr: bool,
}

impl StudyRule {
    pub fn is_open(&self) -> bool {
        self.scope_groups.is_empty() && self.context.is_none() && !self.ehr
    }

    /// Whether judging the scopes needs the study's attributes (a UID constraint does not).
    fn needs_facts(&self) -> bool {
        self.scope_groups
            .iter()
            .flatten()
            .flatten()
            .any(|c| !matches!(c, Constraint::StudyUid(_)))
    }

    fn scopes_admit(&self, uid: &str, facts: &StudyFacts) -> bool {
        self.scope_groups.iter().all(|group| {
            group
                .iter()
                .any(|alt| alt.iter().all(|c| constraint_holds(c, uid, facts)))
        })
    }
}

/// A granular-scope constraint evaluated on a study's DICOM attributes. A study without the
/// attribute does not meet it.
fn constraint_holds(c: &Constraint, uid: &str, facts: &StudyFacts) -> bool {
    match c {
        Constraint::Modality(codes) => facts
            .modalities
            .iter()
            .any(|m| codes.iter().any(|c| c == m)),
        Constraint::Started(tests) => facts
            .study_date
            .as_deref()
            .map(|d| d.trim_matches(' '))
            .is_some_and(|d| tests.iter().any(|t| t.passes(d))),
        Constraint::StudyUid(uids) => uids.iter().any(|u| u == uid),
    }
}

/// The study condition an allowed action carries to its front end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StudyGate {
    /// No study restriction.
    #[default]
    Open,
    /// Each result's study must be checked ([`Policy::admits_result`]).
    Check(Arc<StudyRule>),
    /// Only data of these studies (a retrieval whose studies were already judged).
    Within(Vec<String>),
}

/// The future an [`OwnerLookup`] returns.
pub type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Owner>, String>> + Send + 'a>>;

/// Resolves a UID to its owner by asking the PACS. `Ok(None)`: the PACS does not hold it.
/// Implemented by the PACS client; the policy core only caches and judges the answers.
pub trait OwnerLookup: Send + Sync {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a>;
}

/// The future a [`PatientDirectory`] returns.
pub type DirectoryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, String>> + Send + 'a>>;

/// What the policy core asks of an issuer's EHR. Implemented by the trust core; the policy
/// core only judges the answers. `Ok(None)`: the EHR has nothing (or refused) for this.
pub trait EhrDirectory: Send + Sync {
    /// `GET {fhir_base_url}/Patient/{id}` with the gateway's own credentials.
    fn patient<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a>;
    /// `GET {fhir_base_url}/ImagingStudy/{id}` with the gateway's own credentials.
    fn imaging_study<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a>;
    /// `GET {fhir_base_url}/ImagingStudy?identifier=urn:oid:{uid}[,urn:oid:{uid}..]` with the
    /// caller's own token: the search Bundle, `None` when the EHR refuses the caller (401/403).
    fn studies_seen_by<'a>(
        &'a self,
        p: &'a Principal,
        study_uids: &'a [String],
    ) -> DirectoryFuture<'a>;
}

/// The most distinct studies one query's results are judged for under a study restriction;
/// results of further studies are withheld.
pub const MAX_STUDIES_JUDGED: usize = 1000;

/// The study a query result belongs to, as the result shows it: its UID, and (for a
/// STUDY-level match) its ModalitiesInStudy and StudyDate.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResultStudy<'a> {
    pub uid: Option<&'a str>,
    pub facts: Option<&'a StudyFacts>,
}

impl<'a> ResultStudy<'a> {
    pub fn uid(uid: Option<&'a str>) -> ResultStudy<'a> {
        ResultStudy { uid, facts: None }
    }
}

/// Study UIDs asked about in one EHR search.
pub const EHR_BATCH: usize = 50;

/// What one query's study judgements learned: each study's verdict, and why judging stopped.
#[derive(Debug, Default)]
pub struct StudyMemo {
    judged: std::collections::HashMap<String, bool>,
    /// Set when judging stopped early; every later result is withheld.
    pub stopped: Option<&'static str>,
}

/// Look-ups one request runs at once (the PACS client allows a few more overall, so one
/// request cannot hold every slot).
const LOOKUPS_PER_REQUEST: usize = 4;

/// The most UIDs one request may name; a request naming more is refused (bounded work).
pub const MAX_UIDS_PER_REQUEST: usize = 1000;

/// A retrieval (C-MOVE, C-GET, WADO) as the policy core sees it: the level and every UID the
/// request names. The caller's PatientID key is used only at PATIENT level.
#[derive(Debug, Clone, Default)]
pub struct RetrieveRequest<'a> {
    /// `None` at PATIENT level.
    pub level: Option<UidLevel>,
    pub patient_id: Option<&'a str>,
    pub study_uids: Vec<String>,
    pub series_uids: Vec<String>,
    pub instance_uids: Vec<String>,
}

/// A store (C-STORE, STOW-RS) as the policy core sees it: what the instance says of itself,
/// as the strict reader read it (UIDs validated, without padding).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreRequest<'a> {
    /// SOP Instance UID: it must be new to the PACS, or already the caller's own instance in
    /// the same study and series (never one UID under two patients).
    pub instance_uid: Option<&'a str>,
    pub patient_id: Option<&'a str>,
    /// IssuerOfPatientID.
    pub issuer: Option<&'a str>,
    pub study_uid: Option<&'a str>,
    pub series_uid: Option<&'a str>,
    /// Modality and StudyDate, for scope constraints on writes.
    pub modality: Option<&'a str>,
    pub study_date: Option<&'a str>,
}

/// What the caller asks to do, in protocol-neutral terms.
#[derive(Debug, Clone)]
pub enum Action<'a> {
    /// Open a session (DIMSE association): the token must grant some imaging access at all.
    Connect,
    /// Verification (C-ECHO).
    Echo,
    /// A query (C-FIND, QIDO-RS, a FHIR ImagingStudy search).
    Query(QueryRequest<'a>),
    /// A retrieval (C-GET, C-MOVE, WADO-RS, WADO-URI).
    Retrieve(RetrieveRequest<'a>),
    /// The start of a store request whose instances are not read yet (STOW-RS): only whether
    /// the caller may write at all, so a refused request's body need not be read.
    BeginStore,
    /// One instance to store (C-STORE, a STOW-RS part).
    Store(StoreRequest<'a>),
}

/// The level a query asks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryLevel {
    Patient,
    #[default]
    Study,
    Series,
    Image,
}

/// A query as the policy core sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryRequest<'a> {
    pub level: QueryLevel,
    /// The PatientID matching key as the caller sent it: `None` when the key is absent, else
    /// its raw value (empty means universal matching).
    pub patient_id: Option<&'a str>,
    /// The study the query searches inside (a QIDO-RS search under `/studies/{uid}`, a C-FIND
    /// below STUDY level naming one Study Instance UID), and the series (under
    /// `/series/{uid}`, a C-FIND at IMAGE level naming one Series Instance UID). A look into a
    /// study is judged like a retrieval of it before the query runs.
    pub inside_study: Option<&'a str>,
    pub inside_series: Option<&'a str>,
    /// The caller matches on ModalitiesInStudy or StudyDate, or shifts dates with a timezone
    /// offset: a PACS may echo a matching value back instead of the study's own, so the
    /// matches' values of them are not the study's facts.
    pub matches_on_facts: bool,
}

impl<'a> QueryRequest<'a> {
    /// A STUDY-level query with this PatientID key and nothing else to say.
    pub fn with_patient(patient_id: Option<&'a str>) -> QueryRequest<'a> {
        QueryRequest {
            patient_id,
            ..QueryRequest::default()
        }
    }
}

/// What the policy core asks of the world, owned by it so no front end passes them: the PACS
/// (who holds a UID), the EHR (FHIR reads with the gateway's or the caller's token) and the
/// clock every decision is made at.
#[derive(Clone)]
pub struct Ports {
    pub lookup: Arc<dyn OwnerLookup>,
    pub ehr: Arc<dyn EhrDirectory>,
    pub clock: fn() -> SystemTime,
}

impl Ports {
    pub fn new(lookup: Arc<dyn OwnerLookup>, ehr: Arc<dyn EhrDirectory>) -> Ports {
        Ports {
            lookup,
            ehr,
            clock: SystemTime::now,
        }
    }
}

/// A verified principal the policy core has prepared for its decisions (the FHIR Patient
/// looked up where `patients.map = "fhir"`, launch-context study references resolved). Only
/// [`Policy::caller`] builds one, so no decision is ever made for an unprepared principal.
#[derive(Debug, Clone)]
pub struct Caller {
    principal: Principal,
}

impl Caller {
    /// Who the token says the caller is (for the audit trail and the EHR's questions).
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
}

/// What the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
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
    pub(in crate::policy) plan: query::QueryPlan,
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
    fn new(filter: PatientFilter) -> Permit {
        Permit {
            query_patient_ids: Vec::new(),
            filter,
            studies: StudyGate::Open,
            retrieval: None,
            plan: query::QueryPlan::default(),
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
    pub fn wants_study_facts(&self) -> bool {
        matches!(&self.studies, StudyGate::Check(rule) if rule.needs_facts())
    }

    /// Whether judging results asks the EHR (`user_level = "ehr-check"`): worth batching.
    pub fn asks_ehr(&self) -> bool {
        matches!(&self.studies, StudyGate::Check(rule) if rule.ehr)
    }

    /// Whether an instance met during an allowed retrieval (a C-GET or C-MOVE sub-operation,
    /// a WADO part) may reach the caller: its patient must pass the filter, its study the
    /// gate, and it must be one of what the retrieval named.
    pub fn admits_instance(&self, id: &InstanceId<'_>) -> bool {
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
    pub fn needed_scope(&self) -> Option<&'static str> {
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

/// What a principal's token permits, before any particular request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Read (`r` and `s`) and under which study restriction; `None`: no read.
    pub read: Option<StudyRule>,
    /// Write (`c`, with `policy.write`) and under which study restriction.
    pub write: Option<StudyRule>,
    /// Whose data may be read.
    pub patients: PatientFilter,
    /// Whose data may be written (narrower than `patients` for a clinician tool with user-level
    /// read and a patient-level write scope).
    pub write_patients: PatientFilter,
}

/// Owners cached at most this long: a study's patient rarely changes, but it can (a merge
/// or correction in the PACS), so the cache stays short.
const OWNER_TTL: Duration = Duration::from_secs(60);
/// Owners cached at most this many.
const OWNER_CACHE_ENTRIES: u64 = 20_000;

/// A patient's identifiers are looked up again after this long.
const FHIR_TTL: Duration = Duration::from_secs(300);
const FHIR_CACHE_ENTRIES: u64 = 50_000;
/// The EHR's answers on whether a caller may see a study, at most this many.
const EHR_CACHE_ENTRIES: u64 = 100_000;

/// The policy core.
pub struct Policy {
    /// The PACS, the EHR and the clock.
    ports: Ports,
    user_level: UserLevel,
    write: bool,
    map: PatientMap,
    use_issuer: bool,
    issuer_names: std::collections::HashMap<String, String>,
    /// The mapping table, when `map = "table"`.
    table: Option<mapping::TableSource>,
    /// FHIR Patient resources by (issuer, patient id), when `map = "fhir"`.
    fhir_cache: moka::future::Cache<(String, String), Arc<serde_json::Value>>,
    /// Study Instance UIDs of launch-context ImagingStudy references, by (issuer, id).
    context_cache: moka::future::Cache<(String, String), String>,
    /// The EHR's answer for (digest of the caller's token, study UID).
    ehr_cache: moka::future::Cache<([u8; 32], String), bool>,
    /// The C-MOVE destinations clients may name.
    destinations: Vec<crate::config::Destination>,
    /// Positive ownership answers only: an unknown UID may be stored a moment later.
    owners: moka::future::Cache<(UidLevel, String), Arc<Owner>>,
}

impl Policy {
    pub fn new(cfg: &Config, ports: Ports) -> Policy {
        Policy {
            ports,
            user_level: cfg.policy.user_level,
            write: cfg.policy.write,
            map: cfg.patients.map.clone(),
            use_issuer: cfg.patients.use_issuer,
            issuer_names: cfg.patients.issuer_names.clone(),
            table: match &cfg.patients.map {
                PatientMap::Table(path) => Some(mapping::TableSource::new(path.clone())),
                _ => None,
            },
            destinations: cfg.destinations.clone(),
            fhir_cache: moka::future::Cache::builder()
                .max_capacity(FHIR_CACHE_ENTRIES)
                .time_to_live(FHIR_TTL)
                .build(),
            context_cache: moka::future::Cache::builder()
                .max_capacity(FHIR_CACHE_ENTRIES)
                .time_to_live(FHIR_TTL)
                .build(),
            ehr_cache: moka::future::Cache::builder()
                .max_capacity(EHR_CACHE_ENTRIES)
                .time_to_live(cfg.policy.ehr_check_cache)
                .build(),
            owners: moka::future::Cache::builder()
                .max_capacity(OWNER_CACHE_ENTRIES)
                .time_to_live(OWNER_TTL)
                .build(),
        }
    }

    /// Turns a verified principal into a caller: fetches what decisions need from the EHR
    /// first (see [`Policy::prepare`]).
    pub async fn caller(&self, mut principal: Principal) -> Caller {
        self.prepare(&mut principal, &*self.ports.ehr).await;
        Caller { principal }
    }

    /// Decides one action for a caller, now: a permit with the conditions to apply, or why
    /// not.
    pub async fn decide(&self, caller: &Caller, action: Action<'_>) -> Result<Permit, Denial> {
        let now = (self.ports.clock)();
        let (p, lookup, ehr) = (&caller.principal, &*self.ports.lookup, &*self.ports.ehr);
        let decision = match action {
            Action::Retrieve(req) => self.decide_retrieve(p, &req, lookup, ehr, now).await,
            Action::Store(req) => self.decide_store(p, &req, lookup, ehr, now).await,
            Action::Query(q) => self.decide_query(p, &q, lookup, ehr, now).await,
            Action::BeginStore => match self.access_at(p, now) {
                Ok(a) if a.write.is_some() => Decision::Allow(Permit::new(a.write_patients)),
                Ok(_) => Decision::Deny(Denial::NoWrite),
                Err(d) => Decision::Deny(d),
            },
            other => self.decide_at(p, &other, now),
        };
        match decision {
            Decision::Allow(permit) => Ok(permit),
            Decision::Deny(d) => Err(d),
        }
    }

    /// Records what a store the PACS confirmed proved (see [`Policy::remember_stored`]). Takes
    /// the permit the store was decided with, so only a decided store is remembered.
    pub async fn stored(&self, _permit: &Permit, req: &StoreRequest<'_>) {
        self.remember_stored(req).await;
    }

    /// The owner of a UID, from the cache or the PACS.
    async fn owner(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        let key = (level, uid.to_string());
        if let Some(o) = self.owners.get(&key).await {
            return Ok(Some(o));
        }
        self.look_up(lookup, level, uid).await
    }

    async fn look_up(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        match lookup.owner(level, uid).await {
            Ok(Some(o)) => {
                let o = Arc::new(o);
                self.owners
                    .insert((level, uid.to_string()), o.clone())
                    .await;
                Ok(Some(o))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(level = ?level, error = %e, "ownership lookup failed; denying");
                Err(Denial::LookupFailed)
            }
        }
    }

    /// A study's owner together with its facts (a cached owner recorded by a store has none:
    /// then the PACS is asked).
    async fn study_with_facts(
        &self,
        lookup: &dyn OwnerLookup,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        match self.owner(lookup, UidLevel::Study, uid).await? {
            Some(o) if o.facts.is_some() => Ok(Some(o)),
            Some(_) => self.look_up(lookup, UidLevel::Study, uid).await,
            None => Ok(None),
        }
    }

    /// The IssuerOfPatientID a study is held under, as the PACS answers the gateway's own
    /// look-up: `Some(None)` for none, `None` when that cannot be established.
    pub async fn study_issuer(
        &self,
        lookup: &dyn OwnerLookup,
        study_uid: &str,
    ) -> Option<Option<String>> {
        match self.owner(lookup, UidLevel::Study, study_uid).await {
            Ok(Some(o)) if o.issuer_known => Some(o.issuer.clone()),
            _ => None,
        }
    }

    /// The configured destination a C-MOVE may go to, by AE title (exact, padding aside); any
    /// other Move Destination is refused.
    pub fn move_destination(&self, ae_title: Option<&str>) -> Option<crate::config::Destination> {
        let ae = ae_title?.trim_matches(' ');
        self.destinations
            .iter()
            .find(|d| d.ae_title.trim_matches(' ') == ae)
            .cloned()
    }

    /// Records what a successful store proved: the PACS now holds this study and series under
    /// this patient. Later instances of the same study are then decided without a look-up.
    pub async fn remember_stored(&self, req: &StoreRequest<'_>) {
        let (Some(study_uid), Some(patient_id)) = (req.study_uid, req.patient_id) else {
            return;
        };
        let patient_id = patient_id.trim_matches(' ');
        let issuer = req
            .issuer
            .map(|i| i.trim_matches([' ', '\0']).to_string())
            .filter(|i| !i.is_empty());
        let owner = |series: Option<&str>| {
            Arc::new(Owner {
                patient_id: patient_id.to_string(),
                issuer: issuer.clone(),
                issuer_known: true,
                study_uid: study_uid.to_string(),
                series_uid: series.map(str::to_string),
                facts: None,
            })
        };
        self.owners
            .insert((UidLevel::Study, study_uid.to_string()), owner(None))
            .await;
        if let Some(s) = req.series_uid {
            self.owners
                .insert((UidLevel::Series, s.to_string()), owner(Some(s)))
                .await;
            if let Some(i) = req.instance_uid {
                self.owners
                    .insert((UidLevel::Instance, i.to_string()), owner(Some(s)))
                    .await;
            }
        }
    }

    /// Whether a study passes a rule. `facts`: the study's facts when the caller has them (an
    /// instance being stored); otherwise they are looked up when a scope constraint needs them.
    async fn admits_study(
        &self,
        p: &Principal,
        rule: &StudyRule,
        uid: &str,
        facts: Option<&StudyFacts>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
    ) -> Result<bool, Denial> {
        if let Some(ctx) = &rule.context
            && !ctx.iter().any(|u| u == uid)
        {
            return Ok(false);
        }
        if !rule.scope_groups.is_empty() {
            let looked_up;
            let facts = match facts {
                Some(f) => f,
                None if !rule.needs_facts() => &EMPTY_FACTS,
                None => match self.study_with_facts(lookup, uid).await? {
                    Some(o) => {
                        looked_up = o;
                        looked_up.facts.as_ref().unwrap_or(&EMPTY_FACTS)
                    }
                    None => return Ok(false),
                },
            };
            if !rule.scopes_admit(uid, facts) {
                return Ok(false);
            }
        }
        if rule.ehr {
            return self.ehr_shows(p, uid, ehr).await;
        }
        Ok(true)
    }

    /// Whether the EHR returns the study to the caller's own token; answers (yes and no) are
    /// cached per token and study, failures are not.
    async fn ehr_shows(
        &self,
        p: &Principal,
        uid: &str,
        ehr: &dyn EhrDirectory,
    ) -> Result<bool, Denial> {
        let key = (p.bearer.digest(), uid.to_string());
        if let Some(v) = self.ehr_cache.get(&key).await {
            return Ok(v);
        }
        let shown = match ehr.studies_seen_by(p, &[uid.to_string()]).await {
            Ok(Some(bundle)) => bundle_has_study(&bundle, uid),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(issuer = %p.issuer, error = %e, "EHR study check failed; denying");
                return Err(Denial::EhrUnavailable);
            }
        };
        self.ehr_cache.insert(key, shown).await;
        Ok(shown)
    }

    /// Asks the EHR about many studies at once (searches of [`EHR_BATCH`] identifiers) before
    /// results are judged one by one, so a user-level search costs a few EHR requests rather
    /// than one per study. Only answers the EHR gave for sure are remembered: a study missing
    /// from a Bundle that says it has more pages is left to be asked about alone. Does nothing
    /// unless the decision asks the EHR.
    pub async fn prefetch_ehr(
        &self,
        p: &Principal,
        allowed: &Permit,
        study_uids: &[String],
        memo: &StudyMemo,
        ehr: &dyn EhrDirectory,
    ) {
        if !allowed.asks_ehr() || memo.stopped.is_some() {
            return;
        }
        let digest = p.bearer.digest();
        let room = MAX_STUDIES_JUDGED.saturating_sub(memo.judged.len());
        let mut unknown: Vec<String> = Vec::new();
        for u in study_uids {
            if unknown.len() >= room {
                break;
            }
            if !unknown.contains(u)
                && !memo.judged.contains_key(u)
                && !self.ehr_cache.contains_key(&(digest, u.clone()))
            {
                unknown.push(u.clone());
            }
        }
        for chunk in unknown.chunks(EHR_BATCH) {
            match ehr.studies_seen_by(p, chunk).await {
                Ok(Some(bundle)) => {
                    let more = bundle_has_next_page(&bundle);
                    for u in chunk {
                        let shown = bundle_has_study(&bundle, u);
                        if shown || !more {
                            self.ehr_cache.insert((digest, u.clone()), shown).await;
                        }
                    }
                }
                Ok(None) => {
                    for u in chunk {
                        self.ehr_cache.insert((digest, u.clone()), false).await;
                    }
                }
                // Judged one by one later, which denies if the EHR still fails.
                Err(e) => {
                    tracing::warn!(issuer = %p.issuer, error = %e, "EHR batch study check failed");
                    return;
                }
            }
        }
    }

    /// Whether one result of an allowed query (a C-FIND match, a QIDO result) may reach the
    /// caller under the decision's study gate. A result without a study UID passes only an
    /// open gate. The result's own study facts are used when it carries them (else they are
    /// looked up when a constraint needs them). Each study is judged once per
    /// request (`memo`), at most
    /// [`MAX_STUDIES_JUDGED`] of them; after the first failure to judge (the PACS or the EHR
    /// did not answer) no more are asked about, and the rest are withheld.
    pub async fn admits_result(
        &self,
        p: &Principal,
        allowed: &Permit,
        result: ResultStudy<'_>,
        memo: &mut StudyMemo,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
    ) -> bool {
        let ResultStudy { uid, facts } = result;
        let uid = uid
            .map(|u| u.trim_end_matches(['\0', ' ']))
            .filter(|u| !u.is_empty());
        match (&allowed.studies, uid) {
            (StudyGate::Open, _) => true,
            (_, None) => false,
            (StudyGate::Within(uids), Some(u)) => uids.iter().any(|x| x == u),
            (StudyGate::Check(rule), Some(u)) => {
                if let Some(v) = memo.judged.get(u) {
                    return *v;
                }
                if memo.stopped.is_some() {
                    return false;
                }
                if memo.judged.len() >= MAX_STUDIES_JUDGED {
                    memo.stopped = Some("too many studies to judge in one request");
                    return false;
                }
                match self.admits_study(p, rule, u, facts, lookup, ehr).await {
                    Ok(v) => {
                        memo.judged.insert(u.to_string(), v);
                        v
                    }
                    Err(d) => {
                        memo.stopped = Some(match d {
                            Denial::EhrUnavailable => "the EHR could not be asked",
                            _ => "the PACS could not be asked",
                        });
                        false
                    }
                }
            }
        }
    }

    /// Decides a retrieval: every UID named is resolved against the PACS and must belong to an
    /// allowed patient (and to the study or series it is named under), and every study reached
    /// must pass the token's study restriction; the decision is made on what the UIDs resolve
    /// to, never on a PatientID key the caller sent. At PATIENT level the PatientID key is
    /// narrowed like a query's.
    pub async fn decide_retrieve(
        &self,
        p: &Principal,
        req: &RetrieveRequest<'_>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
        now: SystemTime,
    ) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        let Some(rule) = access.read else {
            return Decision::Deny(Denial::InsufficientScope(
                "imaging read (patient/ImagingStudy.rs)",
            ));
        };
        let Some(level) = req.level else {
            if !rule.is_open() {
                return Decision::Deny(Denial::BadIdentifier(
                    "a study-restricted token retrieves by study, series or instance",
                ));
            }
            let decision = match &access.patients {
                PatientFilter::Any => match req.patient_id.map(|v| v.trim_matches(' ')) {
                    // Any patient may be asked for, but what comes back must be that one.
                    Some(v) if !v.is_empty() && !v.contains(['*', '?', '\\']) => {
                        Decision::Allow(Permit::new(PatientFilter::Only(vec![DicomPatient {
                            patient_id: v.to_string(),
                            ..DicomPatient::default()
                        }])))
                    }
                    _ => Decision::Deny(Denial::BadIdentifier("PATIENT level needs one PatientID")),
                },
                PatientFilter::Only(ids) => {
                    match narrow_query(ids, req.patient_id, &access.patients) {
                        // A retrieval names one patient: several identities need the caller to choose.
                        Decision::Allow(a) if a.query_patient_ids.len() > 1 => Decision::Deny(
                            Denial::BadIdentifier("PATIENT level needs one PatientID"),
                        ),
                        d => d,
                    }
                }
            };
            return match decision {
                Decision::Allow(mut a) => {
                    a.retrieval = Some(Named::default());
                    Decision::Allow(a)
                }
                d => d,
            };
        };
        let own_key = match level {
            UidLevel::Study => &req.study_uids,
            UidLevel::Series => &req.series_uids,
            UidLevel::Instance => &req.instance_uids,
        };
        if own_key.is_empty() {
            return Decision::Deny(Denial::BadIdentifier("the level's unique key is missing"));
        }
        let total = req.study_uids.len() + req.series_uids.len() + req.instance_uids.len();
        if total > MAX_UIDS_PER_REQUEST {
            return Decision::Deny(Denial::BadIdentifier("too many UIDs"));
        }
        // Lowest level first: an instance's owner names its series and study, so a study or
        // series the request names above its own level, and above its instances, needs no
        // look-up of its own (a viewer's instance URL costs one look-up, not three). The
        // request's own level is always looked up. Each UID once, a few at a time, and the first
        // refusal ends it.
        let rank = |l: UidLevel| match l {
            UidLevel::Study => 0,
            UidLevel::Series => 1,
            UidLevel::Instance => 2,
        };
        let groups = [
            (UidLevel::Instance, &req.instance_uids),
            (UidLevel::Series, &req.series_uids),
            (UidLevel::Study, &req.study_uids),
        ];
        let mut studies: Vec<String> = Vec::new();
        let mut covered_series: Vec<String> = Vec::new();
        for (l, uids) in groups {
            let above_level = rank(l) < rank(level);
            let mut todo: Vec<&String> = Vec::new();
            for u in uids.iter() {
                let covered = above_level
                    && match l {
                        UidLevel::Study => studies.contains(u),
                        UidLevel::Series => covered_series.contains(u),
                        UidLevel::Instance => false,
                    };
                if !covered && !todo.contains(&u) {
                    todo.push(u);
                }
            }
            for chunk in todo.chunks(LOOKUPS_PER_REQUEST) {
                let owners = futures_util::future::join_all(
                    chunk.iter().map(|uid| self.owner(lookup, l, uid)),
                )
                .await;
                for owner in owners {
                    let owner = match owner {
                        Ok(Some(o)) => o,
                        Ok(None) => return Decision::Deny(Denial::NotOwned(l)),
                        Err(d) => return Decision::Deny(d),
                    };
                    if self.use_issuer && !owner.issuer_known {
                        tracing::warn!("the PACS did not return IssuerOfPatientID; denying");
                        return Decision::Deny(Denial::LookupFailed);
                    }
                    if !access
                        .patients
                        .admits(Some(&owner.patient_id), owner.issuer.as_deref())
                    {
                        return Decision::Deny(Denial::NotOwned(l));
                    }
                    let under_study =
                        req.study_uids.is_empty() || req.study_uids.contains(&owner.study_uid);
                    let under_series = l != UidLevel::Instance
                        || req.series_uids.is_empty()
                        || owner
                            .series_uid
                            .as_ref()
                            .is_some_and(|s| req.series_uids.contains(s));
                    if l != UidLevel::Study && !(under_study && under_series) {
                        return Decision::Deny(Denial::Hierarchy);
                    }
                    if let Some(se) = &owner.series_uid
                        && !covered_series.contains(se)
                    {
                        covered_series.push(se.clone());
                    }
                    if !studies.contains(&owner.study_uid) {
                        studies.push(owner.study_uid.clone());
                    }
                }
            }
        }
        let mut allowed = Permit::new(access.patients);
        allowed.retrieval = Some(Named {
            studies: req.study_uids.clone(),
            series: req.series_uids.clone(),
            instances: req.instance_uids.clone(),
        });
        if !rule.is_open() {
            // The whole request or nothing: never a partial study.
            for uid in &studies {
                match self.admits_study(p, &rule, uid, None, lookup, ehr).await {
                    Ok(true) => {}
                    Ok(false) => return Decision::Deny(Denial::OutsideStudies),
                    Err(d) => return Decision::Deny(d),
                }
            }
            allowed.studies = StudyGate::Within(studies);
        }
        Decision::Allow(allowed)
    }

    /// Decides a store: the token must grant write, the instance's PatientID must be an allowed
    /// patient's, a study or series it names that the PACS already holds must be that
    /// patient's too (no writing into another patient's study), and the instance must pass the
    /// write scope's study restriction (judged on the instance's own Modality and StudyDate).
    pub async fn decide_store(
        &self,
        p: &Principal,
        req: &StoreRequest<'_>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
        now: SystemTime,
    ) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        let Some(rule) = access.write else {
            return Decision::Deny(Denial::NoWrite);
        };
        let pid = req.patient_id.map(|v| v.trim_matches(' ')).unwrap_or("");
        if pid.is_empty()
            || pid.contains('\\')
            || !access.write_patients.admits(Some(pid), req.issuer)
        {
            return Decision::Deny(Denial::ForeignPatient);
        }
        let mut study = "";
        let mut study_exists = false;
        for (l, uid) in [
            (UidLevel::Study, req.study_uid),
            (UidLevel::Series, req.series_uid),
        ] {
            let Some(uid) = uid
                .map(|u| u.trim_end_matches(['\0', ' ']))
                .filter(|u| !u.is_empty())
            else {
                return Decision::Deny(Denial::BadIdentifier(
                    "the instance has no study or series UID",
                ));
            };
            if l == UidLevel::Study {
                study = uid;
            }
            match self.owner(lookup, l, uid).await {
                Ok(None) => {}
                Ok(Some(o)) => {
                    study_exists |= l == UidLevel::Study;
                    if self.use_issuer && !o.issuer_known {
                        tracing::warn!("the PACS did not return IssuerOfPatientID; denying");
                        return Decision::Deny(Denial::LookupFailed);
                    }
                    let same_issuer = || {
                        let norm = |i: Option<&str>| {
                            i.map(|i| i.trim_matches(' ').to_string())
                                .filter(|i| !i.is_empty())
                        };
                        norm(o.issuer.as_deref()) == norm(req.issuer)
                    };
                    if !lo_eq(&o.patient_id, pid) || (self.use_issuer && !same_issuer()) {
                        return Decision::Deny(Denial::ForeignStudy);
                    }
                }
                Err(d) => return Decision::Deny(d),
            }
        }
        // One UID under two patients, studies or series would make the PACS answer for the
        // wrong data: the instance must be new, or the caller's own in the same place.
        let Some(instance) = req.instance_uid.filter(|u| !u.is_empty()) else {
            return Decision::Deny(Denial::BadIdentifier(
                "the instance has no SOP Instance UID",
            ));
        };
        match self.owner(lookup, UidLevel::Instance, instance).await {
            Ok(None) => {}
            Ok(Some(o)) => {
                let same_issuer = !self.use_issuer
                    || (o.issuer_known
                        && o.issuer
                            .as_deref()
                            .map(|i| i.trim_matches(' '))
                            .filter(|i| !i.is_empty())
                            == req
                                .issuer
                                .map(|i| i.trim_matches(' '))
                                .filter(|i| !i.is_empty()));
                let series = req.series_uid.map(|u| u.trim_end_matches(['\0', ' ']));
                if !lo_eq(&o.patient_id, pid)
                    || !same_issuer
                    || o.study_uid != study
                    || o.series_uid.as_deref() != series
                {
                    return Decision::Deny(Denial::ForeignInstance);
                }
            }
            Err(d) => return Decision::Deny(d),
        }
        if !rule.is_open() {
            let facts = StudyFacts {
                modalities: req
                    .modality
                    .map(|m| m.trim_matches([' ', '\0']).to_string())
                    .into_iter()
                    .filter(|m| !m.is_empty())
                    .collect(),
                study_date: req
                    .study_date
                    .map(|d| d.trim_matches([' ', '\0']).to_string()),
            };
            match self
                .admits_study(p, &rule, study, Some(&facts), lookup, ehr)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Decision::Deny(Denial::OutsideStudies),
                Err(d) => return Decision::Deny(d),
            }
            // Writing into a study the PACS holds is writing into that study: it must be inside
            // the restriction as it stands (else a CT instance could make an MR study readable).
            if study_exists {
                match self.admits_study(p, &rule, study, None, lookup, ehr).await {
                    Ok(true) => {}
                    Ok(false) => return Decision::Deny(Denial::OutsideStudies),
                    Err(d) => return Decision::Deny(d),
                }
            }
        }
        Decision::Allow(Permit::new(access.write_patients))
    }

    /// The DICOM identities of the patient the token names: `None` without patient context,
    /// an empty list when the patient maps to nothing (which grants nothing). With
    /// `use_issuer`, each carries the IssuerOfPatientID values its data must have.
    fn map_patient(&self, p: &Principal) -> Option<Vec<DicomPatient>> {
        let mut ids = self.mapped_identities(p)?;
        if self.use_issuer {
            for id in &mut ids {
                id.issuer_match = Some(self.issuer_names_of(id.issuer.as_deref()));
            }
        }
        Some(ids)
    }

    /// The IssuerOfPatientID values that stand for a mapping's issuer: the configured name,
    /// the issuer itself, and an OID with and without its `urn:oid:` prefix.
    fn issuer_names_of(&self, issuer: Option<&str>) -> Vec<String> {
        let Some(i) = issuer.map(str::trim).filter(|i| !i.is_empty()) else {
            return Vec::new();
        };
        let mut names = vec![i.to_string()];
        if let Some(oid) = i.strip_prefix("urn:oid:") {
            names.push(oid.to_string());
        } else if i.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            names.push(format!("urn:oid:{i}"));
        }
        let configured: Vec<String> = names
            .iter()
            .filter_map(|n| self.issuer_names.get(n))
            .map(|n| n.trim_matches(' ').to_string())
            .collect();
        names.extend(configured);
        names.retain(|n| !n.is_empty() && n.len() <= 64);
        names.sort();
        names.dedup();
        names
    }

    fn mapped_identities(&self, p: &Principal) -> Option<Vec<DicomPatient>> {
        match &self.map {
            PatientMap::Same => p.patient.as_ref().map(|id| {
                vec![DicomPatient {
                    patient_id: id.clone(),
                    ..DicomPatient::default()
                }]
            }),
            PatientMap::Claim(path) => {
                let ids = mapping::from_claim(&p.claims, path);
                if ids.is_empty() && p.patient.is_none() {
                    None
                } else {
                    Some(ids)
                }
            }
            PatientMap::Table(_) => {
                let table = self.table.as_ref()?.current();
                p.patient.as_ref().map(|id| table.get(id))
            }
            PatientMap::Fhir { system, type_code } => {
                p.patient.as_ref()?;
                // Not looked up (prepare was not called) or the look-up failed: nothing.
                let resource = p.fhir_patient.clone().flatten();
                Some(
                    resource
                        .map(|r| mapping::from_fhir(&r, system.as_deref(), type_code.as_deref()))
                        .unwrap_or_default(),
                )
            }
        }
    }

    /// Fetches what decisions need from the EHR before they are made: for `map = "fhir"` the
    /// Patient resource, and the Study Instance UIDs of launch-context ImagingStudy references
    /// (both cached). A failed look-up leaves the principal mapped to nothing, or its context
    /// study unknown; either grants nothing.
    pub async fn prepare(&self, p: &mut Principal, ehr: &dyn EhrDirectory) {
        if let Some(studies) = p.launch_studies.as_mut() {
            for s in studies.iter_mut() {
                let ContextStudy::Reference(id) = s else {
                    continue;
                };
                let key = (p.issuer.clone(), id.clone());
                *s = match self.context_cache.get(&key).await {
                    Some(uid) => ContextStudy::Uid(uid),
                    None => match ehr.imaging_study(&p.issuer, id).await {
                        Ok(Some(r)) => match study_uid_of(&r) {
                            Some(uid) => {
                                self.context_cache.insert(key, uid.clone()).await;
                                ContextStudy::Uid(uid)
                            }
                            None => ContextStudy::Unknown,
                        },
                        Ok(None) => ContextStudy::Unknown,
                        Err(e) => {
                            tracing::warn!(error = %e, "launch-context ImagingStudy look-up failed; it grants nothing");
                            ContextStudy::Unknown
                        }
                    },
                };
            }
        }
        if !matches!(self.map, PatientMap::Fhir { .. }) {
            return;
        }
        let Some(id) = p.patient.clone() else { return };
        let key = (p.issuer.clone(), id.clone());
        if let Some(r) = self.fhir_cache.get(&key).await {
            p.fhir_patient = Some(Some(r));
            return;
        }
        p.fhir_patient = Some(match ehr.patient(&p.issuer, &id).await {
            Ok(Some(r)) => {
                let r = Arc::new(r);
                self.fhir_cache.insert(key, r.clone()).await;
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "FHIR Patient look-up failed; the patient maps to nothing");
                None
            }
        });
    }

    /// What an unexpired principal may do at `now`.
    fn access_at(&self, p: &Principal, now: SystemTime) -> Result<Access, Denial> {
        if p.is_expired_at(now) {
            return Err(Denial::Expired);
        }
        self.access(p)
    }

    /// What the principal may do at all, or why it may do nothing.
    pub fn access(&self, p: &Principal) -> Result<Access, Denial> {
        const PATIENT: &[Level] = &[Level::Patient];
        const USER: &[Level] = &[Level::User, Level::System];
        let read_at = |levels: &[Level]| {
            let r = group(p.scopes.grants(levels, IMAGING, |x| x.read))?;
            let s = group(p.scopes.grants(levels, IMAGING, |x| x.search))?;
            Some(
                [r, s]
                    .into_iter()
                    .filter(|g| !g.is_empty())
                    .collect::<Vec<_>>(),
            )
        };
        let write_at = |levels: &[Level]| {
            if !self.write {
                return None;
            }
            let c = group(p.scopes.grants(levels, IMAGING, |x| x.create))?;
            Some(
                [c].into_iter()
                    .filter(|g| !g.is_empty())
                    .collect::<Vec<_>>(),
            )
        };
        // Launch-context studies, when the issuer asked for them to restrict; a reference not
        // resolved (yet) admits nothing.
        let context: Option<Vec<String>> = p.launch_studies.as_ref().map(|v| {
            v.iter()
                .filter_map(|s| match s {
                    ContextStudy::Uid(u) => Some(u.clone()),
                    _ => None,
                })
                .collect()
        });
        let rule = |groups: Vec<Vec<Vec<Constraint>>>, ehr: bool| StudyRule {
            scope_groups: groups,
            context: context.clone(),
            ehr,
        };
        let (pr, pw) = (read_at(PATIENT), write_at(PATIENT));
        let (ur, uw) = (read_at(USER), write_at(USER));

        // Patient-level scopes apply to the patient in context, and to nobody else.
        let mapped = self.map_patient(p);
        if let Some(ids) = &mapped
            && (pr.is_some() || pw.is_some())
        {
            if self.user_level == UserLevel::Allow
                && let Some(ur) = ur
            {
                // A clinician tool with user scopes and a patient selected: user-level access
                // is what the configuration allows it. A patient-level write scope still writes
                // for that patient only.
                let (write, write_patients) = match (uw, pw) {
                    (Some(g), _) => (Some(rule(g, false)), PatientFilter::Any),
                    (None, Some(g)) if !ids.is_empty() => {
                        (Some(rule(g, false)), PatientFilter::Only(ids.clone()))
                    }
                    _ => (None, PatientFilter::Only(Vec::new())),
                };
                return Ok(Access {
                    read: Some(rule(ur, false)),
                    write,
                    patients: PatientFilter::Any,
                    write_patients,
                });
            }
            if ids.is_empty() {
                return Err(Denial::Unmapped);
            }
            return Ok(Access {
                read: pr.map(|g| rule(g, false)),
                write: pw.map(|g| rule(g, false)),
                patients: PatientFilter::Only(ids.clone()),
                write_patients: PatientFilter::Only(ids.clone()),
            });
        }
        if ur.is_some() || uw.is_some() {
            let ehr = match self.user_level {
                UserLevel::Allow => false,
                UserLevel::EhrCheck => true,
                UserLevel::Deny => return Err(Denial::UserLevelNotAllowed),
            };
            return Ok(Access {
                read: ur.map(|g| rule(g, ehr)),
                write: uw.map(|g| rule(g, ehr)),
                patients: PatientFilter::Any,
                write_patients: PatientFilter::Any,
            });
        }
        if mapped.is_none() && (pr.is_some() || pw.is_some()) {
            return Err(Denial::NoPatientContext);
        }
        Err(Denial::InsufficientScope(
            "imaging access (patient/ImagingStudy.rs or .c)",
        ))
    }

    /// Decides an action that needs no look-up at time `now` (a query's narrowing, without
    /// the look into the study it may search inside).
    fn decide_at(&self, p: &Principal, action: &Action<'_>, now: SystemTime) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        match action {
            Action::Connect | Action::Echo => Decision::Allow(Permit::new(access.patients)),
            Action::Retrieve(_) | Action::Store(_) | Action::BeginStore => {
                Decision::Deny(Denial::BadIdentifier("not decided without a look-up"))
            }
            Action::Query(QueryRequest { patient_id, .. }) => {
                let patient_id = *patient_id;
                let Some(rule) = access.read else {
                    return Decision::Deny(Denial::InsufficientScope(
                        "imaging read (patient/ImagingStudy.rs)",
                    ));
                };
                let decision = match &access.patients {
                    PatientFilter::Any => Decision::Allow(Permit::new(PatientFilter::Any)),
                    PatientFilter::Only(ids) => narrow_query(ids, patient_id, &access.patients),
                };
                match decision {
                    Decision::Allow(mut a) if !rule.is_open() => {
                        a.studies = StudyGate::Check(Arc::new(rule));
                        Decision::Allow(a)
                    }
                    d => d,
                }
            }
        }
    }
}

static EMPTY_FACTS: StudyFacts = StudyFacts {
    modalities: Vec::new(),
    study_date: None,
};

/// One interaction's scope alternatives as a constraint group: empty when some scope grants
/// it without constraints.
fn group(alts: Option<Vec<Vec<Constraint>>>) -> Option<Vec<Vec<Constraint>>> {
    alts.map(|a| {
        if a.iter().any(Vec::is_empty) {
            Vec::new()
        } else {
            a
        }
    })
}

/// The Study Instance UID an ImagingStudy resource names (identifier system `urn:dicom:uid`,
/// value `urn:oid:{uid}`).
pub fn study_uid_of(r: &serde_json::Value) -> Option<String> {
    if r.get("resourceType").and_then(|t| t.as_str()) != Some("ImagingStudy") {
        return None;
    }
    r.get("identifier")?.as_array()?.iter().find_map(|id| {
        let system = id.get("system").and_then(|s| s.as_str());
        if system.is_some_and(|s| s != crate::trust::scopes::DICOM_UID_SYSTEM) {
            return None;
        }
        id.get("value")?
            .as_str()?
            .strip_prefix("urn:oid:")
            .map(str::to_string)
    })
}

/// Whether a search Bundle says there are more pages.
fn bundle_has_next_page(bundle: &serde_json::Value) -> bool {
    bundle
        .get("link")
        .and_then(|l| l.as_array())
        .is_some_and(|links| {
            links
                .iter()
                .any(|l| l.get("relation").and_then(|r| r.as_str()) == Some("next"))
        })
}

/// Whether an ImagingStudy search Bundle holds the study (the EHR may ignore a search
/// parameter it does not support and return everything: each entry is checked).
fn bundle_has_study(bundle: &serde_json::Value, uid: &str) -> bool {
    bundle
        .get("entry")
        .and_then(|e| e.as_array())
        .is_some_and(|entries| {
            entries.iter().any(|e| {
                e.get("resource")
                    .and_then(study_uid_of)
                    .is_some_and(|u| u == uid)
            })
        })
}

/// Narrows a query to the caller's patient: absent, empty or `*` becomes the caller's id; the
/// caller's own id (padding aside) is kept; anything else is refused.
fn narrow_query(ids: &[DicomPatient], requested: Option<&str>, filter: &PatientFilter) -> Decision {
    if ids.is_empty() {
        return Decision::Deny(Denial::Unmapped);
    }
    let allow = |pids: Vec<String>| {
        Decision::Allow(Permit {
            query_patient_ids: pids,
            ..Permit::new(filter.clone())
        })
    };
    let value = requested.map(|v| v.trim_matches(' ')).unwrap_or("");
    if value.is_empty() || value == "*" {
        // One query per PatientID: identities that differ only by issuer share it.
        let mut pids: Vec<String> = Vec::new();
        for p in ids {
            if !pids.iter().any(|x| lo_eq(x, &p.patient_id)) {
                pids.push(p.patient_id.clone());
            }
        }
        return allow(pids);
    }
    if value.contains('\\') || value.contains('*') || value.contains('?') {
        return Decision::Deny(Denial::PatientPattern);
    }
    match ids.iter().find(|p| lo_eq(&p.patient_id, value)) {
        Some(p) => allow(vec![p.patient_id.clone()]),
        None => Decision::Deny(Denial::ForeignPatient),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PACS and an EHR that never answer: the tests hand each decision the ports it needs.
    struct Nowhere;
    impl OwnerLookup for Nowhere {
        fn owner<'a>(&'a self, _: UidLevel, _: &'a str) -> LookupFuture<'a> {
            Box::pin(async { Err("no PACS in this test".to_string()) })
        }
    }
    impl EhrDirectory for Nowhere {
        fn patient<'a>(&'a self, _: &'a str, _: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR in this test".to_string()) })
        }
        fn imaging_study<'a>(&'a self, _: &'a str, _: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR in this test".to_string()) })
        }
        fn studies_seen_by<'a>(&'a self, _: &'a Principal, _: &'a [String]) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR in this test".to_string()) })
        }
    }

    impl Policy {
        fn bare(cfg: &Config) -> Policy {
            Policy::new(cfg, Ports::new(Arc::new(Nowhere), Arc::new(Nowhere)))
        }
    }
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
fhir_base_url = "http://127.0.0.1:9400/fhir"
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
            claims: Arc::new(serde_json::json!({})),
            fhir_patient: None,
            launch_studies: None,
            bearer: crate::trust::Bearer::new(&format!("token-{scope}-{patient:?}")),
        }
    }

    fn query(pol: &Policy, p: &Principal, pid: Option<&str>) -> Decision {
        pol.decide_at(
            p,
            &Action::Query(QueryRequest::with_patient(pid)),
            SystemTime::now(),
        )
    }

    #[test]
    fn patient_query_is_narrowed_or_refused() {
        let pol = Policy::bare(&cfg("deny"));
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
                    assert_eq!(a.query_patient_ids, vec!["PAT1".to_string()], "{req:?}")
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
            issuer_match: None,
        }]);
        assert!(f.admits(Some("SPACE01"), None));
        assert!(f.admits(Some("SPACE01   "), None));
        assert!(f.admits(Some(" SPACE01"), None));
        assert!(!f.admits(Some("space01"), None));
        assert!(!f.admits(Some("SPACE01\0"), None));
        assert!(!f.admits(Some("SPACE011"), None));
        assert!(!f.admits(Some(""), None));
        assert!(!f.admits(None, None));
        assert!(PatientFilter::Any.admits(None, None));
    }

    #[test]
    fn scopes_decide_access() {
        let pol = Policy::bare(&cfg("deny"));
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
            "patient/ImagingStudy.rs?category=exam",
        ] {
            let d = pol.decide_at(
                &principal(s, Some("A")),
                &Action::Connect,
                SystemTime::now(),
            );
            assert!(
                matches!(d, Decision::Deny(Denial::InsufficientScope(_))),
                "{s}: {d:?}"
            );
        }
        // write-only token may connect but not query
        let w = principal("patient/ImagingStudy.c", Some("A"));
        assert!(matches!(
            pol.decide_at(&w, &Action::Connect, SystemTime::now()),
            Decision::Allow(_)
        ));
        assert!(matches!(
            query(&pol, &w, None),
            Decision::Deny(Denial::InsufficientScope(_))
        ));
    }

    #[test]
    fn patient_scope_without_patient_is_denied() {
        let pol = Policy::bare(&cfg("allow"));
        let d = pol.decide_at(
            &principal("patient/ImagingStudy.rs", None),
            &Action::Connect,
            SystemTime::now(),
        );
        assert_eq!(d, Decision::Deny(Denial::NoPatientContext));
    }

    #[test]
    fn user_level_follows_policy() {
        let p = principal("user/ImagingStudy.rs", None);
        let deny = Policy::bare(&cfg("deny"));
        assert_eq!(
            deny.decide_at(&p, &Action::Connect, SystemTime::now()),
            Decision::Deny(Denial::UserLevelNotAllowed)
        );
        let allow = Policy::bare(&cfg("allow"));
        match query(&allow, &p, Some("ANYONE")) {
            Decision::Allow(a) => {
                assert_eq!(a.filter, PatientFilter::Any);
                assert!(a.query_patient_ids.is_empty());
            }
            d => panic!("{d:?}"),
        }
        // system scopes count as user-level
        let s = principal("system/ImagingStudy.rs", None);
        assert_eq!(
            deny.decide_at(&s, &Action::Connect, SystemTime::now()),
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
        let pol = Policy::bare(&cfg("deny"));
        let p = principal("patient/ImagingStudy.rs", Some("A"));
        let later = UNIX_EPOCH + Duration::from_secs(p.expires_at);
        assert_eq!(
            pol.decide_at(&p, &Action::Echo, later),
            Decision::Deny(Denial::Expired)
        );
        assert_eq!(
            query(&pol, &p, None).clone(),
            pol.decide_at(
                &p,
                &Action::Query(QueryRequest::with_patient(None)),
                SystemTime::now()
            )
        );
        assert_eq!(
            pol.decide_at(&p, &Action::Query(QueryRequest::with_patient(None)), later),
            Decision::Deny(Denial::Expired)
        );
    }

    /// A PACS of three studies: S1 and S2 of patient A, S3 of patient B; series R1 in S1, R3 in
    /// S3; instance I1 in R1.
    struct FakePacs {
        fail: bool,
    }

    impl OwnerLookup for FakePacs {
        fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a> {
            Box::pin(async move {
                if self.fail {
                    return Err("PACS down".to_string());
                }
                let o = |p: &str, st: &str, se: Option<&str>| {
                    let facts = |m: &str, d: &str| StudyFacts {
                        modalities: vec![m.to_string()],
                        study_date: Some(d.to_string()),
                    };
                    Some(Owner {
                        patient_id: p.into(),
                        issuer: None,
                        issuer_known: true,
                        study_uid: st.into(),
                        series_uid: se.map(str::to_string),
                        facts: match (se, st) {
                            (Some(_), _) => None,
                            (None, "S1") => Some(facts("CT", "20200115")),
                            (None, "S2") => Some(facts("MR", "20210601")),
                            (None, _) => Some(facts("CT", "20200115")),
                        },
                    })
                };
                Ok(match (level, uid) {
                    (UidLevel::Study, "S1") => o("A", "S1", None),
                    (UidLevel::Study, "S2") => o("A ", "S2", None),
                    (UidLevel::Study, "S3") => o("B", "S3", None),
                    (UidLevel::Series, "R1") => o("A", "S1", Some("R1")),
                    (UidLevel::Series, "R3") => o("B", "S3", Some("R3")),
                    (UidLevel::Instance, "I1") => o("A", "S1", Some("R1")),
                    _ => None,
                })
            })
        }
    }

    /// An EHR that shows the caller the studies in `visible` (by UID), knows ImagingStudy/ctx1
    /// as study S1, and fails when `fail` is set. Counts the searches made with callers' tokens.
    #[derive(Default)]
    struct FakeEhr {
        visible: Vec<&'static str>,
        fail: bool,
        /// Answers say there are more pages.
        paged: bool,
        searches: std::sync::atomic::AtomicUsize,
    }

    impl EhrDirectory for FakeEhr {
        fn patient<'a>(&'a self, _: &'a str, _: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async { Ok(None) })
        }
        fn imaging_study<'a>(&'a self, _: &'a str, id: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async move {
                if self.fail {
                    return Err("EHR down".into());
                }
                Ok((id == "ctx1").then(|| {
                    serde_json::json!({"resourceType": "ImagingStudy", "id": "ctx1",
                        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:S1"}]})
                }))
            })
        }
        fn studies_seen_by<'a>(
            &'a self,
            _: &'a Principal,
            uids: &'a [String],
        ) -> DirectoryFuture<'a> {
            Box::pin(async move {
                self.searches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if self.fail {
                    return Err("EHR down".into());
                }
                // Like a server that ignores the search parameter: every visible study comes
                // back, and the gateway must pick.
                let entries: Vec<_> = self
                    .visible
                    .iter()
                    .map(|u| serde_json::json!({"resource": {"resourceType": "ImagingStudy",
                        "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{u}")}]}}))
                    .collect();
                let _ = uids;
                let mut bundle = serde_json::json!({"resourceType": "Bundle", "entry": entries});
                if self.paged {
                    bundle["link"] = serde_json::json!([{"relation": "next", "url": "x"}]);
                }
                Ok(Some(bundle))
            })
        }
    }

    fn retrieve<'a>(
        level: Option<UidLevel>,
        st: &[&str],
        se: &[&str],
        inst: &[&str],
        pid: Option<&'a str>,
    ) -> RetrieveRequest<'a> {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        RetrieveRequest {
            level,
            patient_id: pid,
            study_uids: v(st),
            series_uids: v(se),
            instance_uids: v(inst),
        }
    }

    async fn decide_r(pol: &Policy, p: &Principal, r: RetrieveRequest<'_>) -> Decision {
        pol.decide_retrieve(
            p,
            &r,
            &FakePacs { fail: false },
            &FakeEhr::default(),
            SystemTime::now(),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retrieval_is_decided_on_what_uids_resolve_to() {
        let pol = Policy::bare(&cfg("deny"));
        let a = principal("patient/ImagingStudy.rs", Some("A"));
        use UidLevel::*;
        assert!(matches!(
            decide_r(&pol, &a, retrieve(Some(Study), &["S1"], &[], &[], None)).await,
            Decision::Allow(_)
        ));
        assert!(
            matches!(
                decide_r(
                    &pol,
                    &a,
                    retrieve(Some(Study), &["S1", "S2"], &[], &[], None)
                )
                .await,
                Decision::Allow(_)
            ),
            "padding aside"
        );
        assert!(matches!(
            decide_r(
                &pol,
                &a,
                retrieve(Some(Series), &["S1"], &["R1"], &[], None)
            )
            .await,
            Decision::Allow(_)
        ));
        assert!(matches!(
            decide_r(
                &pol,
                &a,
                retrieve(Some(Instance), &["S1"], &["R1"], &["I1"], None)
            )
            .await,
            Decision::Allow(_)
        ));
        // foreign, mixed, unknown: all the same refusal, whatever PatientID the caller claims
        for r in [
            retrieve(Some(Study), &["S3"], &[], &[], Some("A")),
            retrieve(Some(Study), &["S1", "S3"], &[], &[], None),
            retrieve(Some(Study), &["S9"], &[], &[], None),
            retrieve(Some(Series), &["S1"], &["R3"], &[], None),
        ] {
            assert!(matches!(
                decide_r(&pol, &a, r).await,
                Decision::Deny(Denial::NotOwned(_))
            ));
        }
        // an own series named under another own study is a confused request
        assert_eq!(
            decide_r(
                &pol,
                &a,
                retrieve(Some(Series), &["S2"], &["R1"], &[], None)
            )
            .await,
            Decision::Deny(Denial::Hierarchy)
        );
        // no unique key
        assert!(matches!(
            decide_r(&pol, &a, retrieve(Some(Series), &["S1"], &[], &[], None)).await,
            Decision::Deny(Denial::BadIdentifier(_))
        ));
        // PATIENT level: own id only
        assert!(matches!(
            decide_r(&pol, &a, retrieve(None, &[], &[], &[], Some("A"))).await,
            Decision::Allow(_)
        ));
        assert_eq!(
            decide_r(&pol, &a, retrieve(None, &[], &[], &[], Some("B"))).await,
            Decision::Deny(Denial::ForeignPatient)
        );
        // a failing PACS denies
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(Some(Study), &["S4"], &[], &[], None),
                &FakePacs { fail: true },
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::LookupFailed));
        // cached owners keep answering while the PACS is down
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(Some(Study), &["S1"], &[], &[], None),
                &FakePacs { fail: true },
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert!(matches!(d, Decision::Allow(_)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stores_need_write_and_own_studies() {
        let pol = Policy::bare(&cfg("deny"));
        let lookup = FakePacs { fail: false };
        let w = principal("patient/ImagingStudy.cruds", Some("A"));
        let st = |pid, study, series| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some(pid),
            issuer: None,
            study_uid: Some(study),
            series_uid: Some(series),
            modality: None,
            study_date: None,
        };
        let now = SystemTime::now();
        assert!(matches!(
            pol.decide_store(&w, &st("A", "S1", "R1"), &lookup, &FakeEhr::default(), now)
                .await,
            Decision::Allow(_)
        ));
        assert!(matches!(
            pol.decide_store(
                &w,
                &st("A", "NEW", "NEWR"),
                &lookup,
                &FakeEhr::default(),
                now
            )
            .await,
            Decision::Allow(_)
        ));
        assert_eq!(
            pol.decide_store(
                &w,
                &st("B", "NEW", "NEWR"),
                &lookup,
                &FakeEhr::default(),
                now
            )
            .await,
            Decision::Deny(Denial::ForeignPatient)
        );
        assert_eq!(
            pol.decide_store(
                &w,
                &st("A", "S3", "NEWR"),
                &lookup,
                &FakeEhr::default(),
                now
            )
            .await,
            Decision::Deny(Denial::ForeignStudy)
        );
        assert_eq!(
            pol.decide_store(&w, &st("A", "NEW", "R3"), &lookup, &FakeEhr::default(), now)
                .await,
            Decision::Deny(Denial::ForeignStudy)
        );
        let r = principal("patient/ImagingStudy.rs", Some("A"));
        assert_eq!(
            pol.decide_store(&r, &st("A", "S1", "R1"), &lookup, &FakeEhr::default(), now)
                .await,
            Decision::Deny(Denial::NoWrite)
        );
        let d = pol
            .decide_store(
                &w,
                &st("A", "NEW2", "R"),
                &FakePacs { fail: true },
                &FakeEhr::default(),
                now,
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::LookupFailed));
        // The SOP Instance UID: new, or the caller's own in the same study and series; never
        // one UID under two studies or patients.
        let with = |instance, study, series| StoreRequest {
            instance_uid: instance,
            ..st("A", study, series)
        };
        let ehr = FakeEhr::default();
        assert!(matches!(
            pol.decide_store(&w, &with(Some("I1"), "S1", "R1"), &lookup, &ehr, now)
                .await,
            Decision::Allow(_)
        ));
        for (study, series) in [("NEW", "NEWR"), ("S1", "NEWR")] {
            assert_eq!(
                pol.decide_store(&w, &with(Some("I1"), study, series), &lookup, &ehr, now)
                    .await,
                Decision::Deny(Denial::ForeignInstance)
            );
        }
        assert!(matches!(
            pol.decide_store(&w, &with(None, "NEW", "NEWR"), &lookup, &ehr, now)
                .await,
            Decision::Deny(Denial::BadIdentifier(_))
        ));
        let b = principal("patient/ImagingStudy.cruds", Some("B"));
        let theirs = StoreRequest {
            instance_uid: Some("I1"),
            ..st("B", "NEW3", "NEW3R")
        };
        assert_eq!(
            pol.decide_store(&b, &theirs, &lookup, &ehr, now).await,
            Decision::Deny(Denial::ForeignInstance)
        );
    }

    #[test]
    fn several_identities_narrow_to_several_queries() {
        let ids = vec![
            DicomPatient {
                patient_id: "A".into(),
                issuer: None,
                issuer_match: None,
            },
            DicomPatient {
                patient_id: "B".into(),
                issuer: None,
                issuer_match: None,
            },
        ];
        let f = PatientFilter::Only(ids.clone());
        match narrow_query(&ids, None, &f) {
            Decision::Allow(a) => {
                assert_eq!(a.query_patient_ids, vec!["A".to_string(), "B".to_string()])
            }
            d => panic!("{d:?}"),
        }
        match narrow_query(&ids, Some("B "), &f) {
            Decision::Allow(a) => assert_eq!(a.query_patient_ids, vec!["B".to_string()]),
            d => panic!("{d:?}"),
        }
        assert_eq!(
            narrow_query(&ids, Some("C"), &f),
            Decision::Deny(Denial::ForeignPatient)
        );
        assert_eq!(
            narrow_query(&[], None, &PatientFilter::Only(vec![])),
            Decision::Deny(Denial::Unmapped)
        );
        assert!(
            f.admits(Some("A"), None) && f.admits(Some("B"), None) && !f.admits(Some("C"), None)
        );
    }

    #[test]
    fn claim_mapping_denies_a_patient_that_maps_to_nothing() {
        let mut c = cfg("deny");
        c.patients.map = PatientMap::Claim("dicom_patient_id".into());
        let pol = Policy::bare(&c);
        let mut p = principal("patient/ImagingStudy.rs", Some("EHR-1"));
        assert_eq!(
            pol.decide_at(&p, &Action::Connect, SystemTime::now()),
            Decision::Deny(Denial::Unmapped)
        );
        p.claims = Arc::new(serde_json::json!({"dicom_patient_id": "MRN-1"}));
        match query(&pol, &p, None) {
            Decision::Allow(a) => assert_eq!(a.query_patient_ids, vec!["MRN-1".to_string()]),
            d => panic!("{d:?}"),
        }
        // the claim alone is patient context
        let mut q = principal("patient/ImagingStudy.rs", None);
        q.claims = Arc::new(serde_json::json!({"dicom_patient_id": "MRN-2"}));
        assert!(matches!(query(&pol, &q, Some("MRN-2")), Decision::Allow(_)));
    }

    #[test]
    fn only_configured_move_destinations() {
        let mut c = cfg("deny");
        c.destinations = vec![crate::config::Destination {
            ae_title: "WS1".into(),
            address: "127.0.0.1:104".into(),
        }];
        let pol = Policy::bare(&c);
        assert_eq!(
            pol.move_destination(Some("WS1")).map(|d| d.address),
            Some("127.0.0.1:104".into())
        );
        assert!(
            pol.move_destination(Some("WS1 ")).is_some(),
            "padding aside"
        );
        assert!(pol.move_destination(Some("ws1")).is_none());
        assert!(pol.move_destination(Some("OTHER")).is_none());
        assert!(pol.move_destination(None).is_none());
    }

    /// What a read principal may reach among S1 (CT, 2020-01-15), S2 (MR, 2021-06-01) of
    /// patient A: `Some(true)` allowed, `Some(false)` outside, per study.
    async fn reach(pol: &Policy, p: &Principal, ehr: &FakeEhr) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        for st in ["S1", "S2"] {
            let d = pol
                .decide_retrieve(
                    p,
                    &retrieve(Some(UidLevel::Study), &[st], &[], &[], None),
                    &FakePacs { fail: false },
                    ehr,
                    SystemTime::now(),
                )
                .await;
            let q = match pol.decide_at(
                p,
                &Action::Query(QueryRequest::with_patient(None)),
                SystemTime::now(),
            ) {
                Decision::Allow(a) => {
                    pol.admits_result(
                        p,
                        &a,
                        ResultStudy::uid(Some(st)),
                        &mut StudyMemo::default(),
                        &FakePacs { fail: false },
                        ehr,
                    )
                    .await
                }
                Decision::Deny(_) => false,
            };
            match d {
                Decision::Allow(_) => out.push((st, true)),
                Decision::Deny(Denial::OutsideStudies) => out.push((st, false)),
                other => panic!("{st}: {other:?}"),
            }
            // Queries and retrievals agree.
            assert_eq!(
                q,
                out.last().unwrap().1,
                "{st}: query and retrieval disagree"
            );
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn granular_scope_constraints_narrow_studies() {
        let pol = Policy::bare(&cfg("deny"));
        let ehr = FakeEhr::default();
        for (scope, s1, s2) in [
            ("patient/ImagingStudy.rs", true, true),
            ("patient/ImagingStudy.rs?modality=CT", true, false),
            ("patient/ImagingStudy.rs?modality=MR,US", false, true),
            (
                "patient/ImagingStudy.rs?modality=http://dicom.nema.org/resources/ontology/DCM|CT",
                true,
                false,
            ),
            ("patient/ImagingStudy.rs?started=ge2021", false, true),
            ("patient/ImagingStudy.rs?started=lt2021-01", true, false),
            ("patient/ImagingStudy.rs?started=2020-01-15", true, false),
            ("patient/ImagingStudy.rs?started=ne2020-01-15", false, true),
            ("patient/ImagingStudy.rs?started=gt2020-01-15", false, true),
            ("patient/ImagingStudy.rs?started=le2020-01-15", true, false),
            (
                "patient/ImagingStudy.rs?started=eb2020,sa2021",
                false,
                false,
            ),
            (
                "patient/ImagingStudy.rs?modality=CT&started=ge2021",
                false,
                false,
            ),
            (
                "patient/ImagingStudy.rs?modality=CT patient/ImagingStudy.rs?started=ge2021",
                true,
                true,
            ),
            // read from one scope, search from another: both constraints apply
            (
                "patient/ImagingStudy.r?modality=CT patient/ImagingStudy.s",
                true,
                false,
            ),
            (
                "patient/ImagingStudy.r?modality=CT patient/ImagingStudy.s?modality=MR",
                false,
                false,
            ),
            // a constraint the gateway cannot evaluate grants nothing, the others still do
            (
                "patient/ImagingStudy.rs?category=x patient/ImagingStudy.rs?modality=MR",
                false,
                true,
            ),
        ] {
            let p = principal(scope, Some("A"));
            assert_eq!(
                reach(&pol, &p, &ehr).await,
                vec![("S1", s1), ("S2", s2)],
                "{scope}"
            );
        }
        // Facts a result carries are judged without a look-up (the PACS here would fail).
        let p = principal("patient/ImagingStudy.rs?modality=CT", Some("A"));
        let Decision::Allow(a) = query(&pol, &p, None) else {
            panic!()
        };
        assert!(a.wants_study_facts());
        let facts = |m: &str| StudyFacts {
            modalities: vec![m.into(), "SR".into()],
            study_date: None,
        };
        let down = FakePacs { fail: true };
        let mut memo = StudyMemo::default();
        assert!(
            pol.admits_result(
                &p,
                &a,
                ResultStudy {
                    uid: Some("X1"),
                    facts: Some(&facts("CT"))
                },
                &mut memo,
                &down,
                &ehr
            )
            .await
        );
        assert!(
            !pol.admits_result(
                &p,
                &a,
                ResultStudy {
                    uid: Some("X2"),
                    facts: Some(&facts("MR"))
                },
                &mut memo,
                &down,
                &ehr
            )
            .await
        );
        assert_eq!(memo.stopped, None);
        let uid_only = principal("patient/ImagingStudy.rs?identifier=urn:oid:1.2", Some("A"));
        let Decision::Allow(a) = query(&pol, &uid_only, None) else {
            panic!()
        };
        assert!(!a.wants_study_facts());
        for scope in [
            "patient/ImagingStudy.rs?category=x",
            "patient/ImagingStudy.rs?modality:not=CT",
            "patient/ImagingStudy.rs?modality=http://snomed.info/sct|77477000",
            "patient/ImagingStudy.rs?started=ap2020",
            "patient/ImagingStudy.rs?started=2020-01-15T10:00:00Z",
            "patient/ImagingStudy.rs?identifier=http://hospital/acc|123",
            "patient/ImagingStudy.rs?modality=%7CMR",
        ] {
            let p = principal(scope, Some("A"));
            assert!(
                matches!(pol.access(&p), Err(Denial::InsufficientScope(_))),
                "{scope}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn study_uid_constraint_and_sub_operations() {
        let pol = Policy::bare(&cfg("deny"));
        let ehr = FakeEhr::default();
        let p = principal(
            "patient/ImagingStudy.rs?identifier=urn:dicom:uid|urn:oid:1.2.3",
            Some("A"),
        );
        let a = match pol.decide_at(
            &p,
            &Action::Query(QueryRequest::with_patient(None)),
            SystemTime::now(),
        ) {
            Decision::Allow(a) => a,
            d => panic!("{d:?}"),
        };
        let lookup = FakePacs { fail: false };
        assert!(
            pol.admits_result(
                &p,
                &a,
                ResultStudy::uid(Some("1.2.3")),
                &mut StudyMemo::default(),
                &lookup,
                &ehr
            )
            .await
        );
        assert!(
            !pol.admits_result(
                &p,
                &a,
                ResultStudy::uid(Some("1.2.4")),
                &mut StudyMemo::default(),
                &lookup,
                &ehr
            )
            .await
        );
        assert!(
            !pol.admits_result(
                &p,
                &a,
                ResultStudy::uid(None),
                &mut StudyMemo::default(),
                &lookup,
                &ehr
            )
            .await
        );
        // A retrieval's sub-operations stay inside the studies it was decided on.
        let p = principal("patient/ImagingStudy.rs?modality=CT", Some("A"));
        let d = pol
            .decide_retrieve(
                &p,
                &retrieve(Some(UidLevel::Instance), &[], &[], &["I1"], None),
                &lookup,
                &ehr,
                SystemTime::now(),
            )
            .await;
        let Decision::Allow(a) = d else {
            panic!("{d:?}")
        };
        assert_eq!(a.studies, StudyGate::Within(vec!["S1".into()]));
        let id = |p, study, instance| InstanceId {
            patient_id: Some(p),
            study,
            instance,
            ..InstanceId::default()
        };
        assert!(a.admits_instance(&id("A", Some("S1"), Some("I1"))));
        assert!(!a.admits_instance(&id("A", Some("S2"), Some("I1"))));
        assert!(!a.admits_instance(&id("A", None, Some("I1"))));
        assert!(!a.admits_instance(&id("B", Some("S1"), Some("I1"))));
        // only what the request named comes back
        assert!(!a.admits_instance(&id("A", Some("S1"), Some("I2"))));
        // Without a study restriction, nothing about studies is asked.
        let open = principal("patient/ImagingStudy.rs", Some("A"));
        let d = pol
            .decide_retrieve(
                &open,
                &retrieve(Some(UidLevel::Study), &["S1"], &[], &[], None),
                &lookup,
                &ehr,
                SystemTime::now(),
            )
            .await;
        let Decision::Allow(a) = d else {
            panic!("{d:?}")
        };
        assert_eq!(a.studies, StudyGate::Open);
        let own = InstanceId {
            patient_id: Some("A"),
            study: Some("S1"),
            ..InstanceId::default()
        };
        assert!(a.admits_instance(&own));
        assert!(!a.admits_instance(&InstanceId {
            study: Some("S2"),
            ..own
        }));
        // PATIENT level cannot be judged per study: refused.
        let d = pol
            .decide_retrieve(
                &p,
                &retrieve(None, &[], &[], &[], Some("A")),
                &lookup,
                &ehr,
                SystemTime::now(),
            )
            .await;
        assert!(
            matches!(d, Decision::Deny(Denial::BadIdentifier(_))),
            "{d:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn write_constraints_are_judged_on_the_instance() {
        let pol = Policy::bare(&cfg("deny"));
        let ehr = FakeEhr::default();
        let lookup = FakePacs { fail: false };
        let w = principal(
            "patient/ImagingStudy.c?modality=CT&started=ge2024",
            Some("A"),
        );
        let st = |modality, date| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some("A"),
            issuer: None,
            study_uid: Some("NEW"),
            series_uid: Some("NEWR"),
            modality,
            study_date: date,
        };
        let now = SystemTime::now();
        assert!(matches!(
            pol.decide_store(&w, &st(Some("CT"), Some("20240301")), &lookup, &ehr, now)
                .await,
            Decision::Allow(_)
        ));
        for (m, d) in [
            (Some("MR"), Some("20240301")),
            (Some("CT"), Some("20230301")),
            (None, Some("20240301")),
            (Some("CT"), None),
        ] {
            assert_eq!(
                pol.decide_store(&w, &st(m, d), &lookup, &ehr, now).await,
                Decision::Deny(Denial::OutsideStudies),
                "{m:?} {d:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_cannot_widen_a_restricted_read() {
        let pol = Policy::bare(&cfg("deny"));
        let ehr = FakeEhr::default();
        let lookup = FakePacs { fail: false };
        let w = principal("patient/ImagingStudy.crs?modality=CT", Some("A"));
        let into = |study| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some("A"),
            study_uid: Some(study),
            series_uid: Some("NEWR"),
            modality: Some("CT"),
            study_date: Some("20240101"),
            ..StoreRequest::default()
        };
        let now = SystemTime::now();
        assert_eq!(
            pol.decide_store(&w, &into("S2"), &lookup, &ehr, now).await,
            Decision::Deny(Denial::OutsideStudies),
            "S2 is an MR study: a CT instance must not make it readable"
        );
        assert!(matches!(
            pol.decide_store(&w, &into("S1"), &lookup, &ehr, now).await,
            Decision::Allow(_)
        ));
        assert!(matches!(
            pol.decide_store(&w, &into("NEW"), &lookup, &ehr, now).await,
            Decision::Allow(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn launch_context_restricts_to_its_study() {
        let pol = Policy::bare(&cfg("deny"));
        let ehr = FakeEhr::default();
        let mut p = principal("patient/ImagingStudy.rs", Some("A"));
        p.launch_studies = Some(vec![ContextStudy::Uid("S2".into())]);
        assert_eq!(
            reach(&pol, &p, &ehr).await,
            vec![("S1", false), ("S2", true)]
        );
        // A reference is resolved through the EHR (with the gateway's own token).
        let mut p = principal("patient/ImagingStudy.rs", Some("A"));
        p.launch_studies = Some(vec![ContextStudy::Reference("ctx1".into())]);
        assert_eq!(
            reach(&pol, &p, &ehr).await,
            vec![("S1", false), ("S2", false)],
            "unresolved: nothing"
        );
        pol.prepare(&mut p, &ehr).await;
        assert_eq!(p.launch_studies, Some(vec![ContextStudy::Uid("S1".into())]));
        assert_eq!(
            reach(&pol, &p, &ehr).await,
            vec![("S1", true), ("S2", false)]
        );
        // An unknown reference, or an EHR that fails, leaves nothing.
        for (id, fail) in [("nope", false), ("ctx2", true)] {
            let mut p = principal("patient/ImagingStudy.rs", Some("A"));
            p.launch_studies = Some(vec![ContextStudy::Reference(id.into())]);
            let ehr = FakeEhr {
                fail,
                ..FakeEhr::default()
            };
            pol.prepare(&mut p, &ehr).await;
            assert_eq!(p.launch_studies, Some(vec![ContextStudy::Unknown]));
            assert_eq!(
                reach(&pol, &p, &FakeEhr::default()).await,
                vec![("S1", false), ("S2", false)]
            );
        }
        // Constraints and context together: both must hold.
        let mut p = principal("patient/ImagingStudy.rs?modality=MR", Some("A"));
        p.launch_studies = Some(vec![ContextStudy::Uid("S1".into())]);
        assert_eq!(
            reach(&pol, &p, &ehr).await,
            vec![("S1", false), ("S2", false)]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ehr_check_asks_the_ehr_with_the_callers_token() {
        let user = principal("user/ImagingStudy.rs", None);
        // deny and allow as before
        assert_eq!(
            Policy::bare(&cfg("deny")).access(&user),
            Err(Denial::UserLevelNotAllowed)
        );
        let ehr = FakeEhr {
            visible: vec!["S2", "S3"],
            ..FakeEhr::default()
        };
        assert_eq!(
            reach(&Policy::bare(&cfg("allow")), &user, &ehr).await,
            vec![("S1", true), ("S2", true)]
        );
        let pol = Policy::bare(&cfg("ehr-check"));
        let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            reach(&pol, &user, &ehr).await,
            vec![("S1", false), ("S2", true)]
        );
        let asked = ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert_eq!(asked, 2, "one search per study, then cached (yes and no)");
        // Another patient's study, shown by the EHR: allowed for the user.
        let d = pol
            .decide_retrieve(
                &user,
                &retrieve(Some(UidLevel::Series), &[], &["R3"], &[], None),
                &FakePacs { fail: false },
                &ehr,
                SystemTime::now(),
            )
            .await;
        assert!(matches!(d, Decision::Allow(_)), "{d:?}");
        // The cache is per token: another token is asked about again.
        let other = principal("user/ImagingStudy.rs system/ImagingStudy.rs", None);
        reach(&pol, &other, &ehr).await;
        assert!(ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before > 3);
        // A failing EHR denies, and is asked again next time (failures are not cached).
        let down = FakeEhr {
            fail: true,
            ..FakeEhr::default()
        };
        let fresh = principal("user/ImagingStudy.rs user/Patient.rs", None);
        let d = pol
            .decide_retrieve(
                &fresh,
                &retrieve(Some(UidLevel::Study), &["S1"], &[], &[], None),
                &FakePacs { fail: false },
                &down,
                SystemTime::now(),
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::EhrUnavailable));
        let a = match pol.decide_at(
            &fresh,
            &Action::Query(QueryRequest::with_patient(None)),
            SystemTime::now(),
        ) {
            Decision::Allow(a) => a,
            d => panic!("{d:?}"),
        };
        assert!(
            !pol.admits_result(
                &fresh,
                &a,
                ResultStudy::uid(Some("S2")),
                &mut StudyMemo::default(),
                &FakePacs { fail: false },
                &down
            )
            .await
        );
        assert!(
            pol.admits_result(
                &fresh,
                &a,
                ResultStudy::uid(Some("S2")),
                &mut StudyMemo::default(),
                &FakePacs { fail: false },
                &ehr
            )
            .await
        );
        // One request stops asking after the first failure, and judges each study once.
        let mut memo = StudyMemo::default();
        let before = down.searches.load(std::sync::atomic::Ordering::Relaxed);
        for st in ["S1", "S2", "S3", "S1"] {
            assert!(
                !pol.admits_result(
                    &fresh,
                    &a,
                    ResultStudy::uid(Some(st)),
                    &mut memo,
                    &FakePacs { fail: false },
                    &down
                )
                .await
            );
        }
        assert_eq!(
            down.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
            1
        );
        assert_eq!(memo.stopped, Some("the EHR could not be asked"));
        let mut memo = StudyMemo::default();
        let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
        let other_user = principal("user/ImagingStudy.rs user/Observation.rs", None);
        for st in ["S2", "S3", "S2", "S3"] {
            pol.admits_result(
                &other_user,
                &a,
                ResultStudy::uid(Some(st)),
                &mut memo,
                &FakePacs { fail: false },
                &ehr,
            )
            .await;
        }
        assert_eq!(
            ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
            2
        );
        // A search's studies are asked about in batches first, then judged from the cache.
        let batcher = principal("user/ImagingStudy.rs user/Encounter.rs", None);
        let Decision::Allow(a) = pol.decide_at(
            &batcher,
            &Action::Query(QueryRequest::with_patient(None)),
            SystemTime::now(),
        ) else {
            panic!()
        };
        let uids: Vec<String> = (0..120)
            .map(|n| format!("X{n}"))
            .chain(["S2".to_string(), "S3".to_string()])
            .collect();
        let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
        pol.prefetch_ehr(&batcher, &a, &uids, &StudyMemo::default(), &ehr)
            .await;
        assert_eq!(
            ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
            uids.len().div_ceil(EHR_BATCH)
        );
        let mut memo = StudyMemo::default();
        for u in &uids {
            let shown = pol
                .admits_result(
                    &batcher,
                    &a,
                    ResultStudy::uid(Some(u)),
                    &mut memo,
                    &FakePacs { fail: false },
                    &ehr,
                )
                .await;
            assert_eq!(shown, u == "S2" || u == "S3", "{u}");
        }
        assert_eq!(
            ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
            uids.len().div_ceil(EHR_BATCH),
            "all from the cache"
        );
        // Once judging stopped, nothing more is asked.
        let stopped = StudyMemo {
            stopped: Some("the EHR could not be asked"),
            ..StudyMemo::default()
        };
        let quiet = principal("user/ImagingStudy.rs user/Location.rs", None);
        let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
        pol.prefetch_ehr(&quiet, &a, &uids, &stopped, &ehr).await;
        assert_eq!(
            ehr.searches.load(std::sync::atomic::Ordering::Relaxed),
            before
        );
        // A paged answer settles only the studies it shows; the rest are asked alone.
        let paged = FakeEhr {
            visible: vec!["S2"],
            paged: true,
            ..FakeEhr::default()
        };
        let third = principal("user/ImagingStudy.rs user/Device.rs", None);
        pol.prefetch_ehr(
            &third,
            &a,
            &["S2".into(), "S3".into()],
            &StudyMemo::default(),
            &paged,
        )
        .await;
        let mut memo = StudyMemo::default();
        for (u, expected) in [("S2", true), ("S3", false)] {
            let shown = pol
                .admits_result(
                    &third,
                    &a,
                    ResultStudy::uid(Some(u)),
                    &mut memo,
                    &FakePacs { fail: false },
                    &paged,
                )
                .await;
            assert_eq!(shown, expected, "{u}");
        }
        assert_eq!(
            paged.searches.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "one batch, then S3 alone"
        );
        // A patient-level token under ehr-check is judged as before, without the EHR.
        let pat = principal("patient/ImagingStudy.rs", Some("A"));
        assert_eq!(
            reach(&pol, &pat, &down).await,
            vec![("S1", true), ("S2", true)]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_patient_write_scope_writes_for_its_patient_only_under_allow() {
        let pol = Policy::bare(&cfg("allow"));
        let p = principal("user/ImagingStudy.rs patient/ImagingStudy.c", Some("A"));
        let a = pol.access(&p).unwrap();
        assert_eq!(a.patients, PatientFilter::Any);
        assert!(a.write.is_some());
        let st = |pid| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some(pid),
            study_uid: Some("NEWX"),
            series_uid: Some("NEWXR"),
            ..StoreRequest::default()
        };
        let (lookup, ehr, now) = (
            FakePacs { fail: false },
            FakeEhr::default(),
            SystemTime::now(),
        );
        assert!(matches!(
            pol.decide_store(&p, &st("A"), &lookup, &ehr, now).await,
            Decision::Allow(_)
        ));
        assert_eq!(
            pol.decide_store(&p, &st("B"), &lookup, &ehr, now).await,
            Decision::Deny(Denial::ForeignPatient)
        );
        let both = principal("user/ImagingStudy.rs user/ImagingStudy.c", Some("A"));
        assert!(matches!(
            pol.decide_store(&both, &st("B"), &lookup, &ehr, now).await,
            Decision::Allow(_)
        ));
    }

    /// Counts the look-ups that reach the PACS.
    struct CountingPacs(std::sync::atomic::AtomicUsize);

    impl OwnerLookup for CountingPacs {
        fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move { FakePacs { fail: false }.owner(level, uid).await })
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_instance_named_under_its_study_and_series_costs_one_look_up() {
        let pol = Policy::bare(&cfg("deny"));
        let a = principal("patient/ImagingStudy.rs", Some("A"));
        let pacs = CountingPacs(Default::default());
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(Some(UidLevel::Instance), &["S1"], &["R1"], &["I1"], None),
                &pacs,
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert!(matches!(d, Decision::Allow(_)), "{d:?}");
        assert_eq!(pacs.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A study the instances do not cover is still looked up, and judged.
        let pol = Policy::bare(&cfg("deny"));
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(
                    Some(UidLevel::Instance),
                    &["S1", "S3"],
                    &["R1"],
                    &["I1"],
                    None,
                ),
                &pacs,
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::NotOwned(UidLevel::Study)));
        // Each UID once; the request's own level always; the first refusal ends the work.
        let count = |pacs: &CountingPacs| pacs.0.load(std::sync::atomic::Ordering::Relaxed);
        for (req, looked_up) in [
            (
                retrieve(
                    Some(UidLevel::Instance),
                    &[],
                    &[],
                    &["I1", "I1", "I1"],
                    None,
                ),
                1,
            ),
            (
                retrieve(Some(UidLevel::Study), &["S1"], &[], &["I1"], None),
                2,
            ),
        ] {
            let pol = Policy::bare(&cfg("deny"));
            let pacs = CountingPacs(Default::default());
            let d = pol
                .decide_retrieve(&a, &req, &pacs, &FakeEhr::default(), SystemTime::now())
                .await;
            assert!(matches!(d, Decision::Allow(_)), "{d:?}");
            assert_eq!(count(&pacs), looked_up);
        }
        let unknown: Vec<String> = (0..100).map(|n| format!("U{n}")).collect();
        let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
        let pacs = CountingPacs(Default::default());
        let d = Policy::bare(&cfg("deny"))
            .decide_retrieve(
                &a,
                &retrieve(Some(UidLevel::Instance), &[], &[], &unknown, None),
                &pacs,
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::NotOwned(UidLevel::Instance)));
        assert_eq!(count(&pacs), LOOKUPS_PER_REQUEST);
        // An instance under a series it is not in: refused on the instance's own owner.
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(Some(UidLevel::Instance), &["S1"], &["R3"], &["I1"], None),
                &pacs,
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::Hierarchy));
    }

    #[test]
    fn bearer_is_never_printed() {
        let p = principal("patient/ImagingStudy.rs", Some("A"));
        let printed = format!("{p:?} {p}");
        assert!(!printed.contains("token-patient"), "{printed}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn use_issuer_matches_patient_id_and_issuer() {
        let cfg = |use_issuer: bool| {
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
[patients]
map = "claim"
claim = "pid"
use_issuer = {use_issuer}
{}
"#,
                if use_issuer {
                    "issuer_names = { \"urn:oid:1.2.3\" = \"HOSP_A\" }"
                } else {
                    ""
                }
            ))
            .unwrap()
        };
        let mut p = principal("patient/ImagingStudy.rs", Some("EHR-1"));
        p.claims = Arc::new(serde_json::json!({"pid": ["P1^^^&1.2.3&ISO", "P2^^^NSB", "P3"]}));
        let pol = Policy::bare(&cfg(true));
        let Decision::Allow(a) = query(&pol, &p, None) else {
            panic!()
        };
        assert_eq!(a.query_patient_ids, vec!["P1", "P2", "P3"]);
        assert!(a.filter.compares_issuer());
        for (pid, issuer, admitted) in [
            ("P1", Some("HOSP_A"), true),
            ("P1", Some("1.2.3"), true),
            ("P1", Some("urn:oid:1.2.3 "), true),
            ("P1", Some("HOSP_B"), false),
            ("P1", None, false),
            ("P1", Some(""), false),
            ("P2", Some("NSB"), true),
            ("P2", Some("nsb"), false),
            ("P3", None, true),
            ("P3", Some("  "), true),
            ("P3", Some("HOSP_A"), false),
            ("P4", Some("HOSP_A"), false),
        ] {
            assert_eq!(
                a.filter.admits(Some(pid), issuer),
                admitted,
                "{pid} {issuer:?}"
            );
        }
        // Without use_issuer the issuer is not compared.
        let Decision::Allow(a) = query(&Policy::bare(&cfg(false)), &p, None) else {
            panic!()
        };
        assert!(!a.filter.compares_issuer());
        assert!(a.filter.admits(Some("P1"), Some("HOSP_B")));
        // Stores: the instance's issuer counts, and an existing study of the same PatientID
        // under another issuer is another patient's.
        let w = {
            let mut w = principal("patient/ImagingStudy.c", Some("EHR-1"));
            w.claims = p.claims.clone();
            w
        };
        let st = |issuer| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some("A"),
            issuer,
            study_uid: Some("S1"),
            series_uid: Some("R1"),
            ..StoreRequest::default()
        };
        let mut wa = w.clone();
        wa.claims = Arc::new(serde_json::json!({"pid": "A^^^HOSP_X"}));
        let ehr = FakeEhr::default();
        let lookup = FakePacs { fail: false };
        let now = SystemTime::now();
        assert_eq!(
            pol.decide_store(&wa, &st(Some("HOSP_X")), &lookup, &ehr, now)
                .await,
            Decision::Deny(Denial::ForeignStudy),
            "S1 is held under A without an issuer"
        );
        assert_eq!(
            pol.decide_store(&wa, &st(Some("HOSP_Y")), &lookup, &ehr, now)
                .await,
            Decision::Deny(Denial::ForeignPatient)
        );
        // What a store proved is remembered with its issuer: the same PatientID without an
        // issuer is another patient, for stores and retrievals alike.
        pol.remember_stored(&StoreRequest {
            instance_uid: Some("NEWSI"),
            patient_id: Some("A"),
            issuer: Some("HOSP_X"),
            study_uid: Some("NEWS"),
            series_uid: Some("NEWSR"),
            ..StoreRequest::default()
        })
        .await;
        let into_news = |issuer| StoreRequest {
            instance_uid: Some("NEWI"),
            patient_id: Some("A"),
            issuer,
            study_uid: Some("NEWS"),
            series_uid: Some("NEWSR"),
            ..StoreRequest::default()
        };
        assert!(matches!(
            pol.decide_store(&wa, &into_news(Some("HOSP_X")), &lookup, &ehr, now)
                .await,
            Decision::Allow(_)
        ));
        let mut bare = w.clone();
        bare.claims = Arc::new(serde_json::json!({"pid": "A"}));
        assert_eq!(
            pol.decide_store(&bare, &into_news(None), &lookup, &ehr, now)
                .await,
            Decision::Deny(Denial::ForeignStudy)
        );
        let mut bare_reader = principal("patient/ImagingStudy.rs", Some("EHR-1"));
        bare_reader.claims = bare.claims.clone();
        let d = pol
            .decide_retrieve(
                &bare_reader,
                &retrieve(Some(UidLevel::Study), &["NEWS"], &[], &[], None),
                &lookup,
                &ehr,
                now,
            )
            .await;
        assert_eq!(d, Decision::Deny(Denial::NotOwned(UidLevel::Study)));
    }
}
