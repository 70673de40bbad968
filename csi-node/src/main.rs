//! `stowage-node`: serves one backend's CSI node plugin.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage_csi::endpoint::Endpoint;

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
    tracing::info!(driver = backend.driver_name(), node_id = %args.node_id, %endpoint, "stowage-node serving");
    stowage_csi::serve::serve(
        &endpoint,
        stowage_node::routes(
            backend,
            args.node_id,
            args.max_volumes,
            config.offers_snapshots(),
        ),
        stowage_csi::serve::shutdown_signal(),
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
