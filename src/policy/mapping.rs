//! Patient identity mapping: from the patient a token names to the DICOM identities (PatientID,
//! and the issuer where known) whose data it may reach.
//!
//! Owns: the `claim` mapping (a claim holding the PatientID, a CX value such as IHE IUA's
//! `extensions.ihe_bppc.patient_id`, or a list of them) and the `table` mapping (a CSV file,
//! reloaded when it changes). A patient that maps to nothing gets nothing. Must not know
//! protocols.

use super::DicomPatient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often the table file is looked at for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// A CX value (`ID^^^&1.2.3&ISO`, HL7 v2 / IHE): the id, and the assigning authority's universal
/// id (or namespace) as the issuer.
pub(crate) fn parse_cx(v: &str) -> Option<DicomPatient> {
    let v = v.trim();
    let mut comps = v.split('^');
    let id = comps.next()?.trim();
    if id.is_empty() || id.len() > 64 || id.contains('\\') {
        return None;
    }
    let issuer = comps.nth(2).and_then(|auth| {
        let mut sub = auth.split('&');
        let namespace = sub.next().unwrap_or("").trim();
        let universal = sub.next().unwrap_or("").trim();
        let chosen = if universal.is_empty() {
            namespace
        } else {
            universal
        };
        (!chosen.is_empty()).then(|| chosen.to_string())
    });
    Some(DicomPatient {
        patient_id: id.to_string(),
        issuer,
        issuer_match: None,
    })
}

/// The identities a claim (dot path) holds: a string (plain or CX) or a list of strings.
pub(crate) fn from_claim(claims: &serde_json::Value, path: &str) -> Vec<DicomPatient> {
    let mut v = claims;
    for part in path.split('.') {
        match v.get(part) {
            Some(x) => v = x,
            None => return Vec::new(),
        }
    }
    let values: Vec<&str> = match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
        _ => Vec::new(),
    };
    values.into_iter().filter_map(parse_cx).take(16).collect()
}

/// The identifiers of a FHIR Patient resource with this system and/or this type code (e.g. MR);
/// the system becomes the issuer.
pub(crate) fn from_fhir(
    patient: &serde_json::Value,
    system: Option<&str>,
    type_code: Option<&str>,
) -> Vec<DicomPatient> {
    let Some(ids) = patient.get("identifier").and_then(|i| i.as_array()) else {
        return Vec::new();
    };
    ids.iter()
        .filter(|i| system.is_none_or(|s| i.get("system").and_then(|x| x.as_str()) == Some(s)))
        .filter(|i| {
            type_code.is_none_or(|t| {
                i.get("type")
                    .and_then(|ty| ty.get("coding"))
                    .and_then(|c| c.as_array())
                    .is_some_and(|codings| {
                        codings
                            .iter()
                            .any(|c| c.get("code").and_then(|x| x.as_str()) == Some(t))
                    })
            })
        })
        .filter_map(|i| {
            let value = i.get("value")?.as_str()?.trim();
            (!value.is_empty() && value.len() <= 64 && !value.contains('\\')).then(|| {
                DicomPatient {
                    patient_id: value.to_string(),
                    issuer: i.get("system").and_then(|s| s.as_str()).map(str::to_string),
                    issuer_match: None,
                }
            })
        })
        .take(16)
        .collect()
}

/// A mapping table: token patient id to DICOM identities.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: HashMap<String, Vec<DicomPatient>>,
}

impl Table {
    /// Reads `patient,patient_id,issuer` rows (header first; `#` lines are comments; the issuer
    /// column may be empty). Every problem names its line.
    pub fn read(path: &Path) -> Result<Table, String> {
        let mut rows: HashMap<String, Vec<DicomPatient>> = HashMap::new();
        for row in crate::config::read_patient_table(path)? {
            rows.entry(row.patient).or_default().push(DicomPatient {
                patient_id: row.patient_id,
                issuer: row.issuer,
                issuer_match: None,
            });
        }
        Ok(Table { rows })
    }

    /// The identities of a patient (at most 16: each costs a query per search).
    pub fn get(&self, patient: &str) -> Vec<DicomPatient> {
        self.rows
            .get(patient)
            .map(|v| v.iter().take(16).cloned().collect())
            .unwrap_or_default()
    }
}

struct Loaded {
    table: Arc<Table>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// A table file kept current: looked at every few seconds, reloaded when its modification time
/// changes; a file that fails to parse keeps the last good table (and says so in the log).
pub(crate) struct TableSource {
    path: PathBuf,
    state: RwLock<Loaded>,
}

impl TableSource {
    pub fn new(path: PathBuf) -> TableSource {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let table = Table::read(&path).unwrap_or_else(|e| {
            tracing::error!(error = %e, "patient mapping table unreadable; no patient maps");
            Table::default()
        });
        TableSource {
            path,
            state: RwLock::new(Loaded {
                table: Arc::new(table),
                modified,
                checked: Instant::now(),
            }),
        }
    }

