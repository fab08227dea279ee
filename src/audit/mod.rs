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
    Wado(WadoPart),
    WadoUri,
    Stow,
    /// An HTTP request refused before its resource was known (authentication).
    HttpRequest,
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
            Operation::Wado(WadoPart::Instances) => "WADO-RS retrieve",
            Operation::Wado(WadoPart::Metadata) => "WADO-RS metadata",
            Operation::Wado(WadoPart::Rendered) => "WADO-RS rendered",
            Operation::Wado(WadoPart::Thumbnail) => "WADO-RS thumbnail",
            Operation::Wado(WadoPart::Frames) => "WADO-RS frames",
            Operation::Wado(WadoPart::BulkData) => "WADO-RS bulkdata",
            Operation::WadoUri => "WADO-URI",
            Operation::Stow => "STOW-RS",
            Operation::HttpRequest => "HTTP request",
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
            Operation::Wado(_) => "WADO-RS",
            Operation::WadoUri => "WADO-URI",
            Operation::Stow => "STOW-RS",
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
        }
    }

    /// The client's network address.
    pub fn with_peer(mut self, peer: Option<std::net::IpAddr>) -> Trail<'a> {
        self.peer = peer;
        self
    }

    /// The patients (DICOM PatientIDs) and studies the recorded operation touched.
    pub fn about(mut self, patients: Vec<String>, studies: Vec<String>) -> Trail<'a> {
        self.patients = patients;
        self.studies = studies;
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
        let (object, reason) = (Clean(object), Clean(reason));
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
                id: p
                    .fhir_user
                    .clone()
                    .or_else(|| p.subject.clone())
                    .or_else(|| p.client_id.clone())
                    .unwrap_or_else(|| "-".into()),
                client_id: p.client_id.clone(),
                issuer: p.issuer.clone(),
                token_id: p.token_id.clone(),
            }),
            client_cert: self.client_cert.clone(),
            peer: self.peer,
            patients: self.patients.clone(),
            studies: self.studies.clone(),
        });
    }
}
