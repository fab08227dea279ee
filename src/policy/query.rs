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

#[allow(unused_imports)]
use super::*;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use std::time::SystemTime;

/// The most distinct studies one query's results are judged for under a study restriction;
/// results of further studies are withheld.
pub const MAX_STUDIES_JUDGED: usize = 1000;

/// The study a query result belongs to, as the result shows it: its UID, and (for a
/// STUDY-level match) its ModalitiesInStudy and StudyDate.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ResultStudy<'a> {
    pub uid: Option<&'a str>,
    pub facts: Option<&'a StudyFacts>,
}

impl<'a> ResultStudy<'a> {
    #[cfg(test)]
    pub fn uid(uid: Option<&'a str>) -> ResultStudy<'a> {
        ResultStudy { uid, facts: None }
    }
}

/// Study UIDs asked about in one EHR search.
pub const EHR_BATCH: usize = 50;

/// What one query's study judgements learned: each study's verdict, and why judging stopped.
#[derive(Debug, Default)]
pub struct StudyMemo {
    pub(super) judged: std::collections::HashMap<String, bool>,
    /// Set when judging stopped early; every later result is withheld.
    pub stopped: Option<&'static str>,
}

impl Policy {
    /// Whether one result of an allowed query (a C-FIND match, a QIDO result) may reach the
    /// caller under the decision's study gate. A result without a study UID passes only an
    /// open gate. The result's own study facts are used when it carries them (else they are
    /// looked up when a constraint needs them). Each study is judged once per
    /// request (`memo`), at most
    /// [`MAX_STUDIES_JUDGED`] of them; after the first failure to judge (the PACS or the EHR
    /// did not answer) no more are asked about, and the rest are withheld.
    pub(crate) async fn admits_result(
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
}

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
pub(crate) const PATIENT_COUNTS: [Tag; 3] = [
    Tag(0x0020, 0x1200),
    Tag(0x0020, 0x1202),
    Tag(0x0020, 0x1204),
];

/// What an allowed query must ask the PACS for, decided with the permit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct QueryPlan {
    /// Return keys the judgement needs, in a fixed order.
    keys: Vec<ResultKey>,
    /// Matches are studies whose ModalitiesInStudy and StudyDate are their study's facts.
    study_facts: bool,
    /// The one study the query searches inside: a match that leaves its UID out is of this
    /// study (with several, such a match has no study).
    inside_study: Option<String>,
    /// Below STUDY level at a PACS of the hierarchical query model, matches cannot be asked
    /// for their patient: they are judged as members of the one study searched inside, whose
    /// owner (this PatientID) was judged before the query ran. A match of another study, or
    /// that names another patient, is withheld.
    vouched_by: Option<String>,
}

impl Permit {
    /// The return keys a query must ask for (and a front end that knows what the caller asked
    /// for strips again from each match when it added them).
    pub(crate) fn result_keys(&self) -> &[ResultKey] {
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
    /// The match names more than one study: it cannot be judged as one, and is withheld.
    pub several_studies: bool,
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
        // Every study and series named is looked into, a list as much as one UID.
        if !q.inside_studies.is_empty() || !q.inside_series.is_empty() {
            let req = RetrieveRequest {
                level: Some(if q.inside_series.is_empty() {
                    UidLevel::Study
                } else {
                    UidLevel::Series
                }),
                patient_id: None,
                study_uids: q.inside_studies.iter().map(|s| s.to_string()).collect(),
                series_uids: q.inside_series.iter().map(|s| s.to_string()).collect(),
                instance_uids: Vec::new(),
            };
            if let Decision::Deny(d) = self.decide_retrieve(p, &req, lookup, ehr, now).await {
                return Decision::Deny(d);
            }
        }
        // A hierarchical PACS answers below STUDY level only inside one study (and, at IMAGE
        // level, one series), and refuses PatientID there in the Study Root model: the study's
        // owner, just judged, stands for every match.
        let vouched_by = if self.hierarchical
            && q.by_dimse
            && matches!(q.level, QueryLevel::Series | QueryLevel::Image)
        {
            let [study] = q.inside_studies else {
                return Decision::Deny(Denial::BadIdentifier(owners::HIERARCHY_NEEDS_STUDY));
            };
            if q.level == QueryLevel::Image && q.inside_series.len() != 1 {
                return Decision::Deny(Denial::BadIdentifier(owners::HIERARCHY_NEEDS_SERIES));
            }
            let owner = match self.owner(lookup, UidLevel::Study, study).await {
                Ok(Some(o)) => o,
                Ok(None) => return Decision::Deny(Denial::NotOwned(UidLevel::Study)),
                Err(d) => return Decision::Deny(d),
            };
            if !q.patient_root {
                permit.query_patient_ids.clear();
            }
            Some(owner.patient_id.clone())
        } else {
            None
        };
        let gated = !matches!(permit.studies, StudyGate::Open);
        let study_facts =
            q.level == QueryLevel::Study && permit.wants_study_facts() && !q.matches_on_facts;
        let issuer = permit.filter.compares_issuer();
        let mut keys = Vec::new();
        if !matches!(permit.filter, super::PatientFilter::Any) && vouched_by.is_none() {
            keys.push(ResultKey::PatientId);
        }
        if issuer && vouched_by.is_none() {
            keys.push(ResultKey::IssuerOfPatientId);
        }
        // The study tells under a restriction, and says whose a match is when its issuer is
        // missing (then the gateway's own look-up of the study says it).
        // A vouched match is judged by its study: it must say which.
        if (gated || issuer || vouched_by.is_some()) && q.level != QueryLevel::Patient {
            keys.push(ResultKey::StudyInstanceUid);
        }
        if study_facts {
            keys.push(ResultKey::ModalitiesInStudy);
            keys.push(ResultKey::StudyDate);
        }
        permit.plan = Box::new(QueryPlan {
            keys,
            study_facts,
            inside_study: match q.inside_studies {
                [one] => Some(one.to_string()),
                _ => None,
            },
            vouched_by,
        });
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
    pub(crate) fn batch(&self) -> usize {
        if self.permit.asks_ehr() { EHR_BATCH } else { 1 }
    }

    /// Whether admitted matches lose the patient-wide counts ([`PATIENT_COUNTS`]).
    pub(crate) fn strips_patient_counts(&self) -> bool {
        !matches!(self.permit.studies, StudyGate::Open)
    }

    /// What judging saw so far.
    pub(crate) fn tally(&self) -> Tally {
        self.tally
    }

    /// Why judging stopped early (every later match withheld), if it did.
    pub(crate) fn stopped(&self) -> Option<&'static str> {
        self.memo.stopped
    }

