//! Access: what a token's scopes permit before any request, user-level policy, expiry.

use super::*;

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

#[test]
fn bearer_is_never_printed() {
    let p = principal("patient/ImagingStudy.rs", Some("A"));
    let printed = format!("{p:?} {p}");
    assert!(!printed.contains("token-patient"), "{printed}");
}
