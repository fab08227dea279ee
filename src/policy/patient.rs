//! Patients: the DICOM identities a token's patient maps to, whose data a caller may see, and
//! how a query is narrowed to them.
//!
//! Owns: [`DicomPatient`], [`PatientFilter`] and LO comparison ([`lo_eq`]), the mapping glue
//! (`patients.map`, `use_issuer`, issuer names), preparing a principal (the FHIR Patient and the
//! launch-context studies fetched through the EHR port) and narrowing a query's PatientID.

#[allow(unused_imports)]
use super::*;

/// One DICOM patient identity: PatientID, and IssuerOfPatientID where the mapping uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DicomPatient {
    pub patient_id: String,
    /// The issuer as the mapping found it (a CX assigning authority, a FHIR identifier system,
    /// the table's issuer column).
    pub issuer: Option<String>,
    /// With `patients.use_issuer`: the IssuerOfPatientID values data of this patient carries
    /// (empty: data must carry none). `None`: the issuer is not compared.
    pub issuer_match: Option<Vec<String>>,
}

impl DicomPatient {
    pub(super) fn matches(&self, patient_id: &str, issuer: Option<&str>) -> bool {
        lo_eq(&self.patient_id, patient_id)
            && match &self.issuer_match {
                None => true,
                Some(names) => match issuer
                    .map(|i| i.trim_matches(' '))
                    .filter(|i| !i.is_empty())
                {
                    None => names.is_empty(),
                    Some(i) => names.iter().any(|n| n == i),
                },
            }
    }
}

/// Which patients' data the caller may see or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientFilter {
    /// Only these identities (patient-level access).
    Only(Vec<DicomPatient>),
    /// Any patient (user- or system-level access where configured).
    Any,
}

impl PatientFilter {
    /// Whether data carrying this PatientID and IssuerOfPatientID belongs to an allowed
    /// patient. Both are LO values: leading and trailing spaces are padding; the rest is
    /// compared byte for byte, never case-folded. The issuer counts only where the mapping says
    /// so (`patients.use_issuer`). Data without a PatientID is never admitted under a
    /// patient-level filter.
    pub(crate) fn admits(&self, patient_id: Option<&str>, issuer: Option<&str>) -> bool {
        match self {
            PatientFilter::Any => true,
            PatientFilter::Only(ids) => match patient_id {
                None => false,
                Some(pid) => ids.iter().any(|p| p.matches(pid, issuer)),
            },
        }
    }

    /// Whether results must carry IssuerOfPatientID to be judged.
    pub(crate) fn compares_issuer(&self) -> bool {
        match self {
            PatientFilter::Any => false,
            PatientFilter::Only(ids) => ids.iter().any(|p| p.issuer_match.is_some()),
        }
    }
}

/// Equality of two LO values: padding spaces removed, then byte for byte.
pub fn lo_eq(a: &str, b: &str) -> bool {
    a.trim_matches(' ').as_bytes() == b.trim_matches(' ').as_bytes()
}

/// Narrows a query to the caller's patient: absent, empty or `*` becomes the caller's id; the
/// caller's own id (padding aside) is kept; anything else is refused.
pub(super) fn narrow_query(
    ids: &[DicomPatient],
    requested: Option<&str>,
    filter: &PatientFilter,
) -> Decision {
    if ids.is_empty() {
        return Decision::Deny(Denial::Unmapped);
    }
    let allow = |pids: Vec<String>| {
        Decision::Allow(Permit {
            query_patient_ids: pids,
            ..Permit::new(filter.clone())
        })
    };
    let value = requested.map(|v| v.trim_matches(' ')).unwrap_or("");
    if value.is_empty() || value == "*" {
        // One query per PatientID: identities that differ only by issuer share it.
        let mut pids: Vec<String> = Vec::new();
        for p in ids {
            if !pids.iter().any(|x| lo_eq(x, &p.patient_id)) {
                pids.push(p.patient_id.clone());
            }
        }
        return allow(pids);
    }
    if value.contains('\\') || value.contains('*') || value.contains('?') {
        return Decision::Deny(Denial::PatientPattern);
    }
    match ids.iter().find(|p| lo_eq(&p.patient_id, value)) {
        Some(p) => allow(vec![p.patient_id.clone()]),
        None => Decision::Deny(Denial::ForeignPatient),
    }
}

impl Policy {
    /// The DICOM identities of the patient the token names: `None` without patient context,
    /// an empty list when the patient maps to nothing (which grants nothing). With
    /// `use_issuer`, each carries the IssuerOfPatientID values its data must have.
    pub(super) fn map_patient(&self, p: &Principal) -> Option<Vec<DicomPatient>> {
        let mut ids = self.mapped_identities(p)?;
        if self.use_issuer {
            for id in &mut ids {
                id.issuer_match = Some(self.issuer_names_of(id.issuer.as_deref()));
            }
        }
        Some(ids)
    }

