//! Exchange: the scopes a token of the gateway's own may carry, never wider than the
//! caller's; what it carries decided by the same access rules as every request.

use super::*;
use crate::policy::exchange::Refusal;

fn caller(p: Principal) -> Caller {
    Caller { principal: p }
}

#[test]
fn offered_scopes_are_imaging_only_and_never_wider() {
    let pol = Policy::bare(&cfg("deny"));
    for (subject, offered) in [
        ("patient/ImagingStudy.rs", "patient/ImagingStudy.rs"),
        ("patient/*.read", "patient/ImagingStudy.rs"),
        // update and delete are not served (create is: policy.write is on by default)
        ("patient/*.*", "patient/ImagingStudy.crs"),
        ("patient/ImagingStudy.cruds", "patient/ImagingStudy.crs"),
        ("patient/Observation.rs openid launch/patient", ""),
        // user scopes are not offered where user-level tokens are not allowed
        (
            "user/ImagingStudy.rs patient/ImagingStudy.r",
            "patient/ImagingStudy.r",
        ),
        (
            "patient/ImagingStudy.rs?modality=CT",
            "patient/ImagingStudy.rs?modality=CT",
        ),
        // a constraint the gateway cannot evaluate grants nothing: not carried
        ("patient/ImagingStudy.rs?category=exam", ""),
        (
            "patient/ImagingStudy.rs patient/ImagingStudy.read",
            "patient/ImagingStudy.rs",
        ),
    ] {
        assert_eq!(
            pol.offered(&ScopeSet::parse(subject)).to_string(),
            offered,
            "{subject}"
        );
    }
    let allow = Policy::bare(&cfg("allow"));
    assert_eq!(
        allow
            .offered(&ScopeSet::parse("user/*.rs system/ImagingStudy.r"))
            .to_string(),
        "user/ImagingStudy.rs system/ImagingStudy.r"
    );
    // ehr-check needs the caller's own token at the EHR: a token of the gateway's has none
    let ehr = Policy::bare(&cfg("ehr-check"));
    assert_eq!(ehr.offered(&ScopeSet::parse("user/*.rs")).to_string(), "");
}

#[test]
fn a_requested_scope_narrows_and_never_widens() {
    let pol = Policy::bare(&cfg("deny"));
    let c = caller(principal("patient/ImagingStudy.rs?modality=CT", Some("A")));
    let want = |s: &str| pol.carried(&c, Some(&ScopeSet::parse(s)));
    assert_eq!(
        want("patient/ImagingStudy.rs?modality=CT")
            .map(|x| x.scopes.to_string())
            .as_deref(),
        Ok("patient/ImagingStudy.rs?modality=CT")
    );
    assert!(
        matches!(
            want("patient/ImagingStudy.r?modality=CT"),
            Err(Refusal::Scope(_))
        ),
        "narrower, but read without search opens nothing here"
    );
    assert_eq!(
        want("patient/ImagingStudy.rs?modality=CT&started=ge2020")
            .map(|x| x.scopes.to_string())
            .as_deref(),
        Ok("patient/ImagingStudy.rs?modality=CT&started=ge2020"),
        "a further constraint narrows"
    );
    for wider in [
        "patient/ImagingStudy.rs",                        // drops the constraint
        "patient/ImagingStudy.crs?modality=CT",           // adds create
        "user/ImagingStudy.rs?modality=CT",               // another level
        "patient/*.rs?modality=CT",                       // another resource
        "patient/ImagingStudy.rs?modality=CT openid",     // not an imaging scope
        "patient/ImagingStudy.rs?modality=CT&category=x", // a constraint that grants nothing
    ] {
        assert!(
            matches!(want(wider), Err(Refusal::Scope(_))),
            "{wider}: {:?}",
            want(wider)
        );
    }
}

#[test]
fn what_is_carried_is_what_access_is_decided_on() {
    let pol = Policy::bare(&cfg("deny"));
    let c = pol.carried(
        &caller(principal("patient/ImagingStudy.rs", Some("A"))),
        None,
    );
    let c = c.expect("carried");
    assert_eq!(
        c.patients
            .as_ref()
            .map(|v| v.iter().map(|p| p.patient_id.clone()).collect::<Vec<_>>()),
        Some(vec!["A".to_string()])
    );
    assert_eq!(c.studies, None);

    // no imaging scope: invalid_scope; no patient in context for a patient scope: the grant
    assert!(matches!(
        pol.carried(
            &caller(principal("patient/Observation.rs", Some("A"))),
            None
        ),
        Err(Refusal::Scope(_))
    ));
    assert_eq!(
        pol.carried(&caller(principal("patient/ImagingStudy.rs", None)), None),
        Err(Refusal::Grant(Denial::NoPatientContext))
    );
    // a user-level token where those are not allowed: nothing offered
    assert!(
        pol.carried(&caller(principal("user/ImagingStudy.rs", None)), None)
            .is_err()
    );
    // expired
    let mut old = principal("patient/ImagingStudy.rs", Some("A"));
    old.expires_at = 1;
    assert_eq!(
        pol.carried(&caller(old), None),
        Err(Refusal::Grant(Denial::Expired))
    );
    // launch-context studies stay a restriction; an unresolved one admits nothing
    let mut ctx = principal("patient/ImagingStudy.rs", Some("A"));
    ctx.launch_studies = Some(vec![
        ContextStudy::Uid("1.2.3".into()),
        ContextStudy::Unknown,
    ]);
    assert_eq!(
        pol.carried(&caller(ctx), None).map(|c| c.studies),
        Ok(Some(vec!["1.2.3".to_string()]))
    );
}

#[test]
fn a_token_of_the_gateways_own_is_mapped_as_it_was_issued() {
    use crate::trust::own::{Granted, GrantedPatient};
    // the configuration maps by claim; the token's identities are used as they are
    let pol = Policy::bare(&cfg("deny"));
    let mut p = principal("patient/ImagingStudy.rs", Some("MRN-7"));
    p.granted = Some(Arc::new(Granted {
        subject_issuer: "http://127.0.0.1:9400".into(),
        patients: Some(vec![GrantedPatient {
            id: "PID-7".into(),
            issuer: None,
        }]),
        studies: None,
    }));
    assert_eq!(
        narrowed(query(&pol, &p, None)),
        Ok(ids(vec!["PID-7"])),
        "the identity the token carries, not its patient claim"
    );
    if let Some(g) = p.granted.as_mut() {
        Arc::make_mut(g).patients = Some(Vec::new());
    }
    assert_eq!(
        denial(&query(&pol, &p, None)),
        Some(&Denial::Unmapped),
        "carried identities: none is none"
    );
}
