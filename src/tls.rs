//! TLS for the gateway's listeners: its server identity (certificate chain and key, and the CA
//! whose client certificates it accepts) as rustls configurations for DICOM TLS and HTTPS,
//! re-read on demand (SIGHUP) without touching connections already running, and the name of a
//! verified client certificate for the audit trail.
//!
//! Owns: the TLS profile (BCP 195 as PS3.15 Annex B.9 asks: TLS 1.2 and 1.3 only, and rustls's
//! suites, every one an AEAD with forward secrecy), loading the PEM files and saying what is
//! wrong with them. Must not know DICOM, HTTP or policy.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// Whether clients must present a certificate the configured CA signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// No certificate is asked for.
    #[default]
    None,
    /// One is asked for; a client without one gets in, one with a certificate the CA did not
    /// sign does not.
    Optional,
    /// A client without a certificate the CA signed gets nothing.
    Required,
}

/// The `[tls]` section: the gateway's server identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
    pub client_auth: ClientAuth,
}

/// What is wrong with a TLS file or the identity it makes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: {path}: {why}")]
    File {
        key: &'static str,
        path: String,
        why: String,
    },
    #[error("tls: {0}")]
    Identity(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn certificates(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |why: String| TlsError::File {
        key,
        path: path.to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(format!("cannot be read ({e})")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(format!("is not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(file(
            "holds no certificate (PEM \"BEGIN CERTIFICATE\")".into(),
        ));
    }
    Ok(certs)
}

fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        key: "key_file",
        path: path.to_string(),
        why: format!("holds no PEM private key (PKCS#8, RSA or EC) ({e})"),
    })
}