    /// The IssuerOfPatientID values that stand for a mapping's issuer: the configured name,
    /// the issuer itself, and an OID with and without its `urn:oid:` prefix.
    pub(super) fn issuer_names_of(&self, issuer: Option<&str>) -> Vec<String> {
        let Some(i) = issuer.map(str::trim).filter(|i| !i.is_empty()) else {
            return Vec::new();
        };
        let mut names = vec![i.to_string()];
        if let Some(oid) = i.strip_prefix("urn:oid:") {
            names.push(oid.to_string());
        } else if i.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            names.push(format!("urn:oid:{i}"));
        }
        let configured: Vec<String> = names
            .iter()
            .filter_map(|n| self.issuer_names.get(n))
            .map(|n| n.trim_matches(' ').to_string())
            .collect();
        names.extend(configured);
        names.retain(|n| !n.is_empty() && n.len() <= 64);
        names.sort();
        names.dedup();
        names
    }

    pub(super) fn mapped_identities(&self, p: &Principal) -> Option<Vec<DicomPatient>> {
        if let Some(g) = &p.granted {
            // A token of the gateway's own carries the identities it was issued for: the
            // mapping was applied then, to the token exchanged, and is not applied again.
            return g.patients.as_ref().map(|ps| {
                ps.iter()
                    .map(|x| DicomPatient {
                        patient_id: x.id.clone(),
                        issuer: x.issuer.clone(),
                        issuer_match: None,
                    })
                    .collect()
            });
        }
        match &self.map {
            PatientMap::Same => p.patient.as_ref().map(|id| {
                vec![DicomPatient {
                    patient_id: id.clone(),
                    ..DicomPatient::default()
                }]
            }),
            PatientMap::Claim(path) => {
                let ids = mapping::from_claim(&p.claims, path);
                if ids.is_empty() && p.patient.is_none() {
                    None
                } else {
                    Some(ids)
                }
            }
            PatientMap::Table(_) => {
                let table = self.table.as_ref()?.current();
                p.patient.as_ref().map(|id| table.get(id))
            }
            PatientMap::Fhir { system, type_code } => {
                p.patient.as_ref()?;
                // Not looked up (prepare was not called) or the look-up failed: nothing.
                let resource = p.fhir_patient.clone().flatten();
                Some(
                    resource
                        .map(|r| mapping::from_fhir(&r, system.as_deref(), type_code.as_deref()))
                        .unwrap_or_default(),
                )
            }
        }
    }

    /// Fetches what decisions need from the EHR before they are made: for `map = "fhir"` the
    /// Patient resource, and the Study Instance UIDs of launch-context ImagingStudy references
    /// (both cached). A failed look-up leaves the principal mapped to nothing, or its context
    /// study unknown; either grants nothing.
    pub(crate) async fn prepare(&self, p: &mut Principal, ehr: &dyn EhrDirectory) {
        if let Some(studies) = p.launch_studies.as_mut() {
            for s in studies.iter_mut() {
                let ContextStudy::Reference(id) = s else {
                    continue;
                };
                let key = (p.issuer.clone(), id.clone());
                let cached = self.context_cache.get(&key).await;
                crate::metrics::cache("launch_context", cached.is_some());
                *s = match cached {
                    Some(uid) => ContextStudy::Uid(uid),
                    None => match ehr.imaging_study(&p.issuer, id).await {
                        Ok(Some(r)) => match study_uid_of(&r) {
                            Some(uid) => {
                                self.context_cache.insert(key, uid.clone()).await;
                                ContextStudy::Uid(uid)
                            }
                            None => ContextStudy::Unknown,
                        },
                        Ok(None) => ContextStudy::Unknown,
                        Err(e) => {
                            tracing::warn!(error = %e, "launch-context ImagingStudy look-up failed; it grants nothing");
                            ContextStudy::Unknown
                        }
                    },
                };
            }
        }
        if !matches!(self.map, PatientMap::Fhir { .. }) || p.granted.is_some() {
            return;
        }
        let Some(id) = p.patient.clone() else { return };
        let key = (p.issuer.clone(), id.clone());
        let cached = self.fhir_cache.get(&key).await;
        crate::metrics::cache("patient_mapping", cached.is_some());
        if let Some(r) = cached {
            p.fhir_patient = Some(Some(r));
            return;
        }
        p.fhir_patient = Some(match ehr.patient(&p.issuer, &id).await {
            Ok(Some(r)) => {
                let r = Arc::new(r);
                self.fhir_cache.insert(key, r.clone()).await;
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "FHIR Patient look-up failed; the patient maps to nothing");
                None
            }
        });
    }
}
