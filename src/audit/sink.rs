//! Where audit messages go: RFC 5424 syslog over UDP (RFC 5426), TCP (RFC 6587 octet
//! counting) or TLS (RFC 5425), and a file of JSON lines.
//!
//! Owns: the bounded queue between the front ends and the writer, the writer task (one
//! connection, reconnection with a pause, a bounded wait for every write), and the count of
//! what could not be written (`pacsgate_audit_dropped_total{sink}`). Clinical traffic never
//! waits here: a full queue or a dead receiver drops the message and counts it. Must not know
//! what a message says ([`super::atna`]).

use super::atna::{self, Activity, Event, Source};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Messages waiting for the writer, at most.
const QUEUE: usize = 8192;
/// Bytes the waiting messages may hold at most (a record is at most some 20 KB; see
/// `Trail::about`): a stalled receiver costs bounded memory, not the queue's length in records.
const QUEUE_BYTES: usize = 32 << 20;
/// What the waiting messages hold now.
static QUEUED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// About what a queued event holds.
fn weight(e: &Event) -> usize {
    let user = e.user.as_ref().map_or(0, |u| {
        u.id.len() + u.issuer.len() + u.token_id.len() + u.client_id.as_ref().map_or(0, String::len)
    });
    let lists: usize = e
        .patients
        .iter()
        .chain(&e.studies)
        .map(|s| s.len() + 24)
        .sum();
    256 + e.object.len()
        + e.reason.len()
        + user
        + lists
        + e.client_cert.as_ref().map_or(0, |c| c.len())
}
/// The longest one connect or one write toward the syslog receiver may take.
const WRITE_WAIT: Duration = Duration::from_secs(2);
/// After a failed connect, messages are dropped (and counted) this long before the next try.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// RFC 5424 facility 10 (security/authorization), severity 5 (notice) or 4 (warning).
const PRI_OK: u8 = 10 * 8 + 5;
const PRI_FAILED: u8 = 10 * 8 + 4;

/// Where the syslog receiver is and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// The `[audit]` settings the sink needs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// (transport, host:port), from `audit.syslog`.
    pub syslog: Option<(Transport, String)>,
    /// Trust anchors for `tls://`.
    pub syslog_ca_file: Option<PathBuf>,
    /// The gateway's certificate and key (`[tls]`), presented to a `tls://` receiver that asks
    /// (IHE ATNA node authentication).
    pub client_identity: Option<(String, String)>,
    pub json_file: Option<PathBuf>,
    pub source_id: String,
}

enum Item {
    Event(Box<Event>),
    Activity(Activity),
    /// Write what is queued, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Open the JSON file again by its name (after logrotate moved it away).
    Reopen,
}

struct Sink {
    tx: mpsc::Sender<Item>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Hands an event to the writer, if one runs; never waits.
pub(crate) fn submit(e: Event) {
    use std::sync::atomic::Ordering;
    let Some(s) = SINK.get() else { return };
    let w = weight(&e);
    if QUEUED_BYTES.fetch_add(w, Ordering::AcqRel) + w > QUEUE_BYTES {
        QUEUED_BYTES.fetch_sub(w, Ordering::AcqRel);
        crate::metrics::audit_dropped("queue");
        return;
    }
    if s.tx.try_send(Item::Event(Box::new(e))).is_err() {
        QUEUED_BYTES.fetch_sub(w, Ordering::AcqRel);
        crate::metrics::audit_dropped("queue");
    }
}

/// Records the gateway starting or stopping.
pub(crate) fn activity(a: Activity) {
    if let Some(s) = SINK.get()
        && s.tx.try_send(Item::Activity(a)).is_err()
    {
        crate::metrics::audit_dropped("queue");
    }
}

/// Opens the JSON lines file again by its name, after what is queued before it was written
/// (SIGHUP: logrotate moved the old file away).
pub fn reopen() {
    if let Some(s) = SINK.get()
        && s.tx.try_send(Item::Reopen).is_err()
    {
        tracing::warn!("audit.json_file: the writer is behind; not reopened, send SIGHUP again");
    }
}

/// A JSON lines file opened for appending; a new one is the service's alone (group may read),
/// as its records name patients.
fn open_json(p: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o640);
    o.open(p)
        .map_err(|e| anyhow::anyhow!("audit.json_file: {}: {e}", p.display()))
}

