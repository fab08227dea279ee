//! Patients: how a query is narrowed to the caller's DICOM identities, and how the patient
//! filter compares PatientID and, under `use_issuer`, the issuer.

use super::*;

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
