//! The HTTP front end. Today it serves `/healthz`; DICOMweb routes will live here too.
//!
//! Owns: the HTTP listener and its routes. Must not know DIMSE framing, and decides no access
//! itself: every DICOMweb route will ask the policy core.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        "ok\n",
    )
}

pub fn router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

/// Serves HTTP until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await
}
