//! `pacsgate serve`: binds every listener, runs the front ends, and stops them cleanly.
//!
//! Owns: start-up order (all listeners bound before anything is served, every bind failure
//! reported with its key), signal handling and draining. Must not know business rules.

use crate::config::Config;
use crate::dimse;
use crate::generation::Generation;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP reads `path` again (see [`reload`]).
pub async fn run(cfg: Config, path: PathBuf) -> anyhow::Result<()> {
    let mut signals = Signals::install();
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
    let identities: Vec<_> = tls.iter().chain(receiver_tls.iter()).cloned().collect();
    let drain = cfg.gateway.drain;
    let cap = http_connection_cap(&cfg);
    let mut current = Generation::first(cfg)?;
    let cfg = current.cfg.clone();
    let g = &cfg.gateway;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (dimse_tx, dimse_rx) = watch::channel(current.dimse.clone());
    let (routes_tx, routes_rx) = watch::channel(crate::web::Routes::new(current.web.clone()));

    let mut tasks = Vec::new();
    for (l, rtls, what) in [
        (receive_l, None, "C-MOVE receiver listening"),
        (
            receive_tls_l,
            receiver_tls.clone(),
            "C-MOVE receiver listening over DICOM TLS",
        ),
    ] {
        if let Some(l) = l {
            tracing::info!(addr = %l.local_addr()?, ae_title = %cfg.pacs.calling_ae_title, "{what}");
            tasks.push(tokio::spawn(dimse::receiver::serve(
                l,
                dimse_rx.clone(),
                rtls,
                stop_rx.clone(),
                drain,
            )));
        }
    }
    for (l, tls, what) in [
        (dimse_l, None, "DIMSE front end listening"),
        (dimse_tls_l, tls.clone(), "DICOM TLS front end listening"),
    ] {
        if let Some(l) = l {
            tracing::info!(addr = %l.local_addr()?, ae_title = %g.ae_title, "{what}");
            tasks.push(tokio::spawn(dimse::serve(
                l,
                dimse_rx.clone(),
                tls,
                stop_rx.clone(),
                drain,
            )));
        }
    }
    let mut http_tasks = Vec::new();
    for (l, tls, what) in [
        (http_l, None, "HTTP front end listening"),
        (https_l, tls.clone(), "HTTPS front end listening"),
    ] {
        if let Some(l) = l {
            tracing::info!(addr = %l.local_addr()?, "{what}");
            let (cfg, routes, stop) = (cfg.clone(), routes_rx.clone(), stop_rx.clone());
            http_tasks.push(tokio::spawn(async move {
                crate::web::serve(l, &cfg, routes, stop, cap, tls, crate::web::Face::Front).await
            }));
        }
    }
    let monitor = match monitor_l {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "monitoring listener (/healthz, /metrics) on its own thread");
            Some(serve_monitor(
                l.into_std()?,
                cfg.clone(),
                routes_rx.clone(),
                stop_rx.clone(),
            )?)
        }
        None => None,
    };

    while signals.next().await == Signal::Reload {
        if let Some(next) = reload(&path, &current, &identities) {
            let _ = dimse_tx.send(next.dimse.clone());
            let _ = routes_tx.send(crate::web::Routes::new(next.web.clone()));
            current = next;
        }
    }
    tracing::info!(drain_secs = drain.as_secs_f64(), "stop requested; draining");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for t in http_tasks {
        let _ = tokio::time::timeout(drain + CUT_SLACK, t).await;
    }
    if let Some(m) = monitor {
        let _ = tokio::time::timeout(
            drain + CUT_SLACK,
            tokio::task::spawn_blocking(move || m.join()),
        )
        .await;
    }
    drop(current);
    crate::audit::sink::activity(crate::audit::atna::Activity::Stop);
    crate::audit::sink::flush(Duration::from_secs(3)).await;
    tracing::info!("stopped");
    Ok(())
}

/// What the HTTP listeners may take beyond the drain time to drop what is left.
const CUT_SLACK: Duration = Duration::from_secs(2);

/// SIGHUP: reads the configuration file again and builds the next generation from it, which
/// new associations and requests then take; running ones finish on theirs. A file that does
/// not load is refused with a line per problem naming its key, and the running configuration
/// stays. Settings bound to the listeners keep their running values until a restart (each
/// changed one is named). The TLS server identities are re-read from their files either way.
fn reload(
    path: &Path,
    current: &Generation,
    identities: &[Arc<crate::tls::ServerTls>],
) -> Option<Generation> {
    let failed: Vec<String> = identities
        .iter()
        .filter_map(|t| t.reload().err().map(|e| e.to_string()))
        .collect();
    if !identities.is_empty() && failed.is_empty() {
        tracing::info!("SIGHUP: TLS certificate and key re-read");
    } else {
        for e in failed {
            tracing::error!(error = %e, "SIGHUP: the TLS files do not load; the current identity stays");
        }
    }
    crate::audit::sink::reopen();
    let mut cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                tracing::error!(key = %p.key, "SIGHUP: {}: {}", e.path, p.message);
            }
            tracing::error!(
                problems = e.problems.len(),
                "SIGHUP: the configuration file is refused; the running configuration stays"
            );
            return None;
        }
    };
    for key in cfg.keep_running(&current.cfg) {
        tracing::warn!(%key, "SIGHUP: changed in the file, takes effect at the next restart; the running value stays");
    }
    // The file was judged under its own require_tls; the running one is what counts.
    let legs = cfg.warnings();
    if cfg.gateway.require_tls && !legs.is_empty() {
        for w in &legs {
            tracing::error!(key = %w.key, "SIGHUP: {} (gateway.require_tls is set)", w.message);
        }
        tracing::error!(
            problems = legs.len(),
            "SIGHUP: the configuration file is refused; the running configuration stays"
        );
        return None;
    }
    for w in legs {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    match current.next(cfg) {
        Ok(next) => {
            tracing::info!(
                issuers = next.cfg.issuers.len(),
                destinations = next.cfg.destinations.len(),
                "SIGHUP: configuration re-read; new associations and requests use it"
            );
            Some(next)
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the configuration cannot be applied; the running configuration stays");
            None
        }
    }
}

/// Connections the monitoring listener holds at once: probes and scrapers, not clients.
const MONITOR_CONNECTIONS: usize = 64;

/// Serves `gateway.monitor_listen` on an OS thread with a runtime of its own (one worker), so a
/// probe is answered in milliseconds even while the front ends' workers are saturated by a
/// flood: the probe then says whether the process serves, not how long its queue is.
fn serve_monitor(
    listener: std::net::TcpListener,
    cfg: Arc<Config>,
    routes: watch::Receiver<crate::web::Routes>,
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
                    &cfg,
                    routes,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

/// The signals `serve` heeds, installed before anything is bound: a SIGHUP that arrives while
/// the gateway starts must not take the default action (ending the process).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            // Each handler on its own: a signal whose handler cannot be installed keeps its
            // default action, and the others still work.
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Waits for SIGINT or SIGTERM (stop) or SIGHUP (reload).
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            let (term, hup) = (&mut self.term, &mut self.hup);
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Signal::Stop,
                Some(_) = async { term.as_mut()?.recv().await } => Signal::Stop,
                Some(_) = async { hup.as_mut()?.recv().await } => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}