    /// Judges a match at once when nothing needs asking: no study restriction, and its issuer
    /// (where the issuer counts) said by the match itself. `None`: it needs
    /// [`ResultJudge::judge`]. The verdict is the one `judge` would give.
    pub(crate) fn judge_now(&mut self, m: &MatchView) -> Option<Verdict> {
        if !matches!(self.permit.studies, StudyGate::Open) {
            return None;
        }
        let filter = &self.permit.filter;
        let admitted = if m.several_studies {
            false
        } else if let Some(owner) = &self.permit.plan.vouched_by {
            self.member(m, owner)
        } else if filter.compares_issuer() {
            let issuer = m.issuer.as_ref()?;
            filter.admits(m.patient_id.as_deref(), issuer.as_deref())
        } else {
            filter.admits(m.patient_id.as_deref(), None)
        };
        let v = if admitted {
            Verdict::Admit
        } else {
            Verdict::OtherPatient
        };
        self.count(v);
        Some(v)
    }

    fn count(&mut self, v: Verdict) {
        match v {
            Verdict::Admit => self.tally.admitted += 1,
            Verdict::OtherPatient => self.tally.other_patient += 1,
            Verdict::OutsideStudies => self.tally.outside += 1,
        }
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
            let admitted = if m.several_studies {
                false
            } else if let Some(owner) = &permit.plan.vouched_by {
                self.member(m, owner)
            } else if permit.filter.compares_issuer() {
                let issuer = match &m.issuer {
                    Some(i) => Some(i.clone()),
                    None => match self.study_of(m) {
                        Some(st) => {
                            self.policy
                                .study_issuer(&*self.policy.ports.lookup, st, pid)
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
            self.count(*v);
        }
        verdicts
    }

    /// Whether a match below STUDY level of a hierarchical PACS is one of the study searched
    /// inside: its StudyInstanceUID is that study's, and a PatientID it says anyway is that
    /// study's owner's.
    fn member(&self, m: &MatchView, owner: &str) -> bool {
        let trimmed = |v: &str| v.trim_end_matches(['\0', ' ']).to_string();
        // A match that does not say its study is not taken on trust: the PACS may have
        // ignored the study key.
        let study_ok = match m.study.as_deref().map(trimmed) {
            Some(s) if !s.is_empty() => self.permit.plan.inside_study.as_deref() == Some(&s),
            _ => false,
        };
        let patient_ok = match m.patient_id.as_deref() {
            Some(p) if !p.trim_matches(' ').is_empty() => lo_eq(p, owner),
            _ => true,
        };
        study_ok && patient_ok && self.permit.plan.inside_study.is_some()
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

#[cfg(test)]
mod tests {
    use super::super::{
        Config, DirectoryFuture, OneOwner, OneOwnerFuture, Owner, Ports, QueryRequest, StudyFacts,
    };
    use super::*;
    use crate::trust::scopes::ScopeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A PACS holding three studies: S1 (CT, patient A, issuer HOSP_A), S2 (MR, patient A,
    /// issuer HOSP_A), S3 (CT, patient B, issuer HOSP_B); series R1 in S1, R3 in S3. Counts
    /// its look-ups.
    #[derive(Default)]
    struct Pacs(AtomicUsize);

    impl OneOwner for Pacs {
        fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> OneOwnerFuture<'a> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                let series = |patient: &str, issuer: &str, study: &str| {
                    Ok(Some(Owner {
                        patient_id: patient.into(),
                        issuer: Some(issuer.into()),
                        issuer_known: true,
                        study_uid: study.into(),
                        series_uid: Some(uid.into()),
                        facts: None,
                    }))
                };
                let (patient, issuer, modality) = match (level, uid) {
                    (UidLevel::Series, "R1") => return series("A", "HOSP_A", "S1"),
                    (UidLevel::Series, "R3") => return series("B", "HOSP_B", "S3"),
                    (UidLevel::Study, "S1") => ("A", "HOSP_A", "CT"),
                    (UidLevel::Study, "S2") => ("A", "HOSP_A", "MR"),
                    (UidLevel::Study, "S3") => ("B", "HOSP_B", "CT"),
                    // Another patient under the caller's issuer.
                    (UidLevel::Study, "S4") => ("B", "HOSP_A", "CT"),
                    _ => return Ok(None),
                };
                Ok(Some(Owner {
                    patient_id: patient.into(),
                    issuer: Some(issuer.into()),
                    issuer_known: true,
                    study_uid: uid.into(),
                    series_uid: None,
                    facts: Some(StudyFacts {
                        modalities: vec![modality.into()],
                        study_date: Some("20240101".into()),
                    }),
                }))
            })
        }
    }

    struct NoEhr;

    impl EhrDirectory for NoEhr {
        fn patient<'a>(&'a self, _: &'a str, _: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR".to_string()) })
        }
        fn imaging_study<'a>(&'a self, _: &'a str, _: &'a str) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR".to_string()) })
        }
        fn studies_seen_by<'a>(&'a self, _: &'a Principal, _: &'a [String]) -> DirectoryFuture<'a> {
            Box::pin(async { Err("no EHR".to_string()) })
        }
    }

    fn policy(use_issuer: bool) -> (Policy, Arc<Pacs>) {
        let cfg = Config::parse(&format!(
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
"#
        ))
        .unwrap();
        let pacs = Arc::new(Pacs::default());
        let ports = Ports::new(pacs.clone(), Arc::new(NoEhr));
        (Policy::new(&cfg, ports), pacs)
    }

    async fn caller(pol: &Policy, scope: &str) -> super::super::Caller {
        let p = Principal {
            issuer: "http://127.0.0.1:9400".into(),
            subject: None,
            client_id: None,
            fhir_user: None,
            scopes: ScopeSet::parse(scope),
            patient: Some("EHR-1".into()),
            expires_at: u64::MAX / 2,
            jti: None,
            token_id: "t".into(),
            claims: Arc::new(serde_json::json!({"pid": ["A^^^HOSP_A"]})),
            fhir_patient: None,
            launch_studies: None,
            granted: None,
            bearer: crate::trust::Bearer::new(scope),
        };
        pol.caller(p).await
    }

    fn study(patient: &str, issuer: Option<Option<&str>>, uid: Option<&str>) -> MatchView {
        MatchView {
            patient_id: Some(patient.into()),
            issuer: issuer.map(|i| i.map(str::to_string)),
            study: uid.map(str::to_string),
            ..MatchView::default()
        }
    }

    async fn permit(pol: &Policy, c: &super::super::Caller, q: QueryRequest<'_>) -> Permit {
        pol.decide(c, super::super::Action::Query(q)).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn matches_are_judged_on_patient_and_issuer_looked_up_when_missing() {
        let (pol, pacs) = policy(true);
        let c = caller(&pol, "patient/ImagingStudy.rs").await;
        let a = permit(&pol, &c, QueryRequest::default()).await;
        assert_eq!(
            a.result_keys(),
            [
                ResultKey::PatientId,
                ResultKey::IssuerOfPatientId,
                ResultKey::StudyInstanceUid
            ]
        );
        let mut judge = pol.judge(&c, &a);
        let cases = [
            // Said by the match itself, padding aside.
            (
                study("A ", Some(Some(" HOSP_A")), Some("S1")),
                Verdict::Admit,
            ),
            (
                study("A", Some(Some("HOSP_B")), Some("S1")),
                Verdict::OtherPatient,
            ),
            (
                study("B", Some(Some("HOSP_A")), Some("S3")),
                Verdict::OtherPatient,
            ),
            // Present without a value says "none", which is not HOSP_A.
            (study("A", Some(None), Some("S1")), Verdict::OtherPatient),
            // Absent: the gateway's own look-up of the study says it.
            (study("A", None, Some("S1")), Verdict::Admit),
            (study("A", None, Some("S3")), Verdict::OtherPatient),
            // The looked-up study is another patient's: its issuer says nothing of this match.
            (study("A", None, Some("S4")), Verdict::OtherPatient),
            // Absent, and the study is unknown or not named: withheld.
            (study("A", None, Some("S9")), Verdict::OtherPatient),
            (study("A", None, None), Verdict::OtherPatient),
            // Two studies in one match: not judged as either.
            (
                MatchView {
                    several_studies: true,
                    ..study("A", Some(Some("HOSP_A")), Some("S1"))
                },
                Verdict::OtherPatient,
            ),
        ];
        for (m, want) in cases {
            assert_eq!(judge.judge(std::slice::from_ref(&m)).await, [want], "{m:?}");
        }
        assert_eq!(
            judge.tally(),
            Tally {
                admitted: 2,
                other_patient: 8,
                outside: 0
            }
        );
        // Each study asked about at most once (answers are cached).
        assert!(pacs.0.load(Ordering::Relaxed) <= 4);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn study_facts_are_trusted_only_where_the_caller_did_not_match_on_them() {
        let (pol, pacs) = policy(false);
        let c = caller(&pol, "patient/ImagingStudy.rs?modality=CT").await;
        let a = permit(&pol, &c, QueryRequest::default()).await;
        assert_eq!(
            a.result_keys(),
            [
                ResultKey::PatientId,
                ResultKey::StudyInstanceUid,
                ResultKey::ModalitiesInStudy,
                ResultKey::StudyDate
            ]
        );
        let mut judge = pol.judge(&c, &a);
        assert!(judge.strips_patient_counts());
        let with = |uid: &str, modalities: &[&str]| MatchView {
            modalities: modalities.iter().map(|m| m.to_string()).collect(),
            ..study("A", None, Some(uid))
        };
        // Judged on the match's own facts (padding trimmed), without a look-up.
        assert_eq!(
            judge
                .judge(&[with("S1", &["CT\0"]), with("S2", &["MR "])])
                .await,
            [Verdict::Admit, Verdict::OutsideStudies]
        );
        assert_eq!(pacs.0.load(Ordering::Relaxed), 0);
        // Matching on ModalitiesInStudy: the echoed value is not the study's; the PACS says.
        let q = QueryRequest {
            matches_on_facts: true,
            ..QueryRequest::default()
        };
        let a = permit(&pol, &c, q).await;
        assert_eq!(
            a.result_keys(),
            [ResultKey::PatientId, ResultKey::StudyInstanceUid]
        );
        let mut judge = pol.judge(&c, &a);
        assert_eq!(
            judge.judge(&[with("S2", &["CT"])]).await,
            [Verdict::OutsideStudies]
        );
        assert_eq!(pacs.0.load(Ordering::Relaxed), 1);
        // Below STUDY level there are no study facts to trust.
        let q = QueryRequest {
            level: QueryLevel::Series,
            ..QueryRequest::default()
        };
        let a = permit(&pol, &c, q).await;
        assert!(!a.result_keys().contains(&ResultKey::ModalitiesInStudy));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_search_inside_a_study_is_a_look_into_it() {
        let (pol, _) = policy(false);
        let c = caller(&pol, "patient/ImagingStudy.rs").await;
        let q = super::super::Action::Query;
        let inside = |level, studies: &'static [&'static str], series: &'static [&'static str]| {
            q(QueryRequest {
                level,
                inside_studies: studies,
                inside_series: series,
                ..QueryRequest::default()
            })
        };
        use super::super::Denial::NotOwned;
        let (series, image) = (QueryLevel::Series, QueryLevel::Image);
        type Case = (
            QueryLevel,
            &'static [&'static str],
            &'static [&'static str],
            Option<super::super::Denial>,
        );
        let cases: &[Case] = &[
            (series, &["S1"], &[], None),
            (series, &["S3"], &[], Some(NotOwned(UidLevel::Study))),
            (series, &["S9"], &[], Some(NotOwned(UidLevel::Study))),
            // A list is looked into whole: one foreign or unknown study refuses it.
            (series, &["S1", "S2"], &[], None),
            (series, &["S1", "S3"], &[], Some(NotOwned(UidLevel::Study))),
            (series, &["S9", "S1"], &[], Some(NotOwned(UidLevel::Study))),
            (image, &["S1"], &["R1"], None),
            (image, &["S3"], &["R3"], Some(NotOwned(UidLevel::Series))),
            // A series named without its study is looked into as well.
            (image, &[], &["R1"], None),
            (image, &[], &["R3"], Some(NotOwned(UidLevel::Series))),
        ];
        for (level, studies, series, want) in cases {
            let got = pol.decide(&c, inside(*level, studies, series)).await;
            assert_eq!(got.err(), want.clone(), "{level:?} {studies:?} {series:?}");
        }
        // A match leaving its study out is of the one study searched inside; with several
        // it has none, and a study restriction cannot admit it.
        let c = caller(&pol, "patient/ImagingStudy.rs?modality=CT").await;
        let a = pol.decide(&c, inside(series, &["S1"], &[])).await.unwrap();
        assert_eq!(
            pol.judge(&c, &a).judge(&[study("A", None, None)]).await,
            [Verdict::Admit]
        );
        assert!(pol.decide(&c, inside(series, &["S2"], &[])).await.is_err());
        let c = caller(&pol, "patient/ImagingStudy.rs?modality=CT,MR").await;
        let a = pol
            .decide(&c, inside(series, &["S1", "S2"], &[]))
            .await
            .unwrap();
        assert_ne!(
            pol.judge(&c, &a).judge(&[study("A", None, None)]).await,
            [Verdict::Admit]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn user_level_queries_are_refused_under_the_default_policy() {
        let (pol, _) = policy(false);
        let mut c = caller(&pol, "user/ImagingStudy.rs").await;
        c.principal.patient = None;
        // user_level defaults to deny: refused before any plan is made.
        assert_eq!(
            pol.decide(&c, super::super::Action::Query(QueryRequest::default()))
                .await,
            Err(super::super::Denial::UserLevelNotAllowed)
        );
    }
}
