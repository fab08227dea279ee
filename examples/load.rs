//! A bounded load and abuse client for `scripts/load.py`: many valid callers at once on DIMSE
//! and HTTP, plaintext or TLS, optionally with a flood of invalid tokens, slow handshakes and
//! silent connections mixed in, while `/healthz` is sampled. Valid callers come from 127.0.0.2
//! and up, abusers from 127.0.1.x, the health probe from 127.0.0.1 (the monitoring address), as
//! they would come from different machines. Prints one JSON object.
//!
//! load --dimse ADDR --http URL --health URL --token-file F [--ca CA.pem]
//!      [--assoc N] [--requests N] [--abuse] [--abuse-secs S]
//!
//! With `--abuse` the flood starts 6 s before the valid callers and runs for S seconds (20).
//!
//! With `--ca`, DIMSE is DICOM TLS and `--http` should be an https:// URL verified by that CA.

use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationRQ, PresentationContextProposed, UserIdentity, UserIdentityType, UserVariableItem,
};
use pacsgate::dicom::message::Event;
use pacsgate::dicom::pdu::{read_pdu, write_pdu};
use pacsgate::dicom::peer::{Incoming, Peer, Stream};
use pacsgate::tls::{ClientFiles, ClientTls};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

const VERIFICATION: &str = "1.2.840.10008.1.1";
const ILE: &str = "1.2.840.10008.1.2";
/// Every wait of a valid caller is bounded by this.
const WAIT: Duration = Duration::from_secs(60);
/// How long the flood runs before the valid callers come.
const FLOOD_LEAD: Duration = Duration::from_secs(6);

struct Args {
    dimse: SocketAddr,
    http: String,
    health: String,
    token: String,
    ca: Option<String>,
    assoc: usize,
    requests: usize,
    abuse: bool,
    abuse_secs: u64,
}

fn args() -> Result<Args, String> {
    let mut dimse = None;
    let (mut http, mut health, mut token, mut ca) = (None, None, None, None);
    let (mut assoc, mut requests, mut abuse, mut abuse_secs) = (500, 1000, false, 20);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--abuse" {
            abuse = true;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--dimse" => dimse = Some(v.parse().map_err(|_| "--dimse IP:PORT")?),
            "--http" => http = Some(v),
            "--health" => health = Some(v),
            "--token-file" => {
                token = Some(
                    std::fs::read_to_string(&v)
                        .map_err(|e| format!("{v}: {e}"))?
                        .trim()
                        .to_string(),
                )
            }
            "--ca" => ca = Some(v),
            "--assoc" => assoc = v.parse().map_err(|_| "--assoc N")?,
            "--requests" => requests = v.parse().map_err(|_| "--requests N")?,
            "--abuse-secs" => abuse_secs = v.parse().map_err(|_| "--abuse-secs S")?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(Args {
        dimse: dimse.ok_or("--dimse is required")?,
        http: http.ok_or("--http is required")?,
        health: health.ok_or("--health is required")?,
        token: token.ok_or("--token-file is required")?,
        ca,
        assoc,
        requests,
        abuse,
        abuse_secs,
    })
}

/// Source addresses: valid callers spread over 127.0.0.2.., abusers over 127.0.1.x.
fn valid_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8))
}
fn abuse_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % 200) as u8))
}

async fn tcp_from(ip: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(ip, 0))?;
    let t = s.connect(to).await?;
    t.set_nodelay(true)?;
    Ok(t)
}

fn echo_rq(msg_id: u16) -> Vec<u8> {
    let el = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(VERIFICATION),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0030])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [msg_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
    ];
    let mut out = Vec::new();
    let obj = InMemDicomObject::command_from_element_iter(el);
    if obj
        .write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .is_err()
    {
        out.clear();
    }
    out
}

fn association_rq(token: &str) -> Pdu {
    Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "LOAD".into(),
        called_ae_title: "PACSGATE".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: VERIFICATION.into(),
            transfer_syntaxes: vec![ILE.into()],
        }],
        user_variables: vec![
            UserVariableItem::MaxLength(65536),
            UserVariableItem::ImplementationClassUID("2.25.2".into()),
            UserVariableItem::UserIdentityItem(UserIdentity::new(
                false,
                UserIdentityType::Jwt,
                token.as_bytes().to_vec(),
                vec![],
            )),
        ],
    })
}

async fn connect(ip: IpAddr, to: SocketAddr, tls: Option<&ClientTls>) -> Result<Stream, String> {
    let tcp = tcp_from(ip, to).await.map_err(|e| e.to_string())?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(t) => t
            .connect(tcp)
            .await
            .map(|s| Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
            .map_err(|e| format!("TLS: {e}")),
    }
}

