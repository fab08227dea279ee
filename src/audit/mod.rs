//! The audit trail: one record per access decision.
//!
//! Owns: what a decision record holds (channel, association or request, who, from where, which
//! operation on what, the patients and studies it touched, outcome, reason) and where it goes:
//! a structured log event on the `pacsgate::audit` target, and, with `[audit]`, a DICOM PS3.15
//! A.5 audit message ([`atna`]) to syslog and a JSON line to a file ([`sink`]). Must not know
//! protocol details: front ends name the operation by an [`Operation`], describe its object in
//! a few words and name the patients and studies.

pub(crate) mod atna;
pub mod sink;

use crate::logtext::Clean;
use crate::trust::Principal;

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Allowed,
    Denied,
    /// Something that should not happen was seen and stopped (e.g. a PACS result for another
    /// patient).
    Anomaly,
    /// Refused because something upstream (the PACS, an issuer, the EHR) could not answer.
    Failed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Anomaly => "anomaly",
            Outcome::Failed => "failed",
        }
    }
}

/// The front end a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    Dimse,
    Http,
}

impl Channel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Channel::Dimse => "dimse",
            Channel::Http => "http",
        }
    }
}

/// What was asked for. The metrics count records by [`Operation::family`]; the log names the
/// operation itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Associate,
    Echo,
    Find,
    Get,
    Move,
    /// An instance the PACS sent to the C-MOVE receiver for a move in flight.
    MoveInstance,
    Store,
    /// A DIMSE request refused before its service was known to apply (wrong SOP class).
    DimseRequest,
    /// A DIMSE identifier the strict reader refused.
    DimseIdentifier,
    Qido,
    /// A FHIR ImagingStudy search (SMART Imaging Access), answered from QIDO-RS or C-FIND.
    FhirSearch,
    Wado(WadoPart),
    WadoUri,
    Stow,
    /// An HTTP request refused before its resource was known (authentication).
    HttpRequest,
    /// A token exchange at the gateway's own authorization server: a subject token in, a
    /// token of the gateway's out.
    TokenExchange,
}

/// What a WADO-RS request retrieves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WadoPart {
    Instances,
    Metadata,
    Rendered,
    Thumbnail,
    Frames,
    BulkData,
}

impl Operation {
    /// The operation as the log shows it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Associate => "A-ASSOCIATE",
            Operation::Echo => "C-ECHO",
            Operation::Find => "C-FIND",
            Operation::Get => "C-GET",
            Operation::Move => "C-MOVE",
            Operation::MoveInstance => "C-MOVE sub-operation",
            Operation::Store => "C-STORE",
            Operation::DimseRequest => "DIMSE request",
            Operation::DimseIdentifier => "DIMSE identifier",
            Operation::Qido => "QIDO-RS",
            Operation::FhirSearch => "FHIR ImagingStudy search",
            Operation::Wado(WadoPart::Instances) => "WADO-RS retrieve",
            Operation::Wado(WadoPart::Metadata) => "WADO-RS metadata",
            Operation::Wado(WadoPart::Rendered) => "WADO-RS rendered",
            Operation::Wado(WadoPart::Thumbnail) => "WADO-RS thumbnail",
            Operation::Wado(WadoPart::Frames) => "WADO-RS frames",
            Operation::Wado(WadoPart::BulkData) => "WADO-RS bulkdata",
            Operation::WadoUri => "WADO-URI",
            Operation::Stow => "STOW-RS",
            Operation::HttpRequest => "HTTP request",
            Operation::TokenExchange => "token exchange",
        }
    }

    /// The `operation` label of `pacsgate_audit_records_total`.
    pub(crate) fn family(self) -> &'static str {
        match self {
            Operation::Associate => "A-ASSOCIATE",
            Operation::Echo => "C-ECHO",
            Operation::Find => "C-FIND",
            Operation::Get => "C-GET",
            Operation::Move | Operation::MoveInstance => "C-MOVE",
            Operation::Store => "C-STORE",
            Operation::Qido => "QIDO-RS",
            Operation::FhirSearch => "FHIR",
            Operation::Wado(_) => "WADO-RS",
            Operation::WadoUri => "WADO-URI",
            Operation::Stow => "STOW-RS",
            Operation::TokenExchange => "token-exchange",
            Operation::DimseRequest | Operation::DimseIdentifier | Operation::HttpRequest => {
                "other"
            }
        }
    }
}

