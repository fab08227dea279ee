//! Owners: who the PACS holds a study, series or instance under, cached.
//!
//! Owns: the [`OwnerLookup`] port (served by the PACS client), [`Owner`], the owner cache
//! (positive answers only, 60 s) and the IssuerOfPatientID a study is held under.

#[allow(unused_imports)]
use super::*;

/// Who a study, series or instance belongs to, as the PACS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub patient_id: String,
    pub issuer: Option<String>,
    pub study_uid: String,
    pub series_uid: Option<String>,
    /// Whether the PACS said anything about IssuerOfPatientID (an empty value counts); without
    /// it the issuer cannot be compared.
    pub issuer_known: bool,
    /// The study's facts, when the look-up was at study level.
    pub facts: Option<StudyFacts>,
}

/// The future an [`OwnerLookup`] returns.
pub type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Owner>, LookupError>> + Send + 'a>>;

/// The future [`OwnerLookup::holds`] returns.
pub type HoldsFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, LookupError>> + Send + 'a>>;

/// The most owners a look-up's answer may name for one UID. A look-up reports at most one more
/// than this, which the policy core judges a PACS inconsistency like two patients (the answers
/// past the cap were not seen, so one of them may name another patient).
pub const MAX_OWNERS: usize = 16;

/// Why the PACS could not say who holds a UID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The PACS could not be asked in time (no association, no answer, a broken one).
    #[error("the PACS could not be asked: {0}")]
    Unreachable(String),
    /// The PACS answered, but not with something that can be read as an answer (a match the
    /// strict reader refuses, a failure status).
    #[error("the PACS's answer cannot be used: {0}")]
    BadAnswer(String),
}

/// Asks the PACS who holds a UID: every match it reports for exactly that UID (none: it does
/// not hold it; at most [`MAX_OWNERS`] + 1). Implemented by the PACS client; the policy core
/// judges the answers (one owner, or none to trust) and caches them.
pub trait OwnerLookup: Send + Sync {
    fn owners<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a>;

    /// For a PACS that enforces the hierarchical query model: whether it holds a series
    /// (`level` SERIES) inside `study`, or an instance inside `study` and `series`, asked with
    /// the keys that model allows at that level only (the unique keys above it, never
    /// PatientID). Whose it is, is its study's owner's.
    fn holds<'a>(
        &'a self,
        level: UidLevel,
        uid: &'a str,
        study: &'a str,
        series: Option<&'a str>,
    ) -> HoldsFuture<'a>;
}

/// Where a series or an instance is named: the study (and, for an instance, the series) the
/// request names it under. Only a PACS of the hierarchical query model needs it, to be asked
/// at all.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Within<'a> {
    pub study: Option<&'a str>,
    pub series: Option<&'a str>,
}

/// Why a series or instance cannot be judged by a PACS of the hierarchical query model.
pub(super) const HIERARCHY_NEEDS_STUDY: &str = "the PACS follows the hierarchical query model: a series or an instance is named inside exactly one study (StudyInstanceUID)";
pub(super) const HIERARCHY_NEEDS_SERIES: &str = "the PACS follows the hierarchical query model: an instance is named inside exactly one study and one series (StudyInstanceUID, SeriesInstanceUID)";

/// The cache key of a series or an instance found inside a study (and series): UIDs never
/// hold a backslash, so the parts cannot run into each other.
fn held_key(level: UidLevel, uid: &str, study: &str, series: Option<&str>) -> (UidLevel, String) {
    let mut k = format!("{study}\\");
    if level == UidLevel::Instance {
        k.push_str(series.unwrap_or_default());
        k.push('\\');
    }
    k.push_str(uid);
    (level, k)
}

/// The one owner a look-up's matches name: `Ok(None)` for no match; an error when they name
/// more than one patient (or issuer) for the UID, a PACS inconsistency that trusts neither.
pub(super) fn one_owner(owners: Vec<Owner>) -> Result<Option<Owner>, Denial> {
    if owners.len() > MAX_OWNERS {
        return Err(Denial::OwnerConflict);
    }
    let mut owners = owners.into_iter();
    let Some(first) = owners.next() else {
        return Ok(None);
    };
    if owners.any(|o| !lo_eq(&o.patient_id, &first.patient_id) || o.issuer != first.issuer) {
        return Err(Denial::OwnerConflict);
    }
    Ok(Some(first))
}

