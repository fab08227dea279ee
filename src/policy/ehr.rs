//! The EHR: what the policy core asks an issuer's FHIR server, and how it reads the answers.
//!
//! Owns: the [`EhrDirectory`] port (served by the EHR adapter), the cache of the EHR's answers
//! per token and study, batched searches ahead of judging (`user_level = "ehr-check"`), and
//! reading ImagingStudy resources and search Bundles.

#[allow(unused_imports)]
use super::*;

/// The future a [`PatientDirectory`] returns.
pub type DirectoryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, String>> + Send + 'a>>;

/// What the policy core asks of an issuer's EHR. Implemented by the trust core; the policy
/// core only judges the answers. `Ok(None)`: the EHR has nothing (or refused) for this.
pub trait EhrDirectory: Send + Sync {
    /// `GET {fhir_base_url}/Patient/{id}` with the gateway's own credentials.
    fn patient<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a>;
    /// `GET {fhir_base_url}/ImagingStudy/{id}` with the gateway's own credentials.
    fn imaging_study<'a>(&'a self, issuer: &'a str, id: &'a str) -> DirectoryFuture<'a>;
    /// `GET {fhir_base_url}/ImagingStudy?identifier=urn:oid:{uid}[,urn:oid:{uid}..]` with the
    /// caller's own token: the search Bundle, `None` when the EHR refuses the caller (401/403).
    fn studies_seen_by<'a>(
        &'a self,
        p: &'a Principal,
        study_uids: &'a [String],
    ) -> DirectoryFuture<'a>;
}

/// The Study Instance UID an ImagingStudy resource names (identifier system `urn:dicom:uid`,
/// value `urn:oid:{uid}`).
pub fn study_uid_of(r: &serde_json::Value) -> Option<String> {
    if r.get("resourceType").and_then(|t| t.as_str()) != Some("ImagingStudy") {
        return None;
    }
    r.get("identifier")?.as_array()?.iter().find_map(|id| {
        let system = id.get("system").and_then(|s| s.as_str());
        if system.is_some_and(|s| s != crate::trust::scopes::DICOM_UID_SYSTEM) {
            return None;
        }
        id.get("value")?
            .as_str()?
            .strip_prefix("urn:oid:")
            .map(str::to_string)
    })
}

/// Whether a search Bundle says there are more pages.
pub(super) fn bundle_has_next_page(bundle: &serde_json::Value) -> bool {
    bundle
        .get("link")
        .and_then(|l| l.as_array())
        .is_some_and(|links| {
            links
                .iter()
                .any(|l| l.get("relation").and_then(|r| r.as_str()) == Some("next"))
        })
}

/// Whether an ImagingStudy search Bundle holds the study (the EHR may ignore a search
/// parameter it does not support and return everything: each entry is checked).
pub(super) fn bundle_has_study(bundle: &serde_json::Value, uid: &str) -> bool {
    bundle
        .get("entry")
        .and_then(|e| e.as_array())
        .is_some_and(|entries| {
            entries.iter().any(|e| {
                e.get("resource")
                    .and_then(study_uid_of)
                    .is_some_and(|u| u == uid)
            })
        })
}

impl Policy {
    /// Whether the EHR returns the study to the caller's own token; answers (yes and no) are
    /// cached per token and study, failures are not.
    pub(super) async fn ehr_shows(
        &self,
        p: &Principal,
        uid: &str,
        ehr: &dyn EhrDirectory,
    ) -> Result<bool, Denial> {
        let key = (p.bearer.digest(), uid.to_string());
        let cached = self.ehr_cache.get(&key).await;
        crate::metrics::cache("ehr_check", cached.is_some());
        if let Some(v) = cached {
            return Ok(v);
        }
        let shown = match ehr.studies_seen_by(p, &[uid.to_string()]).await {
            Ok(Some(bundle)) => bundle_has_study(&bundle, uid),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(issuer = %p.issuer, error = %e, "EHR study check failed; denying");
                return Err(Denial::EhrUnavailable);
            }
        };
        self.ehr_cache.insert(key, shown).await;
        Ok(shown)
    }

    /// Asks the EHR about many studies at once (searches of [`EHR_BATCH`] identifiers) before
    /// results are judged one by one, so a user-level search costs a few EHR requests rather
    /// than one per study. Only answers the EHR gave for sure are remembered: a study missing
    /// from a Bundle that says it has more pages is left to be asked about alone. Does nothing
    /// unless the decision asks the EHR.
    pub(crate) async fn prefetch_ehr(
        &self,
        p: &Principal,
        allowed: &Permit,
        study_uids: &[String],
        memo: &StudyMemo,
        ehr: &dyn EhrDirectory,
    ) {
        if !allowed.asks_ehr() || memo.stopped.is_some() {
            return;
        }
        let digest = p.bearer.digest();
        let room = MAX_STUDIES_JUDGED.saturating_sub(memo.judged.len());
        let mut unknown: Vec<String> = Vec::new();
        for u in study_uids {
            if unknown.len() >= room {
                break;
            }
            if !unknown.contains(u)
                && !memo.judged.contains_key(u)
                && !self.ehr_cache.contains_key(&(digest, u.clone()))
            {
                unknown.push(u.clone());
            }
        }
        for chunk in unknown.chunks(EHR_BATCH) {
            match ehr.studies_seen_by(p, chunk).await {
                Ok(Some(bundle)) => {
                    let more = bundle_has_next_page(&bundle);
                    for u in chunk {
                        let shown = bundle_has_study(&bundle, u);
                        if shown || !more {
                            self.ehr_cache.insert((digest, u.clone()), shown).await;
                        }
                    }
                }
                Ok(None) => {
                    for u in chunk {
                        self.ehr_cache.insert((digest, u.clone()), false).await;
                    }
                }
                // Judged one by one later, which denies if the EHR still fails.
                Err(e) => {
                    tracing::warn!(issuer = %p.issuer, error = %e, "EHR batch study check failed");
                    return;
                }
            }
        }
    }
}
