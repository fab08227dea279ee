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
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerOnly {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    protocol: &'static str,
    direction: &'static str,
}

type Seconds = Family<StatusLabels, Histogram, fn() -> Histogram>;

/// Latency buckets: 1 ms to about 33 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

struct Metrics {
    registry: Registry,
    token_verify_seconds: Family<ResultLabels, Histogram, fn() -> Histogram>,
    dimse_operation_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pacs_request_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
    http_request_seconds: Seconds,
    cache_requests: Family<CacheLabels, Counter>,
    issuer_keys_age: Family<IssuerOnly, Gauge<f64, AtomicU64>>,
    /// When each issuer's keys were last fetched (the age gauge is set from it at each render).
    keys_fetched_at: Mutex<HashMap<String, Instant>>,
    relayed_instances: Family<FlowLabels, Counter>,
    relayed_bytes: Family<FlowLabels, Counter>,
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
        token_verify_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
        dimse_operation_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
        pacs_request_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
        http_request_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
        cache_requests: Family::default(),
        issuer_keys_age: Family::default(),
        keys_fetched_at: Mutex::new(HashMap::new()),
        relayed_instances: Family::default(),
        relayed_bytes: Family::default(),
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
        "Audit records (access decisions, and notes on withheld results), by channel (dimse, http), operation and outcome (allowed, denied, anomaly, failed)",
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
        "TLS handshakes that failed or timed out (no certificate, an untrusted one, a legacy protocol, silence), by listener (dimse-tls, receiver-tls, https)",
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
    registry.register(
        "token_verify_seconds",
        "Time to verify a token (keys fetched, introspection asked when needed), by result",
        m.token_verify_seconds.clone(),
    );
    registry.register(
        "dimse_operation_seconds",
        "Time from a client's DIMSE request to its final response through the gateway (the PACS's work included), by operation",
        m.dimse_operation_seconds.clone(),
    );
    registry.register(
        "pacs_request_seconds",
        "Time the PACS took to answer the gateway's own requests, by kind (lookup: an ownership C-FIND; echo: the readiness C-ECHO; dicomweb: a DICOMweb request until its response head)",
        m.pacs_request_seconds.clone(),
    );
    registry.register(
        "http_request_seconds",
        "Time from an HTTP request to its response head, by status class",
        m.http_request_seconds.clone(),
    );
    registry.register(
        "cache_requests",
        "Cache look-ups, by cache (keys, introspection, ownership, patient_mapping, launch_context, ehr_check) and result (hit, miss)",
        m.cache_requests.clone(),
    );
    registry.register(
        "issuer_keys_age_seconds",
        "Seconds since each issuer's key set was last fetched",
        m.issuer_keys_age.clone(),
    );
    registry.register(
        "relayed_instances",
        "DICOM instances relayed after their checks, by protocol (dimse, dicomweb) and direction (retrieve: to a client or destination; store: to the PACS)",
        m.relayed_instances.clone(),
    );
    registry.register(
        "relayed_bytes",
        "Bytes of the instances counted in relayed_instances (data sets as relayed)",
        m.relayed_bytes.clone(),
    );
    Metrics { registry, ..m }
});

/// One token verification: `valid`, `refused` or `unavailable`, and how long it took.
pub(crate) fn token_verified(result: &'static str, took: Duration) {
    token_check(result);
    METRICS
        .token_verify_seconds
        .get_or_create(&ResultLabels { result })
        .observe(took.as_secs_f64());
}

/// One DIMSE operation relayed (`C-FIND` ...), from request to final response.
pub(crate) fn dimse_operation(operation: &'static str, took: Duration) {
    METRICS
        .dimse_operation_seconds
        .get_or_create(&OperationLabels { operation })
        .observe(took.as_secs_f64());
}

/// One request of the gateway's own to the PACS (`lookup`, `echo`, `dicomweb`).
pub(crate) fn pacs_request(kind: &'static str, took: Duration) {
    METRICS
        .pacs_request_seconds
        .get_or_create(&KindLabels { kind })
        .observe(took.as_secs_f64());
}

/// One cache look-up.
pub(crate) fn cache(cache: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    METRICS
        .cache_requests
        .get_or_create(&CacheLabels { cache, result })
        .inc();
}

/// An issuer's key set was fetched now.
pub(crate) fn keys_fetched(issuer: &str) {
    METRICS
        .keys_fetched_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(issuer.to_string(), Instant::now());
}

/// After a reload: the issuers configured now (the others' key ages are no longer shown).
pub(crate) fn keep_issuers(issuers: &[String]) {
    let mut m = METRICS
        .keys_fetched_at
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    m.retain(|i, _| issuers.contains(i));
    METRICS.issuer_keys_age.clear();
}

/// One instance relayed after its checks: `protocol` `dimse` or `dicomweb`, `direction`
/// `retrieve` or `store`.
pub(crate) fn relayed(protocol: &'static str, direction: &'static str, bytes: u64) {
    let l = FlowLabels {
        protocol,
        direction,
    };
    METRICS.relayed_instances.get_or_create(&l).inc();
    METRICS.relayed_bytes.get_or_create(&l).inc_by(bytes);
}

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

/// One HTTP response, its head sent `took` after the request arrived.
pub(crate) fn http_response(status: u16, took: Duration) {
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
    METRICS
        .http_request_seconds
        .get_or_create(&StatusLabels { class })
        .observe(took.as_secs_f64());
}

/// The OpenMetrics text exposition of every metric.
pub(crate) fn render() -> String {
    {
        let fetched = METRICS
            .keys_fetched_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (issuer, at) in fetched.iter() {
            METRICS
                .issuer_keys_age
                .get_or_create(&IssuerOnly {
                    issuer: issuer.clone(),
                })
                .set(at.elapsed().as_secs_f64());
        }
    }
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
        token_verified("unavailable", Duration::from_millis(3));
        cache("ownership", true);
        keys_fetched("http://ehr.example");
        relayed("dimse", "retrieve", 1000);
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
        assert!(
            text.contains(
                r#"pacsgate_token_verify_seconds_bucket{le="0.004",result="unavailable"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"pacsgate_cache_requests_total{cache="ownership",result="hit"}"#));
        assert!(text.contains(r#"pacsgate_issuer_keys_age_seconds{issuer="http://ehr.example"}"#));
        assert!(text.contains(
            r#"pacsgate_relayed_bytes_total{protocol="dimse",direction="retrieve"} 1000"#
        ));
        assert!(text.ends_with("# EOF\n"));
    }
}
