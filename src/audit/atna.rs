//! One audit event, and how it is written: a DICOM PS3.15 A.5 `AuditMessage` (the XML IHE ATNA
//! audit repositories read) and a JSON line with the same content.
//!
//! Owns: the mapping from an operation and its outcome to the event's coded values (EventID,
//! EventActionCode, EventOutcomeIndicator, EventTypeCode), the participants (the human or
//! system behind the token, the gateway) and the participant objects (patient, studies). Must
//! not know where a message goes ([`super::sink`]) or which front end recorded it.

use super::{Channel, Operation, Outcome};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

/// Who the token stands for, as the audit trail names them.
#[derive(Debug, Clone)]
pub(crate) struct User {
    /// `fhirUser`, else `sub`, else the client id: the human (or system) behind the token.
    pub id: String,
    pub client_id: Option<String>,
    pub issuer: String,
    /// A digest of the token, never the token.
    pub token_id: String,
}

/// One audit event, owned, so it can wait in the sink's queue.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub time: chrono::DateTime<chrono::Utc>,
    pub channel: Channel,
    /// The association's or request's number: with the channel, the correlation id.
    pub session: u64,
    pub op: Operation,
    pub outcome: Outcome,
    pub object: String,
    pub reason: String,
    pub user: Option<User>,
    pub client_cert: Option<Arc<str>>,
    pub peer: Option<IpAddr>,
    /// DICOM PatientIDs.
    pub patients: Vec<String>,
    /// Study Instance UIDs.
    pub studies: Vec<String>,
}

/// The gateway itself, as it appears in every message.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// AuditSourceIdentification/@AuditSourceID (`audit.source_id`).
    pub source_id: String,
    /// The gateway's AE title: its ActiveParticipant's UserID.
    pub ae_title: String,
}

/// The gateway starting or stopping (110100 Application Activity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    Start,
    Stop,
}

struct Code {
    code: &'static str,
    system: &'static str,
    text: &'static str,
}

const fn dcm(code: &'static str, text: &'static str) -> Code {
    Code {
        code,
        system: "DCM",
        text,
    }
}

const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
const QUERY: Code = dcm("110112", "Query");
const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
const LOGIN: Code = dcm("110122", "Login");
const USE_OF_RESTRICTED_FUNCTION: Code = dcm("110132", "Use of Restricted Function");
const APPLICATION_START: Code = dcm("110120", "Application Start");
const APPLICATION_STOP: Code = dcm("110121", "Application Stop");
const APPLICATION: Code = dcm("110150", "Application");
const STUDY_INSTANCE_UID: Code = dcm("110180", "Study Instance UID");
const PATIENT_NUMBER: Code = Code {
    code: "2",
    system: "RFC-3881",
    text: "Patient Number",
};

/// The coded shape of an event: (EventID, EventActionCode, EventTypeCode).
fn shape(e: &Event) -> (&'static Code, &'static str, Option<&'static Code>) {
    let authentication = matches!(
        e.op,
        Operation::Associate | Operation::HttpRequest | Operation::TokenExchange
    );
    match e.outcome {
        Outcome::Allowed | Outcome::Failed if authentication => {
            (&USER_AUTHENTICATION, "E", Some(&LOGIN))
        }
        // A token refused: the authentication failed.
        Outcome::Denied if authentication => (&USER_AUTHENTICATION, "E", Some(&LOGIN)),
        // A refusal by the policy core, or a result withheld: a security alert.
        Outcome::Denied => (&SECURITY_ALERT, "E", Some(&USE_OF_RESTRICTED_FUNCTION)),
        Outcome::Anomaly => (&SECURITY_ALERT, "E", None),
        Outcome::Allowed | Outcome::Failed => match e.op {
            Operation::Find | Operation::Qido | Operation::FhirSearch => (&QUERY, "E", None),
            Operation::Store | Operation::Stow => (&INSTANCES_TRANSFERRED, "C", None),
            Operation::Get
            | Operation::Move
            | Operation::MoveInstance
            | Operation::Wado(_)
            | Operation::WadoUri => (&INSTANCES_TRANSFERRED, "R", None),
            Operation::Echo
            | Operation::DimseRequest
            | Operation::DimseIdentifier
            | Operation::Associate
            | Operation::HttpRequest
            | Operation::TokenExchange => (&USER_AUTHENTICATION, "E", None),
        },
    }
}

/// One ParticipantObjectIdentification: `(type, role)` codes (1, 1: a patient; 2, 3: a study),
/// its ID type, and the ID again as its name (CP-2399: a name or a query is required).
fn participant_object(out: &mut String, id: &str, (kind, role): (&str, &str), id_type: &Code) {
    let id = token(id);
    let _ = write!(
        out,
        r#"<ParticipantObjectIdentification ParticipantObjectID="{id}" ParticipantObjectTypeCode="{kind}" ParticipantObjectTypeCodeRole="{role}">"#
    );
    coded(out, "ParticipantObjectIDTypeCode", id_type);
    let _ = write!(
        out,
        "<ParticipantObjectName>{id}</ParticipantObjectName></ParticipantObjectIdentification>"
    );
}

