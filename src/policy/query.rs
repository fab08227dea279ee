//! Queries: how a query is narrowed, what it must ask for back, and the one judge of its
//! results, for C-FIND, QIDO-RS and any later search alike.
//!
//! Owns: the query plan (the PatientID each upstream query carries, the return keys the
//! judgement needs, whether a match's ModalitiesInStudy and StudyDate may be trusted as its
//! study's facts), the look into a study a query searches inside, and [`ResultJudge`]: whether
//! each match may reach the caller (its patient and issuer, its study under a study restriction,
//! the EHR asked in batches) and what is stripped from it (patient-wide counts under a study
//! restriction). Front ends translate their matches into a protocol-neutral [`MatchView`] and
//! apply the verdicts. Must not know DICOM encodings, JSON or sockets.

use super::{
    Decision, EHR_BATCH, EhrDirectory, OwnerLookup, Permit, Policy, QueryLevel, QueryRequest,
    RetrieveRequest, StudyFacts, StudyGate, StudyMemo, UidLevel,
};
use crate::trust::Principal;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use std::time::SystemTime;

/// A return key a query must carry so its matches can be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKey {
    PatientId,
    IssuerOfPatientId,
    StudyInstanceUid,
    ModalitiesInStudy,
    StudyDate,
}

impl ResultKey {
    pub fn tag(self) -> Tag {
        match self {
            ResultKey::PatientId => tags::PATIENT_ID,
            ResultKey::IssuerOfPatientId => tags::ISSUER_OF_PATIENT_ID,
            ResultKey::StudyInstanceUid => tags::STUDY_INSTANCE_UID,
            ResultKey::ModalitiesInStudy => tags::MODALITIES_IN_STUDY,
            ResultKey::StudyDate => tags::STUDY_DATE,
        }
    }
}

/// Patient-level counts (Number of Patient Related Studies, Series, Instances): under a study
/// restriction they would tell of studies outside it, so matches lose them.
pub const PATIENT_COUNTS: [Tag; 3] = [
    Tag(0x0020, 0x1200),
    Tag(0x0020, 0x1202),
    Tag(0x0020, 0x1204),
];

/// What an allowed query must ask the PACS for, decided with the permit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueryPlan {
    /// Return keys the judgement needs, in a fixed order.
    keys: Vec<ResultKey>,
    /// Matches are studies whose ModalitiesInStudy and StudyDate are their study's facts.
    study_facts: bool,
    /// The study the query searches inside: a match that leaves its UID out is of this study.
    inside_study: Option<String>,
}

impl Permit {
    /// The return keys a query must ask for (and a front end that knows what the caller asked
    /// for strips again from each match when it added them).
    pub fn result_keys(&self) -> &[ResultKey] {
        &self.plan.keys
    }
}

/// A match as the PACS returned it, in protocol-neutral terms. Values as read, padding and all;
/// several values of PatientID or IssuerOfPatientID joined with `\` (so they never match).
#[derive(Debug, Clone, Default)]
pub struct MatchView {
    pub patient_id: Option<String>,
    /// `None`: the attribute is absent; `Some(None)`: present without a value ("none").
    pub issuer: Option<Option<String>>,
    pub study: Option<String>,
    /// ModalitiesInStudy, one entry per value.
    pub modalities: Vec<String>,
    pub study_date: Option<String>,
}

/// Whether a match may reach the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Another patient's, or its patient or issuer could not be established: an anomaly,
    /// since the query was narrowed to the caller's patient.
    OtherPatient,
    /// Outside the token's study restriction (expected: the restriction is narrower than the
    /// patient).
    OutsideStudies,
}

/// What one query's judging saw, for the audit trail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub admitted: usize,
    pub other_patient: usize,
    pub outside: usize,
}

/// Judges the matches of one allowed query, batch by batch, remembering each study's verdict.
pub struct ResultJudge<'a> {
    policy: &'a Policy,
    principal: &'a Principal,
    permit: &'a Permit,
    memo: StudyMemo,
    tally: Tally,
}

impl Policy {
    /// Decides a query: narrowed to the caller's patient, a look into the study it searches
    /// inside judged like a retrieval of it, and the plan of what to ask for back.
    pub(super) async fn decide_query(
        &self,
        p: &Principal,
        q: &QueryRequest<'_>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
        now: SystemTime,
    ) -> Decision {
        let mut permit = match self.decide_at(p, &super::Action::Query(*q), now) {
            Decision::Allow(a) => a,
            d => return d,
        };
        // A search inside a study or series is a look into that study: it must be the
        // caller's patient's, like a retrieval (refused for another patient's or an unknown
        // one, so nobody can probe which exist).
        if let Some(study) = q.inside_study {
            let req = RetrieveRequest {
                level: Some(if q.inside_series.is_some() {
                    UidLevel::Series
                } else {
                    UidLevel::Study
                }),
                patient_id: None,
                study_uids: vec![study.to_string()],
                series_uids: q.inside_series.iter().map(|s| s.to_string()).collect(),
                instance_uids: Vec::new(),
            };
            if let Decision::Deny(d) = self.decide_retrieve(p, &req, lookup, ehr, now).await {
                return Decision::Deny(d);
            }
        }
        let gated = !matches!(permit.studies, StudyGate::Open);
        let study_facts =
            q.level == QueryLevel::Study && permit.wants_study_facts() && !q.matches_on_facts;
        let issuer = permit.filter.compares_issuer();
        let mut keys = Vec::new();
        if !matches!(permit.filter, super::PatientFilter::Any) {
            keys.push(ResultKey::PatientId);
        }
        if issuer {
            keys.push(ResultKey::IssuerOfPatientId);
        }
        // The study tells under a restriction, and says whose a match is when its issuer is
        // missing (then the gateway's own look-up of the study says it).
        if (gated || issuer) && q.level != QueryLevel::Patient {
            keys.push(ResultKey::StudyInstanceUid);
        }
        if study_facts {
            keys.push(ResultKey::ModalitiesInStudy);
            keys.push(ResultKey::StudyDate);
        }
        permit.plan = QueryPlan {
            keys,
            study_facts,
            inside_study: q.inside_study.map(str::to_string),
        };
        Decision::Allow(permit)
    }