/// Builds one server configuration from the files as they are now.
fn server_config(id: &ServerIdentity, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let chain = certificates("cert_file", &id.cert_file)?;
    let key = private_key(&id.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let builder = match (&id.client_ca_file, id.client_auth) {
        (Some(ca), auth) if auth != ClientAuth::None => {
            let mut roots = RootCertStore::empty();
            for c in certificates("client_ca_file", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    key: "client_ca_file",
                    path: ca.clone(),
                    why: format!("holds a certificate that cannot be a trust anchor ({e})"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Identity(format!("client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Identity(format!(
            "cert_file and key_file do not make an identity ({e}); the key must be the certificate's"
        ))
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The gateway's server identity for every TLS listener, replaceable while it serves.
pub struct ServerTls {
    identity: ServerIdentity,
    dicom: RwLock<Arc<ServerConfig>>,
    https: RwLock<Arc<ServerConfig>>,
}

/// HTTPS offers HTTP/2 first: a browser fetching hundreds of frames then needs one connection,
/// not six.
const HTTPS_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

impl ServerTls {
    pub fn load(identity: &ServerIdentity) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            dicom: RwLock::new(Arc::new(server_config(identity, &[])?)),
            https: RwLock::new(Arc::new(server_config(identity, HTTPS_ALPN)?)),
            identity: identity.clone(),
        })
    }

    /// Reads the files again. Connections already running keep the identity they began with;
    /// new ones get the new one. A file that does not load changes nothing.
    pub fn reload(&self) -> Result<(), TlsError> {
        let dicom = Arc::new(server_config(&self.identity, &[])?);
        let https = Arc::new(server_config(&self.identity, HTTPS_ALPN)?);
        *self.dicom.write().unwrap_or_else(|e| e.into_inner()) = dicom;
        *self.https.write().unwrap_or_else(|e| e.into_inner()) = https;
        Ok(())
    }

    /// The acceptor for a new DICOM TLS connection.
    pub fn dicom(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.dicom.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The acceptor for a new HTTPS connection.
    pub fn https(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.https.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// How the gateway speaks TLS as a client (toward the PACS, a C-MOVE destination): the trust
/// anchor its peer's certificate must chain to, its own certificate when the peer asks for one,
/// and the name the peer's certificate must carry. Nothing else is trusted (no system roots: a
/// PACS has its own CA), and a peer that does not verify is a failure, never plaintext.
pub struct ClientTls {
    files: ClientFiles,
    config: RwLock<Arc<rustls::ClientConfig>>,
    server_name: rustls::pki_types::ServerName<'static>,
}

/// The files a [`ClientTls`] is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca_file: String,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// ALPN protocols offered (HTTP/1.1 for a DICOMweb service; none for DICOM).
    pub alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn client_config(files: &ClientFiles) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certificates("ca_file", &files.ca_file)? {
        roots.add(c).map_err(|e| TlsError::File {
            key: "ca_file",
            path: files.ca_file.clone(),
            why: format!("holds a certificate that cannot be a trust anchor ({e})"),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates("cert_file", cert)?, private_key(key)?)
            .map_err(|e| {
                TlsError::Identity(format!(
                    "cert_file and key_file do not make an identity ({e}); the key must be the certificate's"
                ))
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Identity(
                "cert_file and key_file go together: set both, or neither".into(),
            ));
        }
    };
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

impl ClientTls {
    /// `server_name`: the name (or IP address) the peer's certificate must carry.
    pub fn load(files: &ClientFiles, server_name: &str) -> Result<ClientTls, TlsError> {
        let name =
            rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|_| {
                TlsError::Identity(format!(
                    "server_name \"{server_name}\" is not a DNS name or IP address"
                ))
            })?;
        Ok(ClientTls {
            config: RwLock::new(Arc::new(client_config(files)?)),
            files: files.clone(),
            server_name: name,
        })
    }

    /// Reads the files again; new connections use them. A file that does not load changes
    /// nothing.
    pub fn reload(&self) -> Result<(), TlsError> {
        let c = Arc::new(client_config(&self.files)?);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = c;
        Ok(())
    }

    /// The configuration as it is now (for an HTTP client, which keeps it).
    pub fn config(&self) -> rustls::ClientConfig {
        (**self.config.read().unwrap_or_else(|e| e.into_inner())).clone()
    }

    /// Runs the handshake on `tcp`; the peer must present a certificate for the server name
    /// that chains to the trust anchor.
    pub async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
    }
}

/// The host part of a `HOST:PORT` address (brackets of an IPv6 literal removed).
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether the certificate the peer presented (the first of its chain, already verified by the
/// handshake) names `name` in its subject alternative names: a DNS name (case aside) or an IP
/// address. A CA that signs for many machines does not make each of them the PACS.
pub fn certifies_name(certs: Option<&[CertificateDer<'_>]>, name: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Some(der) = certs.and_then(|c| c.first()) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let ip: Option<std::net::IpAddr> = name.parse().ok();
    san.value.general_names.iter().any(|g| match (g, ip) {
        (GeneralName::DNSName(d), None) => d.eq_ignore_ascii_case(name),
        (GeneralName::IPAddress(b), Some(std::net::IpAddr::V4(v4))) => *b == v4.octets(),
        (GeneralName::IPAddress(b), Some(std::net::IpAddr::V6(v6))) => *b == v6.octets(),
        _ => false,
    })
}

/// The subject of a verified client certificate (the first of the chain), as RFC 4514 text:
/// the name of the workstation beside its user's in the audit trail.
pub fn subject_of(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(rfc4514(cert.subject()))
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, `,` between RDNs, `+`
/// between the attributes of one, and every value escaped. x509-parser's own rendering escapes
/// nothing, so a CA-signed `CN=ws1\, O=Radiology` would read as two attributes in the audit
/// trail; control characters are escaped too, so a subject cannot forge a log line.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    use std::fmt::Write;
    use x509_parser::der_parser::asn1_rs::ToDer;
    let short = |oid: &str| match oid {
        "2.5.4.3" => Some("CN"),
        "2.5.4.7" => Some("L"),
        "2.5.4.8" => Some("ST"),
        "2.5.4.10" => Some("O"),
        "2.5.4.11" => Some("OU"),
        "2.5.4.6" => Some("C"),
        "2.5.4.9" => Some("STREET"),
        "0.9.2342.19200300.100.1.25" => Some("DC"),
        "0.9.2342.19200300.100.1.1" => Some("UID"),
        _ => None,
    };
    let mut out = String::new();
    let rdns: Vec<_> = name.iter().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            out.push_str(short(&oid).unwrap_or(&oid));
            out.push('=');
            match atv.as_str() {
                Ok(v) => escape_value(&mut out, v),
                // Not a string type: `#` and the hex of its BER encoding (RFC 4514 2.4).
                Err(_) => {
                    out.push('#');
                    for b in atv.attr_value().to_der_vec().unwrap_or_default() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

/// RFC 4514 2.4: the special characters with a backslash, a leading `#` or space and a trailing
/// space likewise, and NUL and every other control character as `\XX`.
fn escape_value(out: &mut String, v: &str) {
    use std::fmt::Write;
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\{b:02X}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attribute: OID content bytes, ASN.1 tag of the value, the value.
    type Atv<'a> = (&'a [u8], u8, &'a [u8]);

    /// DER of a Name, one slice of attributes per RDN.
    fn name_der(rdns: &[&[Atv<'_>]]) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            assert!(body.len() < 128, "short form lengths only");
            [&[tag, body.len() as u8][..], body].concat()
        }
        let sets: Vec<u8> = rdns
            .iter()
            .flat_map(|atvs| {
                let body: Vec<u8> = atvs
                    .iter()
                    .flat_map(|(oid, tag, v)| tlv(0x30, &[tlv(0x06, oid), tlv(*tag, v)].concat()))
                    .collect();
                tlv(0x31, &body)
            })
            .collect();
        tlv(0x30, &sets)
    }

    #[test]
    fn subjects_are_written_as_rfc_4514_with_every_value_escaped() {
        use x509_parser::prelude::FromDer;
        const CN: &[u8] = &[0x55, 0x04, 0x03];
        const O: &[u8] = &[0x55, 0x04, 0x0a];
        const OU: &[u8] = &[0x55, 0x04, 0x0b];
        const SERIAL: &[u8] = &[0x55, 0x04, 0x05];
        const UTF8: u8 = 0x0c;
        let cases: &[(&str, Vec<u8>, &str)] = &[
            (
                "the last RDN first",
                name_der(&[&[(O, UTF8, b"Radiology")], &[(CN, UTF8, b"workstation-7")]]),
                "CN=workstation-7,O=Radiology",
            ),
            (
                "a comma and an equals sign inside a value stay one value",
                name_der(&[&[(O, UTF8, b"Radiology")], &[(CN, UTF8, b"ws1, O=Evil")]]),
                "CN=ws1\\, O=Evil,O=Radiology",
            ),
            (
                "specials, a leading hash and edge spaces",
                name_der(&[&[(CN, UTF8, b"# a+b;<c>\\\"q\" ")]]),
                "CN=\\# a\\+b\\;\\<c\\>\\\\\\\"q\\\"\\ ",
            ),
            (
                "control characters cannot start a log line",
                name_der(&[&[(CN, UTF8, b"ws\nFORGED\x00")]]),
                "CN=ws\\0AFORGED\\00",
            ),
            (
                "a multi-valued RDN and an attribute without a short name",
                name_der(&[&[(OU, UTF8, b"CT"), (SERIAL, 0x13, b"42")]]),
                "OU=CT+2.5.4.5=42",
            ),
            (
                "a value that is not a string is hex",
                name_der(&[&[(CN, 0x04, b"\x01\x02")]]),
                "CN=#04020102",
            ),
        ];
        for (what, der, want) in cases {
            let (_, name) = x509_parser::x509::X509Name::from_der(der).expect(what);
            assert_eq!(rfc4514(&name), *want, "{what}");
        }
    }

    #[test]
    fn files_that_do_not_load_name_their_key_and_cause() {
        let dir = std::env::temp_dir().join(format!("pacsgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let junk = junk.to_string_lossy().into_owned();
        let id = |cert: &str, key: &str| ServerIdentity {
            cert_file: cert.to_string(),
            key_file: key.to_string(),
            client_ca_file: None,
            client_auth: ClientAuth::None,
        };
        let missing = dir.join("missing.pem").to_string_lossy().into_owned();
        match ServerTls::load(&id(&missing, &junk)) {
            Err(TlsError::File { key, why, .. }) => {
                assert_eq!(key, "cert_file");
                assert!(why.contains("cannot be read"), "{why}");
            }
            other => panic!("{:?}", other.err()),
        }
        match ServerTls::load(&id(&junk, &junk)) {
            Err(TlsError::File { key, why, .. }) => {
                assert_eq!(key, "cert_file");
                assert!(why.contains("no certificate"), "{why}");
            }
            other => panic!("{:?}", other.err()),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