    pub(crate) fn current(&self) -> Arc<Table> {
        let due = self
            .state
            .read()
            .map(|s| s.checked.elapsed() >= RELOAD_CHECK)
            .unwrap_or(false);
        if due && let Ok(mut s) = self.state.write() {
            s.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != s.modified {
                match Table::read(&self.path) {
                    Ok(t) => {
                        tracing::info!(path = %self.path.display(), "patient mapping table reloaded");
                        s.table = Arc::new(t);
                        s.modified = modified;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "patient mapping table not reloaded; keeping the last good one")
                    }
                }
            }
        }
        match self.state.read() {
            Ok(s) => s.table.clone(),
            Err(_) => Arc::new(Table::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cx_values() {
        let p = parse_cx("543797436^^^&1.2.840.113619.6.197&ISO").unwrap();
        assert_eq!(p.patient_id, "543797436");
        assert_eq!(p.issuer.as_deref(), Some("1.2.840.113619.6.197"));
        let p = parse_cx("MRN7^^^HOSP").unwrap();
        assert_eq!(
            (p.patient_id.as_str(), p.issuer.as_deref()),
            ("MRN7", Some("HOSP"))
        );
        assert_eq!(parse_cx("PLAIN").unwrap().issuer, None);
        assert!(parse_cx("").is_none() && parse_cx("A\\B").is_none() && parse_cx("^^^X").is_none());
    }

    #[test]
    fn claims_by_path() {
        let c = json!({"dicom_patient_id": "P1", "extensions": {"ihe_bppc": {"patient_id": "P2^^^&1.2&ISO"}}, "many": ["A", "B", 3]});
        assert_eq!(from_claim(&c, "dicom_patient_id")[0].patient_id, "P1");
        assert_eq!(
            from_claim(&c, "extensions.ihe_bppc.patient_id")[0]
                .issuer
                .as_deref(),
            Some("1.2")
        );
        assert_eq!(from_claim(&c, "many").len(), 2);
        assert!(from_claim(&c, "missing").is_empty());
        assert!(from_claim(&c, "extensions").is_empty());
    }

    #[test]
    fn fhir_identifiers_by_system_and_type() {
        let p = json!({"resourceType": "Patient", "identifier": [
            {"system": "urn:oid:1.2.3", "type": {"coding": [{"code": "MR"}]}, "value": "MRN-1"},
            {"system": "urn:oid:9.9", "type": {"coding": [{"code": "SS"}]}, "value": "123-45"},
            {"system": "urn:oid:1.2.3", "value": "MRN-OLD"},
        ]});
        let v = |s, t| {
            from_fhir(&p, s, t)
                .into_iter()
                .map(|d| d.patient_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(v(None, Some("MR")), vec!["MRN-1"]);
        assert_eq!(v(Some("urn:oid:1.2.3"), None), vec!["MRN-1", "MRN-OLD"]);
        assert_eq!(v(Some("urn:oid:1.2.3"), Some("MR")), vec!["MRN-1"]);
        assert!(v(Some("urn:none"), None).is_empty());
        assert!(from_fhir(&json!({}), None, Some("MR")).is_empty());
    }

    #[test]
    fn table_reads_reloads_and_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("pacsgate-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("patients.csv");
        std::fs::write(
            &f,
            "patient,patient_id,issuer\n# comment\nE1,PAT-A,\nE1,PAT-B,HOSP\nE2,PAT-C\n",
        )
        .unwrap();
        let t = Table::read(&f).unwrap();
        assert_eq!(t.get("E1").len(), 2);
        assert_eq!(t.get("E1")[1].issuer.as_deref(), Some("HOSP"));
        assert!(t.get("nobody").is_empty());
        let src = TableSource::new(f.clone());
        assert_eq!(src.current().get("E2")[0].patient_id, "PAT-C");
        std::fs::write(&f, "patient,patient_id,issuer\nE2,PAT-D,\n").unwrap();
        // force the check and a different modification time
        let later = SystemTime::now() + Duration::from_secs(5);
        let _ = std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(later));
        src.state.write().unwrap().checked = Instant::now() - RELOAD_CHECK;
        assert_eq!(src.current().get("E2")[0].patient_id, "PAT-D");
        std::fs::write(&f, "garbage").unwrap();
        let _ = std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(later + Duration::from_secs(5)));
        src.state.write().unwrap().checked = Instant::now() - RELOAD_CHECK;
        assert_eq!(
            src.current().get("E2")[0].patient_id,
            "PAT-D",
            "the last good table stays"
        );
        for bad in [
            "",
            "id,pid\nA,B\n",
            "patient,patient_id\nA,\n",
            "patient,patient_id\nA,X\\\\Y\n",
        ] {
            std::fs::write(&f, bad).unwrap();
            assert!(Table::read(&f).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
