//! `stowage-node`: serves one backend's CSI node plugin.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage_csi::endpoint::Endpoint;
use stowage_node::health::Health;
use stowage_node::registration::{Registration, Tracker};

#[derive(Parser, Debug)]
#[command(version, about = "Stowage CSI node plugin (Identity + Node)")]
struct Args {
    /// Where to serve: unix:///path/csi.sock (or tcp://host:port, e.g. inside a test VM).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/stowage/csi.sock"
    )]
    endpoint: String,
    /// Backend configuration (YAML); see examples/.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// This node's name as the CO knows it (Kubernetes: spec.nodeName).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// Most volumes of this driver one node may hold (0 = no limit).
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
    /// DaemonSet it differs from --endpoint). Default: the --endpoint socket path.
    #[arg(long, env = "STOWAGE_KUBELET_REGISTRATION_PATH")]
    kubelet_registration_path: Option<String>,
    /// Serve GET /healthz here (e.g. 0.0.0.0:9808) for a livenessProbe: 200 when the CSI
    /// socket answers Probe and kubelet registration succeeded.
    #[arg(long, env = "STOWAGE_HEALTH_ADDRESS")]
    health_address: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    stowage_csi::logging::init(&args.log_format)?;
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
    let endpoint = Endpoint::parse(&args.endpoint).context("--endpoint")?;
    let config = stowage_backends::Config::load(&args.config)?;
    let backend = stowage_backends::build_node(&config);
    register(
        config.clone(),
        stowage_backends::NodeInfo {
            node_id: args.node_id.clone(),
            max_volumes: args.max_volumes,
            topology: backend.topology(&args.node_id),
        },
    );
    let paths = stowage_node::paths::PathPolicy::new(&args.kubelet_root)
        .map_err(|e| anyhow::anyhow!("--kubelet-root: {e}"))?;
    let driver = backend.driver_name().to_string();
    let registration = if args.kubelet_registration {
        let csi_endpoint = match (&args.kubelet_registration_path, &endpoint) {
            (Some(p), _) => p.clone(),
            (None, Endpoint::Unix(p)) => p.to_string_lossy().into_owned(),
            (None, Endpoint::Tcp { .. }) => anyhow::bail!(
                "--kubelet-registration-path is required when --endpoint is not a unix socket"
            ),
        };
        Some(Registration {
            socket: Registration::socket_for(&args.kubelet_root, &driver),
            driver: driver.clone(),
            csi_endpoint,
        })
    } else {
        None
    };

    // One shutdown for every server: SIGTERM stops CSI, registration and health together.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stowage_csi::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // The CSI socket exists before the kubelet can hear of it: bind first, then register.
    let listener = stowage_csi::serve::Listener::bind(&endpoint).await?;
    let mut registrations = Vec::new();
    if let Some(r) = registration {
        let tracker = Tracker::default();
        registrations.push((driver.clone(), tracker.clone()));
        tokio::spawn(r.run(tracker, stop_rx.clone()));
    }
    if let Some(addr) = args.health_address {
        let health = Health {
            csi: listener.local_endpoint(),
            registrations,
        };
        // Bound here so a taken probe port stops the start with a clear error instead of
        // a DaemonSet restarted forever by a failing probe.
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-address {addr}"))?;
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = health.serve(l, rx).await {
                tracing::error!(error = %e, "/healthz server failed");
            }
        });
    }
    tracing::info!(driver = %driver, node_id = %args.node_id, %endpoint, kubelet_root = %args.kubelet_root.display(), "stowage-node serving");
    let mut rx = stop_rx;
    listener
        .serve(
            stowage_node::routes(
                backend,
                args.node_id,
                args.max_volumes,
                config.offers_snapshots(),
                paths,
            ),
            async move {
                while !*rx.borrow() {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            },
        )
        .await?;
    tracing::info!("stowage-node stopped");
    Ok(())
}

/// Registers this node with the backend's controller side, through the backend's own storage
/// (the node has no channel to the controller), retrying in the background until it succeeds:
/// ControllerPublish refuses nodes it has never heard of.
fn register(config: stowage_backends::Config, node: stowage_backends::NodeInfo) {
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
                    tracing::info!(node_id = %node.node_id, "node registered with the backend");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "node registration failed")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(60));
        }
    });
}
