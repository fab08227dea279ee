//! Stores: C-STORE and STOW-RS parts decided on what the instance says of itself.
//!
//! Owns: the write decision (write scope, the caller's patient, a study, series or SOP Instance
//! UID the PACS already holds must be that patient's, the write restriction) and what a
//! confirmed store proves for later decisions.

use super::decision::Placement;
#[allow(unused_imports)]
use super::*;

impl Policy {
    /// Remembers where a confirmed store put its instance, for UIDs not cached already. Later
    /// instances of the same study are then decided without a look-up, but only until the
    /// entry's time is up: a store never renews an entry (else a caller storing now and then
    /// would keep the PACS from being asked again, and a study later reassigned, or held under
    /// two patients, would go on being judged the caller's).
    pub(super) async fn remember_placement(&self, p: &Placement) {
        let owner = |series: Option<&str>| {
            Arc::new(Owner {
                patient_id: p.patient_id.clone(),
                issuer: p.issuer.clone(),
                issuer_known: true,
                study_uid: p.study.clone(),
                series_uid: series.map(str::to_string),
                facts: None,
            })
        };
        let in_study = Within {
            study: Some(&p.study),
            series: None,
        };
        let in_series = Within {
            series: Some(&p.series),
            ..in_study
        };
        let keys = [
            ((UidLevel::Study, p.study.clone()), owner(None)),
            (
                self.owner_key(UidLevel::Series, &p.series, in_study),
                owner(Some(&p.series)),
            ),
            (
                self.owner_key(UidLevel::Instance, &p.instance, in_series),
                owner(Some(&p.series)),
            ),
        ];
        for (key, owner) in keys {
            self.owners.entry(key).or_insert(owner).await;
        }
    }

    /// Decides a store: the token must grant write, the instance's PatientID must be an allowed
    /// patient's, a study or series it names that the PACS already holds must be that
    /// patient's too (no writing into another patient's study), and the instance must pass the
    /// write scope's study restriction (judged on the instance's own Modality and StudyDate).
    pub(crate) async fn decide_store(
        &self,
        p: &Principal,
        req: &StoreRequest<'_>,
        lookup: &dyn OwnerLookup,
        ehr: &dyn EhrDirectory,
        now: SystemTime,
    ) -> Decision {
        let access = match self.access_at(p, now) {
            Ok(a) => a,
            Err(d) => return Decision::Deny(d),
        };
        let Some(rule) = access.write else {
            return Decision::Deny(Denial::NoWrite);
        };
        let pid = req.patient_id.map(|v| v.trim_matches(' ')).unwrap_or("");
        if pid.is_empty()
            || pid.contains('\\')
            || !access.write_patients.admits(Some(pid), req.issuer)
        {
            return Decision::Deny(Denial::ForeignPatient);
        }
        let mut study = "";
        let mut study_exists = false;
        for (l, uid) in [
            (UidLevel::Study, req.study_uid),
            (UidLevel::Series, req.series_uid),
        ] {
            let Some(uid) = uid
                .map(|u| u.trim_end_matches(['\0', ' ']))
                .filter(|u| !u.is_empty())
            else {
                return Decision::Deny(Denial::BadIdentifier(
                    "the instance has no study or series UID",
                ));
            };
            if l == UidLevel::Study {
                study = uid;
            }
            let within = Within {
                study: Some(study),
                series: None,
            };
            match self.owner_within(lookup, l, uid, within).await {
                Ok(None) => {}
                Ok(Some(o)) => {
                    study_exists |= l == UidLevel::Study;
                    if self.use_issuer && !o.issuer_known {
                        tracing::warn!("the PACS did not return IssuerOfPatientID; denying");
                        return Decision::Deny(Denial::LookupFailed);
                    }
                    let same_issuer = || issuer(o.issuer.as_deref()) == issuer(req.issuer);
                    if !lo_eq(&o.patient_id, pid) || (self.use_issuer && !same_issuer()) {
                        return Decision::Deny(Denial::ForeignStudy);
                    }
                }
                Err(d) => return Decision::Deny(d),
            }
        }
        // One UID under two patients, studies or series would make the PACS answer for the
        // wrong data: the instance must be new, or the caller's own in the same place.
        let Some(instance) = req.instance_uid.filter(|u| !u.is_empty()) else {
            return Decision::Deny(Denial::BadIdentifier(
                "the instance has no SOP Instance UID",
            ));
        };
        let series = req.series_uid.map(|u| u.trim_end_matches(['\0', ' ']));
        let within = Within {
            study: Some(study),
            series,
        };
        match self
            .owner_within(lookup, UidLevel::Instance, instance, within)
            .await
        {
            Ok(None) => {}
            Ok(Some(o)) => {
                let same_issuer = !self.use_issuer
                    || (o.issuer_known && issuer(o.issuer.as_deref()) == issuer(req.issuer));
                if !lo_eq(&o.patient_id, pid)
                    || !same_issuer
                    || o.study_uid != study
                    || o.series_uid.as_deref() != series
                {
                    return Decision::Deny(Denial::ForeignInstance);
                }
            }
            Err(d) => return Decision::Deny(d),
        }
        if !rule.is_open() {
            let facts = StudyFacts {
                modalities: req
                    .modality
                    .map(|m| m.trim_matches([' ', '\0']).to_string())
                    .into_iter()
                    .filter(|m| !m.is_empty())
                    .collect(),
                study_date: req
                    .study_date
                    .map(|d| d.trim_matches([' ', '\0']).to_string()),
            };
            match self
                .admits_study(p, &rule, study, Some(&facts), lookup, ehr)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Decision::Deny(Denial::OutsideStudies),
                Err(d) => return Decision::Deny(d),
            }
            // Writing into a study the PACS holds is writing into that study: it must be inside
            // the restriction as it stands (else a CT instance could make an MR study readable).
            if study_exists {
                match self.admits_study(p, &rule, study, None, lookup, ehr).await {
                    Ok(true) => {}
                    Ok(false) => return Decision::Deny(Denial::OutsideStudies),
                    Err(d) => return Decision::Deny(d),
                }
            }
        }
        let mut permit = Permit::new(access.write_patients);
        permit.stores = Some(Box::new(Placement {
            patient_id: pid.to_string(),
            issuer: issuer(req.issuer).map(str::to_string),
            study: study.to_string(),
            series: series.unwrap_or_default().to_string(),
            instance: instance.to_string(),
        }));
        Decision::Allow(permit)
    }
}

/// An IssuerOfPatientID as compared: without padding, empty as none.
fn issuer(i: Option<&str>) -> Option<&str> {
    i.map(|i| i.trim_matches([' ', '\0']))
        .filter(|i| !i.is_empty())
}
