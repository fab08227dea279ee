//! The TOML configuration: its model, defaults, and validation.
//!
//! Owns: turning one TOML file into a [`Config`] whose every value has been checked, and reporting
//! every problem at once, each naming the key and the fix. Must not know sockets: binding the
//! listeners (and so "port in use") belongs to `serve`.

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key the problem is about, e.g. `gateway.dimse_listen` or `issuers[1].verify`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub path: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s) in the configuration:",
            self.path,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: Gateway,
    pub limits: Limits,
    pub pacs: Pacs,
    pub issuers: Vec<Issuer>,
    pub patients: Patients,
    pub policy: Policy,
    pub destinations: Vec<Destination>,
    /// The gateway's server identity for its TLS listeners (`[tls]`).
    pub tls: Option<crate::tls::ServerIdentity>,
    /// The audit trail's sinks (`[audit]`); `None`: records go to the log only.
    pub audit: Option<crate::audit::sink::AuditConfig>,
    /// `[fhir]`: the FHIR ImagingStudy search of SMART Imaging Access at `{public_url}/fhir`.
    pub fhir: Fhir,
    /// `[authorization_server]`: the gateway's own tokens, by RFC 8693 token exchange at
    /// `{public_url}/token`; `None` when not enabled.
    pub authorization_server: Option<AuthorizationServer>,
}

/// The gateway as the imaging system's authorization server.
#[derive(Debug, Clone)]
pub struct AuthorizationServer {
    /// `iss` of the tokens it signs: `public_url`.
    pub issuer: String,
    /// PKCS#8 PEM or JWK (Set) private key; created (EC P-256) when the file does not exist.
    pub signing_key_file: std::path::PathBuf,
    /// The longest an exchanged token lives (never past its subject token's `exp`).
    pub token_lifetime: Duration,
    /// The [[issuers]] whose access tokens may be exchanged.
    pub subject_issuers: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Fhir {
    pub enabled: bool,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub ae_title: String,
    /// At least one of the DIMSE listeners is set.
    pub dimse_listen: Option<SocketAddr>,
    /// DICOM TLS (PS3.15 Annex B).
    pub dimse_tls_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub https_listen: Option<SocketAddr>,
    /// `/healthz` and `/metrics` alone, served by a thread and runtime of their own so that a
    /// probe is answered however busy the front ends are.
    pub monitor_listen: Option<SocketAddr>,
    /// Plaintext listeners on addresses other than loopback are errors, not warnings.
    pub require_tls: bool,
    pub public_url: String,
    /// Token `aud` values accepted.
    pub audiences: Vec<String>,
    /// Refuse associations whose called AE title is not `ae_title`.
    pub require_called_ae_title: bool,
    /// Browser origins allowed to call DICOMweb (CORS); `*` allows any. Tokens travel in the
    /// Authorization header, never in cookies, so credentials are never allowed.
    pub cors_origins: Vec<String>,
    /// Client addresses (networks) that may read `/metrics` on the HTTP listener; empty: none.
    pub metrics_clients: Vec<ipnet::IpNet>,
    /// How long running associations and requests may take to finish after SIGTERM.
    pub drain: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_associations: usize,
    /// The largest P-DATA PDU the gateway accepts from either peer (announced as its Maximum Length).
    pub max_pdu_length: u32,
    /// The largest A-ASSOCIATE-RQ accepted, read before anything else.
    pub max_association_request_bytes: u32,
    /// The largest C-FIND identifier (request or response) held in memory.
    pub max_identifier_bytes: usize,
    pub association_request_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_timeout: Duration,
    pub token_verify_timeout: Duration,
    pub http_fetch_timeout: Duration,
    /// The deepest nesting of sequences the strict reader accepts in any data set.
    pub max_sequence_depth: usize,
    /// Connections that have not yet sent a complete A-ASSOCIATE-RQ, at once (a budget of
    /// their own: silent sockets never hold association slots).
    pub max_pending_associations: usize,
    /// The same, from one peer address.
    pub max_pending_per_peer: usize,
    /// How long an HTTP client may take to send a request's headers.
    pub http_header_timeout: Duration,
    /// The largest request head (request line and headers) accepted.
    pub max_http_header_bytes: usize,
    /// HTTP connections open at once, and from one peer address.
    pub max_http_connections: usize,
    pub max_http_connections_per_peer: usize,
}

impl Limits {
    /// The strict reader's bounds.
    pub fn reader(&self) -> crate::dicom::reader::Limits {
        crate::dicom::reader::Limits {
            max_depth: self.max_sequence_depth,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pacs {
    pub ae_title: String,
    pub address: String,
    pub dicomweb_url: Option<String>,
    pub calling_ae_title: String,
    pub receive_listen: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// DICOM TLS toward `address` (`[pacs.tls]` with `dimse = true`).
    pub dimse_tls: Option<std::sync::Arc<crate::tls::ClientTls>>,
    /// `[pacs.tls]`, when set.
    pub tls: Option<PacsTls>,
    /// Associations the gateway opens to the PACS on its own behalf at once (DICOMweb by
    /// translation); more wait for one to end.
    pub max_associations: usize,
    /// How the PACS answers C-FIND below STUDY level (`pacs.query_model`).
    pub query_model: QueryModel,
    /// How the gateway retrieves for DICOMweb by translation (`pacs.retrieve`).
    pub retrieve: Retrieve,
}

/// How instances are retrieved from the PACS for DICOMweb by translation: by C-GET on the
/// gateway's association, or, for a PACS without C-GET, by C-MOVE to the gateway's own
/// receiver (`pacs.receive_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retrieve {
    Get,
    Move,
}

/// The query model a PACS enforces (PS3.4 C.4.1.3.1): a relational PACS answers a series or an
/// instance asked for by its UID alone, with PatientID among the keys; a hierarchical one only
/// inside its study (and series), with the unique keys above the level and no other key of an
/// upper level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryModel {
    Relational,
    Hierarchical,
}

impl Pacs {
    /// Whether the PACS can deliver C-MOVE sub-operations to the gateway (a receiver listens,
    /// in plaintext or over TLS).
    pub fn receives(&self) -> bool {
        self.receive_listen.is_some()
            || self
                .tls
                .as_ref()
                .is_some_and(|t| t.receive_tls_listen.is_some())
    }
}

/// `[pacs.tls]`: how the gateway meets the PACS over TLS.
#[derive(Debug, Clone)]
pub struct PacsTls {
    /// The PACS's trust anchor and the gateway's client identity toward it.
    pub files: crate::tls::ClientFiles,
    /// The C-MOVE receiver over TLS: the PACS must present a certificate `files.ca_file`
    /// signed, which replaces the check of its address.
    pub receive_tls_listen: Option<SocketAddr>,
    /// For an `https://` `dicomweb_url` (HTTP/1.1 by ALPN).
    pub http: std::sync::Arc<crate::tls::ClientTls>,
    /// The name the PACS's certificate carries: checked when it connects to the receiver too.
    pub server_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    Jwt,
    Introspection,
    JwtAndIntrospection,
}

#[derive(Debug, Clone)]
pub struct Issuer {
    pub issuer: String,
    pub verify: VerifyMode,
    pub jwks_uri: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub client_id: Option<String>,
    pub fhir_base_url: Option<String>,
    pub allowed_client_ids: Vec<String>,
    pub accept_ehr_audience: bool,
    /// JWT `typ` header values accepted; `""` stands for "no typ header".
    pub accept_typ: Vec<String>,
    /// Vendor quirk: without a `patient` claim, take the patient from `sub` when it names a
    /// Patient (`Patient/123` or a Patient URL under the issuer or its FHIR base).
    pub patient_in_sub: bool,
    /// Vendor quirk: the introspection endpoint is not advertised; derive it from the token
    /// endpoint (`.../token` becomes `.../introspect`).
    pub introspection_from_token_endpoint: bool,
    /// How the gateway authenticates itself to this issuer (introspection, FHIR look-ups).
    pub client_auth: Option<ClientAuth>,
    /// The scope the gateway asks for its own Backend Services token.
    pub client_scope: String,
    /// Introspection results are cached at most this long (and never past the token's `exp`).
    pub introspection_cache: Duration,
    /// An ImagingStudy named in the token's launch context (`fhirContext`) restricts the
    /// token to that study.
    pub launch_context_restricts: bool,
    /// Opaque tokens (not JWTs) are introspected here. At most one issuer has it; by default
    /// the only `verify = "introspection"` issuer, when there is exactly one.
    pub opaque_tokens: bool,
    /// An introspection answer without `aud` is accepted (for authorization servers that
    /// omit it); off by default: `aud` must name the gateway.
    pub introspection_aud_optional: bool,
}

/// The gateway's own credentials at an issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// client_secret_basic.
    Secret(String),
    /// SMART Backend Services: client_credentials with a private_key_jwt assertion signed by
    /// the key in this PKCS#8 PEM file.
    PrivateKeyJwt(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientMap {
    /// PatientID = the token's patient id.
    Same,
    /// A claim (dot path, e.g. `dicom_patient_id` or `extensions.ihe_bppc.patient_id`) holds the
    /// PatientID, a CX value (`ID^^^&OID&ISO`), or a list of them.
    Claim(String),
    /// A CSV file with columns patient,patient_id,issuer, reloaded when it changes.
    Table(std::path::PathBuf),
    /// `GET {fhir_base_url}/Patient/{id}` with the gateway's own token; the identifiers with
    /// this system and/or type code (e.g. MR) are the PatientIDs.
    Fhir {
        system: Option<String>,
        type_code: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Patients {
    pub map: PatientMap,
    /// Compare IssuerOfPatientID too: data must carry the issuer the mapping found.
    pub use_issuer: bool,
    /// IssuerOfPatientID values by the issuer a mapping yields (e.g. a FHIR identifier system
    /// `urn:oid:1.2.3` stored in the PACS as `HOSP_A`).
    pub issuer_names: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserLevel {
    Deny,
    Allow,
    /// A study is allowed only when the EHR returns it to the caller's own token.
    EhrCheck,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub user_level: UserLevel,
    pub write: bool,
    /// How long the EHR's answer for (token, study) is reused.
    pub ehr_check_cache: Duration,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub ae_title: String,
    pub address: String,
    /// DICOM TLS toward it (`tls = true`, with its `ca_file`; the gateway's client identity is
    /// `[pacs.tls]`'s, when that has one).
    pub tls: Option<std::sync::Arc<crate::tls::ClientTls>>,
}

// ---- the raw file, as serde reads it ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    gateway: Option<RawGateway>,
    limits: Option<RawLimits>,
    pacs: Option<RawPacs>,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    patients: Option<RawPatients>,
    policy: Option<RawPolicy>,
    #[serde(default)]
    destinations: Vec<RawDestination>,
    tls: Option<RawTls>,
    audit: Option<RawAudit>,
    fhir: Option<RawFhir>,
    authorization_server: Option<RawAuthorizationServer>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFhir {
    enabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuthorizationServer {
    enabled: Option<bool>,
    signing_key_file: Option<String>,
    token_lifetime_secs: Option<f64>,
    subject_issuers: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    syslog: Option<String>,
    syslog_ca_file: Option<String>,
    json_file: Option<String>,
    source_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
    client_auth: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    ae_title: Option<String>,
    dimse_listen: Option<String>,
    dimse_tls_listen: Option<String>,
    http_listen: Option<String>,
    https_listen: Option<String>,
    monitor_listen: Option<String>,
    require_tls: Option<bool>,
    public_url: Option<String>,
    audiences: Option<Vec<String>>,
    require_called_ae_title: Option<bool>,
    cors_origins: Option<Vec<String>>,
    metrics_clients: Option<Vec<String>>,
    drain_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_associations: Option<i64>,
    max_pdu_length: Option<i64>,
    max_association_request_bytes: Option<i64>,
    max_identifier_bytes: Option<i64>,
    association_request_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    upstream_timeout_secs: Option<f64>,
    token_verify_timeout_secs: Option<f64>,
    http_fetch_timeout_secs: Option<f64>,
    max_sequence_depth: Option<i64>,
    max_pending_associations: Option<i64>,
    max_pending_per_peer: Option<i64>,
    http_header_timeout_secs: Option<f64>,
    max_http_header_bytes: Option<i64>,
    max_http_connections: Option<i64>,
    max_http_connections_per_peer: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPacs {
    ae_title: Option<String>,
    address: Option<String>,
    dicomweb_url: Option<String>,
    calling_ae_title: Option<String>,
    receive_listen: Option<String>,
    connect_timeout_secs: Option<f64>,
    max_associations: Option<i64>,
    query_model: Option<String>,
    retrieve: Option<String>,
    tls: Option<RawPacsTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPacsTls {
    dimse: Option<bool>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    server_name: Option<String>,
    receive_tls_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: Option<String>,
    verify: Option<String>,
    jwks_uri: Option<String>,
    introspection_endpoint: Option<String>,
    client_id: Option<String>,
    client_key_file: Option<String>,
    client_secret: Option<String>,
    fhir_base_url: Option<String>,
    allowed_client_ids: Option<Vec<String>>,
    accept_ehr_audience: Option<bool>,
    accept_typ: Option<Vec<String>>,
    patient_in_sub: Option<bool>,
    introspection_from_token_endpoint: Option<bool>,
    client_scope: Option<String>,
    introspection_cache_secs: Option<f64>,
    launch_context_restricts: Option<bool>,
    opaque_tokens: Option<bool>,
    introspection_aud_optional: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPatients {
    map: Option<String>,
    claim: Option<String>,
    identifier_system: Option<String>,
    identifier_type: Option<String>,
    use_issuer: Option<bool>,
    issuer_names: Option<HashMap<String, String>>,
    table_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    user_level: Option<String>,
    write: Option<bool>,
    ehr_check_cache_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    ae_title: Option<String>,
    address: Option<String>,
    tls: Option<bool>,
    ca_file: Option<String>,
}

/// Collects problems while a configuration is checked.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn required(&mut self, key: &str, value: Option<String>, example: &str) -> String {
        let (section, name) = match key.rsplit_once('.') {
            Some((s, n)) => (s.split('[').next().unwrap_or(s), n),
            None => ("", key),
        };
        let place = if section.is_empty() {
            String::new()
        } else if key.contains('[') {
            format!(" to the [[{section}]] entry")
        } else {
            format!(" under [{section}]")
        };
        match value {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => {
                self.problem(key, format!("is empty; set it, e.g. {name} = {example}"));
                String::new()
            }
            None => {
                self.problem(
                    key,
                    format!("is missing; add it{place}, e.g. {name} = {example}"),
                );
                String::new()
            }
        }
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "\"{value}\" is not an address; write IP:PORT, e.g. \"127.0.0.1:11112\" (host names are not accepted for listeners)"
                    ),
                );
                None
            }
        }
    }

    fn host_port(&mut self, key: &str, value: &str) {
        let ok = match value.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        };
        if !ok {
            self.problem(
                key,
                format!("\"{value}\" is not HOST:PORT; write e.g. \"127.0.0.1:4242\""),
            );
        }
    }

    fn ae_title(&mut self, key: &str, value: &str) {
        if value.is_empty() {
            return; // reported as missing already
        }
        let trimmed = value.trim_matches(' ');
        if trimmed.is_empty()
            || value.len() > 16
            || !value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            self.problem(
                key,
                format!(
                    "\"{value}\" is not a valid AE title: use 1 to 16 printable ASCII characters, no backslash"
                ),
            );
        }
    }

    fn http_url(&mut self, key: &str, value: &str) {
        match url::Url::parse(value) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
            _ => self.problem(
                key,
                format!("\"{value}\" is not an absolute http(s) URL; write e.g. \"http://127.0.0.1:9400\""),
            ),
        }
    }

