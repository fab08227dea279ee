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
    Pin<Box<dyn Future<Output = Result<Option<Owner>, String>> + Send + 'a>>;

/// Resolves a UID to its owner by asking the PACS. `Ok(None)`: the PACS does not hold it.
/// Implemented by the PACS client; the policy core only caches and judges the answers.
pub trait OwnerLookup: Send + Sync {
    fn owner<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a>;
}

impl Policy {
    /// The owner of a UID, from the cache or the PACS.
    pub(super) async fn owner(
        &self,
        lookup: &dyn OwnerLookup,
        level: UidLevel,
        uid: &str,
    ) -> Result<Option<Arc<Owner>>, Denial> {
        let key = (level, uid.to_string());
        if let Some(o) = self.owners.get(&key).await {
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
        match lookup.owner(level, uid).await {
            Ok(Some(o)) => {
                let o = Arc::new(o);
                self.owners
                    .insert((level, uid.to_string()), o.clone())
                    .await;
                Ok(Some(o))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(level = ?level, error = %e, "ownership lookup failed; denying");
                Err(Denial::LookupFailed)
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
