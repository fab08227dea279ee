//! The policy core's decisions, one file per concern; here the fixtures they share: a PACS and
//! an EHR that answer (or never do), a configuration, a principal and the usual requests.

use super::*;

mod access;
mod ehr;
mod exchange;
mod mapping;
mod patient;
mod retrieve;
mod store;
mod study;

/// A PACS and an EHR that never answer: the tests hand each decision the ports it needs.
struct Nowhere;
impl OneOwner for Nowhere {
    fn owner<'a>(&'a self, _: UidLevel, _: &'a str) -> OneOwnerFuture<'a> {
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
    pub(crate) fn bare(cfg: &Config) -> Policy {
        Policy::new(cfg, Ports::new(Arc::new(Nowhere), Arc::new(Nowhere)))
    }
}
use crate::trust::scopes::ScopeSet;
use std::time::{Duration, UNIX_EPOCH};

pub(crate) fn cfg(user_level: &str) -> Config {
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

pub(crate) fn principal(scope: &str, patient: Option<&str>) -> Principal {
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
        granted: None,
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

/// A decision as the tables state it: `None` when allowed, else the denial.
fn denial(d: &Decision) -> Option<&Denial> {
    match d {
        Decision::Allow(_) => None,
        Decision::Deny(denial) => Some(denial),
    }
}

/// A query decision as the tables state it: the PatientIDs it is narrowed to, or the denial.
fn narrowed(d: Decision) -> Result<Vec<String>, Denial> {
    match d {
        Decision::Allow(a) => Ok(a.query_patient_ids),
        Decision::Deny(denial) => Err(denial),
    }
}

/// The PatientIDs a table row expects, as a decision holds them.
fn ids(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_string).collect()
}

/// A PACS of three studies: S1 and S2 of patient A, S3 of patient B; series R1 in S1, R3 in
/// S3; instance I1 in R1.
struct FakePacs {
    fail: bool,
}

impl OneOwner for FakePacs {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> OneOwnerFuture<'a> {
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
    fn studies_seen_by<'a>(&'a self, _: &'a Principal, uids: &'a [String]) -> DirectoryFuture<'a> {
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
                .map(|u| {
                    serde_json::json!({"resource": {"resourceType": "ImagingStudy",
                    "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{u}")}]}})
                })
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

/// Counts the look-ups that reach the PACS.
struct CountingPacs(std::sync::atomic::AtomicUsize);

impl OneOwner for CountingPacs {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> OneOwnerFuture<'a> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move { FakePacs { fail: false }.owner(level, uid).await })
    }
}
