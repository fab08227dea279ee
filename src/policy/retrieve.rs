//! Retrievals: C-GET, C-MOVE, WADO-RS and WADO-URI decided on what their UIDs resolve to.
//!
//! Owns: resolving every UID a retrieval names (lowest level first, a few at a time, bounded),
//! the hierarchy check, and the study restriction over every study reached.

#[allow(unused_imports)]
use super::*;

/// Look-ups one request runs at once (the PACS client allows a few more overall, so one
/// request cannot hold every slot).
pub(super) const LOOKUPS_PER_REQUEST: usize = 4;

/// The most UIDs one request may name; a request naming more is refused (bounded work).
pub const MAX_UIDS_PER_REQUEST: usize = 1000;

impl Policy {
    /// Decides a retrieval: every UID named is resolved against the PACS and must belong to an
    /// allowed patient (and to the study or series it is named under), and every study reached
    /// must pass the token's study restriction; the decision is made on what the UIDs resolve
    /// to, never on a PatientID key the caller sent. At PATIENT level the PatientID key is
    /// narrowed like a query's.
    pub(crate) async fn decide_retrieve(
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
        // A hierarchical PACS retrieves (and is asked about) a series inside one study and an
        // instance inside one study and one series (PS3.4 C.4.2.2.1.2).
        let within = Within {
            study: match req.study_uids.as_slice() {
                [one] => Some(one.as_str()),
                _ => None,
            },
            series: match req.series_uids.as_slice() {
                [one] => Some(one.as_str()),
                _ => None,
            },
        };
        if self.hierarchical {
            if level != UidLevel::Study && within.study.is_none() {
                return Decision::Deny(Denial::BadIdentifier(owners::HIERARCHY_NEEDS_STUDY));
            }
            if level == UidLevel::Instance && within.series.is_none() {
                return Decision::Deny(Denial::BadIdentifier(owners::HIERARCHY_NEEDS_SERIES));
            }
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
                    chunk
                        .iter()
                        .map(|uid| self.owner_within(lookup, l, uid, within)),
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
}
