//! The policy core's decisions, scenario by scenario.

use super::*;

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
    assert!(f.admits(Some("A"), None) && f.admits(Some("B"), None) && !f.admits(Some("C"), None));
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

impl OneOwner for CountingPacs {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> OneOwnerFuture<'a> {
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
    let first = StoreRequest {
        instance_uid: Some("NEWSI"),
        patient_id: Some("A"),
        issuer: Some("HOSP_X"),
        study_uid: Some("NEWS"),
        series_uid: Some("NEWSR"),
        ..StoreRequest::default()
    };
    let Decision::Allow(permit) = pol.decide_store(&wa, &first, &lookup, &ehr, now).await else {
        panic!("a store into a new study is allowed")
    };
    pol.stored(&permit).await;
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