/// Where one association's or one request's records go: its channel, its number and, once
/// the token was verified, its principal; and the subject of the client certificate the TLS
/// handshake verified, so that a workstation is named beside its user.
#[derive(Clone)]
pub(crate) struct Trail<'a> {
    channel: Channel,
    id: u64,
    principal: Option<&'a Principal>,
    client_cert: Option<std::sync::Arc<str>>,
    peer: Option<std::net::IpAddr>,
    patients: Vec<String>,
    studies: Vec<String>,
    /// Distinct patients and studies left out of the record (beyond the caps).
    omitted: usize,
}

/// Studies one record names at most; more are counted in its reason.
pub const MAX_STUDIES: usize = 100;
/// Patients one record names at most.
pub const MAX_PATIENTS: usize = 16;
/// The longest object, reason or user text a record carries (bytes; longer is cut).
const MAX_TEXT: usize = 1024;

/// The first `max` distinct values in their order, and how many distinct ones were left out.
fn first_unique(values: Vec<String>, max: usize) -> (Vec<String>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut kept = Vec::new();
    let mut left = 0;
    for v in values {
        if seen.contains(&v) {
            continue;
        }
        if kept.len() < max {
            seen.insert(v.clone());
            kept.push(v);
        } else if seen.insert(v) {
            left += 1;
        }
    }
    (kept, left)
}

/// `s` cut to at most `max` bytes, at a character boundary, with every character that could
/// make an audit viewer show something else than the record holds (C1 controls, bidirectional
/// overrides and isolates, which a claim or a path may carry) replaced by U+FFFD. XML and JSON
/// escaping come on top, where each format is written.
fn bounded(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end]
        .chars()
        .map(|c| if misleading(c) { '\u{fffd}' } else { c })
        .collect()
}

fn misleading(c: char) -> bool {
    matches!(c, '\u{80}'..='\u{9f}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}')
}

impl<'a> Trail<'a> {
    pub fn new(channel: Channel, id: u64, principal: Option<&'a Principal>) -> Trail<'a> {
        Trail {
            channel,
            id,
            principal,
            client_cert: None,
            peer: None,
            patients: Vec::new(),
            studies: Vec::new(),
            omitted: 0,
        }
    }

    /// The client's network address.
    pub fn with_peer(mut self, peer: Option<std::net::IpAddr>) -> Trail<'a> {
        self.peer = peer;
        self
    }

