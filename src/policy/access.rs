//! Access: what a token's SMART scopes permit before any particular request.
//!
//! Owns: [`Access`] (read and write, under which study restriction, for whose patients),
//! patient- versus user/system-level access (`policy.user_level`) and token expiry.

#[allow(unused_imports)]
use super::*;

/// What a principal's token permits, before any particular request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Read (`r` and `s`) and under which study restriction; `None`: no read.
    pub read: Option<StudyRule>,
    /// Write (`c`, with `policy.write`) and under which study restriction.
    pub write: Option<StudyRule>,
    /// Whose data may be read.
    pub patients: PatientFilter,
    /// Whose data may be written (narrower than `patients` for a clinician tool with user-level
    /// read and a patient-level write scope).
    pub write_patients: PatientFilter,
}

/// One interaction's scope alternatives as a constraint group: empty when some scope grants
/// it without constraints.
pub(super) fn group(alts: Option<Vec<Vec<Constraint>>>) -> Option<Vec<Vec<Constraint>>> {
    alts.map(|a| {
        if a.iter().any(Vec::is_empty) {
            Vec::new()
        } else {
            a
        }
    })
}

impl Policy {
    /// What an unexpired principal may do at `now`.
    pub(super) fn access_at(&self, p: &Principal, now: SystemTime) -> Result<Access, Denial> {
        if p.is_expired_at(now) {
            return Err(Denial::Expired);
        }
        self.access(p)
    }

    /// What the principal may do at all, or why it may do nothing.
    pub fn access(&self, p: &Principal) -> Result<Access, Denial> {
        const PATIENT: &[Level] = &[Level::Patient];
        const USER: &[Level] = &[Level::User, Level::System];
        let read_at = |levels: &[Level]| {
            let r = group(p.scopes.grants(levels, IMAGING, |x| x.read))?;
            let s = group(p.scopes.grants(levels, IMAGING, |x| x.search))?;
            Some(
                [r, s]
                    .into_iter()
                    .filter(|g| !g.is_empty())
                    .collect::<Vec<_>>(),
            )
        };
        let write_at = |levels: &[Level]| {
            if !self.write {
                return None;
            }
            let c = group(p.scopes.grants(levels, IMAGING, |x| x.create))?;
            Some(
                [c].into_iter()
                    .filter(|g| !g.is_empty())
                    .collect::<Vec<_>>(),
            )
        };
        // Launch-context studies, when the issuer asked for them to restrict; a reference not
        // resolved (yet) admits nothing.
        let context: Option<Vec<String>> = p.launch_studies.as_ref().map(|v| {
            v.iter()
                .filter_map(|s| match s {
                    ContextStudy::Uid(u) => Some(u.clone()),
                    _ => None,
                })
                .collect()
        });
        let rule = |groups: Vec<Vec<Vec<Constraint>>>, ehr: bool| StudyRule {
            scope_groups: groups,
            context: context.clone(),
            ehr,
        };
        let (pr, pw) = (read_at(PATIENT), write_at(PATIENT));
        let (ur, uw) = (read_at(USER), write_at(USER));

        // Patient-level scopes apply to the patient in context, and to nobody else.
        let mapped = self.map_patient(p);
        if let Some(ids) = &mapped
            && (pr.is_some() || pw.is_some())
        {
            if self.user_level == UserLevel::Allow
                && let Some(ur) = ur
            {
                // A clinician tool with user scopes and a patient selected: user-level access
                // is what the configuration allows it. A patient-level write scope still writes
                // for that patient only.
                let (write, write_patients) = match (uw, pw) {
                    (Some(g), _) => (Some(rule(g, false)), PatientFilter::Any),
                    (None, Some(g)) if !ids.is_empty() => {
                        (Some(rule(g, false)), PatientFilter::Only(ids.clone()))
                    }
                    _ => (None, PatientFilter::Only(Vec::new())),
                };
                return Ok(Access {
                    read: Some(rule(ur, false)),
                    write,
                    patients: PatientFilter::Any,
                    write_patients,
                });
            }
            if ids.is_empty() {
                return Err(Denial::Unmapped);
            }
            return Ok(Access {
                read: pr.map(|g| rule(g, false)),
                write: pw.map(|g| rule(g, false)),
                patients: PatientFilter::Only(ids.clone()),
                write_patients: PatientFilter::Only(ids.clone()),
            });
        }
        if ur.is_some() || uw.is_some() {
            let ehr = match self.user_level {
                UserLevel::Allow => false,
                UserLevel::EhrCheck => true,
                UserLevel::Deny => return Err(Denial::UserLevelNotAllowed),
            };
            return Ok(Access {
                read: ur.map(|g| rule(g, ehr)),
                write: uw.map(|g| rule(g, ehr)),
                patients: PatientFilter::Any,
                write_patients: PatientFilter::Any,
            });
        }
        if mapped.is_none() && (pr.is_some() || pw.is_some()) {
            return Err(Denial::NoPatientContext);
        }
        Err(Denial::InsufficientScope(
            "imaging access (patient/ImagingStudy.rs or .c)",
        ))
    }
}