    fn positive_int(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        match value {
            None => default,
            Some(v) if v >= min && v <= max => v,
            Some(v) => {
                self.problem(
                    key,
                    format!("{v} is out of range; use a value from {min} to {max}"),
                );
                default
            }
        }
    }

    fn seconds(&mut self, key: &str, value: Option<f64>, default: f64) -> Duration {
        match value {
            None => Duration::from_secs_f64(default),
            Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Duration::from_secs_f64(v),
            Some(v) => {
                self.problem(
                    key,
                    format!("{v} is not a duration in seconds; use a number from 0.001 to 86400"),
                );
                Duration::from_secs_f64(default)
            }
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: display.clone(),
            problems: vec![Problem {
                key: "(file)".into(),
                message: format!("cannot read the file: {e}; check the path given to --config"),
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse_in(&text, &base).map_err(|problems| ConfigError {
            path: display,
            problems,
        })
    }

    /// Validates configuration text; every problem found is returned.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        Config::parse_in(text, Path::new(""))
    }

    /// Validates configuration text whose relative file paths (`client_key_file`,
    /// `table_file`) are relative to `base`, the configuration file's directory.
    pub(crate) fn parse_in(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let resolve = |f: &str| -> String {
            let p = Path::new(f);
            if p.is_absolute() {
                f.to_string()
            } else {
                base.join(p).to_string_lossy().into_owned()
            }
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            vec![Problem {
                key: "(syntax)".into(),
                message: e.to_string().replace('\n', " "),
            }]
        })?;
        let mut c = Checker { problems: vec![] };

        // [gateway]
        let g = raw.gateway.unwrap_or_default();
        let ae_title = c.required("gateway.ae_title", g.ae_title, "\"PACSGATE\"");
        c.ae_title("gateway.ae_title", &ae_title);
        let dimse_tls_listen = g
            .dimse_tls_listen
            .as_deref()
            .and_then(|s| c.socket_addr("gateway.dimse_tls_listen", s));
        // A DICOM TLS listener alone serves DIMSE; without one the plaintext listener is needed.
        let dimse_listen = match (g.dimse_listen, &g.dimse_tls_listen) {
            (None, Some(_)) => None,
            (v, _) => {
                let v = c.required("gateway.dimse_listen", v, "\"127.0.0.1:11112\"");
                if v.is_empty() {
                    None
                } else {
                    c.socket_addr("gateway.dimse_listen", &v)
                }
            }
        };
        let http_listen = g
            .http_listen
            .as_deref()
            .and_then(|s| c.socket_addr("gateway.http_listen", s));
        let https_listen = g
            .https_listen
            .as_deref()
            .and_then(|s| c.socket_addr("gateway.https_listen", s));
        let monitor_listen = g
            .monitor_listen
            .as_deref()
            .and_then(|s| c.socket_addr("gateway.monitor_listen", s));
        let drain = c.seconds("gateway.drain_secs", g.drain_secs, 20.0);
        let public_url = match g.public_url {
            Some(u) => {
                c.http_url("gateway.public_url", &u);
                u.trim_end_matches('/').to_string()
            }
            None => match (https_listen, http_listen) {
                (Some(a), _) => format!("https://{a}"),
                (None, Some(a)) => format!("http://{a}"),
                (None, None) => {
                    c.problem(
                        "gateway.public_url",
                        "is missing; add it, e.g. public_url = \"http://127.0.0.1:8080\" (the URL clients use to reach the gateway; token audiences derive from it)",
                    );
                    String::new()
                }
            },
        };
        let audiences = match g.audiences {
            Some(a) if a.is_empty() => {
                c.problem(
                    "gateway.audiences",
                    "is an empty list, so no token could be accepted; list the `aud` values tokens carry for this gateway, or remove the key to use public_url and public_url/dicom-web",
                );
                a
            }
            Some(a) => a,
            None => vec![public_url.clone(), format!("{public_url}/dicom-web")],
        };

        let mut metrics_clients = Vec::new();
        let raw_clients = g
            .metrics_clients
            .clone()
            .unwrap_or_else(|| vec!["127.0.0.1".into(), "::1".into()]);
        for (i, m) in raw_clients.iter().enumerate() {
            let net = m
                .parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| m.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
            match net {
                Some(n) => metrics_clients.push(n),
                None => c.problem(
                    format!("gateway.metrics_clients[{i}]"),
                    format!("\"{m}\" is not an IP address or network; write e.g. \"10.0.5.7\" or \"10.0.5.0/24\""),
                ),
            }
        }

        let cors_origins = g.cors_origins.clone().unwrap_or_default();
        for (i, o) in cors_origins.iter().enumerate() {
            let ok = o == "*"
                || url::Url::parse(o).is_ok_and(|u| {
                    (u.scheme() == "http" || u.scheme() == "https")
                        && u.path() == "/"
                        && !o.ends_with('/')
                        && u.query().is_none()
                });
            if !ok {
                c.problem(
                    format!("gateway.cors_origins[{i}]"),
                    format!("\"{o}\" is not an origin; write scheme://host[:port] without a path, e.g. \"https://viewer.example.org\", or \"*\""),
                );
            }
        }

        // [limits]
        let l = raw.limits.unwrap_or_default();
        let limits = Limits {
            max_associations: c.positive_int(
                "limits.max_associations",
                l.max_associations,
                64,
                1,
                10_000,
            ) as usize,
            max_pdu_length: c.positive_int(
                "limits.max_pdu_length",
                l.max_pdu_length,
                65_536,
                4_096,
                4_194_304,
            ) as u32,
            max_association_request_bytes: c.positive_int(
                "limits.max_association_request_bytes",
                l.max_association_request_bytes,
                131_072,
                8_192,
                1_048_576,
            ) as u32,
            max_identifier_bytes: c.positive_int(
                "limits.max_identifier_bytes",
                l.max_identifier_bytes,
                1_048_576,
                4_096,
                67_108_864,
            ) as usize,
            association_request_timeout: c.seconds(
                "limits.association_request_timeout_secs",
                l.association_request_timeout_secs,
                5.0,
            ),
            idle_timeout: c.seconds("limits.idle_timeout_secs", l.idle_timeout_secs, 300.0),
            upstream_timeout: c.seconds(
                "limits.upstream_timeout_secs",
                l.upstream_timeout_secs,
                60.0,
            ),
            token_verify_timeout: c.seconds(
                "limits.token_verify_timeout_secs",
                l.token_verify_timeout_secs,
                10.0,
            ),
            http_fetch_timeout: c.seconds(
                "limits.http_fetch_timeout_secs",
                l.http_fetch_timeout_secs,
                5.0,
            ),
            max_sequence_depth: c.positive_int(
                "limits.max_sequence_depth",
                l.max_sequence_depth,
                16,
                1,
                64,
            ) as usize,
            max_pending_associations: c.positive_int(
                "limits.max_pending_associations",
                l.max_pending_associations,
                64,
                1,
                10_000,
            ) as usize,
            max_pending_per_peer: c.positive_int(
                "limits.max_pending_per_peer",
                l.max_pending_per_peer,
                8,
                1,
                10_000,
            ) as usize,
            http_header_timeout: c.seconds(
                "limits.http_header_timeout_secs",
                l.http_header_timeout_secs,
                10.0,
            ),
            max_http_header_bytes: c.positive_int(
                "limits.max_http_header_bytes",
                l.max_http_header_bytes,
                65_536,
                8_192,
                1_048_576,
            ) as usize,
            max_http_connections: c.positive_int(
                "limits.max_http_connections",
                l.max_http_connections,
                1024,
                1,
                100_000,
            ) as usize,
            max_http_connections_per_peer: c.positive_int(
                "limits.max_http_connections_per_peer",
                l.max_http_connections_per_peer,
                256,
                1,
                100_000,
            ) as usize,
        };

        // [pacs]
        let pacs = match raw.pacs {
            None => {
                c.problem(
                    "pacs",
                    "the [pacs] section is missing; add it with ae_title and address of the upstream PACS",
                );
                RawPacs::default()
            }
            Some(p) => p,
        };
        let p_ae = c.required("pacs.ae_title", pacs.ae_title, "\"ORTHANC\"");
        c.ae_title("pacs.ae_title", &p_ae);
        let p_addr = c.required("pacs.address", pacs.address, "\"127.0.0.1:4242\"");
        if !p_addr.is_empty() {
            c.host_port("pacs.address", &p_addr);
        }
        if let Some(u) = &pacs.dicomweb_url {
            c.http_url("pacs.dicomweb_url", u);
        }
        let calling = match pacs.calling_ae_title {
            Some(a) => {
                c.ae_title("pacs.calling_ae_title", &a);
                a
            }
            None => ae_title.clone(),
        };
        let receive_listen = pacs
            .receive_listen
            .as_deref()
            .and_then(|s| c.socket_addr("pacs.receive_listen", s));
        let connect_timeout =
            c.seconds("pacs.connect_timeout_secs", pacs.connect_timeout_secs, 5.0);
        let pacs_max_associations =
            c.positive_int("pacs.max_associations", pacs.max_associations, 100, 2, 1000) as usize;
        let query_model = match pacs.query_model.as_deref().unwrap_or("relational") {
            "relational" => QueryModel::Relational,
            "hierarchical" => QueryModel::Hierarchical,
            other => {
                c.problem(
                    "pacs.query_model",
                    format!("unknown value \"{other}\"; use \"relational\" (most PACS) or \"hierarchical\" (a PACS that refuses a C-FIND below STUDY level without its StudyInstanceUID, or with PatientID)"),
                );
                QueryModel::Relational
            }
        };
        let retrieve = match pacs.retrieve.as_deref().unwrap_or("c-get") {
            "c-get" => Retrieve::Get,
            "c-move" => Retrieve::Move,
            other => {
                c.problem(
                    "pacs.retrieve",
                    format!("unknown value \"{other}\"; use \"c-get\" or \"c-move\" (a PACS without C-GET; needs pacs.receive_listen)"),
                );
                Retrieve::Get
            }
        };
        let (pacs_tls, dimse_tls) = match pacs.tls {
            Some(t) => pacs_tls(&mut c, t, &p_addr, &resolve),
            None => (None, None),
        };
        if let Some(u) = pacs.dicomweb_url.as_deref()
            && u.starts_with("https://")
            && pacs_tls.is_none()
        {
            c.problem(
                "pacs.tls.ca_file",
                "is missing; pacs.dicomweb_url is https://, and the PACS's certificate is verified against its own CA only: add [pacs.tls] with ca_file",
            );
        }

        // [[issuers]]
        if raw.issuers.is_empty() {
            c.problem(
                "issuers",
                "no [[issuers]] are configured, so no token could be accepted; add one with issuer = \"https://ehr.example.org\" and verify = \"jwt\"",
            );
        }
        let mut issuers = Vec::new();
        let mut opaque_set: Vec<Option<bool>> = Vec::new();
        let mut seen_iss: HashMap<String, usize> = HashMap::new();
        for (i, ri) in raw.issuers.into_iter().enumerate() {
            let k = |f: &str| format!("issuers[{i}].{f}");
            let iss = c.required(&k("issuer"), ri.issuer, "\"https://ehr.example.org\"");
            if !iss.is_empty() {
                c.http_url(&k("issuer"), &iss);
                if let Some(prev) = seen_iss.insert(iss.clone(), i) {
                    c.problem(
                        k("issuer"),
                        format!("\"{iss}\" is configured twice (also issuers[{prev}]); keep one entry per issuer"),
                    );
                }
            }
            let verify = match ri.verify.as_deref().unwrap_or("jwt") {
                "jwt" => VerifyMode::Jwt,
                "introspection" => VerifyMode::Introspection,
                "jwt+introspection" => VerifyMode::JwtAndIntrospection,
                other => {
                    c.problem(
                        k("verify"),
                        format!("unknown mode \"{other}\"; use \"jwt\", \"introspection\" or \"jwt+introspection\""),
                    );
                    VerifyMode::Jwt
                }
            };
            for (f, v) in [
                ("jwks_uri", &ri.jwks_uri),
                ("introspection_endpoint", &ri.introspection_endpoint),
                ("fhir_base_url", &ri.fhir_base_url),
            ] {
                if let Some(v) = v {
                    c.http_url(&k(f), v);
                }
            }
            let client_auth = match (&ri.client_secret, &ri.client_key_file) {
                (Some(_), Some(_)) => {
                    c.problem(
                        k("client_secret"),
                        "set client_secret or client_key_file, not both",
                    );
                    None
                }
                (Some(sec), None) => Some(ClientAuth::Secret(sec.clone())),
                (None, Some(f)) => Some(ClientAuth::PrivateKeyJwt(resolve(f))),
                (None, None) => None,
            };
            if client_auth.is_some() && ri.client_id.is_none() {
                c.problem(
                    k("client_id"),
                    "is needed with client credentials: the gateway's own client id at this issuer",
                );
            }
            if let Some(ClientAuth::PrivateKeyJwt(f)) = &client_auth
                && let Err(e) = crate::crypto::SigningKey::load_any(Path::new(f), &CLIENT_KEY_ALGS)
            {
                c.problem(
                    k("client_key_file"),
                    format!("{e:#}; give a PKCS#8 PEM RSA or EC P-384 key (signed RS384 or ES384)"),
                );
            }
            if verify != VerifyMode::Jwt && client_auth.is_none() {
                c.problem(
                    k("verify"),
                    "introspection needs the gateway's own credentials at this issuer: set client_id and client_secret (client_secret_basic) or client_key_file (SMART Backend Services)",
                );
            }
            if ri.accept_ehr_audience == Some(true) && ri.fhir_base_url.is_none() {
                c.problem(
                    k("accept_ehr_audience"),
                    "needs fhir_base_url (the EHR FHIR base that tokens name as `aud`); set it or remove accept_ehr_audience",
                );
            }
            let accept_typ = ri
                .accept_typ
                .unwrap_or_else(|| vec!["at+jwt".into(), "application/at+jwt".into()]);
            if accept_typ.is_empty() {
                c.problem(
                    k("accept_typ"),
                    "is empty, so no token could be accepted; list e.g. [\"at+jwt\", \"JWT\"], and \"\" for tokens without typ",
                );
            }
            issuers.push(Issuer {
                issuer: iss,
                verify,
                jwks_uri: ri.jwks_uri,
                introspection_endpoint: ri.introspection_endpoint,
                client_id: ri.client_id,
                fhir_base_url: ri
                    .fhir_base_url
                    .map(|u| u.trim_end_matches('/').to_string()),
                allowed_client_ids: ri.allowed_client_ids.unwrap_or_default(),
                accept_ehr_audience: ri.accept_ehr_audience.unwrap_or(false),
                accept_typ,
                patient_in_sub: ri.patient_in_sub.unwrap_or(false),
                introspection_from_token_endpoint: ri
                    .introspection_from_token_endpoint
                    .unwrap_or(false),
                client_auth,
                client_scope: ri.client_scope.unwrap_or_else(|| "system/*.rs".into()),
                introspection_cache: c.seconds(
                    &k("introspection_cache_secs"),
                    ri.introspection_cache_secs,
                    60.0,
                ),
                launch_context_restricts: ri.launch_context_restricts.unwrap_or(false),
                opaque_tokens: ri.opaque_tokens.unwrap_or(false),
                introspection_aud_optional: ri.introspection_aud_optional.unwrap_or(false),
            });
            opaque_set.push(ri.opaque_tokens);
        }
        // Opaque tokens go to one issuer only, never to each in turn (an issuer would learn
        // another's tokens and could replay them).
        let introspecting: Vec<usize> = issuers
            .iter()
            .enumerate()
            .filter(|(_, i)| i.verify == VerifyMode::Introspection)
            .map(|(n, _)| n)
            .collect();
        let chosen: Vec<usize> = opaque_set
            .iter()
            .enumerate()
            .filter(|(_, o)| **o == Some(true))
            .map(|(n, _)| n)
            .collect();
        for &n in &chosen {
            if issuers[n].verify != VerifyMode::Introspection {
                c.problem(
                    format!("issuers[{n}].opaque_tokens"),
                    "needs verify = \"introspection\": an opaque token can only be checked by introspection",
                );
            }
        }
        match (chosen.as_slice(), introspecting.as_slice()) {
            ([], [only]) if opaque_set[*only].is_none() => issuers[*only].opaque_tokens = true,
            ([], [_, second, ..]) if opaque_set.iter().all(|o| o.is_none()) => c.problem(
                format!("issuers[{second}].opaque_tokens"),
                "several issuers use introspection: set opaque_tokens = true on the one that opaque (non-JWT) tokens are sent to (JWTs go to the issuer their iss names)",
            ),
            ([_, second, ..], _) => c.problem(
                format!("issuers[{second}].opaque_tokens"),
                "is set on more than one issuer; opaque tokens go to exactly one",
            ),
            _ => {}
        }

        // [patients]
        let raw_issuers_fhir_ready = issuers
            .iter()
            .any(|i: &Issuer| i.fhir_base_url.is_some() && i.client_auth.is_some());
        let rp = raw.patients.unwrap_or_default();
        let map = match rp.map.as_deref().unwrap_or("same") {
            "same" => PatientMap::Same,
            "claim" => match rp.claim.clone().filter(|c| !c.is_empty()) {
                Some(claim) => PatientMap::Claim(claim),
                None => {
                    c.problem("patients.claim", "is needed with map = \"claim\": the claim that holds the DICOM PatientID, e.g. claim = \"dicom_patient_id\"");
                    PatientMap::Same
                }
            },
            "table" => match rp.table_file.as_deref().map(resolve) {
                Some(f) => {
                    if let Err(e) = read_patient_table(Path::new(&f)) {
                        c.problem(
                            "patients.table_file",
                            format!(
                                "{e}; give a CSV file with the header patient,patient_id,issuer"
                            ),
                        );
                    }
                    PatientMap::Table(f.into())
                }
                None => {
                    c.problem("patients.table_file", "is needed with map = \"table\": a CSV file with columns patient,patient_id,issuer");
                    PatientMap::Same
                }
            },
            "fhir" => {
                if rp.identifier_system.is_none() && rp.identifier_type.is_none() {
                    c.problem(
                        "patients.identifier_system",
                        "map = \"fhir\" needs identifier_system and/or identifier_type (e.g. identifier_type = \"MR\") to pick the Patient identifier that is the PatientID",
                    );
                }
                if !raw_issuers_fhir_ready {
                    c.problem(
                        "patients.map",
                        "map = \"fhir\" needs, on the issuers whose tokens it maps, fhir_base_url and the gateway's credentials (client_id with client_secret or client_key_file)",
                    );
                }
                PatientMap::Fhir {
                    system: rp.identifier_system.clone(),
                    type_code: rp.identifier_type.clone(),
                }
            }
            other => {
                c.problem(
                    "patients.map",
                    format!("unknown mapping \"{other}\"; use \"same\", \"claim\", \"fhir\" or \"table\""),
                );
                PatientMap::Same
            }
        };
        let use_issuer = rp.use_issuer.unwrap_or(false);
        if use_issuer && map == PatientMap::Same {
            c.problem(
                "patients.use_issuer",
                "map = \"same\" yields no issuer, so only data without IssuerOfPatientID would match; use map = \"claim\" (CX), \"table\" (issuer column) or \"fhir\" (identifier system), or remove use_issuer",
            );
        }
        let issuer_names = rp.issuer_names.clone().unwrap_or_default();
        if !issuer_names.is_empty() && !use_issuer {
            c.problem(
                "patients.issuer_names",
                "has no effect unless use_issuer = true; remove it",
            );
        }
        for (k, v) in &issuer_names {
            if v.trim().is_empty() || v.len() > 64 || v.contains('\\') {
                c.problem(
                    format!("patients.issuer_names.{k}"),
                    "must be an IssuerOfPatientID value (LO: 1 to 64 characters, no backslash)",
                );
            }
        }
        for (f, present) in [
            ("identifier_system", rp.identifier_system.is_some()),
            ("identifier_type", rp.identifier_type.is_some()),
        ] {
            if present && !matches!(map, PatientMap::Fhir { .. }) {
                c.problem(
                    format!("patients.{f}"),
                    "has no effect unless map = \"fhir\"; remove it",
                );
            }
        }
        if rp.claim.is_some() && !matches!(map, PatientMap::Claim(_)) {
            c.problem(
                "patients.claim",
                "has no effect unless map = \"claim\"; remove it",
            );
        }
        if rp.table_file.is_some() && !matches!(map, PatientMap::Table(_)) {
            c.problem(
                "patients.table_file",
                "has no effect unless map = \"table\"; remove it",
            );
        }

        // [policy]
        let rpol = raw.policy.unwrap_or_default();
        let user_level = match rpol.user_level.as_deref().unwrap_or("deny") {
            "deny" => UserLevel::Deny,
            "allow" => UserLevel::Allow,
            "ehr-check" => {
                if issuers.iter().all(|i| i.fhir_base_url.is_none()) {
                    c.problem(
                        "policy.user_level",
                        "\"ehr-check\" asks the EHR's FHIR server about each study, but no issuer has fhir_base_url; set it on the issuers whose user-level tokens should be checked",
                    );
                }
                UserLevel::EhrCheck
            }
            other => {
                c.problem(
                    "policy.user_level",
                    format!("unknown value \"{other}\"; use \"deny\", \"allow\" or \"ehr-check\""),
                );
                UserLevel::Deny
            }
        };
        let policy = Policy {
            user_level,
            write: rpol.write.unwrap_or(true),
            ehr_check_cache: c.seconds(
                "policy.ehr_check_cache_secs",
                rpol.ehr_check_cache_secs,
                60.0,
            ),
        };

        // [[destinations]]
        let mut destinations = Vec::new();
        let mut seen_ae: HashMap<String, String> = HashMap::new();
        if !ae_title.is_empty() {
            seen_ae.insert(ae_title.trim().to_string(), "gateway.ae_title".into());
        }
        for (i, d) in raw.destinations.into_iter().enumerate() {
            let key = format!("destinations[{i}].ae_title");
            let ae = c.required(&key, d.ae_title, "\"VIEWER\"");
            c.ae_title(&key, &ae);
            if !ae.is_empty()
                && let Some(prev) = seen_ae.insert(ae.trim().to_string(), key.clone())
            {
                c.problem(
                    key.clone(),
                    format!(
                        "AE title \"{ae}\" is already used by {prev}; every AE title must be unique"
                    ),
                );
            }
            let akey = format!("destinations[{i}].address");
            let addr = c.required(&akey, d.address, "\"127.0.0.1:11114\"");
            if !addr.is_empty() {
                c.host_port(&akey, &addr);
            }
            let tls = match (d.tls.unwrap_or(false), d.ca_file) {
                (false, None) => None,
                (false, Some(_)) => {
                    c.problem(
                        format!("destinations[{i}].ca_file"),
                        "is set but tls is not; add tls = true, or remove ca_file",
                    );
                    None
                }
                (true, None) => {
                    c.problem(format!("destinations[{i}].ca_file"), "is missing; with tls = true the destination's certificate is verified against its CA: add ca_file = \"destination-ca.pem\"");
                    None
                }
                (true, Some(ca)) => {
                    let identity = pacs_tls.as_ref().map(|t| &t.files);
                    let files = crate::tls::ClientFiles {
                        ca_file: resolve(&ca),
                        cert_file: identity.and_then(|f| f.cert_file.clone()),
                        key_file: identity.and_then(|f| f.key_file.clone()),
                        alpn: Vec::new(),
                    };
                    match crate::tls::ClientTls::load(&files, crate::tls::host_of(&addr)) {
                        Ok(t) => Some(std::sync::Arc::new(t)),
                        Err(e) => {
                            c.problem(format!("destinations[{i}].ca_file"), e.to_string());
                            None
                        }
                    }
                }
            };
            destinations.push(Destination {
                ae_title: ae,
                address: addr,
                tls,
            });
        }

        let receive_tls_listen = pacs_tls.as_ref().and_then(|t| t.receive_tls_listen);
        if !destinations.is_empty() && receive_listen.is_none() && receive_tls_listen.is_none() {
            c.problem(
                "pacs.receive_listen",
                "is needed for C-MOVE: [[destinations]] are configured, and the PACS delivers moved instances to the gateway there; add e.g. receive_listen = \"127.0.0.1:11113\" and register calling_ae_title at that address in the PACS",
            );
        }

        if retrieve == Retrieve::Move && receive_listen.is_none() && receive_tls_listen.is_none() {
            c.problem(
                "pacs.receive_listen",
                "is needed for pacs.retrieve = \"c-move\": the PACS delivers the instances DICOMweb asks for to the gateway there; add e.g. receive_listen = \"127.0.0.1:11113\" and register calling_ae_title at that address in the PACS",
            );
        }

        // listeners must not collide with each other
        let mut listens: Vec<(&str, SocketAddr)> = Vec::new();
        if let Some(a) = dimse_listen {
            listens.push(("gateway.dimse_listen", a));
        }
        if let Some(a) = dimse_tls_listen {
            listens.push(("gateway.dimse_tls_listen", a));
        }
        if let Some(a) = http_listen {
            listens.push(("gateway.http_listen", a));
        }
        if let Some(a) = https_listen {
            listens.push(("gateway.https_listen", a));
        }
        if let Some(a) = monitor_listen {
            listens.push(("gateway.monitor_listen", a));
        }
        if let Some(a) = receive_listen {
            listens.push(("pacs.receive_listen", a));
        }
        if let Some(a) = receive_tls_listen {
            listens.push(("pacs.tls.receive_tls_listen", a));
            if raw.tls.is_none() {
                c.problem(
                    "tls.cert_file",
                    "is missing; pacs.tls.receive_tls_listen needs the gateway's certificate: add [tls] with cert_file and key_file (PEM)",
                );
            }
        }
        for i in 0..listens.len() {
            for j in (i + 1)..listens.len() {
                if listens[i].1 == listens[j].1 && listens[i].1.port() != 0 {
                    c.problem(
                        listens[j].0,
                        format!(
                            "{} is also used by {}; give each listener its own port",
                            listens[j].1, listens[i].0
                        ),
                    );
                }
            }
        }

        // [tls]: needed by every TLS listener, and loaded here so that a file that does not
        // load is found by check-config, not at the first handshake.
        let tls_listeners: Vec<&str> = [
            ("gateway.dimse_tls_listen", dimse_tls_listen.is_some()),
            ("gateway.https_listen", https_listen.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect();
        let tls = match raw.tls {
            Some(t) => tls_identity(&mut c, t, &resolve),
            None => {
                if let Some(first) = tls_listeners.first() {
                    c.problem(
                        "tls.cert_file",
                        format!("is missing; {first} needs the gateway's certificate: add [tls] with cert_file and key_file (PEM)"),
                    );
                }
                None
            }
        };
        let require_tls = g.require_tls.unwrap_or(false);
        let audit = raw.audit.map(|a| {
            use crate::audit::sink::Transport;
            let syslog = a.syslog.as_deref().and_then(|u| {
                let (t, rest) = match u.split_once("://") {
                    Some(("udp", r)) => (Transport::Udp, r),
                    Some(("tcp", r)) => (Transport::Tcp, r),
                    Some(("tls", r)) => (Transport::Tls, r),
                    _ => {
                        c.problem(
                            "audit.syslog",
                            format!("{u:?} is not a syslog receiver; write udp://HOST:PORT (RFC 5426), tcp://HOST:PORT (RFC 6587) or tls://HOST:PORT (RFC 5425)"),
                        );
                        return None;
                    }
                };
                let rest = rest.trim_end_matches('/');
                match rest.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
                        Some((t, rest.to_string()))
                    }
                    _ => {
                        c.problem("audit.syslog", format!("{u:?} names no HOST:PORT"));
                        None
                    }
                }
            });
            let tls_syslog = matches!(syslog, Some((Transport::Tls, _)));
            let syslog_ca_file = a.syslog_ca_file.as_deref().map(&resolve);
            match (&syslog_ca_file, tls_syslog) {
                (None, true) => c.problem(
                    "audit.syslog_ca_file",
                    "is missing; a tls:// audit.syslog needs the receiver's CA (PEM)",
                ),
                (Some(f), _) if !Path::new(f).is_file() => c.problem(
                    "audit.syslog_ca_file",
                    format!("{f}: no such file"),
                ),
                _ => {}
            }
            let json_file = a.json_file.as_deref().map(&resolve);
            if let Some(f) = &json_file {
                let dir = Path::new(f).parent().filter(|d| !d.as_os_str().is_empty());
                if dir.is_some_and(|d| !d.is_dir()) {
                    c.problem(
                        "audit.json_file",
                        format!("{f}: its directory does not exist"),
                    );
                }
            }
            if syslog.is_none() && json_file.is_none() && a.syslog.is_none() {
                c.problem(
                    "audit",
                    "names no sink; set audit.syslog, audit.json_file or both (or remove [audit])",
                );
            }
            crate::audit::sink::AuditConfig {
                syslog,
                syslog_ca_file: syslog_ca_file.map(std::path::PathBuf::from),
                client_identity: None,
                json_file: json_file.map(std::path::PathBuf::from),
                source_id: a.source_id.unwrap_or_else(|| "PACSGATE".into()),
            }
        });

        // [authorization_server]
        let authorization_server = match raw.authorization_server {
            Some(ra) if ra.enabled == Some(true) => {
                let key = "authorization_server";
                let signing_key_file = match ra.signing_key_file.as_deref() {
                    Some(f) if !f.trim().is_empty() => resolve(f),
                    _ => {
                        c.problem(
                            format!("{key}.signing_key_file"),
                            "is needed: the file of the key the gateway signs its tokens with (PKCS#8 PEM or JWK; created as an EC P-256 key if it does not exist), e.g. signing_key_file = \"as-signing-key.pem\"",
                        );
                        String::new()
                    }
                };
                let path = std::path::PathBuf::from(&signing_key_file);
                if !signing_key_file.is_empty()
                    && path.exists()
                    && let Err(e) = crate::crypto::SigningKey::load_any(&path, &TOKEN_KEY_ALGS)
                {
                    c.problem(
                        format!("{key}.signing_key_file"),
                        format!("{e:#}; give a PKCS#8 PEM or JWK EC (P-256, P-384) or RSA private key, or name a file that does not exist yet to have one created"),
                    );
                }
                let token_lifetime = c.seconds(
                    &format!("{key}.token_lifetime_secs"),
                    ra.token_lifetime_secs,
                    300.0,
                );
                if token_lifetime > Duration::from_secs(3600) {
                    c.problem(
                        format!("{key}.token_lifetime_secs"),
                        "is at most 3600: an exchanged token is short-lived (an app exchanges a fresh EHR token for another)",
                    );
                }
                let subject_issuers = ra.subject_issuers.unwrap_or_default();
                if subject_issuers.is_empty() {
                    c.problem(
                        format!("{key}.subject_issuers"),
                        "is needed: the [[issuers]] whose access tokens may be exchanged, e.g. subject_issuers = [\"https://ehr.example/auth\"]",
                    );
                }
                for si in &subject_issuers {
                    if !issuers.iter().any(|i: &Issuer| &i.issuer == si) {
                        c.problem(
                            format!("{key}.subject_issuers"),
                            format!("{si:?} is not an [[issuers]] entry; only tokens of trusted issuers may be exchanged"),
                        );
                    }
                }
                if issuers
                    .iter()
                    .any(|i| i.issuer.trim_end_matches('/') == public_url)
                {
                    c.problem(
                        format!("{key}.enabled"),
                        "the gateway signs its tokens as gateway.public_url, which is also an [[issuers]] entry; give the gateway a public_url of its own",
                    );
                }
                Some(AuthorizationServer {
                    issuer: public_url.clone(),
                    signing_key_file: path,
                    token_lifetime,
                    subject_issuers,
                })
            }
            _ => None,
        };

        if !c.problems.is_empty() {
            return Err(c.problems);
        }
        let config = Config {
            gateway: Gateway {
                ae_title,
                dimse_listen,
                dimse_tls_listen,
                http_listen,
                https_listen,
                monitor_listen,
                require_tls,
                public_url,
                audiences,
                require_called_ae_title: g.require_called_ae_title.unwrap_or(true),
                cors_origins,
                metrics_clients,
                drain,
            },
            limits,
            pacs: Pacs {
                ae_title: p_ae,
                address: p_addr,
                dicomweb_url: pacs.dicomweb_url,
                calling_ae_title: calling,
                receive_listen,
                connect_timeout,
                dimse_tls,
                tls: pacs_tls,
                max_associations: pacs_max_associations,
                query_model,
                retrieve,
            },
            issuers,
            patients: Patients {
                map,
                use_issuer,
                issuer_names,
            },
            policy,
            destinations,
            fhir: Fhir {
                enabled: raw.fhir.and_then(|f| f.enabled).unwrap_or(false),
            },
            authorization_server,
            audit: audit.map(|mut a| {
                a.client_identity = tls
                    .as_ref()
                    .map(|t| (t.cert_file.clone(), t.key_file.clone()));
                a
            }),
            tls,
        };
        // Under require_tls nothing may cross a network in clear.
        if require_tls {
            let legs = config.plaintext_legs();
            if !legs.is_empty() {
                return Err(legs
                    .into_iter()
                    .map(|p| Problem {
                        message: format!("{} and gateway.require_tls is set", p.message),
                        ..p
                    })
                    .collect());
            }
        }
        Ok(config)
    }

    /// For a configuration read again while running: the settings bound to what was set up
    /// at start (listeners and their limits, the server identity's file names, the audit
    /// trail's sinks, the drain time) keep their running values, copied from `running`; the
    /// keys that differed in the file are returned, for the admin to be told they wait for a
    /// restart. Issuers, the PACS, destinations, policy and patient mapping are not touched.
    pub fn keep_running(&mut self, running: &Config) -> Vec<&'static str> {
        fn differ<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
            format!("{a:?}") != format!("{b:?}")
        }
        let mut changed = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $key:literal) => {
                if differ(&self.$($field).+, &running.$($field).+) {
                    changed.push($key);
                    self.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!(gateway.ae_title, "gateway.ae_title");
        keep!(gateway.dimse_listen, "gateway.dimse_listen");
        keep!(gateway.dimse_tls_listen, "gateway.dimse_tls_listen");
        keep!(gateway.http_listen, "gateway.http_listen");
        keep!(gateway.https_listen, "gateway.https_listen");
        keep!(gateway.monitor_listen, "gateway.monitor_listen");
        keep!(gateway.require_tls, "gateway.require_tls");
        keep!(gateway.metrics_clients, "gateway.metrics_clients");
        keep!(gateway.drain, "gateway.drain_secs");
        keep!(limits, "[limits]");
        keep!(tls, "[tls]");
        keep!(audit, "[audit]");
        keep!(pacs.receive_listen, "pacs.receive_listen");
        let receive_tls = |c: &Config| c.pacs.tls.as_ref().and_then(|t| t.receive_tls_listen);
        if receive_tls(self) != receive_tls(running) {
            changed.push("pacs.tls.receive_tls_listen");
            if let Some(t) = self.pacs.tls.as_mut() {
                t.receive_tls_listen = receive_tls(running);
            }
        }
        // The receiver over TLS checks the PACS against the CA it was started with; toward the
        // PACS the new file applies at once (it is a client identity of this generation).
        let receiver_ca = |c: &Config| {
            c.pacs
                .tls
                .as_ref()
                .filter(|t| t.receive_tls_listen.is_some())
                .map(|t| t.files.ca_file.clone())
        };
        if receiver_ca(running).is_some() && receiver_ca(self) != receiver_ca(running) {
            changed.push("pacs.tls.ca_file (for the C-MOVE receiver)");
        }
        changed
    }

    /// What is allowed but unwise: legs in plaintext where tokens or images would cross a
    /// network (anything not on loopback). `check-config` prints them and `serve` logs them;
    /// `gateway.require_tls` makes them errors.
    pub fn warnings(&self) -> Vec<Problem> {
        self.plaintext_legs()
    }

    fn plaintext_legs(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut leg = |key: String, what: String, fix: &str| {
            out.push(Problem {
                key,
                message: format!("{what} crosses the network in clear; {fix}"),
            })
        };
        let g = &self.gateway;
        for (key, addr, fix) in [
            (
                "gateway.dimse_listen",
                g.dimse_listen,
                "serve DIMSE on gateway.dimse_tls_listen instead, or bind it to 127.0.0.1",
            ),
            (
                "gateway.http_listen",
                g.http_listen,
                "serve HTTP on gateway.https_listen instead, or bind it to 127.0.0.1",
            ),
            (
                "pacs.receive_listen",
                self.pacs.receive_listen,
                "use pacs.tls.receive_tls_listen instead, or bind it to 127.0.0.1",
            ),
        ] {
            if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
                leg(
                    key.into(),
                    format!("{a} is a plaintext listener: what it carries (tokens, images)"),
                    fix,
                );
            }
        }
        if self.pacs.dimse_tls.is_none() && on_network(&self.pacs.address) {
            leg(
                "pacs.address".into(),
                format!("DIMSE toward the PACS at {}", self.pacs.address),
                "add [pacs.tls] with dimse = true",
            );
        }
        if let Some(u) = &self.pacs.dicomweb_url
            && u.starts_with("http://")
            && url::Url::parse(u)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .is_some_and(|h| on_network(&format!("{h}:0")))
        {
            leg(
                "pacs.dicomweb_url".into(),
                "DICOMweb toward the PACS".into(),
                "use its https:// URL with [pacs.tls]",
            );
        }
        for (i, d) in self.destinations.iter().enumerate() {
            if d.tls.is_none() && on_network(&d.address) {
                leg(
                    format!("destinations[{i}].address"),
                    format!("C-MOVE toward {} at {}", d.ae_title, d.address),
                    "set tls = true with its ca_file",
                );
            }
        }
        if let Some((transport, addr)) = self.audit.as_ref().and_then(|a| a.syslog.as_ref())
            && !matches!(transport, crate::audit::sink::Transport::Tls)
            && on_network(addr)
        {
            leg(
                "audit.syslog".into(),
                format!("the audit trail (patients, studies, users) toward {addr}"),
                "use tls://HOST:6514 with audit.syslog_ca_file (RFC 5425)",
            );
        }
        out
    }
}

