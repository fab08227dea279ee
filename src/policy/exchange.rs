//! Exchange: what a token of the gateway's own may carry when it is issued for a caller's
//! token (RFC 8693 token exchange at `[authorization_server]`).
//!
//! Owns: the imaging scopes the gateway offers (ImagingStudy interactions it serves, at the
//! levels `policy.user_level` lets a token of its own use), narrowing a caller's scopes to
//! them and to what the caller asked for, never wider than what the caller's token grants; and
//! what the issued token carries (the patient identities as the mapping gives them, the
//! launch-context studies that restrict it), decided with the same access rules as every
//! request. Must not know token formats, keys or HTTP.

#[allow(unused_imports)]
use super::*;
use crate::trust::scopes::{Perms, Scope, ScopeSet};

/// What an issued token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// The narrowed imaging scopes.
    pub scopes: ScopeSet,
    /// The patient identities; `None`: the caller's token has no patient in context.
    pub patients: Option<Vec<DicomPatient>>,
    /// The launch-context studies that restrict it; `None`: no such restriction.
    pub studies: Option<Vec<String>>,
}

/// Why no token is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The scope asked for is not one the gateway offers within the caller's (`invalid_scope`).
    Scope(String),
    /// The caller's token opens no imaging access here (`invalid_grant`).
    Grant(Denial),
}

impl Policy {
    /// The caller's scopes narrowed to the imaging scopes the gateway offers: each one on
    /// ImagingStudy (or `*`) becomes the same scope on ImagingStudy with only the interactions
    /// the gateway serves (read and search, and create where `policy.write` allows it); user
    /// and system scopes only where `user_level = "allow"` (a check with the EHR needs the
    /// caller's own token, which a token of the gateway's does not carry); constraints kept
    /// as written, and scopes whose constraints grant nothing here dropped.
    pub fn offered(&self, scopes: &ScopeSet) -> ScopeSet {
        let mut out: Vec<Scope> = Vec::new();
        for s in &scopes.scopes {
            if s.resource != IMAGING && s.resource != "*" {
                continue;
            }
            if s.level != Level::Patient && self.user_level != UserLevel::Allow {
                continue;
            }
            if s.study_constraints().is_none() {
                continue;
            }
            let perms = Perms {
                read: s.perms.read,
                search: s.perms.search,
                create: s.perms.create && self.write,
                ..Perms::default()
            };
            if perms.is_empty() {
                continue;
            }
            let narrowed = Scope {
                level: s.level,
                resource: IMAGING.to_string(),
                perms,
                constraints: s.constraints.clone(),
            };
            if !out.contains(&narrowed) {
                out.push(narrowed);
            }
        }
        ScopeSet {
            scopes: out,
            other: Vec::new(),
        }
    }

    /// What a token issued for this caller carries, with the scopes `requested` asks for (each
    /// within one the gateway offers the caller) or, without, all it offers. Refused when the
    /// result opens no imaging access by the rules every request is decided by (expired, no
    /// imaging scope, a patient that maps to nobody, a user-level token where those are not
    /// allowed).
    pub fn carried(
        &self,
        caller: &Caller,
        requested: Option<&ScopeSet>,
    ) -> Result<Carried, Refusal> {
        let p = &caller.principal;
        let offered = self.offered(&p.scopes);
        let scopes = match requested {
            None => offered,
            Some(r) => {
                if let Some(other) = r.other.first() {
                    return Err(Refusal::Scope(format!(
                        "{other:?} is not an imaging scope this server issues"
                    )));
                }
                for want in &r.scopes {
                    if !offered.scopes.iter().any(|o| covers(o, want)) {
                        return Err(Refusal::Scope(format!(
                            "{want} is not within the imaging scopes of the subject token ({})",
                            if offered.scopes.is_empty() {
                                "none".to_string()
                            } else {
                                offered.to_string()
                            }
                        )));
                    }
                }
                ScopeSet {
                    scopes: r.scopes.clone(),
                    other: Vec::new(),
                }
            }
        };
        let mut narrowed = p.clone();
        narrowed.scopes = scopes.clone();
        let access = self
            .access_at(&narrowed, (self.ports.clock)())
            .map_err(|d| match d {
                Denial::InsufficientScope(_) => Refusal::Scope(match requested {
                    Some(_) => format!("{d}: the scope asked for opens none"),
                    None => format!("{d}: the subject token's scopes offer none"),
                }),
                d => Refusal::Grant(d),
            })?;
        let studies = p.launch_studies.as_ref().map(|v| {
            v.iter()
                .filter_map(|s| match s {
                    ContextStudy::Uid(u) => Some(u.clone()),
                    _ => None,
                })
                .collect()
        });
        // The identities the access was decided for: none beyond them goes into the token.
        let patients = self.map_patient(p).map(|ids| {
            ids.into_iter()
                .map(|id| DicomPatient {
                    issuer_match: None,
                    ..id
                })
                .collect()
        });
        debug_assert!(access.read.is_some() || access.write.is_some());
        Ok(Carried {
            scopes,
            patients,
            studies,
        })
    }
}

/// Whether `want` asks for no more than `offer`: same level, ImagingStudy, its interactions
/// among the offer's, and every constraint of the offer among its own (more constraints
/// narrow further), with constraints the gateway can evaluate.
fn covers(offer: &Scope, want: &Scope) -> bool {
    want.level == offer.level
        && want.resource == IMAGING
        && !want.perms.is_empty()
        && want.perms.within(&offer.perms)
        && offer
            .constraints
            .iter()
            .all(|c| want.constraints.contains(c))
        && want.study_constraints().is_some()
}
