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
