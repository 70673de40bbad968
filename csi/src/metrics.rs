//! `GET /metrics`: the process-wide registry of `stowage_backends::metrics` as Prometheus
//! text, for `--metrics-address` of the controller and the node.

use std::future::Future;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The content type prometheus-client's text encoder writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `/metrics` handler, for a router that serves other paths too (the node's `/healthz`).
pub async fn handler() -> Response {
    match stowage_backends::metrics::get().encode() {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A router with `/metrics` only.
pub fn router() -> Router {
    Router::new().route("/metrics", get(handler))
}

/// Serves `router` on an already bound listener until `shutdown` resolves. Bound by the
/// caller so a taken port stops the start with an error naming the flag.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` for `--metrics-address`: done before anything serves, so a taken port stops
/// the start (the caller's error names the flag and the address).
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics` on `listener` in a task until `stop` turns true: what
/// `--metrics-address` of the controller and the node does.
pub fn start(listener: tokio::net::TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        if let Err(e) = serve(listener, router(), shutdown).await {
            tracing::error!(error = %e, "/metrics server failed");
        }
    });
}