/// Waits (at most `wait`) until what was submitted so far has been written: at stop.
pub async fn flush(wait: Duration) {
    if let Some(s) = SINK.get() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if s.tx.send_timeout(Item::Flush(tx), wait).await.is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }
}

/// Starts the writer (once per process) with `cfg`, for the gateway `ae_title`.
pub fn start(cfg: &AuditConfig, ae_title: &str) -> anyhow::Result<()> {
    let tls = match (&cfg.syslog, &cfg.syslog_ca_file) {
        (Some((Transport::Tls, addr)), Some(ca)) => {
            let files = crate::tls::ClientFiles {
                ca_file: ca.to_string_lossy().into_owned(),
                cert_file: cfg.client_identity.as_ref().map(|(c, _)| c.clone()),
                key_file: cfg.client_identity.as_ref().map(|(_, k)| k.clone()),
                alpn: Vec::new(),
            };
            let t = crate::tls::ClientTls::load(&files, crate::tls::host_of(addr))
                .map_err(|e| anyhow::anyhow!("audit.syslog_ca_file: {e}"))?;
            Some(Arc::new(t))
        }
        (Some((Transport::Tls, _)), None) => {
            anyhow::bail!("audit.syslog_ca_file is needed for a tls:// audit.syslog")
        }
        _ => None,
    };
    let file = cfg.json_file.as_deref().map(open_json).transpose()?;
    let (tx, rx) = mpsc::channel(QUEUE);
    if SINK.set(Sink { tx }).is_err() {
        anyhow::bail!("the audit trail was started twice");
    }
    let writer = Writer {
        src: Source {
            source_id: cfg.source_id.clone(),
            ae_title: ae_title.to_string(),
        },
        syslog: cfg.syslog.clone(),
        tls,
        file: file.map(std::io::BufWriter::new),
        file_path: cfg.json_file.clone(),
        conn: None,
        paused_until: None,
        host: hostname(),
    };
    tokio::spawn(writer.run(rx));
    Ok(())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    // RFC 5424 HOSTNAME: printable US-ASCII without spaces, else the NILVALUE.
    if r == 0 && !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) {
        name
    } else {
        "-".into()
    }
}

