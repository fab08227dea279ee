//! The audit trail: one record per access decision.
//!
//! Owns: what a decision record holds (channel, association or request, who, which operation
//! on what, outcome, reason) and where it goes. Today records are structured log events on the
//! `pacsgate::audit` target; DICOM PS3.15 audit messages will be emitted from here. Must not
//! know protocol details: front ends name the operation by an [`Operation`] and describe its
//! object (a study, a destination) in a few words.

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
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Anomaly => "anomaly",
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
}

impl<'a> Trail<'a> {
    pub fn new(channel: Channel, id: u64, principal: Option<&'a Principal>) -> Trail<'a> {
        Trail {
            channel,
            id,
            principal,
            client_cert: None,
        }
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
            Outcome::Denied | Outcome::Anomaly => tracing::warn!(
                target: "pacsgate::audit", channel, session, iss = ?iss, sub = ?sub, client_id = ?client,
                client_cert = ?cert, patient = ?patient, token, operation, object = ?object,
                outcome = outcome.as_str(), reason = ?reason
            ),
        }
    }
}
