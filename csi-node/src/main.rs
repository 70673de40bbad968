//! `stowage-node`: serves the CSI node plugin of every configured backend, one socket (and one
//! kubelet registration socket) per driver, one /healthz for all.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage_backends::config::{ConfigFile, per_driver};
use stowage_csi::endpoint::Endpoint;
use stowage_csi::serve::Listener;
use stowage_node::health::Health;
use stowage_node::registration::{Registration, Tracker};

#[derive(Parser, Debug)]
#[command(
    name = "stowage-node",
    version = stowage_version::VERSION,
    about = "Stowage CSI node plugin (Identity + Node)"
)]
struct Args {
    /// Where to serve: unix:///path/csi.sock (or tcp://host:port, e.g. inside a test VM).
    /// `{driver}` is replaced by the driver name; required with several backends.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/stowage/csi.sock"
    )]
    endpoint: String,
    /// Backend configuration (YAML): one backend, or a `backends:` list; see examples/.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// This node's name as the CO knows it (Kubernetes: spec.nodeName).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// Most volumes of each driver one node may hold (0 = no limit).
    #[arg(long, env = "STOWAGE_MAX_VOLUMES", default_value_t = 0)]
    max_volumes: i64,
    /// Seconds before a mount or unmount command is killed and the call answers UNAVAILABLE
    /// (a hung NFS server must not hold node calls hostage).
    #[arg(long, env = "STOWAGE_MOUNT_TIMEOUT_SECS", default_value_t = 60)]
    mount_timeout_secs: u64,
    /// The kubelet's root directory as this process sees it. Every staging and target path of
    /// a node call must lie below it; the registration socket goes in its plugins_registry/.
    #[arg(long, env = "KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    kubelet_root: PathBuf,
    /// Register with the kubelet through <kubelet-root>/plugins_registry/ (no
    /// node-driver-registrar sidecar needed). Off for COs that are not Kubernetes.
    #[arg(long, env = "STOWAGE_KUBELET_REGISTRATION", default_value_t = true, action = clap::ArgAction::Set)]
    kubelet_registration: bool,
    /// The CSI socket path the kubelet should dial, as a path on the kubelet's host (in a
    /// DaemonSet it differs from --endpoint). Default: the --endpoint socket path. `{driver}`
    /// is replaced by the driver name; required with several backends.
    #[arg(long, env = "STOWAGE_KUBELET_REGISTRATION_PATH")]
    kubelet_registration_path: Option<String>,
    /// Serve GET /healthz here (e.g. 0.0.0.0:9808) for a livenessProbe: 200 when the CSI
    /// socket of every driver answers Probe and every driver is registered with the kubelet.
    #[arg(long, env = "STOWAGE_HEALTH_ADDRESS")]
    health_address: Option<std::net::SocketAddr>,
    /// Serve GET /metrics (Prometheus text) here, e.g. 0.0.0.0:9809. The same address as
    /// --health-address serves /healthz and /metrics on one port. Off when unset.
    #[arg(long, env = "STOWAGE_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

