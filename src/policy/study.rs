//! Studies: what a study restriction is judged on and how.
//!
//! Owns: [`StudyFacts`], [`StudyRule`] (granular scope constraints, launch context, the EHR's
//! answer), [`StudyGate`] and whether one study passes a rule.

#[allow(unused_imports)]
use super::*;

/// What a study restriction is judged on, as the PACS holds it for a study.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StudyFacts {
    /// ModalitiesInStudy (or, for an instance being stored, its Modality).
    pub modalities: Vec<String>,
    /// StudyDate, `YYYYMMDD`.
    pub study_date: Option<String>,
}

/// Which studies a caller may reach, beyond its patient filter: the granular constraints of
/// its scopes, the studies of its launch context, and (for `user_level = "ehr-check"`) what the
/// EHR shows the caller's own token. All that apply must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StudyRule {
    /// Every group must be met by one of its alternatives, and an alternative by all of its
    /// constraints (one group per interaction needed: a read needs `r` and `s`, which may come
    /// from different scopes). No groups: the scopes restrict nothing.
    pub scope_groups: Vec<Vec<Vec<Constraint>>>,
    /// The launch context's studies, when the issuer treats launch context as a restriction.
    pub context: Option<Vec<String>>,
    /// The EHR must return the study to the caller's own token.
    pub ehr: bool,
}

impl StudyRule {
    pub(crate) fn is_open(&self) -> bool {
        self.scope_groups.is_empty() && self.context.is_none() && !self.ehr
    }

    /// Whether judging the scopes needs the study's attributes (a UID constraint does not).
    pub(super) fn needs_facts(&self) -> bool {
        self.scope_groups
            .iter()
            .flatten()
            .flatten()
            .any(|c| !matches!(c, Constraint::StudyUid(_)))
    }

    pub(super) fn scopes_admit(&self, uid: &str, facts: &StudyFacts) -> bool {
        self.scope_groups.iter().all(|group| {
            group
                .iter()
                .any(|alt| alt.iter().all(|c| constraint_holds(c, uid, facts)))
        })
    }
}

/// A granular-scope constraint evaluated on a study's DICOM attributes. A study without the
/// attribute does not meet it.
pub(super) fn constraint_holds(c: &Constraint, uid: &str, facts: &StudyFacts) -> bool {
    match c {
        Constraint::Modality(codes) => facts
            .modalities
            .iter()
            .any(|m| codes.iter().any(|c| c == m)),
        Constraint::Started(tests) => facts
            .study_date
            .as_deref()
            .map(|d| d.trim_matches(' '))
            .is_some_and(|d| tests.iter().any(|t| t.passes(d))),
        Constraint::StudyUid(uids) => uids.iter().any(|u| u == uid),
    }
}

/// The study condition an allowed action carries to its front end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StudyGate {
    /// No study restriction.
    #[default]
    Open,
    /// Each result's study must be checked ([`Policy::admits_result`]).
    Check(Arc<StudyRule>),
    /// Only data of these studies (a retrieval whose studies were already judged).
    Within(Vec<String>),
}

pub(super) static EMPTY_FACTS: StudyFacts = StudyFacts {
    modalities: Vec::new(),
    study_date: None,
};

impl Policy {
    /// Whether a study passes a rule. `facts`: the study's facts when the caller has them (an
    /// instance being stored); otherwise they are looked up when a scope constraint needs them.
    pub(super) async fn admits_study(
        &self,
        p: &Principal,
        rule: &StudyRule,
        uid: &str,
        facts: Option<&StudyFacts>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
    ) -> Result<bool, Denial> {
        if let Some(ctx) = &rule.context
            && !ctx.iter().any(|u| u == uid)
        {
            return Ok(false);
        }
        if !rule.scope_groups.is_empty() {
            let looked_up;
            let facts = match facts {
                Some(f) => f,
                None if !rule.needs_facts() => &EMPTY_FACTS,
                None => match self.study_with_facts(lookup, uid).await? {
                    Some(o) => {
                        looked_up = o;
                        looked_up.facts.as_ref().unwrap_or(&EMPTY_FACTS)
                    }
                    None => return Ok(false),
                },
            };
            if !rule.scopes_admit(uid, facts) {
                return Ok(false);
            }
        }
        if rule.ehr {
            return self.ehr_shows(p, uid, ehr).await;
        }
        Ok(true)
    }
}