/// EventOutcomeIndicator: 0 success, 4 a refusal, 8 an upstream failure.
fn outcome_code(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "0",
        Outcome::Denied | Outcome::Anomaly => "4",
        Outcome::Failed => "8",
    }
}

/// XML text and attribute escaping; characters XML 1.0 cannot carry at all become U+FFFD.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A schema `token` holds no leading, trailing or doubled whitespace: collapsed.
fn token(s: &str) -> String {
    esc(&s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn coded(out: &mut String, element: &str, c: &Code) {
    let _ = write!(
        out,
        r#"<{element} csd-code="{}" codeSystemName="{}" originalText="{}"/>"#,
        c.code, c.system, c.text
    );
}

fn begin(out: &mut String, id: &Code, action: &str, time: &str, outcome: &str) {
    out.push_str(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    out.push_str("<AuditMessage>");
    let _ = write!(
        out,
        r#"<EventIdentification EventActionCode="{action}" EventDateTime="{time}" EventOutcomeIndicator="{outcome}">"#
    );
    coded(out, "EventID", id);
}

fn gateway(out: &mut String, src: &Source, correlation: Option<&str>, requestor: bool) {
    let _ = write!(
        out,
        r#"<ActiveParticipant UserID="{}""#,
        token(&src.ae_title)
    );
    if let Some(c) = correlation {
        let _ = write!(out, r#" AlternativeUserID="{}""#, esc(c));
    }
    let _ = write!(out, r#" UserIsRequestor="{requestor}">"#);
    coded(out, "RoleIDCode", &APPLICATION);
    out.push_str("</ActiveParticipant>");
}

fn source(out: &mut String, src: &Source) {
    let _ = write!(
        out,
        r#"<AuditSourceIdentification AuditSourceID="{}"><AuditSourceTypeCode csd-code="4"/></AuditSourceIdentification>"#,
        token(&src.source_id)
    );
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The correlation id of an event: its channel and number (`dimse-12`, `http-40`).
pub(crate) fn correlation(e: &Event) -> String {
    format!("{}-{}", e.channel.as_str(), e.session)
}

/// The PS3.15 A.5.1 `AuditMessage` of an event.
pub(crate) fn xml(e: &Event, src: &Source) -> String {
    let (id, action, type_code) = shape(e);
    let mut out = String::with_capacity(1536);
    begin(
        &mut out,
        id,
        action,
        &time(&e.time),
        outcome_code(e.outcome),
    );
    if let Some(t) = type_code {
        coded(&mut out, "EventTypeCode", t);
    }
    let mut description = e.op.name().to_string();
    if !e.object.is_empty() {
        let _ = write!(description, " {}", e.object);
    }
    let _ = write!(description, ": {}", e.reason);
    if let Some(c) = &e.client_cert {
        let _ = write!(description, " (client certificate {c})");
    }
    let _ = write!(
        out,
        "<EventOutcomeDescription>{}</EventOutcomeDescription></EventIdentification>",
        esc(&description)
    );
    // The human or system behind the token (or, without a verified token, the peer).
    let user_id = match &e.user {
        Some(u) => u.id.clone(),
        None => e
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into()),
    };
    let _ = write!(out, r#"<ActiveParticipant UserID="{}""#, esc(&user_id));
    if let Some(u) = &e.user {
        if let Some(c) = &u.client_id {
            let _ = write!(out, r#" AlternativeUserID="{}""#, esc(c));
        }
        let _ = write!(out, r#" UserName="{}""#, esc(&u.issuer));
    }
    out.push_str(r#" UserIsRequestor="true""#);
    if let Some(p) = e.peer {
        let _ = write!(
            out,
            r#" NetworkAccessPointID="{p}" NetworkAccessPointTypeCode="2""#
        );
    }
    out.push_str("/>");
    gateway(&mut out, src, Some(&correlation(e)), false);
    source(&mut out, src);
    for p in &e.patients {
        participant_object(&mut out, p, ("1", "1"), &PATIENT_NUMBER);
    }
    for s in &e.studies {
        participant_object(&mut out, s, ("2", "3"), &STUDY_INSTANCE_UID);
    }
    out.push_str("</AuditMessage>");
    out
}

/// The 110100 Application Activity message of the gateway starting or stopping.
pub(crate) fn activity_xml(a: Activity, src: &Source) -> String {
    let mut out = String::with_capacity(768);
    let now = time(&chrono::Utc::now());
    begin(&mut out, &APPLICATION_ACTIVITY, "E", &now, "0");
    coded(
        &mut out,
        "EventTypeCode",
        match a {
            Activity::Start => &APPLICATION_START,
            Activity::Stop => &APPLICATION_STOP,
        },
    );
    out.push_str("</EventIdentification>");
    gateway(&mut out, src, None, true);
    source(&mut out, src);
    out.push_str("</AuditMessage>");
    out
}

/// The same event as one JSON object.
pub(crate) fn json(e: &Event, src: &Source) -> serde_json::Value {
    let (id, action, _) = shape(e);
    serde_json::json!({
        "time": time(&e.time),
        "source": src.source_id,
        "event": id.text,
        "event_id": id.code,
        "action": action,
        "outcome": e.outcome.as_str(),
        "outcome_indicator": outcome_code(e.outcome),
        "correlation_id": correlation(e),
        "operation": e.op.name(),
        "object": e.object,
        "reason": e.reason,
        "user": e.user.as_ref().map(|u| serde_json::json!({
            "id": u.id, "client_id": u.client_id, "issuer": u.issuer, "token": u.token_id,
        })),
        "client_cert": e.client_cert.as_deref(),
        "address": e.peer.map(|p| p.to_string()),
        "patients": e.patients,
        "studies": e.studies,
    })
}

/// The Application Activity as a JSON object.
pub(crate) fn activity_json(a: Activity, src: &Source) -> serde_json::Value {
    serde_json::json!({
        "time": time(&chrono::Utc::now()),
        "source": src.source_id,
        "event": APPLICATION_ACTIVITY.text,
        "event_id": APPLICATION_ACTIVITY.code,
        "action": "E",
        "outcome": "allowed",
        "outcome_indicator": "0",
        "operation": match a { Activity::Start => "start", Activity::Stop => "stop" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::WadoPart;

    fn event(op: Operation, outcome: Outcome) -> Event {
        Event {
            time: chrono::Utc::now(),
            channel: Channel::Http,
            session: 7,
            op,
            outcome,
            object: String::new(),
            reason: "r".into(),
            user: None,
            client_cert: None,
            peer: None,
            patients: Vec::new(),
            studies: Vec::new(),
        }
    }

    #[test]
    fn each_operation_and_outcome_has_its_coded_event() {
        use Operation as O;
        use Outcome as R;
        let cases = [
            (O::Associate, R::Allowed, "110114", "E", "0"),
            (O::Associate, R::Denied, "110114", "E", "4"),
            (O::HttpRequest, R::Failed, "110114", "E", "8"),
            (O::Find, R::Allowed, "110112", "E", "0"),
            (O::Qido, R::Failed, "110112", "E", "8"),
            (O::Get, R::Allowed, "110104", "R", "0"),
            (O::Wado(WadoPart::Frames), R::Allowed, "110104", "R", "0"),
            (O::WadoUri, R::Allowed, "110104", "R", "0"),
            (O::Store, R::Allowed, "110104", "C", "0"),
            (O::Stow, R::Failed, "110104", "C", "8"),
            (O::Get, R::Denied, "110113", "E", "4"),
            (O::Qido, R::Anomaly, "110113", "E", "4"),
        ];
        for (op, outcome, id, action, indicator) in cases {
            let e = event(op, outcome);
            let (code, a, _) = shape(&e);
            assert_eq!(
                (code.code, a, outcome_code(outcome)),
                (id, action, indicator),
                "{op:?} {outcome:?}"
            );
        }
    }

    #[test]
    fn peer_values_cannot_break_the_xml() {
        let mut e = event(Operation::Wado(WadoPart::Metadata), Outcome::Denied);
        e.user = Some(User {
            id: "a\"/><Injected x=\"".into(),
            client_id: Some("c&d<e>".into()),
            issuer: "https://ehr'".into(),
            token_id: "t".into(),
        });
        e.reason = "line\nbreak\u{1} </EventOutcomeDescription>".into();
        e.studies = vec!["1.2 \t 3".into()];
        let x = xml(
            &e,
            &Source {
                source_id: "S".into(),
                ae_title: "GW".into(),
            },
        );
        assert!(!x.contains("<Injected"), "{x}");
        assert!(x.contains("a&quot;/&gt;&lt;Injected x=&quot;"), "{x}");
        assert!(
            x.contains("c&amp;d&lt;e&gt;") && x.contains("https://ehr&apos;"),
            "{x}"
        );
        assert!(
            x.contains("line&#10;break\u{fffd} &lt;/EventOutcomeDescription&gt;"),
            "{x}"
        );
        assert!(
            x.contains(r#"ParticipantObjectID="1.2 3""#),
            "a token has no doubled spaces: {x}"
        );
        assert_eq!(x.matches("</EventOutcomeDescription>").count(), 1, "{x}");
    }
}