pub fn main() -> anyhow::Result<()> {
    // A small runtime (stowage_csi::runtime): a plugin mostly waits.
    stowage_csi::runtime::build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    stowage_csi::identity::set_vendor_version(stowage_version::VERSION);
    stowage_csi::logging::init(&args.log_format)?;
    stowage_backends::metrics::get()
        .set_build_info(stowage_version::VERSION_NUMBER, stowage_version::COMMIT);
    anyhow::ensure!(
        !args.node_id.trim().is_empty(),
        "--node-id must not be empty"
    );
    anyhow::ensure!(args.max_volumes >= 0, "--max-volumes must not be negative");
    anyhow::ensure!(
        args.mount_timeout_secs > 0,
        "--mount-timeout-secs must be positive"
    );
    stowage_backends::command::set_mount_timeout(std::time::Duration::from_secs(
        args.mount_timeout_secs,
    ));
    let file = ConfigFile::load(&args.config)?;
    file.check_per_driver("--endpoint", &args.endpoint)
        .map_err(anyhow::Error::msg)?;
    if let Some(p) = &args.kubelet_registration_path {
        file.check_per_driver("--kubelet-registration-path", p)
            .map_err(anyhow::Error::msg)?;
    }
    let paths = stowage_node::paths::PathPolicy::new(&args.kubelet_root)
        .map_err(|e| anyhow::anyhow!("--kubelet-root: {e}"))?;

    // One shutdown for every server: SIGTERM stops CSI, registration and health together.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stowage_csi::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // The probe and metrics ports are bound before any socket exists or any registration
    // starts: a taken port stops the start with a clear error naming the flag, instead of a
    // DaemonSet restarted forever by a failing probe or a node serving without its metrics.
    let shared = args.metrics_address.is_some() && args.metrics_address == args.health_address;
    let health_listener = match args.health_address {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--health-address {addr}"))?,
        ),
        None => None,
    };
    let metrics_listener = match (args.metrics_address, shared) {
        (Some(addr), false) => Some(
            stowage_csi::metrics::bind(addr)
                .await
                .with_context(|| format!("--metrics-address {addr}"))?,
        ),
        _ => None,
    };
    let mut servers = Vec::new();
    let mut sockets = Vec::new();
    let mut kubelet = Vec::new();
    for config in &file.backends {
        let driver = config.driver_name();
        let endpoint = Endpoint::parse(&per_driver(&args.endpoint, driver))
            .with_context(|| format!("--endpoint for {driver}"))?;
        let backend = stowage_backends::build_node(config);
        register(
            config.clone(),
            stowage_backends::NodeInfo {
                node_id: args.node_id.clone(),
                max_volumes: args.max_volumes,
                topology: backend.topology(&args.node_id),
            },
        );
        if args.kubelet_registration {
            let csi_endpoint = match (&args.kubelet_registration_path, &endpoint) {
                (Some(p), _) => per_driver(p, driver),
                (None, Endpoint::Unix(p)) => p.to_string_lossy().into_owned(),
                (None, Endpoint::Tcp { .. }) => anyhow::bail!(
                    "--kubelet-registration-path is required when --endpoint is not a unix socket"
                ),
            };
            kubelet.push(Registration {
                socket: Registration::socket_for(&args.kubelet_root, driver),
                driver: driver.to_string(),
                csi_endpoint,
            });
        }
        // Every CSI socket exists before the kubelet can hear of it: bind all, then register.
        let listener = Listener::bind(&endpoint)
            .await
            .with_context(|| driver.to_string())?
            .with_driver(driver);
        tracing::info!(driver, node_id = %args.node_id, %endpoint, kubelet_root = %args.kubelet_root.display(), "stowage-node serving");
        sockets.push((driver.to_string(), listener.local_endpoint()));
        let routes = stowage_node::routes(
            backend,
            args.node_id.clone(),
            args.max_volumes,
            config.offers_snapshots(),
            paths.clone(),
        );
        servers.push((listener, routes));
    }
    let mut registrations = Vec::new();
    for r in kubelet {
        let tracker = Tracker::default();
        registrations.push((r.driver.clone(), tracker.clone()));
        tokio::spawn(r.run(tracker, stop_rx.clone()));
    }
    if let Some(l) = health_listener {
        let health = Health {
            csi: sockets,
            registrations,
        };
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = health.serve(l, shared, rx).await {
                tracing::error!(error = %e, "/healthz server failed");
            }
        });
    }
    if let Some(listener) = metrics_listener {
        stowage_csi::metrics::start(listener, stop_rx.clone());
    }
    let mut rx = stop_rx;
    stowage_csi::serve::serve_all(servers, async move {
        let _ = rx.wait_for(|stop| *stop).await;
    })
    .await?;
    tracing::info!("stowage-node stopped");
    Ok(())
}

/// Registers this node with the backend's controller side, through the backend's own storage
/// (the node has no channel to the controller), retrying in the background until it succeeds:
/// ControllerPublish refuses nodes it has never heard of.
fn register(config: stowage_backends::Config, node: stowage_backends::NodeInfo) {
    let driver = config.driver_name();
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            let res = async {
                stowage_backends::build_controller(&config)
                    .await?
                    .register_node(&node)
                    .await
            }
            .await;
            match res {
                Ok(()) => {
                    tracing::info!(driver, node_id = %node.node_id, "node registered with the backend");
                    return;
                }
                Err(e) => {
                    tracing::warn!(driver, error = %e, retry_in_s = wait.as_secs(), "node registration failed")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(60));
        }
    });
}
