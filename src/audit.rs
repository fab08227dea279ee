//! The audit trail: one record per access decision.
//!
//! Owns: what a decision record holds (channel, association or request, who, what, outcome,
//! reason) and where it goes. Today records are structured log events on the `pacsgate::audit`
//! target; DICOM PS3.15 audit messages will be emitted from here. Must not know protocol
//! details: front ends describe the action in a few words.

use crate::logtext::Clean;
use crate::trust::Principal;

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    /// Something that should not happen was seen and stopped (e.g. a PACS result for another
    /// patient).
    Anomaly,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Anomaly => "anomaly",
        }
    }
}

/// Records one decision. `reason` must not hold a token; the patient of the principal is
/// recorded because an audit trail needs it (it is not written to ordinary logs).
pub fn record(
    channel: &str,
    session: u64,
    principal: Option<&Principal>,
    action: &str,
    outcome: Outcome,
    reason: &str,
) {
    crate::metrics::audit_record(channel, action, outcome.as_str());
    let (iss, sub, client, patient, token) = match principal {
        Some(p) => (
            p.issuer.as_str(),
            p.subject.as_deref().unwrap_or("-"),
            p.client_id.as_deref().unwrap_or("-"),
            p.patient.as_deref().unwrap_or("-"),
            p.token_id.as_str(),
        ),
        None => ("-", "-", "-", "-", "-"),
    };
    // Every value may come from a peer (a claim, a path, an AE title): written escaped.
    let (iss, sub, client, patient) = (Clean(iss), Clean(sub), Clean(client), Clean(patient));
    let (action, reason) = (Clean(action), Clean(reason));
    match outcome {
        Outcome::Allowed => tracing::info!(
            target: "pacsgate::audit", channel, session, iss = ?iss, sub = ?sub, client_id = ?client,
            patient = ?patient, token, action = ?action, outcome = outcome.as_str(), reason = ?reason
        ),
        Outcome::Denied | Outcome::Anomaly => tracing::warn!(
            target: "pacsgate::audit", channel, session, iss = ?iss, sub = ?sub, client_id = ?client,
            patient = ?patient, token, action = ?action, outcome = outcome.as_str(), reason = ?reason
        ),
    }
}