/// Associates; `Ok(None)` when the gateway rejected the association.
async fn associate(
    ip: IpAddr,
    to: SocketAddr,
    tls: Option<&ClientTls>,
    token: &str,
) -> Result<Option<Peer>, String> {
    let mut s = connect(ip, to, tls).await?;
    write_pdu(&mut s, &association_rq(token))
        .await
        .map_err(|e| e.to_string())?;
    match read_pdu(&mut s, 1 << 20).await.map_err(|e| e.to_string())? {
        Pdu::AssociationAC(_) => Ok(Some(Peer::new("gateway", s, 1 << 20, 16384))),
        Pdu::AssociationRJ(_) => Ok(None),
        other => Err(other.short_description().to_string()),
    }
}

async fn echo(p: &mut Peer, msg_id: u16) -> Result<(), String> {
    p.send_message(1, &echo_rq(msg_id), None)
        .await
        .map_err(|e| e.to_string())?;
    match p.next().await {
        Incoming::Message(Event::Command { command, .. }) if command.status == Some(0) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

async fn release(p: &mut Peer) {
    let _ = p.send_pdu(&Pdu::ReleaseRQ).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), p.next()).await;
}

/// Percentile of sorted milliseconds.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut ms: Vec<f64>, failed: usize, secs: f64) -> serde_json::Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({"ok": ms.len(), "failed": failed, "p50_ms": pct(&ms, 0.5), "p99_ms": pct(&ms, 0.99),
           "max_ms": ms.last().copied().unwrap_or(0.0), "secs": secs})
}

/// `n` associations at once: each associates and echoes, all hold until every one is up (or
/// the wait is over), then each echoes again and releases.
async fn dimse_phase(a: &Args, tls: Option<Arc<ClientTls>>) -> serde_json::Value {
    let barrier = Arc::new(tokio::sync::Barrier::new(a.assoc));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.assoc {
        let (to, token, tls, barrier) = (a.dimse, a.token.clone(), tls.clone(), barrier.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let r = tokio::time::timeout(WAIT, async {
                let mut p = associate(valid_ip(i), to, tls.as_deref(), &token)
                    .await?
                    .ok_or("rejected")?;
                echo(&mut p, 1).await?;
                Ok::<_, String>((p, t0.elapsed()))
            })
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r);
            // Everyone waits at the barrier, up or not, so that the peak is held together.
            let _ = tokio::time::timeout(WAIT, barrier.wait()).await;
            match r {
                Ok((mut p, took)) => {
                    let second = echo(&mut p, 2).await;
                    release(&mut p).await;
                    second.map(|_| took.as_secs_f64() * 1000.0)
                }
                Err(e) => Err(e),
            }
        });
    }
    collect(tasks, start).await
}

/// The summary of a phase's callers: the milliseconds of those served, and the first few
/// reasons of those that were not.
async fn collect(
    mut tasks: tokio::task::JoinSet<Result<f64, String>>,
    start: Instant,
) -> serde_json::Value {
    let (mut ms, mut failed, mut why) = (Vec::new(), 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(m) => ms.push(m),
            Err(e) => {
                failed += 1;
                if why.len() < 5 {
                    why.push(e);
                }
            }
        }
    }
    let mut s = summary(ms, failed, start.elapsed().as_secs_f64());
    s["errors"] = json!(why);
    s
}

fn http_client(tls: Option<&ClientTls>, ip: IpAddr) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .local_address(ip)
        .pool_max_idle_per_host(1024)
        .timeout(WAIT);
    if let Some(t) = tls {
        b = b.tls_backend_preconfigured(t.config());
    }
    b.build().unwrap_or_default()
}

/// `n` QIDO-RS searches at once, spread over clients of 20 source addresses.
async fn http_phase(a: &Args, tls: Option<Arc<ClientTls>>) -> serde_json::Value {
    let clients: Vec<reqwest::Client> = (0..20)
        .map(|i| http_client(tls.as_deref(), valid_ip(i)))
        .collect();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.requests {
        let c = clients[i % clients.len()].clone();
        let (url, token) = (format!("{}/dicom-web/studies", a.http), a.token.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let r = c.get(&url).bearer_auth(&token).send().await;
            match r {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(_) => Ok(t0.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => Err(e.to_string()),
                },
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.without_url().to_string()),
            }
        });
    }
    collect(tasks, start).await
}

#[derive(Default)]
struct Abuse {
    bad_token_rejected: AtomicUsize,
    bad_token_other: AtomicUsize,
    http_401: AtomicUsize,
    http_other: AtomicUsize,
    slow_closed: AtomicUsize,
    silent_closed: AtomicUsize,
}