/// Whether a `HOST:PORT` is off this machine (anything but a loopback address or `localhost`).
fn on_network(address: &str) -> bool {
    let host = crate::tls::host_of(address);
    if host.eq_ignore_ascii_case("localhost") {
        return false;
    }
    !host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Checks `[pacs.tls]` and loads it once: the section, and the DICOM TLS client toward the
/// PACS when `dimse = true`.
fn pacs_tls(
    c: &mut Checker,
    t: RawPacsTls,
    address: &str,
    resolve: &dyn Fn(&str) -> String,
) -> (
    Option<PacsTls>,
    Option<std::sync::Arc<crate::tls::ClientTls>>,
) {
    let ca = c.required("pacs.tls.ca_file", t.ca_file, "\"pacs-ca.pem\"");
    let receive_tls_listen = t
        .receive_tls_listen
        .as_deref()
        .and_then(|s| c.socket_addr("pacs.tls.receive_tls_listen", s));
    if ca.is_empty() {
        return (None, None);
    }
    let files = crate::tls::ClientFiles {
        ca_file: resolve(&ca),
        cert_file: t.cert_file.as_deref().map(resolve),
        key_file: t.key_file.as_deref().map(resolve),
        alpn: Vec::new(),
    };
    let name = t
        .server_name
        .clone()
        .unwrap_or_else(|| crate::tls::host_of(address).to_string());
    let load = |c: &mut Checker, files: &crate::tls::ClientFiles| match crate::tls::ClientTls::load(
        files, &name,
    ) {
        Ok(t) => Some(std::sync::Arc::new(t)),
        Err(crate::tls::TlsError::File { key, path, why }) => {
            c.problem(format!("pacs.tls.{key}"), format!("{path} {why}"));
            None
        }
        Err(e) => {
            let key = if t.server_name.is_some() {
                "pacs.tls.server_name"
            } else {
                "pacs.tls.cert_file"
            };
            c.problem(key, e.to_string());
            None
        }
    };
    let dimse = if t.dimse.unwrap_or(false) {
        load(c, &files)
    } else {
        None
    };
    let http_files = crate::tls::ClientFiles {
        alpn: vec![b"http/1.1".to_vec()],
        ..files.clone()
    };
    let Some(http) = load(c, &http_files) else {
        return (None, dimse);
    };
    (
        Some(PacsTls {
            files,
            receive_tls_listen,
            http,
            server_name: name.clone(),
        }),
        dimse,
    )
}

/// Checks `[tls]` and loads it once, so that every file problem is named by its key.
fn tls_identity(
    c: &mut Checker,
    t: RawTls,
    resolve: &dyn Fn(&str) -> String,
) -> Option<crate::tls::ServerIdentity> {
    use crate::tls::ClientAuth;
    let cert = c.required("tls.cert_file", t.cert_file, "\"gateway-cert.pem\"");
    let key = c.required("tls.key_file", t.key_file, "\"gateway-key.pem\"");
    let client_auth = match (t.client_auth.as_deref(), &t.client_ca_file) {
        (Some("none"), Some(_)) => {
            c.problem(
                "tls.client_ca_file",
                "is set but client_auth = \"none\" asks for no client certificate: remove client_ca_file, or set client_auth = \"optional\" or \"required\"",
            );
            ClientAuth::None
        }
        (None, None) | (Some("none"), _) => ClientAuth::None,
        (None, Some(_)) | (Some("required"), _) => ClientAuth::Required,
        (Some("optional"), _) => ClientAuth::Optional,
        (Some(other), _) => {
            c.problem(
                "tls.client_auth",
                format!("\"{other}\" is not one of \"none\", \"optional\", \"required\""),
            );
            ClientAuth::None
        }
    };
    if client_auth != ClientAuth::None && t.client_ca_file.is_none() {
        c.problem(
            "tls.client_ca_file",
            "is missing; tls.client_auth asks for client certificates, so name the CA that signs them, e.g. client_ca_file = \"clients-ca.pem\"",
        );
    }
    if cert.is_empty() || key.is_empty() {
        return None;
    }
    let identity = crate::tls::ServerIdentity {
        cert_file: resolve(&cert),
        key_file: resolve(&key),
        client_ca_file: t.client_ca_file.as_deref().map(resolve),
        client_auth,
    };
    match crate::tls::ServerTls::load(&identity) {
        Ok(_) => Some(identity),
        Err(crate::tls::TlsError::File { key, path, why }) => {
            c.problem(format!("tls.{key}"), format!("{path} {why}"));
            None
        }
        Err(e) => {
            c.problem("tls.cert_file", e.to_string());
            None
        }
    }
}

/// The algorithms a `client_key_file` may sign client assertions with (SMART Backend
/// Services: RS384 for an RSA key, ES384 for an EC P-384 key).
pub(crate) const CLIENT_KEY_ALGS: [jsonwebtoken::Algorithm; 2] = [
    jsonwebtoken::Algorithm::RS384,
    jsonwebtoken::Algorithm::ES384,
];

/// The algorithms the gateway's own tokens may be signed with (`authorization_server`), in
/// the order a key file is tried.
pub(crate) const TOKEN_KEY_ALGS: [jsonwebtoken::Algorithm; 3] = [
    jsonwebtoken::Algorithm::ES256,
    jsonwebtoken::Algorithm::ES384,
    jsonwebtoken::Algorithm::RS256,
];

/// The largest patient mapping table read.
const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;

/// One row of a patient mapping table (`patients.table_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableRow {
    /// The token's patient.
    pub patient: String,
    /// A DICOM PatientID of that patient (one LO value).
    pub patient_id: String,
    /// Its IssuerOfPatientID, when the table gives one.
    pub issuer: Option<String>,
}

