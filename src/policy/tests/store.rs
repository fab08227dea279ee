//! Stores: write scope, the caller's patient, studies and instances the PACS already holds,
//! and write restrictions judged on the instance.

use super::*;

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
    let ehr = FakeEhr::default();
    // The SOP Instance UID: new, or the caller's own in the same study and series; never
    // one UID under two studies or patients.
    let with = |instance, study, series| StoreRequest {
        instance_uid: instance,
        ..st("A", study, series)
    };
    let r = principal("patient/ImagingStudy.rs", Some("A"));
    let b = principal("patient/ImagingStudy.cruds", Some("B"));
    for (why, who, req, expected) in [
        (
            "into an own study and series",
            &w,
            st("A", "S1", "R1"),
            None,
        ),
        ("into a new study", &w, st("A", "NEW", "NEWR"), None),
        (
            "for another patient",
            &w,
            st("B", "NEW", "NEWR"),
            Some(Denial::ForeignPatient),
        ),
        (
            "into another patient's study",
            &w,
            st("A", "S3", "NEWR"),
            Some(Denial::ForeignStudy),
        ),
        (
            "into another patient's series",
            &w,
            st("A", "NEW", "R3"),
            Some(Denial::ForeignStudy),
        ),
        (
            "without a write scope",
            &r,
            st("A", "S1", "R1"),
            Some(Denial::NoWrite),
        ),
        (
            "the own instance again, where it is",
            &w,
            with(Some("I1"), "S1", "R1"),
            None,
        ),
        (
            "the own instance under a new study",
            &w,
            with(Some("I1"), "NEW", "NEWR"),
            Some(Denial::ForeignInstance),
        ),
        (
            "the own instance under a new series",
            &w,
            with(Some("I1"), "S1", "NEWR"),
            Some(Denial::ForeignInstance),
        ),
        (
            "another patient's instance under a new study",
            &b,
            StoreRequest {
                instance_uid: Some("I1"),
                ..st("B", "NEW3", "NEW3R")
            },
            Some(Denial::ForeignInstance),
        ),
    ] {
        let d = pol.decide_store(who, &req, &lookup, &ehr, now).await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
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
    assert!(matches!(
        pol.decide_store(&w, &with(None, "NEW", "NEWR"), &lookup, &ehr, now)
            .await,
        Decision::Deny(Denial::BadIdentifier(_))
    ));
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
    for (why, m, d, expected) in [
        ("CT of 2024", Some("CT"), Some("20240301"), None),
        (
            "another modality",
            Some("MR"),
            Some("20240301"),
            Some(Denial::OutsideStudies),
        ),
        (
            "before 2024",
            Some("CT"),
            Some("20230301"),
            Some(Denial::OutsideStudies),
        ),
        (
            "no modality",
            None,
            Some("20240301"),
            Some(Denial::OutsideStudies),
        ),
        (
            "no study date",
            Some("CT"),
            None,
            Some(Denial::OutsideStudies),
        ),
    ] {
        let decision = pol.decide_store(&w, &st(m, d), &lookup, &ehr, now).await;
        assert_eq!(denial(&decision), expected.as_ref(), "{why}: {m:?} {d:?}");
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
    for (why, study, expected) in [
        (
            "S2 is an MR study: a CT instance must not make it readable",
            "S2",
            Some(Denial::OutsideStudies),
        ),
        ("S1 is a CT study", "S1", None),
        ("a new study", "NEW", None),
    ] {
        let d = pol.decide_store(&w, &into(study), &lookup, &ehr, now).await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
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
    let both = principal("user/ImagingStudy.rs user/ImagingStudy.c", Some("A"));
    for (why, who, pid, expected) in [
        ("its own patient", &p, "A", None),
        ("another patient", &p, "B", Some(Denial::ForeignPatient)),
        ("another patient, with a user write scope", &both, "B", None),
    ] {
        let d = pol.decide_store(who, &st(pid), &lookup, &ehr, now).await;
        assert_eq!(denial(&d), expected.as_ref(), "{why}: {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_store_never_renews_what_is_cached() {
    // The look-up's entry for S1 (with the study's facts) must stay as it is, timer and all:
    // a caller storing into S1 now and then would otherwise keep the PACS from being asked
    // again, and a study reassigned meanwhile would go on being judged the caller's.
    let pol = Policy::bare(&cfg("deny"));
    let lookup = FakePacs { fail: false };
    let (ehr, now) = (FakeEhr::default(), SystemTime::now());
    let r = principal("patient/ImagingStudy.rs", Some("A"));
    let req = retrieve(Some(UidLevel::Study), &["S1"], &[], &[], None);
    assert!(matches!(
        pol.decide_retrieve(&r, &req, &lookup, &ehr, now).await,
        Decision::Allow(_)
    ));
    let key = (UidLevel::Study, "S1".to_string());
    let before = pol.owners.get(&key).await.expect("the look-up is cached");
    let w = principal("patient/ImagingStudy.cruds", Some("A"));
    let st = StoreRequest {
        instance_uid: Some("NEWI"),
        patient_id: Some("A"),
        study_uid: Some("S1"),
        series_uid: Some("NEWR"),
        ..StoreRequest::default()
    };
    let Decision::Allow(permit) = pol.decide_store(&w, &st, &lookup, &ehr, now).await else {
        panic!("a store into an own study is allowed")
    };
    pol.stored(&permit).await;
    let after = pol.owners.get(&key).await.expect("still cached");
    assert!(
        Arc::ptr_eq(&before, &after),
        "the cached entry was replaced"
    );
    assert!(after.facts.is_some());
    // What was not cached is remembered.
    let series = pol
        .owners
        .get(&(UidLevel::Series, "NEWR".to_string()))
        .await;
    assert_eq!(series.map(|o| o.patient_id.clone()), Some("A".to_string()));
}
