//! `/healthz` for the node DaemonSet's livenessProbe (what the livenessprobe sidecar does for
//! other drivers): 200 only when the CSI socket of every driver this process serves answers
//! Probe with ready and every driver's kubelet registration succeeded; 503 with the reason
//! (naming the driver) otherwise.

use std::time::Duration;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::routing::get;
use stowage_csi::Endpoint;
use stowage_csi::v1::identity_client::IdentityClient;
use tokio::sync::watch;

use crate::registration::{State, Tracker};

/// A Probe that takes longer than this counts as failed: a wedged plugin must fail its
/// liveness check, not hang it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Health {
    /// Each driver's CSI socket as this process reaches it.
    pub csi: Vec<(String, Endpoint)>,
    /// One tracker per driver registered with the kubelet; empty when registration is off.
    pub registrations: Vec<(String, Tracker)>,
}

impl Health {
    /// Ok, or the reason the plugin is unhealthy: every driver must answer Probe and be
    /// registered, since the kubelet cannot use a driver that is not.
    pub async fn check(&self) -> Result<(), String> {
        // Probed together, so a wedged driver costs one timeout, not one per driver.
        let mut probes = tokio::task::JoinSet::new();
        for (i, (driver, ep)) in self.csi.iter().cloned().enumerate() {
            probes.spawn(async move {
                (
                    i,
                    probe(&ep).await.map_err(|why| format!("{driver}: {why}")),
                )
            });
        }
        let mut failed: Vec<(usize, String)> = Vec::new();
        while let Some(done) = probes.join_next().await {
            match done {
                Ok((i, Err(why))) => failed.push((i, why)),
                Ok((_, Ok(()))) => {}
                Err(e) => return Err(format!("Probe task failed: {e}")),
            }
        }
        // The first driver in configuration order, whichever answered first.
        failed.sort();
        if let Some((_, why)) = failed.into_iter().next() {
            return Err(why);
        }
        for (driver, t) in &self.registrations {
            match t.get() {
                State::Registered => {}
                State::Waiting => {
                    return Err(format!("{driver}: not registered with the kubelet yet"));
                }
                State::Refused(why) => {
                    return Err(format!("{driver}: the kubelet refused registration: {why}"));
                }
                State::Broken(why) => {
                    return Err(format!("{driver}: registration socket not served: {why}"));
                }
            }
        }
        Ok(())
    }

    /// Serves `GET /healthz` (and `GET /metrics` when `with_metrics`) on `listener` until
    /// `shutdown` turns true.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        with_metrics: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, with_metrics, "serving /healthz");
        }
        let mut app = Router::new()
            .route("/healthz", get(healthz))
            .with_state(self);
        if with_metrics {
            app = app.route("/metrics", get(stowage_csi::metrics::handler));
        }
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await
    }
}

async fn healthz(AxumState(h): AxumState<Health>) -> (StatusCode, String) {
    match h.check().await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => {
            tracing::warn!(reason = %why, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

/// One driver's socket answers Probe with ready within [`PROBE_TIMEOUT`].
async fn probe(csi: &Endpoint) -> Result<(), String> {
    let probe = async {
        let ch = stowage_csi::connect(csi).await.map_err(|e| e.to_string())?;
        let r = IdentityClient::new(ch)
            .probe(stowage_csi::v1::ProbeRequest {})
            .await
            .map_err(|s| format!("Probe failed: {}", s.message()))?
            .into_inner();
        if r.ready == Some(false) {
            return Err("Probe says not ready".to_string());
        }
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .map_err(|_| format!("Probe did not answer within {PROBE_TIMEOUT:?}"))?
}
