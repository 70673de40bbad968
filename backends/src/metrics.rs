//! The Prometheus metrics of `stowage-controller` and `stowage-node`, in one process-wide
//! registry: the backends record what they time (mount helpers, FUSE mounters), the gRPC layer
//! (`stowage_csi::serve`) records every CSI call, and `stowage_csi::metrics` serves the text.
//!
//! Process-wide because a backend has no handle to the server it runs under and one process
//! serves several drivers; the driver is a label. Recording takes a family's lock only for the
//! lookup of a label set (never across an await), and no label carries a volume ID or a path:
//! every label has a small fixed set of values.

use std::sync::LazyLock;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every RPC of `csi.v1` and `stowage.v1` (a unit test checks this against the protos). A call
/// to any other path is counted as `unknown`, so a client cannot mint label values.
pub const METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "GroupControllerGetCapabilities",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
    "GetMetadataAllocated",
    "GetMetadataDelta",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "RecycleVolume",
    "GetVolumeDetails",
];

/// The method label of a gRPC path (`/csi.v1.Node/NodePublishVolume` -> `NodePublishVolume`).
pub fn method_label(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or("");
    METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("unknown")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CsiLabels {
    pub driver: &'static str,
    pub method: &'static str,
    /// The gRPC status code name (`OK`, `InvalidArgument`, ...).
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub driver: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// local | nfs | glusterfs | s3 | rbd, or the mount machinery's filesystem family.
    pub backend: &'static str,
    pub operation: &'static str,
    /// success | failure
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FuseLabels {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverLabels {
    pub driver: &'static str,
}

/// Every metric name the binaries expose, as scraped (counters with `_total`, the info metric
/// with `_info`, histograms without their `_bucket`/`_sum`/`_count` suffixes). The dashboard
/// test checks its queries against this list.
pub const NAMES: &[&str] = &[
    "stowage_build_info",
    "stowage_csi_operations_total",
    "stowage_csi_operation_duration_seconds",
    "stowage_backend_operation_duration_seconds",
    "stowage_fuse_mounts_running",
    "stowage_fuse_mounts_healed_total",
    "stowage_node_volumes_published",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// A gauge (always 1) rather than an OpenMetrics info metric: it reads the same in
    /// Prometheus (`stowage_build_info{version,commit} 1`) and can be set after the registry
    /// exists, once the binary names its version.
    pub build_info: Family<BuildLabels, Gauge<i64, AtomicI64>>,
    pub csi_operations: Family<CsiLabels, Counter>,
    pub csi_durations: Family<MethodLabels, Histogram>,
    pub backend_durations: Family<BackendLabels, Histogram>,
    pub fuse_running: Family<FuseLabels, Gauge<i64, AtomicI64>>,
    pub fuse_healed: Family<FuseLabels, Counter>,
    pub published: Family<DriverLabels, Gauge<i64, AtomicI64>>,
}

/// 1 ms .. 5 min: a Probe takes a millisecond, a mount of a busy NFS server or a copy for a
/// clone minutes.
const BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("stowage");
        let build_info = Family::<BuildLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "build_info",
            "Version and git commit of this binary (always 1)",
            build_info.clone(),
        );
        let csi_operations = Family::<CsiLabels, Counter>::default();
        registry.register(
            "csi_operations",
            "CSI and stowage.v1 calls answered, by driver, method and gRPC code",
            csi_operations.clone(),
        );
        let csi_durations =
            Family::<MethodLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "csi_operation_duration_seconds",
            "Time from a CSI call's arrival to its answer (lock waits included), by driver and method",
            csi_durations.clone(),
        );
        let backend_durations =
            Family::<BackendLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "backend_operation_duration_seconds",
            "Time of one backend operation (a mount or unmount command, a FUSE mounter start), by backend, operation and result",
            backend_durations.clone(),
        );
        let fuse_running = Family::<FuseLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "fuse_mounts_running",
            "FUSE mounts this node plugin staged and is watching (S3 mounters, GlusterFS clients)",
            fuse_running.clone(),
        );
        let fuse_healed = Family::<FuseLabels, Counter>::default();
        registry.register(
            "fuse_mounts_healed",
            "Dead FUSE mounts (their process died) this node plugin mounted again",
            fuse_healed.clone(),
        );
        let published = Family::<DriverLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "node_volumes_published",
            "Publications (volume, target path) this node plugin made and has not unpublished since it started",
            published.clone(),
        );
        Metrics {
            registry,
            build_info,
            csi_operations,
            csi_durations,
            backend_durations,
            fuse_running,
            fuse_healed,
            published,
        }
    }

    /// Sets `stowage_build_info{version,commit} 1`; binaries call it once at start (only
    /// they know their version).
    pub fn set_build_info(&self, version: &'static str, commit: &'static str) {
        self.build_info
            .get_or_create(&BuildLabels { version, commit })
            .set(1);
    }

    /// One finished CSI call.
    pub fn record_csi(
        &self,
        driver: &'static str,
        method: &'static str,
        code: &'static str,
        took: Duration,
    ) {
        self.csi_operations
            .get_or_create(&CsiLabels {
                driver,
                method,
                code,
            })
            .inc();
        self.csi_durations
            .get_or_create(&MethodLabels { driver, method })
            .observe(took.as_secs_f64());
    }

    /// One finished backend operation.
    pub fn record_backend(
        &self,
        backend: &'static str,
        operation: &'static str,
        ok: bool,
        took: Duration,
    ) {
        self.backend_durations
            .get_or_create(&BackendLabels {
                backend,
                operation,
                result: if ok { "success" } else { "failure" },
            })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus/OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Times `fut` as backend operation `operation` of `backend`.
pub async fn timed<T, E>(
    backend: &'static str,
    operation: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = std::time::Instant::now();
    let result = fut.await;
    get().record_backend(backend, operation, result.is_ok(), started.elapsed());
    result
}

/// The gRPC code's name as Prometheus label (`InvalidArgument`, as grpc-go's metrics spell it).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_match_the_protos() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../csi/proto");
        let mut rpcs = Vec::new();
        for f in ["csi.proto", "stowage.proto"] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("rpc ") {
                    rpcs.push(rest.split('(').next().unwrap().trim().to_string());
                }
            }
        }
        let known: Vec<String> = METHODS.iter().map(|m| m.to_string()).collect();
        assert_eq!(rpcs, known);
        assert_eq!(
            method_label("/csi.v1.Node/NodePublishVolume"),
            "NodePublishVolume"
        );
        assert_eq!(method_label("/x.Y/NotAnRpc"), "unknown");
    }

    #[test]
    fn encodes_every_family_with_build_info() {
        let m = get();
        m.set_build_info("0.1.0 (commit abc)", "abc");
        m.record_csi("local.stowage.io", "Probe", "OK", Duration::from_millis(2));
        m.record_backend("bind", "mount", true, Duration::from_millis(3));
        m.fuse_healed
            .get_or_create(&FuseLabels { backend: "s3" })
            .inc();
        m.fuse_running
            .get_or_create(&FuseLabels { backend: "s3" })
            .set(1);
        m.published
            .get_or_create(&DriverLabels {
                driver: "local.stowage.io",
            })
            .set(0);
        let text = m.encode().unwrap();
        assert!(
            text.contains(r#"stowage_build_info{version="0.1.0 (commit abc)",commit="abc"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"stowage_csi_operations_total{driver="local.stowage.io",method="Probe",code="OK"}"#
        ), "{text}");
        assert!(text.contains(r#"stowage_backend_operation_duration_seconds_count{backend="bind",operation="mount",result="success"}"#), "{text}");
        assert!(
            text.contains(r#"stowage_fuse_mounts_healed_total{backend="s3"}"#),
            "{text}"
        );
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
                "{name} missing: {text}"
            );
        }
    }
}
