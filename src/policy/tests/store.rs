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
