//! `pacsgate serve`: binds every listener, runs the front ends, and stops them cleanly.
//!
//! Owns: start-up order (all listeners bound before anything is served, every bind failure
//! reported with its key), signal handling and draining. Must not know business rules.

use crate::config::Config;
use crate::dimse;
use crate::policy::{Policy, Ports};
use crate::trust::TrustCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long running associations may take to finish after a stop signal.
const DRAIN: Duration = Duration::from_secs(20);

/// Connections the kernel queues for a listener before it accepts them: a morning's burst of
/// workstations (hundreds at once) must not see SYNs dropped and retried a second later. The
/// kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's listeners do: a restarted gateway binds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    listen(addr).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is in use; choose another port or stop the program using it"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "the address is not on this machine; use one of its addresses, e.g. 127.0.0.1"
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied; use a port above 1023 or grant the capability"
            }
            _ => "cannot listen there",
        };
        format!("{key}: {addr}: {hint} ({e})")
    })
}

/// Binds an optional listener; a failure is added to `problems`.
async fn bind_opt(
    key: &str,
    addr: Option<SocketAddr>,
    problems: &mut Vec<String>,
) -> Option<TcpListener> {
    match bind(key, addr?).await {
        Ok(l) => Some(l),
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP re-reads the TLS certificate and key.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let g = &cfg.gateway;
    let mut problems = Vec::new();
    let dimse_l = bind_opt("gateway.dimse_listen", g.dimse_listen, &mut problems).await;
    let dimse_tls_l = bind_opt(
        "gateway.dimse_tls_listen",
        g.dimse_tls_listen,
        &mut problems,
    )
    .await;
    let http_l = bind_opt("gateway.http_listen", g.http_listen, &mut problems).await;
    let https_l = bind_opt("gateway.https_listen", g.https_listen, &mut problems).await;
    let monitor_l = bind_opt("gateway.monitor_listen", g.monitor_listen, &mut problems).await;
    let receive_l = bind_opt(
        "pacs.receive_listen",
        cfg.pacs.receive_listen,
        &mut problems,
    )
    .await;
    let receive_tls_addr = cfg.pacs.tls.as_ref().and_then(|t| t.receive_tls_listen);
    let receive_tls_l = bind_opt(
        "pacs.tls.receive_tls_listen",
        receive_tls_addr,
        &mut problems,
    )
    .await;
    if !problems.is_empty() {
        anyhow::bail!("cannot start:\n  - {}", problems.join("\n  - "));
    }
    for w in cfg.warnings() {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    if let Some(a) = &cfg.audit {
        crate::audit::sink::start(a, &g.ae_title)
            .map_err(|e| anyhow::anyhow!("cannot start: {e}"))?;
        crate::audit::sink::activity(crate::audit::atna::Activity::Start);
    }
    let load = |id: &crate::tls::ServerIdentity| {
        crate::tls::ServerTls::load(id)
            .map(Arc::new)
            .map_err(|e| anyhow::anyhow!("cannot start: {e}"))
    };
    let tls = cfg.tls.as_ref().map(load).transpose()?;
    // The receiver's TLS: the gateway's identity, and the PACS's CA for the PACS's certificate.
    let receiver_tls = match (&cfg.tls, &cfg.pacs.tls, receive_tls_addr) {
        (Some(id), Some(p), Some(_)) => Some(load(&crate::tls::ServerIdentity {
            client_ca_file: Some(p.files.ca_file.clone()),
            client_auth: crate::tls::ClientAuth::Required,
            ..id.clone()
        })?),
        _ => None,
    };
    let mut reloadable = Reloadable {
        servers: tls.iter().chain(receiver_tls.iter()).cloned().collect(),
        clients: cfg
            .pacs
            .dimse_tls
            .iter()
            .chain(cfg.pacs.tls.as_ref().map(|t| &t.http))
            .chain(cfg.destinations.iter().filter_map(|d| d.tls.as_ref()))
            .cloned()
            .collect(),
        dicomweb: None,
    };
    let trust = TrustCore::new(&cfg)?;
    // The policy core's ports: the PACS answers who owns a UID, the EHR answers FHIR reads.
    let lookup = Arc::new(crate::pacs::PacsLookup::new(&cfg));
    let ehr = Arc::new(crate::ehr::Ehr::new(&cfg, trust.clone())?);
    let policy = Arc::new(Policy::new(&cfg, Ports::new(lookup, ehr)));
    let (stop_tx, stop_rx) = watch::channel(false);

    let ctx = dimse::Ctx::new(cfg.clone(), trust.clone(), policy.clone());
    let readiness = crate::readiness::Readiness::new(&trust.issuer_names());
    // The checks /readyz answers from start before any listener serves.
    tokio::spawn(
        readiness
            .clone()
            .run(cfg.pacs.clone(), trust.clone(), stop_rx.clone()),
    );
    let web = crate::web::WebCtx::new(cfg.clone(), trust, policy, readiness)?;
    if cfg.pacs.tls.is_some() {
        reloadable.dicomweb = Some(web.clone());
    }
    let mut tasks = Vec::new();
    if let Some(l) = receive_l {
        tracing::info!(addr = %l.local_addr()?, ae_title = %cfg.pacs.calling_ae_title, "C-MOVE receiver listening");
        tasks.push(tokio::spawn(dimse::receiver::serve(
            l,
            ctx.clone(),
            None,
            stop_rx.clone(),
            DRAIN,
        )));
    }
    if let (Some(l), Some(rtls)) = (receive_tls_l, &receiver_tls) {
        tracing::info!(addr = %l.local_addr()?, ae_title = %cfg.pacs.calling_ae_title, "C-MOVE receiver listening over DICOM TLS");
        tasks.push(tokio::spawn(dimse::receiver::serve(
            l,
            ctx.clone(),
            Some(rtls.clone()),
            stop_rx.clone(),
            DRAIN,
        )));
    }
    if let Some(l) = dimse_l {
        tracing::info!(addr = %l.local_addr()?, ae_title = %g.ae_title, "DIMSE front end listening");
        tasks.push(tokio::spawn(dimse::serve(
            l,
            ctx.clone(),
            None,
            stop_rx.clone(),
            DRAIN,
        )));
    }
    if let (Some(l), Some(tls)) = (dimse_tls_l, &tls) {
        tracing::info!(addr = %l.local_addr()?, ae_title = %g.ae_title, "DICOM TLS front end listening");
        tasks.push(tokio::spawn(dimse::serve(
            l,
            ctx.clone(),
            Some(tls.clone()),
            stop_rx.clone(),
            DRAIN,
        )));
    }
    let cap = http_connection_cap(&cfg);
    let mut http_tasks = Vec::new();
    for (l, tls, what) in [
        (http_l, None, "HTTP front end listening"),
        (https_l, tls.clone(), "HTTPS front end listening"),
    ] {
        if let Some(l) = l {
            tracing::info!(addr = %l.local_addr()?, "{what}");
            http_tasks.push(tokio::spawn(crate::web::serve(
                l,
                web.clone(),
                stop_rx.clone(),
                cap,
                tls,
                crate::web::Face::Front,
            )));
        }
    }
    let monitor = match monitor_l {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "monitoring listener (/healthz, /metrics) on its own thread");
            Some(serve_monitor(l.into_std()?, web.clone(), stop_rx.clone())?)
        }
        None => None,
    };

    wait_for_signal(&reloadable).await;
    tracing::info!("stop requested; draining");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for t in http_tasks {
        let _ = tokio::time::timeout(DRAIN, t).await;
    }
    if let Some(m) = monitor {
        let _ = tokio::time::timeout(DRAIN, tokio::task::spawn_blocking(move || m.join())).await;
    }
    crate::audit::sink::activity(crate::audit::atna::Activity::Stop);
    crate::audit::sink::flush(Duration::from_secs(3)).await;
    tracing::info!("stopped");
    Ok(())
}