    /// The judge of an allowed query's matches.
    pub fn judge<'a>(&'a self, caller: &'a super::Caller, permit: &'a Permit) -> ResultJudge<'a> {
        ResultJudge {
            policy: self,
            principal: caller.principal(),
            permit,
            memo: StudyMemo::default(),
            tally: Tally::default(),
        }
    }
}

impl ResultJudge<'_> {
    /// How many matches are worth gathering before they are judged together: one EHR search
    /// asks about a whole batch under `user_level = "ehr-check"`; otherwise each is judged as
    /// it comes.
    pub fn batch(&self) -> usize {
        if self.permit.asks_ehr() { EHR_BATCH } else { 1 }
    }

    /// Whether admitted matches lose the patient-wide counts ([`PATIENT_COUNTS`]).
    pub fn strips_patient_counts(&self) -> bool {
        !matches!(self.permit.studies, StudyGate::Open)
    }

    /// What judging saw so far.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Why judging stopped early (every later match withheld), if it did.
    pub fn stopped(&self) -> Option<&'static str> {
        self.memo.stopped
    }

    /// Judges a batch of matches, in order. A match is admitted only when its patient is an
    /// allowed one and, where the issuer counts, its IssuerOfPatientID is known (from the match,
    /// or failing that from the gateway's own look-up of its study) and allowed; then, under a
    /// study restriction, its study must pass.
    pub async fn judge(&mut self, matches: &[MatchView]) -> Vec<Verdict> {
        let permit = self.permit;
        let mut verdicts = Vec::with_capacity(matches.len());
        for m in matches {
            let pid = m.patient_id.as_deref();
            let admitted = if permit.filter.compares_issuer() {
                let issuer = match &m.issuer {
                    Some(i) => Some(i.clone()),
                    None => match self.study_of(m) {
                        Some(st) => {
                            self.policy
                                .study_issuer(&*self.policy.ports.lookup, st)
                                .await
                        }
                        None => None,
                    },
                };
                issuer.is_some_and(|i| permit.filter.admits(pid, i.as_deref()))
            } else {
                permit.filter.admits(pid, None)
            };
            verdicts.push(if admitted {
                Verdict::Admit
            } else {
                Verdict::OtherPatient
            });
        }
        if !matches!(permit.studies, StudyGate::Open) {
            let (lookup, ehr) = (&*self.policy.ports.lookup, &*self.policy.ports.ehr);
            // With ehr-check, one EHR search asks about all these studies.
            let uids: Vec<String> = matches
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| **v == Verdict::Admit)
                .filter_map(|(m, _)| self.study_of(m).map(str::to_string))
                .collect();
            self.policy
                .prefetch_ehr(self.principal, permit, &uids, &self.memo, ehr)
                .await;
            for (m, v) in matches.iter().zip(verdicts.iter_mut()) {
                if *v != Verdict::Admit {
                    continue;
                }
                let facts = self.permit.plan.study_facts.then(|| facts_of(m));
                let study = self.study_of(m).map(str::to_string);
                let shown = self
                    .policy
                    .admits_result(
                        self.principal,
                        permit,
                        super::ResultStudy {
                            uid: study.as_deref(),
                            facts: facts.as_ref(),
                        },
                        &mut self.memo,
                        lookup,
                        ehr,
                    )
                    .await;
                if !shown {
                    *v = Verdict::OutsideStudies;
                }
            }
        }
        for v in &verdicts {
            match v {
                Verdict::Admit => self.tally.admitted += 1,
                Verdict::OtherPatient => self.tally.other_patient += 1,
                Verdict::OutsideStudies => self.tally.outside += 1,
            }
        }
        verdicts
    }

    /// A match's study: its own UID, else the study the query searched inside.
    fn study_of<'m>(&'m self, m: &'m MatchView) -> Option<&'m str> {
        m.study
            .as_deref()
            .map(|u| u.trim_end_matches(['\0', ' ']))
            .filter(|u| !u.is_empty())
            .or(self.permit.plan.inside_study.as_deref())
    }
}

/// A study-level match's facts: ModalitiesInStudy values without padding, StudyDate.
fn facts_of(m: &MatchView) -> StudyFacts {
    StudyFacts {
        modalities: m
            .modalities
            .iter()
            .map(|x| x.trim_matches([' ', '\0']).to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        study_date: m.study_date.clone(),
    }
}
