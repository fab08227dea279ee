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

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
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

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let mut problems = Vec::new();
    let dimse_l = bind("gateway.dimse_listen", cfg.gateway.dimse_listen)
        .await
        .map_err(|e| problems.push(e))
        .ok();
    let http_l = match cfg.gateway.http_listen {
        Some(a) => bind("gateway.http_listen", a)
            .await
            .map_err(|e| problems.push(e))
            .ok(),
        None => None,
    };
    let receive_l = match cfg.pacs.receive_listen {
        Some(a) => bind("pacs.receive_listen", a)
            .await
            .map_err(|e| problems.push(e))
            .ok(),
        None => None,
    };
    if !problems.is_empty() {
        anyhow::bail!("cannot start:\n  - {}", problems.join("\n  - "));
    }
    let Some(dimse_l) = dimse_l else {
        anyhow::bail!("cannot start: gateway.dimse_listen is not bound");
    };
    let trust = TrustCore::new(&cfg)?;
    // The policy core's ports: the PACS answers who owns a UID, the EHR answers FHIR reads.
    let lookup = Arc::new(crate::pacs::PacsLookup::new(&cfg));
    let ehr = Arc::new(crate::ehr::Ehr::new(&cfg, trust.clone())?);
    let policy = Arc::new(Policy::new(&cfg, Ports::new(lookup, ehr)));
    let (stop_tx, stop_rx) = watch::channel(false);

    let ctx = dimse::Ctx::new(cfg.clone(), trust.clone(), policy.clone());
    let web = crate::web::WebCtx::new(cfg.clone(), trust, policy)?;
    tracing::info!(addr = %dimse_l.local_addr()?, ae_title = %cfg.gateway.ae_title, "DIMSE front end listening");
    let receive_task = match receive_l {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, ae_title = %cfg.pacs.calling_ae_title, "C-MOVE receiver listening");
            Some(tokio::spawn(dimse::receiver::serve(
                l,
                ctx.clone(),
                stop_rx.clone(),
                DRAIN,
            )))
        }
        None => None,
    };
    let dimse_task = tokio::spawn(dimse::serve(dimse_l, ctx, stop_rx.clone(), DRAIN));
    let http_task = match http_l {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "HTTP front end listening");
            let cap = http_connection_cap(&cfg);
            Some(tokio::spawn(crate::web::serve(
                l,
                web,
                stop_rx.clone(),
                cap,
            )))
        }
        None => None,
    };

    wait_for_signal().await;
    tracing::info!("stop requested; draining");
    let _ = stop_tx.send(true);
    let _ = dimse_task.await;
    if let Some(t) = receive_task {
        let _ = t.await;
    }
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(DRAIN, t).await;
    }
    tracing::info!("stopped");
    Ok(())
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