impl Policy {
    /// The owner of a series or an instance named inside `within`. Of a relational PACS it is
    /// asked directly ([`Policy::owner`]). A hierarchical PACS cannot be asked who holds a
    /// series or an instance, only whether a study holds it: then it is its study's owner's
    /// (asked at STUDY level) when the study holds it, and nobody's when not. This is weaker
    /// than the relational look-up in one way: a UID the PACS also holds under another study is
    /// not seen here (the per-instance check of what flows back still is).
    pub(super) async fn owner_within(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        if !self.hierarchical || level == UidLevel::Study {
            return self.owner(lookup, level, uid).await;
        }
        let (Some(study), series) = (within.study, within.series) else {
            return Err(Denial::BadIdentifier(HIERARCHY_NEEDS_STUDY));
        };
        if level == UidLevel::Instance && series.is_none() {
            return Err(Denial::BadIdentifier(HIERARCHY_NEEDS_SERIES));
        }
        let key = held_key(level, uid, study, series);
        let cached = self.owners.get(&key).await;
        crate::metrics::cache("ownership", cached.is_some());
        if let Some(o) = cached {
            return Ok(Some(o));
        }
        let Some(owner) = self.owner(lookup, UidLevel::Study, study).await? else {
            return Ok(None);
        };
        let series = series.filter(|_| level == UidLevel::Instance);
        match lookup.holds(level, uid, study, series).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                tracing::warn!(level = ?level, error = %e, "ownership lookup failed; denying");
                return Err(Denial::LookupFailed);
            }
        }
        let o = Arc::new(Owner {
            series_uid: Some(series.unwrap_or(uid).to_string()),
            facts: None,
            ..(*owner).clone()
        });
        self.owners.insert(key, o.clone()).await;
        Ok(Some(o))
    }

    /// The cache key of a UID's owner: by the UID alone for a relational PACS, by where it was
    /// found for a hierarchical one (the same UID inside another study is another question).
    pub(super) fn owner_key(
        &self,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> (UidLevel, String) {
        match (self.hierarchical, level, within.study) {
            (true, UidLevel::Series | UidLevel::Instance, Some(study)) => {
                held_key(level, uid, study, within.series)
            }
            _ => (level, uid.to_string()),
        }
    }

    /// The owner of a UID, from the cache or the PACS.
    pub(super) async fn owner(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        let key = (level, uid.to_string());
        let cached = self.owners.get(&key).await;
        crate::metrics::cache("ownership", cached.is_some());
        if let Some(o) = cached {
            return Ok(Some(o));
        }
        self.look_up(lookup, level, uid).await
    }

    pub(super) async fn look_up(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        let owners = match lookup.owners(level, uid).await {
            Ok(owners) => owners,
            Err(e) => {
                tracing::warn!(level = ?level, error = %e, "ownership lookup failed; denying");
                return Err(Denial::LookupFailed);
            }
        };
        match one_owner(owners) {
            Ok(Some(o)) => {
                let o = Arc::new(o);
                self.owners
                    .insert((level, uid.to_string()), o.clone())
                    .await;
                Ok(Some(o))
            }
            Ok(None) => Ok(None),
            Err(d) => {
                tracing::warn!(level = ?level, "the PACS holds one UID under more than one patient; denying");
                Err(d)
            }
        }
    }

    /// A study's owner together with its facts (a cached owner recorded by a store has none:
    /// then the PACS is asked).
    pub(super) async fn study_with_facts(
        &self,
        lookup: &dyn OwnerLookup,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        match self.owner(lookup, UidLevel::Study, uid).await? {
            Some(o) if o.facts.is_some() => Ok(Some(o)),
            Some(_) => self.look_up(lookup, UidLevel::Study, uid).await,
            None => Ok(None),
        }
    }

    /// The IssuerOfPatientID a study is held under, as the PACS answers the gateway's own
    /// look-up, when the PACS holds it under `patient_id` (a match that names another
    /// patient than its study's owner says nothing about its issuer): `Some(None)` for none,
    /// `None` when that cannot be established.
    pub(super) async fn study_issuer(
        &self,
        lookup: &dyn OwnerLookup,
        study_uid: &str,
        patient_id: Option<&str>,
    ) -> Option<Option<String>> {
        match self.owner(lookup, UidLevel::Study, study_uid).await {
            Ok(Some(o))
                if o.issuer_known && patient_id.is_some_and(|p| lo_eq(&o.patient_id, p)) =>
            {
                Some(o.issuer.clone())
            }
            _ => None,
        }
    }
}