enum Conn {
    Udp(tokio::net::UdpSocket),
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

struct Writer {
    src: Source,
    syslog: Option<(Transport, String)>,
    tls: Option<Arc<crate::tls::ClientTls>>,
    file: Option<std::io::BufWriter<std::fs::File>>,
    file_path: Option<PathBuf>,
    conn: Option<Conn>,
    paused_until: Option<Instant>,
    host: String,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Item>) {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Event(e) => {
                    QUEUED_BYTES.fetch_sub(weight(&e), std::sync::atomic::Ordering::AcqRel);
                    let failed = !matches!(e.outcome, super::Outcome::Allowed);
                    // The XML only for a syslog receiver: the file holds JSON.
                    let xml = match self.syslog {
                        Some(_) => atna::xml(&e, &self.src),
                        None => String::new(),
                    };
                    let json = atna::json(&e, &self.src);
                    self.write(&xml, &json, failed).await;
                }
                Item::Reopen => self.reopen(),
                Item::Activity(a) => {
                    let (xml, json) = (
                        atna::activity_xml(a, &self.src),
                        atna::activity_json(a, &self.src),
                    );
                    self.write(&xml, &json, false).await;
                }
                Item::Flush(done) => {
                    if let Some(f) = self.file.as_mut() {
                        let _ = f.flush();
                    }
                    let _ = done.send(());
                }
            }
            // The file is flushed whenever the queue is empty: a burst is written in one go.
            if rx.is_empty()
                && let Some(f) = self.file.as_mut()
                && f.flush().is_err()
            {
                crate::metrics::audit_dropped("json_file");
            }
        }
    }

    fn reopen(&mut self) {
        let Some(path) = &self.file_path else { return };
        if let Some(f) = self.file.as_mut() {
            let _ = f.flush();
        }
        match open_json(path) {
            Ok(f) => {
                self.file = Some(std::io::BufWriter::new(f));
                tracing::info!(path = %path.display(), "audit.json_file reopened");
            }
            // The old file stays in use: records are not lost to a failed reopen.
            Err(e) => {
                tracing::error!(error = %e, "audit.json_file cannot be reopened; writing on to the file open before")
            }
        }
    }

    async fn write(&mut self, xml: &str, json: &serde_json::Value, failed: bool) {
        if let Some(f) = self.file.as_mut()
            && writeln!(f, "{json}").is_err()
        {
            crate::metrics::audit_dropped("json_file");
        }
        if self.syslog.is_some() && !self.send(&self.frame(xml, failed)).await {
            crate::metrics::audit_dropped("syslog");
        }
    }

    /// RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, the MSG the XML
    /// after a BOM (UTF-8), MSGID as IHE ATNA names the DICOM format.
    fn frame(&self, xml: &str, failed: bool) -> Vec<u8> {
        let pri = if failed { PRI_FAILED } else { PRI_OK };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut m = format!(
            "<{pri}>1 {now} {} pacsgate {} IHE+RFC-3881 - \u{feff}",
            self.host,
            std::process::id()
        )
        .into_bytes();
        m.extend_from_slice(xml.as_bytes());
        m
    }

    /// Sends one message; `false` when it could not be (it is then dropped).
    async fn send(&mut self, msg: &[u8]) -> bool {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        // One retry on a fresh connection: a receiver that restarted is reached again.
        for _ in 0..2 {
            if self.conn.is_none() {
                match tokio::time::timeout(WRITE_WAIT, self.connect()).await {
                    Ok(Ok(c)) => self.conn = Some(c),
                    Ok(Err(e)) => return self.pause(&e),
                    Err(_) => return self.pause("no connection within 2 s"),
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return false;
            };
            let sent = tokio::time::timeout(WRITE_WAIT, async {
                match conn {
                    Conn::Udp(s) => s.send(msg).await.map(|_| ()),
                    Conn::Tcp(s) => write_counted(s, msg).await,
                    Conn::Tls(s) => write_counted(s.as_mut(), msg).await,
                }
            })
            .await;
            match sent {
                Ok(Ok(())) => {
                    self.paused_until = None;
                    return true;
                }
                _ => self.conn = None,
            }
        }
        false
    }

    fn pause(&mut self, why: &str) -> bool {
        if self.paused_until.is_none() {
            tracing::warn!(reason = %why, "audit: the syslog receiver cannot be reached; messages are dropped and counted until it can");
        }
        self.paused_until = Some(Instant::now() + RECONNECT_PAUSE);
        false
    }

    async fn connect(&self) -> Result<Conn, String> {
        let Some((transport, addr)) = &self.syslog else {
            return Err("no syslog receiver".into());
        };
        match transport {
            Transport::Udp => {
                let s = tokio::net::UdpSocket::bind(if addr.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                })
                .await
                .map_err(|e| e.to_string())?;
                s.connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
                Ok(Conn::Udp(s))
            }
            Transport::Tcp | Transport::Tls => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?;
                let _ = s.set_nodelay(true);
                match (transport, &self.tls) {
                    (Transport::Tls, Some(tls)) => {
                        let s = tls
                            .connect(s)
                            .await
                            .map_err(|e| format!("TLS with {addr}: {e}"))?;
                        Ok(Conn::Tls(Box::new(s)))
                    }
                    (Transport::Tls, None) => Err("no trust anchors for tls://".into()),
                    _ => Ok(Conn::Tcp(s)),
                }
            }
        }
    }
}

/// RFC 6587 octet counting (also RFC 5425's framing): `LENGTH SP MESSAGE`.
async fn write_counted<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<()> {
    let mut framed = format!("{} ", msg.len()).into_bytes();
    framed.extend_from_slice(msg);
    s.write_all(&framed).await?;
    s.flush().await
}
