//! Prometheus metrics and the HTTP endpoint that serves them (`/metrics`, `/healthz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// provision | delete | recycle | bind | attach | detach | expand
    pub operation: &'static str,
    /// success | failure
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// claim | volume
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub operation: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub operations: Family<OpLabels, Counter>,
    pub durations: Family<DurationLabels, Histogram>,
    pub leader: Gauge<i64, AtomicI64>,
    /// Finished syncs of the claim and volume controllers (the bench times a full resync
    /// with it).
    pub syncs: Family<SyncLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stowage_provisioner");
        let operations = Family::<OpLabels, Counter>::default();
        registry.register(
            "operations",
            "Provisioner operations (provision, delete, recycle, bind, attach, detach, expand) by result",
            operations.clone(),
        );
        let durations = Family::<DurationLabels, Histogram>::new_with_constructor(|| {
            // 10 ms .. ~5 min: a local directory takes milliseconds, a busy backend minutes.
            Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
        });
        registry.register(
            "operation_duration_seconds",
            "Time from the start of an operation to its success (provision: claim seen to PV created)",
            durations.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "Drivers whose leader lease this replica holds (1 while it leads, with one driver)",
            leader.clone(),
        );
        let syncs = Family::<SyncLabels, Counter>::default();
        registry.register(
            "syncs",
            "Finished syncs (reconciles) of claims and volumes, successful or not",
            syncs.clone(),
        );
        Metrics {
            registry,
            operations,
            durations,
            leader,
            syncs,
        }
    }

    pub fn record(&self, operation: &'static str, ok: bool, took: Option<Duration>) {
        self.operations
            .get_or_create(&OpLabels {
                operation,
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        if let (true, Some(t)) = (ok, took) {
            self.durations
                .get_or_create(&DurationLabels { operation })
                .observe(t.as_secs_f64());
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Binds the HTTP endpoint; returns the bound address (the port may have been 0) and the
/// server future.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(m);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, async move { axum::serve(listener, app).await }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_operations_and_latency() {
        let m = Metrics::new();
        m.record("provision", true, Some(Duration::from_millis(30)));
        m.record("provision", false, None);
        m.leader.set(1);
        m.syncs.get_or_create(&SyncLabels { kind: "claim" }).inc();
        let text = m.encode().unwrap();
        assert!(
            text.contains(r#"stowage_provisioner_syncs_total{kind="claim"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stowage_provisioner_operations_total{operation="provision",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"stowage_provisioner_operations_total{operation="provision",result="failure"} 1"#
        ));
        assert!(text.contains(r#"stowage_provisioner_operation_duration_seconds_bucket{le="0.05",operation="provision"} 1"#), "{text}");
        assert!(text.contains("stowage_provisioner_leader 1"));
    }
}