/// Reads `patient,patient_id,issuer` rows (header first; `#` lines are comments; the issuer
/// column may be empty). Every problem names its line.
pub(crate) fn read_patient_table(path: &Path) -> Result<Vec<TableRow>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_TABLE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_TABLE_BYTES} bytes",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let header: Vec<String> = match lines.next() {
        Some((_, h)) => h
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .collect(),
        None => return Err(format!("{} is empty", path.display())),
    };
    if header.first().map(String::as_str) != Some("patient")
        || header.get(1).map(String::as_str) != Some("patient_id")
    {
        return Err(format!(
            "{}: the first line must be the header patient,patient_id,issuer",
            path.display()
        ));
    }
    let mut rows = Vec::new();
    for (n, line) in lines {
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        let (Some(patient), Some(pid)) = (cols.first(), cols.get(1)) else {
            return Err(format!(
                "{} line {}: expected patient,patient_id[,issuer]",
                path.display(),
                n + 1
            ));
        };
        if patient.is_empty() || pid.is_empty() || pid.len() > 64 || pid.contains('\\') {
            return Err(format!(
                "{} line {}: empty patient, or a PatientID that is not a single LO value",
                path.display(),
                n + 1
            ));
        }
        rows.push(TableRow {
            patient: patient.to_string(),
            patient_id: pid.to_string(),
            issuer: cols.get(2).filter(|i| !i.is_empty()).map(|i| i.to_string()),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:11112"
http_listen = "127.0.0.1:8080"
public_url = "http://127.0.0.1:8080"

[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"

[[issuers]]
issuer = "http://127.0.0.1:9400"
verify = "jwt"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.gateway.ae_title, "PACSGATE");
        assert_eq!(
            c.gateway.audiences,
            vec!["http://127.0.0.1:8080", "http://127.0.0.1:8080/dicom-web"]
        );
        assert_eq!(c.pacs.calling_ae_title, "PACSGATE");
        assert_eq!(c.policy.user_level, UserLevel::Deny);
        assert_eq!(c.limits.max_associations, 64);
        assert_eq!(
            c.issuers[0].accept_typ,
            vec!["at+jwt", "application/at+jwt"]
        );
    }

    #[test]
    fn tls_settings_are_checked_with_their_keys() {
        let keys = |text: &str| -> Vec<String> {
            Config::parse(text)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        // A TLS listener needs [tls]; without a plaintext DIMSE listener, a DICOM TLS one does.
        let tls_only = GOOD.replace(
            "dimse_listen = \"127.0.0.1:11112\"",
            "dimse_tls_listen = \"127.0.0.1:2762\"",
        );
        assert_eq!(keys(&tls_only), ["tls.cert_file"]);
        let https_pacs = GOOD.replace(
            "address = \"127.0.0.1:4242\"",
            "address = \"127.0.0.1:4242\"\ndicomweb_url = \"https://127.0.0.1:8043/dicom-web\"",
        );
        assert_eq!(keys(&https_pacs), ["pacs.tls.ca_file"]);
        let tls_dest = format!(
            "{GOOD}\n[[destinations]]\nae_title = \"WS\"\naddress = \"127.0.0.1:104\"\ntls = true\n"
        );
        let k = keys(&tls_dest);
        assert!(k.contains(&"destinations[0].ca_file".to_string()), "{k:?}");
        // Plaintext on the network: a warning, and an error under require_tls.
        let exposed = GOOD.replace("127.0.0.1:11112", "0.0.0.0:11112");
        let c = Config::parse(&exposed).expect("allowed");
        let w: Vec<String> = c.warnings().into_iter().map(|p| p.key).collect();
        assert_eq!(w, ["gateway.dimse_listen"]);
        let strict = exposed.replace(
            "public_url = \"http://127.0.0.1:8080\"",
            "public_url = \"http://127.0.0.1:8080\"\nrequire_tls = true",
        );
        assert_eq!(keys(&strict), ["gateway.dimse_listen"]);
        assert!(Config::parse(GOOD).expect("loopback").warnings().is_empty());
        // Every leg counts: the PACS, its DICOMweb service, the receiver and the destinations.
        let far = GOOD
            .replace("address = \"127.0.0.1:4242\"", "address = \"pacs.hospital.example:104\"\ndicomweb_url = \"http://10.1.2.3/dicom-web\"\nreceive_listen = \"0.0.0.0:11113\"")
            + "\n[[destinations]]\nae_title = \"WS\"\naddress = \"10.1.2.4:104\"\n";
        let w: Vec<String> = Config::parse(&far)
            .expect("allowed")
            .warnings()
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in [
            "pacs.address",
            "pacs.dicomweb_url",
            "pacs.receive_listen",
            "destinations[0].address",
        ] {
            assert!(w.contains(&k.to_string()), "{k}: {w:?}");
        }
        // A client CA that asks for nothing is a contradiction, not a silent no-op.
        let tls = format!(
            "{GOOD}\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\nclient_auth = \"none\"\n"
        );
        assert!(keys(&tls).contains(&"tls.client_ca_file".to_string()));
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let bad = r#"
[gateway]
ae_title = "THIS-AE-TITLE-IS-FAR-TOO-LONG"
dimse_listen = "localhost:99999"

[pacs]
ae_title = "ORTHANC"

[[issuers]]
issuer = "http://127.0.0.1:9400"
verify = "magic"

[[destinations]]
ae_title = "A"
address = "127.0.0.1:1"
[[destinations]]
ae_title = "A"
address = "nowhere"
"#;
        let problems = Config::parse(bad).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "gateway.ae_title",
            "gateway.dimse_listen",
            "gateway.public_url",
            "pacs.address",
            "issuers[0].verify",
            "destinations[1].ae_title",
            "destinations[1].address",
        ] {
            assert!(keys.contains(&k), "missing problem for {k}: {problems:?}");
        }
        let verify = problems
            .iter()
            .find(|p| p.key == "issuers[0].verify")
            .unwrap();
        assert!(
            verify.message.contains("\"jwt\""),
            "message names the fix: {}",
            verify.message
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_are_reported() {
        let p = Config::parse("[gateway]\nae_tittle = \"X\"\n").unwrap_err();
        assert!(p[0].message.contains("ae_tittle"), "{p:?}");
        let p = Config::parse("[gateway\n").unwrap_err();
        assert_eq!(p[0].key, "(syntax)");
    }

    #[test]
    fn duplicate_gateway_and_destination_ae_titles_are_refused() {
        let text = format!(
            "{GOOD}\n[[destinations]]\nae_title = \"PACSGATE\"\naddress = \"127.0.0.1:11114\"\n"
        );
        let p = Config::parse(&text).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.key == "destinations[0].ae_title"
                    && p.message.contains("gateway.ae_title"))
        );
    }

    #[test]
    fn colliding_listeners_are_refused() {
        let text = GOOD.replace("127.0.0.1:8080\"\npublic", "127.0.0.1:11112\"\npublic");
        let p = Config::parse(&text).unwrap_err();
        assert!(p.iter().any(|p| p.key == "gateway.http_listen"), "{p:?}");
    }

    #[test]
    fn an_audit_trail_in_clear_off_this_machine_is_a_leg_in_plaintext() {
        let with = |syslog: &str, require: bool| {
            let text = format!(
                "{}\n[audit]\nsyslog = \"{syslog}\"\n",
                GOOD.replace(
                    "public_url",
                    &format!("require_tls = {require}\npublic_url")
                )
            );
            Config::parse(&text)
        };
        let warned = |c: Result<Config, Vec<Problem>>| {
            c.unwrap()
                .warnings()
                .into_iter()
                .any(|w| w.key == "audit.syslog")
        };
        assert!(warned(with("udp://10.1.2.3:514", false)));
        assert!(warned(with("tcp://audit.example.org:601", false)));
        assert!(!warned(with("udp://127.0.0.1:514", false)));
        let refused = with("tcp://10.1.2.3:601", true).err().unwrap_or_default();
        assert!(
            refused.iter().any(|p| p.key == "audit.syslog"),
            "{refused:?}"
        );
    }

    #[test]
    fn a_reread_configuration_keeps_what_waits_for_a_restart() {
        let text = |listen: &str, drain: &str, issuer: &str| {
            GOOD.replace(
                "dimse_listen = \"127.0.0.1:11112\"",
                &format!("dimse_listen = \"{listen}\"\ndrain_secs = {drain}"),
            )
            .replace("http://127.0.0.1:9400", issuer)
        };
        let running =
            Config::parse(&text("127.0.0.1:11112", "20", "http://127.0.0.1:9400")).unwrap();
        let mut next =
            Config::parse(&text("127.0.0.1:4243", "5", "http://127.0.0.1:9401")).unwrap();
        let changed = next.keep_running(&running);
        assert_eq!(changed, vec!["gateway.dimse_listen", "gateway.drain_secs"]);
        assert_eq!(next.gateway.dimse_listen, running.gateway.dimse_listen);
        assert_eq!(next.gateway.drain, Duration::from_secs(20));
        assert_eq!(
            next.issuers[0].issuer, "http://127.0.0.1:9401",
            "issuers are re-read"
        );
        let mut same =
            Config::parse(&text("127.0.0.1:11112", "20", "http://127.0.0.1:9400")).unwrap();
        assert!(same.keep_running(&running).is_empty());
    }

    #[test]
    fn the_monitor_listener_is_read_and_must_not_collide() {
        let with = |addr: &str| {
            GOOD.replace(
                "http_listen = \"127.0.0.1:8080\"",
                &format!("http_listen = \"127.0.0.1:8080\"\nmonitor_listen = \"{addr}\""),
            )
        };
        let cfg = Config::parse(&with("127.0.0.1:9100")).unwrap();
        assert_eq!(
            cfg.gateway.monitor_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        let p = Config::parse(&with("127.0.0.1:8080")).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.key == "gateway.monitor_listen" && p.message.contains("http_listen")),
            "{p:?}"
        );
        let p = Config::parse(&with("nowhere")).unwrap_err();
        assert!(p.iter().any(|p| p.key == "gateway.monitor_listen"), "{p:?}");
        // It carries no token: off loopback it is not a plaintext leg to warn of.
        let cfg = Config::parse(&with("0.0.0.0:9100")).unwrap();
        assert!(
            !cfg.warnings()
                .iter()
                .any(|w| w.key == "gateway.monitor_listen"),
            "{:?}",
            cfg.warnings()
        );
    }

    #[test]
    fn the_authorization_server_names_its_key_and_trusted_subject_issuers() {
        let with = |body: &str| Config::parse(&format!("{GOOD}\n[authorization_server]\n{body}"));
        let c = with(
            "enabled = true\nsigning_key_file = \"/nonexistent/as.pem\"\nsubject_issuers = [\"http://127.0.0.1:9400\"]",
        )
        .unwrap();
        let a = c.authorization_server.expect("enabled");
        assert_eq!(a.issuer, "http://127.0.0.1:8080");
        assert_eq!(a.token_lifetime, Duration::from_secs(300));
        assert!(
            with("enabled = false")
                .unwrap()
                .authorization_server
                .is_none()
        );
        for (body, key) in [
            (
                "enabled = true\nsubject_issuers = [\"http://127.0.0.1:9400\"]",
                "authorization_server.signing_key_file",
            ),
            (
                "enabled = true\nsigning_key_file = \"k.pem\"",
                "authorization_server.subject_issuers",
            ),
            (
                "enabled = true\nsigning_key_file = \"k.pem\"\nsubject_issuers = [\"https://elsewhere\"]",
                "authorization_server.subject_issuers",
            ),
            (
                "enabled = true\nsigning_key_file = \"k.pem\"\nsubject_issuers = [\"http://127.0.0.1:9400\"]\ntoken_lifetime_secs = 7200",
                "authorization_server.token_lifetime_secs",
            ),
            ("enabled = true\nunknown = 1", "(syntax)"),
        ] {
            let p = with(body).unwrap_err();
            assert!(p.iter().any(|p| p.key == key), "{body}: {p:?}");
        }
        // A key file that is there must hold a key.
        let dir = std::env::temp_dir().join(format!("pacsgate-askey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a key").unwrap();
        let p = with(&format!(
            "enabled = true\nsigning_key_file = \"{}\"\nsubject_issuers = [\"http://127.0.0.1:9400\"]",
            bad.display()
        ))
        .unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.key == "authorization_server.signing_key_file"),
            "{p:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_query_model_is_one_of_two() {
        let with = |v: &str| {
            Config::parse(&GOOD.replace(
                "address = \"127.0.0.1:4242\"\n",
                &format!("address = \"127.0.0.1:4242\"\nquery_model = \"{v}\"\n"),
            ))
        };
        assert_eq!(
            Config::parse(GOOD).unwrap().pacs.query_model,
            QueryModel::Relational
        );
        assert_eq!(
            with("hierarchical").unwrap().pacs.query_model,
            QueryModel::Hierarchical
        );
        let p = with("Hierarchical").unwrap_err();
        assert!(p.iter().any(|p| p.key == "pacs.query_model"), "{p:?}");
        // A client's relay and the look-ups its requests need are open together: at least 2.
        let p = Config::parse(&GOOD.replace(
            "address = \"127.0.0.1:4242\"\n",
            "address = \"127.0.0.1:4242\"\nmax_associations = 1\n",
        ))
        .unwrap_err();
        assert!(p.iter().any(|p| p.key == "pacs.max_associations"), "{p:?}");
    }

    #[test]
    fn empty_audiences_are_refused() {
        let text = GOOD.replace(
            "public_url = \"http://127.0.0.1:8080\"",
            "public_url = \"http://127.0.0.1:8080\"\naudiences = []",
        );
        let p = Config::parse(&text).unwrap_err();
        assert!(p.iter().any(|p| p.key == "gateway.audiences"));
    }

    #[test]
    fn study_and_issuer_options_are_checked() {
        let keys = |extra: &str| -> Vec<String> {
            match Config::parse(&format!("{GOOD}{extra}")) {
                Ok(_) => Vec::new(),
                Err(p) => p.into_iter().map(|p| p.key).collect(),
            }
        };
        assert_eq!(
            keys("[policy]\nuser_level = \"ehr-check\"\n"),
            vec!["policy.user_level"],
            "ehr-check needs a fhir_base_url"
        );
        assert!(keys("fhir_base_url = \"http://127.0.0.1:9400/fhir\"\nlaunch_context_restricts = true\n[policy]\nuser_level = \"ehr-check\"\nehr_check_cache_secs = 30\n").is_empty());
        assert_eq!(
            keys("[patients]\nuse_issuer = true\n"),
            vec!["patients.use_issuer"],
            "map = same yields no issuer"
        );
        assert_eq!(
            keys(
                "[patients]\nmap = \"claim\"\nclaim = \"pid\"\nissuer_names = { \"urn:oid:1.2\" = \"H\" }\n"
            ),
            vec!["patients.issuer_names"]
        );
        assert_eq!(
            keys(
                "[patients]\nmap = \"claim\"\nclaim = \"pid\"\nuse_issuer = true\nissuer_names = { \"urn:oid:1.2\" = \"\" }\n"
            ),
            vec!["patients.issuer_names.urn:oid:1.2"]
        );
        let c = Config::parse(&format!(
            "{GOOD}[patients]\nmap = \"claim\"\nclaim = \"pid\"\nuse_issuer = true\nissuer_names = {{ \"urn:oid:1.2\" = \"HOSP\" }}\n"
        ))
        .unwrap();
        assert!(c.patients.use_issuer);
        assert_eq!(c.patients.issuer_names["urn:oid:1.2"], "HOSP");
        assert_eq!(c.policy.ehr_check_cache, std::time::Duration::from_secs(60));
        assert_eq!(
            c.gateway.metrics_clients.len(),
            2,
            "loopback only by default"
        );
    }

    #[test]
    fn opaque_tokens_go_to_exactly_one_issuer() {
        let intro = |n: u16, extra: &str| {
            format!(
                "[[issuers]]\nissuer = \"http://127.0.0.1:{n}\"\nverify = \"introspection\"\nclient_id = \"gw\"\nclient_secret = \"s\"\n{extra}\n"
            )
        };
        let parse = |extra: String| Config::parse(&format!("{GOOD}{extra}"));
        let keys = |extra: String| -> Vec<String> {
            match parse(extra) {
                Ok(_) => Vec::new(),
                Err(p) => p.into_iter().map(|p| p.key).collect(),
            }
        };
        // one introspection issuer takes them by default
        let c = parse(intro(9401, "")).unwrap();
        assert!(c.issuers[1].opaque_tokens && !c.issuers[0].opaque_tokens);
        // two: the configuration must choose, and choose one
        assert_eq!(
            keys(intro(9401, "") + &intro(9402, "")),
            vec!["issuers[2].opaque_tokens"]
        );
        let c = parse(intro(9401, "") + &intro(9402, "opaque_tokens = true")).unwrap();
        assert!(!c.issuers[1].opaque_tokens && c.issuers[2].opaque_tokens);
        assert_eq!(
            keys(intro(9401, "opaque_tokens = true") + &intro(9402, "opaque_tokens = true")),
            vec!["issuers[2].opaque_tokens"]
        );
        // only an introspection issuer can judge an opaque token; off means off
        assert_eq!(
            keys("opaque_tokens = true\n".to_string()),
            vec!["issuers[0].opaque_tokens"]
        );
        let c = parse(intro(9401, "opaque_tokens = false")).unwrap();
        assert!(c.issuers.iter().all(|i| !i.opaque_tokens));
    }
}
