//! The policy core: a [`Principal`] and an [`Action`] in, a [`Decision`] out. The one place that
//! allows or denies, for DIMSE and DICOMweb alike.
//!
//! Owns: what SMART scopes permit (imaging read = `r`+`s`, write = `c`, on ImagingStudy or `*`),
//! patient-level versus user/system-level access (`[policy] user_level`), token expiry on every
//! operation, the mapping of the token's patient to DICOM patient identities (`[patients] map`),
//! how a patient-scoped query is narrowed, and whether a PatientID found in data belongs to the
//! caller. Must not know sockets, PDUs or HTTP: front ends translate their protocol into an
//! `Action` and apply the `Decision`.

pub mod mapping;

use crate::config::{Config, PatientMap, UserLevel};
use crate::trust::Principal;
use crate::trust::scopes::Level;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// The level of a DICOM unique identifier in the patient/study/series/instance hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UidLevel {
    Study,
    Series,
    Instance,
}

/// Who a study, series or instance belongs to, as the PACS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub patient_id: String,
    pub issuer: Option<String>,
    pub study_uid: String,
    pub series_uid: Option<String>,
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

/// Fetches a patient's FHIR resource from the EHR of an issuer (with the gateway's own
/// credentials). Implemented by the trust core; the policy core only picks identifiers.
pub trait PatientDirectory: Send + Sync {
    fn patient<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a>;
}

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