/// Waits until the gateway closes `s` (or `until` passes); true when the gateway closed it.
async fn closed_by_gateway(mut s: tokio::net::TcpStream, until: Instant) -> bool {
    let mut buf = [0u8; 256];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// The flood: invalid tokens on both protocols, handshakes sent a byte at a time, connections
/// that never speak. Runs until `stop`.
fn abuse(a: &Args, tls: Option<Arc<ClientTls>>, stop: Arc<AtomicBool>, out: Arc<Abuse>) {
    let until = Instant::now() + Duration::from_secs(a.abuse_secs);
    for i in 0..20 {
        let (to, tls, stop, out) = (a.dimse, tls.clone(), stop.clone(), out.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                match associate(
                    abuse_ip(i),
                    to,
                    tls.as_deref(),
                    "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
                )
                .await
                {
                    Ok(None) => out.bad_token_rejected.fetch_add(1, Ordering::Relaxed),
                    _ => out.bad_token_other.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    for i in 0..20 {
        let c = http_client(tls.as_deref(), abuse_ip(50 + i));
        let (url, stop, out) = (
            format!("{}/dicom-web/studies", a.http),
            stop.clone(),
            out.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                match c.get(&url).bearer_auth("not-a-token").send().await {
                    Ok(r) if r.status() == 401 => out.http_401.fetch_add(1, Ordering::Relaxed),
                    _ => out.http_other.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    // Slow handshakes: an A-ASSOCIATE-RQ (or, on TLS, the bytes of one: no ClientHello) one
    // byte every 200 ms, on both listeners; and silent connections. Each from its own address
    // so that per-peer caps do not hide them.
    let mut rq = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut rq, &association_rq("x")).is_err() {
        rq.clear();
    }
    let http_addr = a
        .http
        .split("//")
        .nth(1)
        .and_then(|h| h.split('/').next())
        .and_then(|h| h.parse::<SocketAddr>().ok());
    for i in 0..200 {
        let to = if i % 2 == 0 { Some(a.dimse) } else { http_addr };
        let Some(to) = to else { continue };
        let (rq, out) = (rq.clone(), out.clone());
        let slow = i < 100;
        tokio::spawn(async move {
            let Ok(mut s) = tcp_from(abuse_ip(100 + i / 2), to).await else {
                return;
            };
            if slow {
                for b in rq.iter().take(40) {
                    if s.write_all(&[*b]).await.is_err() {
                        out.slow_closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if closed_by_gateway(s, until).await {
                    out.slow_closed.fetch_add(1, Ordering::Relaxed);
                }
            } else if closed_by_gateway(s, until).await {
                out.silent_closed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Samples `/healthz` every 50 ms from the monitoring address until `stop`.
async fn health(
    url: String,
    tls: Option<Arc<ClientTls>>,
    stop: Arc<AtomicBool>,
) -> serde_json::Value {
    let c = http_client(tls.as_deref(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (mut ms, mut failed) = (Vec::new(), 0);
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), c.get(&url).send()).await {
            Ok(Ok(r)) if r.status().is_success() => ms.push(t0.elapsed().as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summary(ms, failed, 0.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    let tls = match &a.ca {
        None => None,
        Some(ca) => {
            let files = ClientFiles {
                ca_file: ca.clone(),
                cert_file: None,
                key_file: None,
                alpn: vec![b"http/1.1".to_vec()],
            };
            match ClientTls::load(&files, "127.0.0.1") {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    eprintln!("load: {e}");
                    std::process::exit(2);
                }
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(health(a.health.clone(), tls.clone(), stop.clone()));
    let abused = Arc::new(Abuse::default());
    let flood_ends = Instant::now() + Duration::from_secs(a.abuse_secs);
    if a.abuse {
        abuse(&a, tls.clone(), stop.clone(), abused.clone());
        // The valid callers come once the slow and silent connections hold what they can.
        tokio::time::sleep(FLOOD_LEAD).await;
    }
    let dimse = dimse_phase(&a, tls.clone()).await;
    let http = http_phase(&a, tls.clone()).await;
    if a.abuse {
        // The flood runs its course (its connections are closed by the gateway's timeouts or
        // not at all), with /healthz still probed.
        tokio::time::sleep_until(flood_ends.into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut health = probe.await.unwrap_or_default();
    if let Some(max) = health.get("max_ms").and_then(|m| m.as_f64()) {
        health["over_100ms"] = json!(max > 100.0);
    }
    let abuse = json!({
        "dimse_bad_tokens_rejected": abused.bad_token_rejected.load(Ordering::Relaxed),
        "dimse_bad_tokens_other": abused.bad_token_other.load(Ordering::Relaxed),
        "http_bad_tokens_401": abused.http_401.load(Ordering::Relaxed),
        "http_bad_tokens_other": abused.http_other.load(Ordering::Relaxed),
        "slow_handshakes_closed_by_gateway": abused.slow_closed.load(Ordering::Relaxed),
        "silent_connections_closed_by_gateway": abused.silent_closed.load(Ordering::Relaxed),
    });
    println!(
        "{}",
        json!({"tls": a.ca.is_some(), "abuse": a.abuse, "dimse": dimse, "http": http, "health": health, "flood": abuse})
    );
}
