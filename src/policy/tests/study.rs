//! Study restrictions: granular scope constraints and launch context, for queries,
//! retrievals and a retrieval's sub-operations.

use super::*;

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
    for (why, uid, modality, shown) in [
        ("a CT study", "X1", "CT", true),
        ("an MR study", "X2", "MR", false),
    ] {
        let result = ResultStudy {
            uid: Some(uid),
            facts: Some(&facts(modality)),
        };
        assert_eq!(
            pol.admits_result(&p, &a, result, &mut memo, &down, &ehr)
                .await,
            shown,
            "{why}"
        );
    }
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
    for (why, uid, shown) in [
        ("the study named", Some("1.2.3"), true),
        ("another study", Some("1.2.4"), false),
        ("no StudyInstanceUID", None, false),
    ] {
        let mut memo = StudyMemo::default();
        assert_eq!(
            pol.admits_result(&p, &a, ResultStudy::uid(uid), &mut memo, &lookup, &ehr)
                .await,
            shown,
            "{why}"
        );
    }
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
    for (why, patient, study, instance, admitted) in [
        (
            "the instance named, in its study",
            "A",
            Some("S1"),
            Some("I1"),
            true,
        ),
        ("another study", "A", Some("S2"), Some("I1"), false),
        ("no study", "A", None, Some("I1"), false),
        ("another patient", "B", Some("S1"), Some("I1"), false),
        // only what the request named comes back
        ("an instance not named", "A", Some("S1"), Some("I2"), false),
    ] {
        assert_eq!(
            a.admits_instance(&id(patient, study, instance)),
            admitted,
            "{why}"
        );
    }
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
