//! Patients: how a query is narrowed to the caller's DICOM identities, and how the patient
//! filter compares PatientID and, under `use_issuer`, the issuer.

use super::*;

#[test]
fn patient_query_is_narrowed_or_refused() {
    let pol = Policy::bare(&cfg("deny"));
    let p = principal("patient/ImagingStudy.rs", Some("PAT1"));
    use Denial::{ForeignPatient, PatientPattern};
    for (why, req, expected) in [
        ("no PatientID key", None, Ok(vec!["PAT1"])),
        ("an empty key", Some(""), Ok(vec!["PAT1"])),
        ("a lone wildcard", Some("*"), Ok(vec!["PAT1"])),
        ("spaces only", Some("  "), Ok(vec!["PAT1"])),
        ("the own PatientID", Some("PAT1"), Ok(vec!["PAT1"])),
        (
            "the own PatientID, padded",
            Some(" PAT1  "),
            Ok(vec!["PAT1"]),
        ),
        ("another patient", Some("PAT2"), Err(ForeignPatient)),
        ("case matters", Some("pat1"), Err(ForeignPatient)),
        ("a trailing *", Some("PAT*"), Err(PatientPattern)),
        ("a ?", Some("PAT?"), Err(PatientPattern)),
        ("a leading *", Some("*1"), Err(PatientPattern)),
        ("a list of two", Some("PAT1\\PAT2"), Err(PatientPattern)),
        ("a list ending empty", Some("PAT1\\"), Err(PatientPattern)),
    ] {
        assert_eq!(
            narrowed(query(&pol, &p, req)),
            expected.map(ids),
            "{why}: {req:?}"
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
    for (why, pid, admitted) in [
        ("the same value", Some("SPACE01"), true),
        ("trailing padding", Some("SPACE01   "), true),
        ("leading spaces", Some(" SPACE01"), true),
        ("case matters", Some("space01"), false),
        ("NUL is not padding", Some("SPACE01\0"), false),
        ("a longer value", Some("SPACE011"), false),
        ("an empty value", Some(""), false),
        ("no PatientID", None, false),
    ] {
        assert_eq!(f.admits(pid, None), admitted, "{why}: {pid:?}");
    }
    assert!(PatientFilter::Any.admits(None, None));
}

#[test]
fn several_identities_narrow_to_several_queries() {
    let ids_ab = vec![
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
    let f = PatientFilter::Only(ids_ab.clone());
    let none = PatientFilter::Only(vec![]);
    for (why, identities, req, filter, expected) in [
        (
            "no key: one query each",
            &ids_ab[..],
            None,
            &f,
            Ok(vec!["A", "B"]),
        ),
        (
            "one of them, padded",
            &ids_ab[..],
            Some("B "),
            &f,
            Ok(vec!["B"]),
        ),
        (
            "neither",
            &ids_ab[..],
            Some("C"),
            &f,
            Err(Denial::ForeignPatient),
        ),
        (
            "no identity at all",
            &[][..],
            None,
            &none,
            Err(Denial::Unmapped),
        ),
    ] {
        assert_eq!(
            narrowed(narrow_query(identities, req, filter)),
            expected.map(ids),
            "{why}"
        );
    }
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
    for (why, issuer, expected) in [
        (
            "S1 is held under A without an issuer",
            "HOSP_X",
            Denial::ForeignStudy,
        ),
        ("not the caller's issuer", "HOSP_Y", Denial::ForeignPatient),
    ] {
        let d = pol
            .decide_store(&wa, &st(Some(issuer)), &lookup, &ehr, now)
            .await;
        assert_eq!(d, Decision::Deny(expected), "{why}");
    }
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