/// A store (C-STORE, STOW-RS) as the policy core sees it: what the instance says of itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreRequest<'a> {
    pub patient_id: Option<&'a str>,
    pub study_uid: Option<&'a str>,
    pub series_uid: Option<&'a str>,
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
    /// For queries: the PatientID matching values the query must carry upstream, one query per
    /// value (empty: leave the caller's key as it is).
    pub query_patient_ids: Vec<String>,
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
    /// The token's patient maps to no DICOM identity.
    Unmapped,
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
            Denial::Unmapped => write!(
                f,
                "the token's patient maps to no DICOM patient (patients.map)"
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

/// Owners cached at most this long: a study's patient rarely changes, but it can (a merge
/// or correction in the PACS), so the cache stays short.
const OWNER_TTL: Duration = Duration::from_secs(60);
/// Owners cached at most this many.
const OWNER_CACHE_ENTRIES: u64 = 20_000;

/// A patient's identifiers are looked up again after this long.
const FHIR_TTL: Duration = Duration::from_secs(300);
const FHIR_CACHE_ENTRIES: u64 = 50_000;

/// The policy core.
pub struct Policy {
    user_level: UserLevel,
    write: bool,
    map: PatientMap,
    /// The mapping table, when `map = "table"`.
    table: Option<mapping::TableSource>,
    /// FHIR Patient resources by (issuer, patient id), when `map = "fhir"`.
    fhir_cache: moka::future::Cache<(String, String), Arc<serde_json::Value>>,
    /// The C-MOVE destinations clients may name.
    destinations: Vec<crate::config::Destination>,
    /// Positive ownership answers only: an unknown UID may be stored a moment later.
    owners: moka::future::Cache<(UidLevel, String), Arc<Owner>>,
}

impl Policy {
    pub fn new(cfg: &Config) -> Policy {
        Policy {
            user_level: cfg.policy.user_level,
            write: cfg.policy.write,
            map: cfg.patients.map.clone(),
            table: match &cfg.patients.map {
                PatientMap::Table(path) => Some(mapping::TableSource::new(path.clone())),
                _ => None,
            },
            destinations: cfg.destinations.clone(),
            fhir_cache: moka::future::Cache::builder()
                .max_capacity(FHIR_CACHE_ENTRIES)
                .time_to_live(FHIR_TTL)
                .build(),
            owners: moka::future::Cache::builder()
                .max_capacity(OWNER_CACHE_ENTRIES)
                .time_to_live(OWNER_TTL)
                .build(),
        }
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
        match lookup.owner(level, uid).await {
            Ok(Some(o)) => {
                let o = Arc::new(o);
                self.owners.insert(key, o.clone()).await;
                Ok(Some(o))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(level = ?level, error = %e, "ownership lookup failed; denying");
                Err(Denial::LookupFailed)
            }
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
    pub async fn remember_stored(
        &self,
        study_uid: &str,
        series_uid: Option<&str>,
        patient_id: &str,
    ) {
        let owner = |series: Option<&str>| {
            Arc::new(Owner {
                patient_id: patient_id.to_string(),
                issuer: None,
                study_uid: study_uid.to_string(),
                series_uid: series.map(str::to_string),
            })
        };
        self.owners
            .insert((UidLevel::Study, study_uid.to_string()), owner(None))
            .await;
        if let Some(s) = series_uid {
            self.owners
                .insert((UidLevel::Series, s.to_string()), owner(Some(s)))
                .await;
        }
    }

    /// Decides a retrieval: every UID named is resolved against the PACS and must belong to an
    /// allowed patient (and to the study or series it is named under); the decision is made on
    /// what the UIDs resolve to, never on a PatientID key the caller sent. At PATIENT level the
    /// PatientID key is narrowed like a query's.
    pub async fn decide_retrieve(
        &self,
        p: &Principal,
        req: &RetrieveRequest<'_>,
        lookup: &dyn OwnerLookup,
        now: SystemTime,
    ) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        if !access.read {
            return Decision::Deny(Denial::InsufficientScope(
                "imaging read (patient/ImagingStudy.rs)",
            ));
        }
        let Some(level) = req.level else {
            return match &access.patients {
                PatientFilter::Any => match req.patient_id.map(|v| v.trim_matches(' ')) {
                    Some(v) if !v.is_empty() && !v.contains(['*', '?', '\\']) => {
                        Decision::Allow(Allowed {
                            query_patient_ids: Vec::new(),
                            filter: PatientFilter::Any,
                        })
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
        let groups = [
            (UidLevel::Study, &req.study_uids),
            (UidLevel::Series, &req.series_uids),
            (UidLevel::Instance, &req.instance_uids),
        ];
        for (l, uids) in groups {
            for uid in uids.iter() {
                let owner = match self.owner(lookup, l, uid).await {
                    Ok(Some(o)) => o,
                    Ok(None) => return Decision::Deny(Denial::NotOwned(l)),
                    Err(d) => return Decision::Deny(d),
                };
                if !access.patients.admits(Some(&owner.patient_id)) {
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
            }
        }
        Decision::Allow(Allowed {
            query_patient_ids: Vec::new(),
            filter: access.patients,
        })
    }

    /// Decides a store: the token must grant write, the instance's PatientID must be an allowed
    /// patient's, and a study or series it names that the PACS already holds must be that
    /// patient's too (no writing into another patient's study).
    pub async fn decide_store(
        &self,
        p: &Principal,
        req: &StoreRequest<'_>,
        lookup: &dyn OwnerLookup,
        now: SystemTime,
    ) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        if !access.write {
            return Decision::Deny(Denial::NoWrite);
        }
        let pid = req.patient_id.map(|v| v.trim_matches(' ')).unwrap_or("");
        if pid.is_empty() || pid.contains('\\') || !access.patients.admits(Some(pid)) {
            return Decision::Deny(Denial::ForeignPatient);
        }
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
            match self.owner(lookup, l, uid).await {
                Ok(None) => {}
                Ok(Some(o)) => {
                    if !crate::policy::lo_eq(&o.patient_id, pid) {
                        return Decision::Deny(Denial::ForeignStudy);
                    }
                }
                Err(d) => return Decision::Deny(d),
            }
        }
        Decision::Allow(Allowed {
            query_patient_ids: Vec::new(),
            filter: access.patients,
        })
    }

    /// The DICOM identities of the token's patient.
    /// The DICOM identities of the patient the token names: `None` without patient context,
    /// an empty list when the patient maps to nothing (which grants nothing).
    fn map_patient(&self, p: &Principal) -> Option<Vec<DicomPatient>> {
        match &self.map {
            PatientMap::Same => p.patient.as_ref().map(|id| {
                vec![DicomPatient {
                    patient_id: id.clone(),
                    issuer: None,
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

    /// Fetches what the mapping needs from the EHR before decisions are made (for
    /// `map = "fhir"`: the Patient resource, cached). A failed look-up leaves the principal
    /// mapped to nothing, which grants nothing.
    pub async fn prepare(&self, p: &mut Principal, directory: &dyn PatientDirectory) {
        if !matches!(self.map, PatientMap::Fhir { .. }) {
            return;
        }
        let Some(id) = p.patient.clone() else { return };
        let key = (p.issuer.clone(), id.clone());
        if let Some(r) = self.fhir_cache.get(&key).await {
            p.fhir_patient = Some(Some(r));
            return;
        }
        p.fhir_patient = Some(match directory.patient(&p.issuer, &id).await {
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
        let patient_perms = p.scopes.granted(Level::Patient, IMAGING);
        let mut user_perms = p.scopes.granted(Level::User, IMAGING);
        let system_perms = p.scopes.granted(Level::System, IMAGING);
        user_perms.read |= system_perms.read;
        user_perms.search |= system_perms.search;
        user_perms.create |= system_perms.create;

        // Patient-level scopes apply to the patient in context, and to nobody else.
        let mapped = self.map_patient(p);
        if let Some(ids) = &mapped {
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
                if ids.is_empty() {
                    return Err(Denial::Unmapped);
                }
                return Ok(Access {
                    read,
                    write,
                    patients: PatientFilter::Only(ids.clone()),
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
        if mapped.is_none() && patient_level_grant {
            return Err(Denial::NoPatientContext);
        }
        Err(Denial::InsufficientScope(
            "imaging access (patient/ImagingStudy.rs or .c)",
        ))
    }

    /// Decides one action at time `now`.
    pub fn decide(&self, p: &Principal, action: Action<'_>, now: SystemTime) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        match action {
            Action::Connect | Action::Echo => Decision::Allow(Allowed {
                query_patient_ids: Vec::new(),
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
                        query_patient_ids: Vec::new(),
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
    if ids.is_empty() {
        return Decision::Deny(Denial::Unmapped);
    }
    let allow = |pids: Vec<String>| {
        Decision::Allow(Allowed {
            query_patient_ids: pids,
            filter: filter.clone(),
        })
    };
    let value = requested.map(|v| v.trim_matches(' ')).unwrap_or("");
    if value.is_empty() || value == "*" {
        return allow(ids.iter().map(|p| p.patient_id.clone()).collect());
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
            claims: Arc::new(serde_json::json!({})),
            fhir_patient: None,
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
                assert!(a.query_patient_ids.is_empty());
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
                    Some(Owner {
                        patient_id: p.into(),
                        issuer: None,
                        study_uid: st.into(),
                        series_uid: se.map(str::to_string),
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
        pol.decide_retrieve(p, &r, &FakePacs { fail: false }, SystemTime::now())
            .await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retrieval_is_decided_on_what_uids_resolve_to() {
        let pol = Policy::new(&cfg("deny"));
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
                SystemTime::now(),
            )
            .await;
        assert!(matches!(d, Decision::Allow(_)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stores_need_write_and_own_studies() {
        let pol = Policy::new(&cfg("deny"));
        let lookup = FakePacs { fail: false };
        let w = principal("patient/ImagingStudy.cruds", Some("A"));
        let st = |pid, study, series| StoreRequest {
            patient_id: Some(pid),
            study_uid: Some(study),
            series_uid: Some(series),
        };
        let now = SystemTime::now();
        assert!(matches!(
            pol.decide_store(&w, &st("A", "S1", "R1"), &lookup, now)
                .await,
            Decision::Allow(_)
        ));
        assert!(matches!(
            pol.decide_store(&w, &st("A", "NEW", "NEWR"), &lookup, now)
                .await,
            Decision::Allow(_)
        ));
        assert_eq!(
            pol.decide_store(&w, &st("B", "NEW", "NEWR"), &lookup, now)
                .await,
            Decision::Deny(Denial::ForeignPatient)
        );
        assert_eq!(
            pol.decide_store(&w, &st("A", "S3", "NEWR"), &lookup, now)
                .await,
            Decision::Deny(Denial::ForeignStudy)
        );
        assert_eq!(
            pol.decide_store(&w, &st("A", "NEW", "R3"), &lookup, now)
                .await,
            Decision::Deny(Denial::ForeignStudy)
        );
        let r = principal("patient/ImagingStudy.rs", Some("A"));
        assert_eq!(
            pol.decide_store(&r, &st("A", "S1", "R1"), &lookup, now)
                .await,
            Decision::Deny(Denial::NoWrite)
        );
        let d = pol
            .decide_store(&w, &st("A", "NEW2", "R"), &FakePacs { fail: true }, now)
            .await;
        assert_eq!(d, Decision::Deny(Denial::LookupFailed));
    }

    #[test]
    fn several_identities_narrow_to_several_queries() {
        let ids = vec![
            DicomPatient {
                patient_id: "A".into(),
                issuer: None,
            },
            DicomPatient {
                patient_id: "B".into(),
                issuer: None,
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
        assert!(f.admits(Some("A")) && f.admits(Some("B")) && !f.admits(Some("C")));
    }

    #[test]
    fn claim_mapping_denies_a_patient_that_maps_to_nothing() {
        let mut c = cfg("deny");
        c.patients.map = PatientMap::Claim("dicom_patient_id".into());
        let pol = Policy::new(&c);
        let mut p = principal("patient/ImagingStudy.rs", Some("EHR-1"));
        assert_eq!(
            pol.decide(&p, Action::Connect, SystemTime::now()),
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
        let pol = Policy::new(&c);
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
}