    /// The patients (DICOM PatientIDs) and studies the recorded operation touched, each named
    /// once. A request may name thousands (a refused C-FIND with a long UID list): a record
    /// keeps the first [`MAX_STUDIES`] and [`MAX_PATIENTS`] and counts the rest, so one record
    /// stays small enough for a syslog datagram and for the sink's queue.
    pub fn about(mut self, patients: Vec<String>, studies: Vec<String>) -> Trail<'a> {
        let clean = |v: Vec<String>| v.iter().map(|s| bounded(s, 128)).collect();
        let (patients, more_patients) = first_unique(clean(patients), MAX_PATIENTS);
        let (studies, more_studies) = first_unique(clean(studies), MAX_STUDIES);
        self.patients = patients;
        self.studies = studies;
        self.omitted = more_patients + more_studies;
        self
    }

    /// What a permit decided about: its patients and studies.
    pub fn about_permit(self, permit: &crate::policy::Permit) -> Trail<'a> {
        self.about(permit.audited_patients(), permit.audited_studies())
    }

    /// The subject of the client's verified certificate, when it presented one.
    pub fn with_client_cert(mut self, subject: Option<std::sync::Arc<str>>) -> Trail<'a> {
        self.client_cert = subject;
        self
    }

    /// Records one decision on `op`. `object` names what it applied to (e.g. `study=…`),
    /// empty when the operation says it all; neither it nor `reason` may hold a token.
    pub(crate) fn record(&self, op: Operation, object: &str, outcome: Outcome, reason: &str) {
        crate::metrics::audit_record(self.channel.as_str(), op.family(), outcome.as_str());
        let (iss, sub, client, patient, token) = match self.principal {
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
        let reason = match self.omitted {
            0 => bounded(reason, MAX_TEXT),
            n => format!(
                "{} ({n} more patients or studies not listed)",
                bounded(reason, MAX_TEXT)
            ),
        };
        let object = bounded(object, MAX_TEXT);
        let (object, reason) = (Clean(object.as_str()), Clean(reason.as_str()));
        let cert = Clean(self.client_cert.as_deref().unwrap_or("-"));
        let (channel, session, operation) = (self.channel.as_str(), self.id, op.name());
        match outcome {
            Outcome::Allowed => tracing::info!(
                target: "pacsgate::audit", channel, session, iss = ?iss, sub = ?sub, client_id = ?client,
                client_cert = ?cert, patient = ?patient, token, operation, object = ?object,
                outcome = outcome.as_str(), reason = ?reason
            ),
            Outcome::Denied | Outcome::Anomaly | Outcome::Failed => tracing::warn!(
                target: "pacsgate::audit", channel, session, iss = ?iss, sub = ?sub, client_id = ?client,
                client_cert = ?cert, patient = ?patient, token, operation, object = ?object,
                outcome = outcome.as_str(), reason = ?reason
            ),
        }
        sink::submit(atna::Event {
            time: chrono::Utc::now(),
            channel: self.channel,
            session: self.id,
            op,
            outcome,
            object: object.0.to_string(),
            reason: reason.0.to_string(),
            user: self.principal.map(|p| atna::User {
                id: bounded(
                    p.fhir_user
                        .as_deref()
                        .or(p.subject.as_deref())
                        .or(p.client_id.as_deref())
                        .unwrap_or("-"),
                    MAX_TEXT,
                ),
                client_id: p.client_id.as_deref().map(|c| bounded(c, MAX_TEXT)),
                issuer: bounded(&p.issuer, MAX_TEXT),
                token_id: p.token_id.clone(),
            }),
            client_cert: self.client_cert.clone(),
            peer: self.peer,
            patients: self.patients.clone(),
            studies: self.studies.clone(),
        });
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn a_record_names_each_study_once_and_at_most_the_cap() {
        let many: Vec<String> = (0..5000).map(|i| format!("1.2.{}", i % 2500)).collect();
        let (kept, left) = first_unique(many, MAX_STUDIES);
        assert_eq!(kept.len(), MAX_STUDIES);
        assert_eq!(
            left,
            2500 - MAX_STUDIES,
            "distinct ones left out, repeats not counted"
        );
        assert_eq!(kept[0], "1.2.0");
        let (kept, left) = first_unique(vec!["a".into(), "a".into(), "b".into()], 16);
        assert_eq!((kept, left), (vec!["a".to_string(), "b".to_string()], 0));
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_and_cannot_mislead() {
        let s = "é".repeat(600);
        let b = bounded(&s, MAX_TEXT);
        assert!(b.len() <= MAX_TEXT && b.len() >= MAX_TEXT - 1);
        assert_eq!(bounded("short", MAX_TEXT), "short");
        assert_eq!(
            bounded("Practitioner/\u{202e}gro\u{85}x\u{2066}", MAX_TEXT),
            "Practitioner/\u{fffd}gro\u{fffd}x\u{fffd}"
        );
    }
}
