//! Prometheus metrics: what the gateway decided and how the parties it depends on answered.
//!
//! Owns: the metric names, their labels (every label value comes from a small fixed set or from
//! the configuration, never from a request, so series stay bounded), and the text exposition
//! served at `GET /metrics`. Must not know protocols or rules: callers report what happened in
//! their own words through the functions below. Nothing here holds a token or PHI.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    channel: &'static str,
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    class: &'static str,
}

struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    token_checks: Family<ResultLabels, Counter>,
    issuer_requests: Family<IssuerLabels, Counter>,
    pacs_lookups: Family<ResultLabels, Counter>,
    associations_rejected: Family<ReasonLabels, Counter>,
    associations_active: Gauge,
    http_responses: Family<StatusLabels, Counter>,
    tls_handshakes_failed: Family<ListenerLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    audit_dropped: Family<SinkLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("pacsgate");
    let m = Metrics {
        decisions: Family::default(),
        token_checks: Family::default(),
        issuer_requests: Family::default(),
        pacs_lookups: Family::default(),
        associations_rejected: Family::default(),
        associations_active: Gauge::default(),
        http_responses: Family::default(),
        tls_handshakes_failed: Family::default(),
        connections_open: Family::default(),
        audit_dropped: Family::default(),
        registry: Registry::default(),
    };
    registry.register(
        "audit_records",
        "Audit records (access decisions, and notes on withheld results), by channel (dimse, http), operation and outcome (allowed, denied, anomaly)",
        m.decisions.clone(),
    );
    registry.register(
        "token_checks",
        "Token verifications, by result (valid, refused, unavailable: the issuer could not be asked)",
        m.token_checks.clone(),
    );
    registry.register(
        "issuer_requests",
        "Requests to an issuer or its EHR (introspection, patient, imaging_study, study_search), by result",
        m.issuer_requests.clone(),
    );
    registry.register(
        "pacs_lookups",
        "Ownership look-ups at the PACS, by result (ok, error)",
        m.pacs_lookups.clone(),
    );
    registry.register(
        "associations_rejected",
        "A-ASSOCIATE-RJ sent, by reason",
        m.associations_rejected.clone(),
    );
    registry.register(
        "associations_active",
        "DIMSE associations being served",
        m.associations_active.clone(),
    );
    registry.register(
        "http_responses",
        "HTTP responses, by status class",
        m.http_responses.clone(),
    );
    registry.register(
        "tls_handshakes_failed",
        "TLS handshakes that failed or timed out (no certificate, an untrusted one, a legacy protocol, silence), by listener (dimse, https)",
        m.tls_handshakes_failed.clone(),
    );
    registry.register(
        "connections_open",
        "Connections a listener is serving (from accept to close: pending, in TLS handshake or in use), by listener",
        m.connections_open.clone(),
    );
    registry.register(
        "audit_dropped",
        "Audit messages that could not be written, by sink (queue: the writer was behind; syslog: the receiver could not be reached; json_file)",
        m.audit_dropped.clone(),
    );
    Metrics { registry, ..m }
});

/// One audit record, by channel, operation family and outcome.
pub(crate) fn audit_record(channel: &'static str, operation: &'static str, outcome: &'static str) {
    METRICS
        .decisions
        .get_or_create(&DecisionLabels {
            channel,
            operation,
            outcome,
        })
        .inc();
}

/// One TLS handshake that did not complete, on the `dimse` or `https` listener.
pub(crate) fn tls_handshake_failed(listener: &'static str) {
    METRICS
        .tls_handshakes_failed
        .get_or_create(&ListenerLabels { listener })
        .inc();
}

/// One audit message not written to `sink`.
pub(crate) fn audit_dropped(sink: &'static str) {
    METRICS
        .audit_dropped
        .get_or_create(&SinkLabels { sink })
        .inc();
}

/// How many connections `listener` holds now (its tasks not yet joined).
pub(crate) fn connections_open(listener: &'static str, n: usize) {
    METRICS
        .connections_open
        .get_or_create(&ListenerLabels { listener })
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// One token verification: `valid`, `refused` or `unavailable`.
pub(crate) fn token_check(result: &'static str) {
    METRICS
        .token_checks
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// One request to a configured issuer (its introspection endpoint or its EHR).
pub(crate) fn issuer_request(issuer: &str, kind: &'static str, result: &'static str) {
    METRICS
        .issuer_requests
        .get_or_create(&IssuerLabels {
            issuer: issuer.to_string(),
            kind,
            result,
        })
        .inc();
}

/// One ownership look-up at the PACS: `ok` or `error` (whether the UID was found is not told:
/// that would tell a caller which UIDs exist).
pub(crate) fn pacs_lookup(result: &'static str) {
    METRICS
        .pacs_lookups
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// One A-ASSOCIATE-RJ.
pub(crate) fn association_rejected(reason: &'static str) {
    METRICS
        .associations_rejected
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// Counts an association as served until the guard is dropped.
pub(crate) fn association_started() -> ActiveGuard {
    METRICS.associations_active.inc();
    ActiveGuard(())
}

pub(crate) struct ActiveGuard(());

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        METRICS.associations_active.dec();
    }
}

/// One HTTP response.
pub(crate) fn http_response(status: u16) {
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    METRICS
        .http_responses
        .get_or_create(&StatusLabels { class })
        .inc();
}

/// The OpenMetrics text exposition of every metric.
pub(crate) fn render() -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &METRICS.registry).is_err() {
        out.clear();
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_rendered() {
        use crate::audit::{Channel, Operation, Outcome, Trail};
        // Labels come from the typed operation, never from the record's object.
        Trail::new(Channel::Dimse, 1, None).record(
            Operation::Find,
            "level=STUDY",
            Outcome::Allowed,
            "",
        );
        Trail::new(Channel::Http, 2, None).record(
            Operation::Stow,
            "study=1.2.3",
            Outcome::Denied,
            "",
        );
        Trail::new(Channel::Http, 3, None).record(
            Operation::HttpRequest,
            "/dicom-web/studies/1.2.3",
            Outcome::Denied,
            "",
        );
        token_check("unavailable");
        issuer_request("http://ehr.example", "introspection", "error");
        let g = association_started();
        let text = render();
        drop(g);
        assert!(text.contains(
            r#"pacsgate_audit_records_total{channel="dimse",operation="C-FIND",outcome="allowed"}"#
        ));
        assert!(text.contains(
            r#"pacsgate_audit_records_total{channel="http",operation="STOW-RS",outcome="denied"}"#
        ));
        assert!(text.contains(r#"operation="other""#));
        assert!(!text.contains("1.2.3"), "no UID becomes a label");
        assert!(text.contains(r#"pacsgate_token_checks_total{result="unavailable"}"#));
        assert!(text.contains(
            r#"pacsgate_issuer_requests_total{issuer="http://ehr.example",kind="introspection",result="error"}"#
        ));
        assert!(text.contains("pacsgate_associations_active"));
        assert!(text.ends_with("# EOF\n"));
    }
}
