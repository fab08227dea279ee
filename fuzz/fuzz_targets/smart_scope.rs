//! SMART scope strings: `ScopeSet::parse` and every question the policy core asks of it,
//! with sanity checks on what a scope grants and on date constraints.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::trust::scopes::{Constraint, DateOp, Level, ScopeSet};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let set = ScopeSet::parse(&s);
    let items = s
        .split([' ', '\t', '\n', '\r'])
        .filter(|x| !x.is_empty())
        .count();
    assert_eq!(
        set.scopes.len() + set.other.len(),
        items,
        "a scope string was lost"
    );
    for sc in &set.scopes {
        assert!(
            !sc.perms.is_empty(),
            "a parsed scope grants nothing: {sc:?}"
        );
        if let Some(cs) = sc.study_constraints() {
            assert_eq!(cs.len(), sc.constraints.len());
            for c in cs {
                match c {
                    Constraint::Started(tests) => {
                        for t in tests {
                            assert!(t.lo.len() == 8 && t.hi.len() == 8 && t.lo <= t.hi, "{t:?}");
                            match t.op {
                                DateOp::Eq => assert!(t.passes(&t.lo) && t.passes(&t.hi)),
                                DateOp::Ne => assert!(!t.passes(&t.lo) && !t.passes(&t.hi)),
                                DateOp::Ge => assert!(t.passes(&t.lo)),
                                DateOp::Le => assert!(t.passes(&t.hi)),
                                DateOp::Gt | DateOp::Sa => assert!(!t.passes(&t.hi)),
                                DateOp::Lt | DateOp::Eb => assert!(!t.passes(&t.lo)),
                            }
                            assert!(!t.passes("2020-01-01") && !t.passes("2020010"));
                        }
                    }
                    Constraint::StudyUid(uids) => {
                        assert!(uids.iter().all(|u| pacsgate::dicom::values::is_uid(u)));
                    }
                    Constraint::Modality(codes) => assert!(codes.iter().all(|c| !c.is_empty())),
                }
            }
        }
    }
    for level in [Level::Patient, Level::User, Level::System] {
        let _ = set.granted(level, "ImagingStudy");
    }
    let _ = set.grants(&[Level::Patient, Level::User], "ImagingStudy", |p| {
        p.read && p.search
    });
    let _ = set.levels_naming("ImagingStudy");
});