/// Connections the monitoring listener holds at once: probes and scrapers, not clients.
const MONITOR_CONNECTIONS: usize = 64;

/// Serves `gateway.monitor_listen` on an OS thread with a runtime of its own (one worker), so a
/// probe is answered in milliseconds even while the front ends' workers are saturated by a
/// flood: the probe then says whether the process serves, not how long its queue is.
fn serve_monitor(
    listener: std::net::TcpListener,
    web: Arc<crate::web::WebCtx>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pacsgate-monitor")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the monitoring listener's runtime: {e}"))?;
    let thread = std::thread::Builder::new()
        .name("pacsgate-monitor".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "gateway.monitor_listen: cannot serve");
                        return;
                    }
                };
                let _ = crate::web::serve(
                    listener,
                    web,
                    stop,
                    MONITOR_CONNECTIONS,
                    None,
                    crate::web::Face::Monitor,
                )
                .await;
            })
        })
        .map_err(|e| anyhow::anyhow!("cannot start the monitoring listener's thread: {e}"))?;
    Ok(thread)
}

/// Raises the soft limit on open descriptors to the hard one and returns it (`None` where
/// it cannot be read).
fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return None;
            }
            if l.rlim_cur < l.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: l.rlim_max,
                    rlim_max: l.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    l = raised;
                }
            }
        }
        Some(l.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// How many HTTP connections may be open at once: the configured cap, lowered so that the
/// DIMSE side (client and PACS legs, the C-MOVE receiver, look-ups, pending connections) and a
/// reserve always have descriptors, however HTTP is flooded.
fn http_connection_cap(cfg: &Config) -> usize {
    const RESERVE: u64 = 128;
    let l = &cfg.limits;
    let dimse = 4 * l.max_associations as u64 + 2 * l.max_pending_associations as u64 + 64;
    match raise_descriptor_limit() {
        Some(fds) => {
            let room = fds.saturating_sub(dimse + RESERVE) as usize;
            let cap = l.max_http_connections.min(room).max(1);
            if cap < l.max_http_connections {
                tracing::warn!(
                    configured = l.max_http_connections,
                    cap,
                    descriptors = fds,
                    "limits.max_http_connections lowered to keep descriptors for DIMSE; raise the process's open-files limit (LimitNOFILE) to allow more"
                );
            }
            cap
        }
        None => l.max_http_connections,
    }
}

/// The TLS identities SIGHUP re-reads.
struct Reloadable {
    servers: Vec<Arc<crate::tls::ServerTls>>,
    clients: Vec<Arc<crate::tls::ClientTls>>,
    /// The PACS's DICOMweb service, whose HTTP client is rebuilt with `[pacs.tls]` re-read.
    dicomweb: Option<Arc<crate::web::WebCtx>>,
}

impl Reloadable {
    /// Re-reads every identity; each that does not load keeps the one it had.
    fn reload(&self) {
        if self.servers.is_empty() && self.clients.is_empty() {
            tracing::info!("SIGHUP: nothing to re-read (no TLS configured)");
            return;
        }
        let results = self
            .servers
            .iter()
            .map(|t| t.reload())
            .chain(self.clients.iter().map(|t| t.reload()));
        let mut failed: Vec<String> = results
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if let Some(pacs) = self.dicomweb.as_ref().and_then(|w| w.pacs.as_ref())
            && let Err(e) = pacs.reload()
        {
            failed.push(format!("pacs.tls: {e}"));
        }
        if failed.is_empty() {
            tracing::info!("SIGHUP: TLS certificate and key re-read");
        } else {
            for e in failed {
                tracing::error!(error = %e, "SIGHUP: the TLS files do not load; the current identity stays");
            }
        }
    }
}

/// Waits for SIGINT or SIGTERM. Meanwhile each SIGHUP re-reads the TLS files: new connections
/// get the new identity, running ones keep theirs, and files that do not load change nothing.
async fn wait_for_signal(tls: &Reloadable) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Each handler on its own: a signal whose handler cannot be installed keeps its
        // default action, and the others still work.
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                Some(_) = async { term.as_mut()?.recv().await } => return,
                Some(_) = async { hup.as_mut()?.recv().await } => tls.reload(),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
        let _ = tokio::signal::ctrl_c().await;
    }
}
