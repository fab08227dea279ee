//! Retrievals: decided on what their UIDs resolve to, the look-ups that costs, and the
//! destinations a C-MOVE may name.

use super::*;

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
    for (why, r, expected) in [
        (
            "an own study",
            retrieve(Some(Study), &["S1"], &[], &[], None),
            None,
        ),
        (
            "own studies, padding aside",
            retrieve(Some(Study), &["S1", "S2"], &[], &[], None),
            None,
        ),
        (
            "an own series",
            retrieve(Some(Series), &["S1"], &["R1"], &[], None),
            None,
        ),
        (
            "an own instance",
            retrieve(Some(Instance), &["S1"], &["R1"], &["I1"], None),
            None,
        ),
        (
            "an own series named under another own study is a confused request",
            retrieve(Some(Series), &["S2"], &["R1"], &[], None),
            Some(Denial::Hierarchy),
        ),
        (
            "PATIENT level, the own id",
            retrieve(None, &[], &[], &[], Some("A")),
            None,
        ),
        (
            "PATIENT level, another id",
            retrieve(None, &[], &[], &[], Some("B")),
            Some(Denial::ForeignPatient),
        ),
    ] {
        let d = decide_r(&pol, &a, r).await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
    // foreign, mixed, unknown: all the same refusal, whatever PatientID the caller claims
    for (why, r) in [
        (
            "a foreign study, own PatientID claimed",
            retrieve(Some(Study), &["S3"], &[], &[], Some("A")),
        ),
        (
            "an own and a foreign study",
            retrieve(Some(Study), &["S1", "S3"], &[], &[], None),
        ),
        (
            "an unknown study",
            retrieve(Some(Study), &["S9"], &[], &[], None),
        ),
        (
            "a foreign series under an own study",
            retrieve(Some(Series), &["S1"], &["R3"], &[], None),
        ),
    ] {
        let d = decide_r(&pol, &a, r).await;
        assert!(
            matches!(d, Decision::Deny(Denial::NotOwned(_))),
            "{why}: {d:?}"
        );
    }
    // no unique key
    assert!(matches!(
        decide_r(&pol, &a, retrieve(Some(Series), &["S1"], &[], &[], None)).await,
        Decision::Deny(Denial::BadIdentifier(_))
    ));
    // The PACS is down from here on.
    for (why, study, expected) in [
        ("a failing PACS denies", "S4", Some(Denial::LookupFailed)),
        ("cached owners keep answering", "S1", None),
    ] {
        let d = pol
            .decide_retrieve(
                &a,
                &retrieve(Some(Study), &[study], &[], &[], None),
                &FakePacs { fail: true },
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
}

#[test]
fn only_configured_move_destinations() {
    let mut c = cfg("deny");
    c.destinations = vec![crate::config::Destination {
        ae_title: "WS1".into(),
        address: "127.0.0.1:104".into(),
        tls: None,
    }];
    let pol = Policy::bare(&c);
    assert_eq!(
        pol.move_destination(Some("WS1")).map(|d| d.address),
        Some("127.0.0.1:104".into())
    );
    for (why, ae, configured) in [
        ("padding aside", Some("WS1 "), true),
        ("case matters", Some("ws1"), false),
        ("not configured", Some("OTHER"), false),
        ("no destination named", None, false),
    ] {
        assert_eq!(
            pol.move_destination(ae).is_some(),
            configured,
            "{why}: {ae:?}"
        );
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

/// A PACS of the hierarchical query model: a series or instance is judged through its study's
/// owner and whether that study (and series) holds it; naming it without them is refused
/// before anything is asked.
#[tokio::test(flavor = "multi_thread")]
async fn a_hierarchical_pacs_is_asked_inside_the_study_named() {
    let mut c = cfg("deny");
    c.pacs.query_model = crate::config::QueryModel::Hierarchical;
    let pol = Policy::bare(&c);
    let a = principal("patient/ImagingStudy.rs", Some("A"));
    use UidLevel::*;
    let needs_study = Some(Denial::BadIdentifier(
        super::super::owners::HIERARCHY_NEEDS_STUDY,
    ));
    let needs_series = Some(Denial::BadIdentifier(
        super::super::owners::HIERARCHY_NEEDS_SERIES,
    ));
    for (why, r, expected) in [
        (
            "an own study",
            retrieve(Some(Study), &["S1"], &[], &[], None),
            None,
        ),
        (
            "an own series in its study",
            retrieve(Some(Series), &["S1"], &["R1"], &[], None),
            None,
        ),
        (
            "an own instance in its study and series",
            retrieve(Some(Instance), &["S1"], &["R1"], &["I1"], None),
            None,
        ),
        (
            "a series without its study",
            retrieve(Some(Series), &[], &["R1"], &[], None),
            needs_study.clone(),
        ),
        (
            "a series under two studies",
            retrieve(Some(Series), &["S1", "S2"], &["R1"], &[], None),
            needs_study,
        ),
        (
            "an instance without its series",
            retrieve(Some(Instance), &["S1"], &[], &["I1"], None),
            needs_series,
        ),
        (
            "an own series under another own study: that study does not hold it",
            retrieve(Some(Series), &["S2"], &["R1"], &[], None),
            Some(Denial::NotOwned(Series)),
        ),
        (
            "another patient's series inside its own study",
            retrieve(Some(Series), &["S3"], &["R3"], &[], None),
            Some(Denial::NotOwned(Series)),
        ),
        (
            "another patient's series named inside an own study",
            retrieve(Some(Series), &["S1"], &["R3"], &[], None),
            Some(Denial::NotOwned(Series)),
        ),
    ] {
        let d = decide_r(&pol, &a, r).await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
}

/// Below STUDY level at a hierarchical PACS the query carries no PatientID and asks none back;
/// each match is judged as a member of the one study searched inside.
#[tokio::test(flavor = "multi_thread")]
async fn a_hierarchical_query_is_judged_by_the_study_it_searches() {
    let mut c = cfg("deny");
    c.pacs.query_model = crate::config::QueryModel::Hierarchical;
    let pol = Policy::new(
        &c,
        Ports::new(
            Arc::new(FakePacs { fail: false }),
            Arc::new(FakeEhr::default()),
        ),
    );
    let a = principal("patient/ImagingStudy.rs", Some("A"));
    let caller = pol.caller(a.clone()).await;
    let q = |level, studies: &'static [&'static str]| QueryRequest {
        level,
        inside_studies: studies,
        by_dimse: true,
        ..QueryRequest::default()
    };
    let decide = |r: QueryRequest<'static>| {
        let (pol, a) = (&pol, &a);
        async move {
            pol.decide_query(
                a,
                &r,
                &FakePacs { fail: false },
                &FakeEhr::default(),
                SystemTime::now(),
            )
            .await
        }
    };
    let d = decide(q(QueryLevel::Series, &[])).await;
    assert_eq!(
        denial(&d),
        Some(&Denial::BadIdentifier(
            super::super::owners::HIERARCHY_NEEDS_STUDY
        ))
    );
    let d = decide(q(QueryLevel::Series, &["S1", "S2"])).await;
    assert!(
        matches!(denial(&d), Some(Denial::BadIdentifier(_))),
        "{d:?}"
    );
    let d = decide(q(QueryLevel::Series, &["S3"])).await;
    assert_eq!(denial(&d), Some(&Denial::NotOwned(UidLevel::Study)));
    let Decision::Allow(permit) = decide(q(QueryLevel::Series, &["S1"])).await else {
        panic!("an own study is searched inside");
    };
    assert!(permit.query_patient_ids().is_empty());
    assert!(!permit.result_keys().contains(&ResultKey::PatientId));
    assert!(permit.result_keys().contains(&ResultKey::StudyInstanceUid));
    let mut judge = pol.judge(&caller, &permit);
    let m = |study: Option<&str>, pid: Option<&str>| MatchView {
        study: study.map(str::to_string),
        patient_id: pid.map(str::to_string),
        ..MatchView::default()
    };
    let verdicts = judge
        .judge(&[
            m(Some("S1"), None),
            m(None, None),
            m(Some("S1 "), Some("A")),
            m(Some("S2"), None),
            m(Some("S1"), Some("B")),
        ])
        .await;
    use Verdict::*;
    // A match without its study is not taken on trust.
    assert_eq!(
        verdicts,
        vec![Admit, OtherPatient, Admit, OtherPatient, OtherPatient]
    );
    // A QIDO-RS search relayed to a DICOMweb service is relational: narrowed by PatientID.
    let relayed = QueryRequest {
        by_dimse: false,
        ..q(QueryLevel::Series, &["S1"])
    };
    let Decision::Allow(permit) = decide(relayed).await else {
        panic!("an own study is searched inside");
    };
    assert_eq!(permit.query_patient_ids(), ["A".to_string()]);
    // Study level: narrowed by PatientID as with any PACS.
    let Decision::Allow(permit) = decide(q(QueryLevel::Study, &[])).await else {
        panic!("a study search is allowed");
    };
    assert_eq!(permit.query_patient_ids(), ["A".to_string()]);
}
