//! The policy core: a [`Caller`] and an [`Action`] in, a [`Permit`] or a [`Denial`] out. The
//! one place that allows or denies, for DIMSE and DICOMweb alike.
//!
//! Owns: its ports ([`Ports`]: the PACS's ownership answers, the EHR, the clock), turning a
//! verified principal into a [`Caller`] once, and every decision, one concern per file: what
//! SMART scopes permit and token expiry ([`access`]), the patients a caller may see and how a
//! query is narrowed ([`patient`], [`mapping`]), study restrictions ([`study`]), who owns a UID
//! ([`owners`]), what the EHR shows ([`ehr`]), queries and the one judge of their results
//! ([`query`]), retrievals ([`retrieve`]), stores ([`store`]), what a token of the gateway's
//! own may carry ([`exchange`]), and what a decision is ([`decision`]). Must not know sockets, PDUs or HTTP: front ends translate their protocol
//! into an `Action` and apply the `Permit`.

mod access;
mod decision;
mod ehr;
pub mod exchange;
pub mod mapping;
mod owners;
mod patient;
pub mod query;
mod retrieve;
mod store;
mod study;

pub use access::Access;
use decision::Decision;
pub use decision::{Denial, DenialKind, InstanceId, Named, Permit};
pub use ehr::{DirectoryFuture, EhrDirectory, study_uid_of};
use owners::Within;
pub use owners::{HoldsFuture, LookupError, LookupFuture, MAX_OWNERS, Owner, OwnerLookup};
#[cfg(test)]
use owners::{OneOwner, OneOwnerFuture};
use patient::narrow_query;
pub use patient::{DicomPatient, PatientFilter, lo_eq};
use query::ResultStudy;
pub use query::{
    EHR_BATCH, MAX_STUDIES_JUDGED, MatchView, ResultJudge, ResultKey, StudyMemo, Tally, Verdict,
};
#[cfg(test)]
use retrieve::LOOKUPS_PER_REQUEST;
pub use retrieve::MAX_UIDS_PER_REQUEST;
pub use study::{StudyFacts, StudyGate, StudyRule};

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

/// The level of a DICOM unique identifier in the patient/study/series/instance hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UidLevel {
    Study,
    Series,
    Instance,
}

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

impl<'a> StoreRequest<'a> {
    /// What an instance read by the strict reader says of itself, for the write decision.
    pub fn of(h: &'a crate::dicom::head::InstanceHead) -> StoreRequest<'a> {
        StoreRequest {
            instance_uid: h.sop_instance.as_deref(),
            patient_id: h.patient_id.as_deref(),
            issuer: h.issuer.as_deref(),
            study_uid: h.study.as_deref(),
            series_uid: h.series.as_deref(),
            modality: h.modality.as_deref(),
            study_date: h.study_date.as_deref(),
        }
    }
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
    /// The studies the query searches inside (a QIDO-RS search under `/studies/{uid}` or with
    /// `StudyInstanceUID` below the study level, a C-FIND below STUDY level naming Study
    /// Instance UIDs), and the series (under `/series/{uid}`, or named at IMAGE level). A look
    /// into studies and series is judged like a retrieval of them before the query runs.
    pub inside_studies: &'a [&'a str],
    pub inside_series: &'a [&'a str],
    /// The caller matches on ModalitiesInStudy or StudyDate, or shifts dates with a timezone
    /// offset: a PACS may echo a matching value back instead of the study's own, so the
    /// matches' values of them are not the study's facts.
    pub matches_on_facts: bool,
    /// The query goes to the PACS in the Patient Root model (there PatientID is the unique key
    /// above every level, allowed at each by the hierarchical model too).
    pub patient_root: bool,
    /// The query goes to the PACS as a C-FIND, so `pacs.query_model` applies to it (a QIDO-RS
    /// search relayed to the PACS's DICOMweb service is relational, and narrowed as such).
    pub by_dimse: bool,
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
    pub(crate) fn principal(&self) -> &Principal {
        &self.principal
    }
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
    /// The PACS enforces the hierarchical query model (`pacs.query_model`).
    hierarchical: bool,
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
            hierarchical: cfg.pacs.query_model == crate::config::QueryModel::Hierarchical,
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

    /// Records what a store the PACS confirmed proved: the PACS now holds this study, series
    /// and instance under the patient the store was decided for. Takes only the permit, so
    /// what is remembered is what was decided, never what a front end says afterwards.
    pub(crate) async fn stored(&self, permit: &Permit) {
        if let Some(placement) = &permit.stores {
            self.remember_placement(placement).await;
        }
    }

    /// The configured destination a C-MOVE may go to, by AE title (exact, padding aside); any
    /// other Move Destination is refused.
    pub(crate) fn move_destination(
        &self,
        ae_title: Option<&str>,
    ) -> Option<crate::config::Destination> {
        let ae = ae_title?.trim_matches(' ');
        self.destinations
            .iter()
            .find(|d| d.ae_title.trim_matches(' ') == ae)
            .cloned()
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

#[cfg(test)]
pub(crate) mod tests;
