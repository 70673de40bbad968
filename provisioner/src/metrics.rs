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

    /// Every series name a registry's text exposes: counters with `_total`, histograms with
    /// `_bucket`, `_sum` and `_count`, others as typed.
    fn exposed(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{s}"));
                    }
                }
                "info" => {
                    out.insert(format!("{name}_info"));
                }
                _ => {
                    out.insert(name.to_string());
                }
            }
        }
        out
    }

    fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
            _ => {}
        }
    }

    #[test]
    fn dashboard_queries_only_exposed_metrics() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/stowage/dashboards/stowage.json");
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        queries(&dash, &mut exprs);
        assert!(exprs.len() >= 10, "{exprs:?}");
        // A family is exposed once it has a series: give each one.
        let m = Metrics::new();
        m.record("provision", true, Some(Duration::from_millis(5)));
        m.syncs.get_or_create(&SyncLabels { kind: "claim" }).inc();
        let p = stowage_backends::metrics::get();
        p.set_build_info("0.1.0", "test");
        p.record_csi("local.stowage.io", "Probe", "OK", Duration::from_millis(1));
        p.record_backend("bind", "mount", true, Duration::from_millis(1));
        let fuse = stowage_backends::metrics::FuseLabels { backend: "s3" };
        p.fuse_running.get_or_create(&fuse).set(1);
        p.fuse_healed.get_or_create(&fuse).inc();
        p.published
            .get_or_create(&stowage_backends::metrics::DriverLabels {
                driver: "local.stowage.io",
            })
            .set(1);
        let mut known = exposed(&m.encode().unwrap());
        known.extend(exposed(&p.encode().unwrap()));
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("stowage_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                used.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
        let unknown: Vec<_> = used.iter().filter(|n| !known.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "dashboard queries {unknown:?}; exposed: {known:?}"
        );
        // Every plugin metric is on the dashboard somewhere.
        for name in stowage_backends::metrics::NAMES {
            assert!(
                used.iter().any(|u| u.starts_with(name)),
                "{name} is not on the dashboard"
            );
        }
    }

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
