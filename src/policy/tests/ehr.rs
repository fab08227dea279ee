//! The EHR check (`user_level = "ehr-check"`): studies asked about with the caller's token,
//! cached per token, batched ahead of judging, and denied when the EHR fails.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn ehr_check_asks_the_ehr_with_the_callers_token() {
    let user = principal("user/ImagingStudy.rs", None);
    // deny and allow as before
    assert_eq!(
        Policy::bare(&cfg("deny")).access(&user),
        Err(Denial::UserLevelNotAllowed)
    );
    let ehr = FakeEhr {
        visible: vec!["S2", "S3"],
        ..FakeEhr::default()
    };
    assert_eq!(
        reach(&Policy::bare(&cfg("allow")), &user, &ehr).await,
        vec![("S1", true), ("S2", true)]
    );
    let pol = Policy::bare(&cfg("ehr-check"));
    let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        reach(&pol, &user, &ehr).await,
        vec![("S1", false), ("S2", true)]
    );
    let asked = ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(asked, 2, "one search per study, then cached (yes and no)");
    // Another patient's study, shown by the EHR: allowed for the user.
    let d = pol
        .decide_retrieve(
            &user,
            &retrieve(Some(UidLevel::Series), &[], &["R3"], &[], None),
            &FakePacs { fail: false },
            &ehr,
            SystemTime::now(),
        )
        .await;
    assert!(matches!(d, Decision::Allow(_)), "{d:?}");
    // The cache is per token: another token is asked about again.
    let other = principal("user/ImagingStudy.rs system/ImagingStudy.rs", None);
    reach(&pol, &other, &ehr).await;
    assert!(ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before > 3);
    // A failing EHR denies, and is asked again next time (failures are not cached).
    let down = FakeEhr {
        fail: true,
        ..FakeEhr::default()
    };
    let fresh = principal("user/ImagingStudy.rs user/Patient.rs", None);
    let d = pol
        .decide_retrieve(
            &fresh,
            &retrieve(Some(UidLevel::Study), &["S1"], &[], &[], None),
            &FakePacs { fail: false },
            &down,
            SystemTime::now(),
        )
        .await;
    assert_eq!(d, Decision::Deny(Denial::EhrUnavailable));
    let a = match pol.decide_at(
        &fresh,
        &Action::Query(QueryRequest::with_patient(None)),
        SystemTime::now(),
    ) {
        Decision::Allow(a) => a,
        d => panic!("{d:?}"),
    };
    for (why, directory, shown) in [
        ("the EHR fails: withheld", &down, false),
        ("the EHR answers again: asked again, shown", &ehr, true),
    ] {
        let mut memo = StudyMemo::default();
        let lookup = FakePacs { fail: false };
        assert_eq!(
            pol.admits_result(
                &fresh,
                &a,
                ResultStudy::uid(Some("S2")),
                &mut memo,
                &lookup,
                directory
            )
            .await,
            shown,
            "{why}"
        );
    }
    // One request stops asking after the first failure, and judges each study once.
    let mut memo = StudyMemo::default();
    let before = down.searches.load(std::sync::atomic::Ordering::Relaxed);
    for st in ["S1", "S2", "S3", "S1"] {
        assert!(
            !pol.admits_result(
                &fresh,
                &a,
                ResultStudy::uid(Some(st)),
                &mut memo,
                &FakePacs { fail: false },
                &down
            )
            .await
        );
    }
    assert_eq!(
        down.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
        1
    );
    assert_eq!(memo.stopped, Some("the EHR could not be asked"));
    let mut memo = StudyMemo::default();
    let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
    let other_user = principal("user/ImagingStudy.rs user/Observation.rs", None);
    for st in ["S2", "S3", "S2", "S3"] {
        pol.admits_result(
            &other_user,
            &a,
            ResultStudy::uid(Some(st)),
            &mut memo,
            &FakePacs { fail: false },
            &ehr,
        )
        .await;
    }
    assert_eq!(
        ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
        2
    );
    // A search's studies are asked about in batches first, then judged from the cache.
    let batcher = principal("user/ImagingStudy.rs user/Encounter.rs", None);
    let Decision::Allow(a) = pol.decide_at(
        &batcher,
        &Action::Query(QueryRequest::with_patient(None)),
        SystemTime::now(),
    ) else {
        panic!()
    };
    let uids: Vec<String> = (0..120)
        .map(|n| format!("X{n}"))
        .chain(["S2".to_string(), "S3".to_string()])
        .collect();
    let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
    pol.prefetch_ehr(&batcher, &a, &uids, &StudyMemo::default(), &ehr)
        .await;
    assert_eq!(
        ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
        uids.len().div_ceil(EHR_BATCH)
    );
    let mut memo = StudyMemo::default();
    for u in &uids {
        let shown = pol
            .admits_result(
                &batcher,
                &a,
                ResultStudy::uid(Some(u)),
                &mut memo,
                &FakePacs { fail: false },
                &ehr,
            )
            .await;
        assert_eq!(shown, u == "S2" || u == "S3", "{u}");
    }
    assert_eq!(
        ehr.searches.load(std::sync::atomic::Ordering::Relaxed) - before,
        uids.len().div_ceil(EHR_BATCH),
        "all from the cache"
    );
    // Once judging stopped, nothing more is asked.
    let stopped = StudyMemo {
        stopped: Some("the EHR could not be asked"),
        ..StudyMemo::default()
    };
    let quiet = principal("user/ImagingStudy.rs user/Location.rs", None);
    let before = ehr.searches.load(std::sync::atomic::Ordering::Relaxed);
    pol.prefetch_ehr(&quiet, &a, &uids, &stopped, &ehr).await;
    assert_eq!(
        ehr.searches.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    // A paged answer settles only the studies it shows; the rest are asked alone.
    let paged = FakeEhr {
        visible: vec!["S2"],
        paged: true,
        ..FakeEhr::default()
    };
    let third = principal("user/ImagingStudy.rs user/Device.rs", None);
    pol.prefetch_ehr(
        &third,
        &a,
        &["S2".into(), "S3".into()],
        &StudyMemo::default(),
        &paged,
    )
    .await;
    let mut memo = StudyMemo::default();
    for (u, expected) in [("S2", true), ("S3", false)] {
        let shown = pol
            .admits_result(
                &third,
                &a,
                ResultStudy::uid(Some(u)),
                &mut memo,
                &FakePacs { fail: false },
                &paged,
            )
            .await;
        assert_eq!(shown, expected, "{u}");
    }
    assert_eq!(
        paged.searches.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "one batch, then S3 alone"
    );
    // A patient-level token under ehr-check is judged as before, without the EHR.
    let pat = principal("patient/ImagingStudy.rs", Some("A"));
    assert_eq!(
        reach(&pol, &pat, &down).await,
        vec![("S1", true), ("S2", true)]
    );
}