/// Fakes of the PACS in tests answer one owner or none, as most PACS do.
#[cfg(test)]
pub(super) type OneOwnerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Owner>, String>> + Send + 'a>>;

#[cfg(test)]
pub(super) trait OneOwner: Send + Sync {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> OneOwnerFuture<'a>;
}

#[cfg(test)]
impl<T: OneOwner> OwnerLookup for T {
    fn owners<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            match self.owner(level, uid).await {
                Ok(o) => Ok(o.into_iter().collect()),
                Err(e) => Err(LookupError::Unreachable(e)),
            }
        })
    }

    /// A fake's hierarchy: it holds a UID inside a study (and series) when its owner names them.
    fn holds<'a>(
        &'a self,
        level: UidLevel,
        uid: &'a str,
        study: &'a str,
        series: Option<&'a str>,
    ) -> HoldsFuture<'a> {
        Box::pin(async move {
            match self.owner(level, uid).await {
                Ok(o) => Ok(o.is_some_and(|o| {
                    o.study_uid == study && (series.is_none() || o.series_uid.as_deref() == series)
                })),
                Err(e) => Err(LookupError::Unreachable(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(patient: &str, issuer: Option<&str>) -> Owner {
        Owner {
            patient_id: patient.into(),
            issuer: issuer.map(str::to_string),
            study_uid: "S".into(),
            series_uid: None,
            issuer_known: true,
            facts: None,
        }
    }

    #[test]
    fn one_uid_under_two_patients_trusts_neither() {
        type Case<'a> = (
            &'a [(&'a str, Option<&'a str>)],
            Result<Option<&'a str>, Denial>,
        );
        let cases: &[Case] = &[
            (&[], Ok(None)),
            (&[("A", None)], Ok(Some("A"))),
            (&[("A", None), ("A ", None)], Ok(Some("A"))),
            (&[("A", None), ("B", None)], Err(Denial::OwnerConflict)),
            (
                &[("A", Some("H1")), ("A", Some("H2"))],
                Err(Denial::OwnerConflict),
            ),
            (
                &[("A", Some("H1")), ("A", None)],
                Err(Denial::OwnerConflict),
            ),
            // PatientID is case-sensitive: two patients.
            (&[("a", None), ("A", None)], Err(Denial::OwnerConflict)),
        ];
        for (matches, want) in cases {
            let got = one_owner(matches.iter().map(|(p, i)| owner(p, *i)).collect());
            let got = got.map(|o| o.map(|o| o.patient_id));
            let want = want.clone().map(|o| o.map(str::to_string));
            assert_eq!(got, want, "{matches:?}");
        }
        // As many as the cap allows, all one patient's: that patient. One more: the answers
        // past the cap were not seen, so none is trusted.
        let many = |n| (0..n).map(|_| owner("A", None)).collect::<Vec<_>>();
        assert_eq!(
            one_owner(many(MAX_OWNERS)).map(|o| o.map(|o| o.patient_id)),
            Ok(Some("A".to_string()))
        );
        assert_eq!(
            one_owner(many(MAX_OWNERS + 1)).map(|o| o.map(|o| o.patient_id)),
            Err(Denial::OwnerConflict)
        );
    }
}
