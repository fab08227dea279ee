//! Patient mapping: a token's patient mapped through a claim to the DICOM PatientID, or to nothing.

use super::*;

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
