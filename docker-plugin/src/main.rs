//! `stowage-docker`: Stowage for Docker. `serve` runs the volume plugin (standalone Docker and
//! Swarm services); `csi` runs the combined CSI endpoint for Swarm cluster volumes (Docker ≥ 23).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stowage_backends::types::Secrets;
use stowage_csi::endpoint::Endpoint;
use stowage_docker::{Driver, Scope, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "stowage-docker",
    version = stowage_version::VERSION,
    about = "Stowage for Docker: volume plugin and Swarm cluster-volume CSI endpoint"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "STOWAGE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the Docker volume plugin API (/Plugin.Activate, /VolumeDriver.*).
    Serve(ServeArgs),
    /// Serve CSI Identity + Controller + Node on one socket (Swarm cluster volumes).
    Csi(CsiArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Backend configuration (YAML), the same file the CSI plugins take; see examples/.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// The plugin socket. Docker finds legacy plugins as /run/docker/plugins/<name>.sock, and
    /// `<name>` is what `docker volume create -d <name>` names.
    #[arg(
        long,
        env = "STOWAGE_DOCKER_SOCKET",
        default_value = "/run/docker/plugins/stowage.sock"
    )]
    socket: PathBuf,
    /// Where volume records and staging mounts live (must survive plugin restarts).
    #[arg(
        long,
        env = "STOWAGE_DOCKER_STATE",
        default_value = "/var/lib/stowage/docker"
    )]
    state_dir: PathBuf,
    /// Where volumes are mounted for Docker to bind into containers (default: <state-dir>/mounts).
    /// In a managed plugin this must lie under the plugin's propagatedMount.
    #[arg(long, env = "STOWAGE_DOCKER_MOUNTS")]
    mount_dir: Option<PathBuf>,
    /// This node's name, for backends that attach volumes to nodes (default: the host name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// YAML map of secrets handed to the backend on every call (as CSI secrets); Docker's
    /// driver options are visible to anyone who can inspect a volume, so secrets never go there.
    /// Empty = none (a managed plugin's settable variables cannot be unset, only emptied).
    #[arg(long, env = "STOWAGE_DOCKER_SECRETS")]
    secrets_file: Option<String>,
    /// Volume scope reported to Docker: auto = local when the backend's volumes are bound to a
    /// node (the local backend), global otherwise.
    #[arg(long, env = "STOWAGE_DOCKER_SCOPE", value_enum, default_value_t = ScopeArg::Auto)]
    scope: ScopeArg,
    /// Seconds a mount command (mount.nfs, a FUSE helper...) may take before it is killed.
    #[arg(long, env = "STOWAGE_MOUNT_TIMEOUT_SECS", default_value_t = 60)]
    mount_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScopeArg {
    Auto,
    Local,
    Global,
}

#[derive(clap::Args, Debug)]
struct CsiArgs {
    /// Where to serve CSI; Docker sets CSI_ENDPOINT for managed CSI plugins.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/docker/plugins/csi.sock"
    )]
    endpoint: String,
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// This node's name as Swarm knows it (default: the host name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Most volumes of this driver one node may hold (0 = no limit).
    #[arg(long, env = "STOWAGE_MAX_VOLUMES", default_value_t = 0)]
    max_volumes: i64,
    /// Seconds a mount command (mount.nfs, a FUSE helper...) may take before it is killed.
    #[arg(long, env = "STOWAGE_MOUNT_TIMEOUT_SECS", default_value_t = 60)]
    mount_timeout_secs: u64,
    /// The directory Swarm's staging and target paths lie under (the plugin's `/data`, whose
    /// `published/` is the propagatedMount); node calls naming paths elsewhere are refused.
    #[arg(long, env = "STOWAGE_VOLUME_ROOT", default_value = "/data")]
    volume_root: PathBuf,
}

fn hostname() -> anyhow::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name; pass --node-id")?;
    let h = h.trim().to_owned();
    anyhow::ensure!(!h.is_empty(), "the host name is empty; pass --node-id");
    Ok(h)
}

/// The given node ID, or the host name when none (or an empty one, as a managed plugin's
/// settable variable can only be emptied) is given.
fn node_id(given: Option<String>) -> anyhow::Result<String> {
    match given {
        Some(n) if !n.trim().is_empty() => Ok(n.trim().to_owned()),
        _ => hostname(),
    }
}

fn load_secrets(path: Option<&Path>) -> anyhow::Result<Secrets> {
    let Some(path) = path else {
        return Ok(Secrets::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --secrets-file {}", path.display()))?;
    // The error names the file only: a parser message could quote a secret value.
    let map: BTreeMap<String, String> = serde_saphyr::from_str(&text).map_err(|_| {
        anyhow::anyhow!(
            "--secrets-file {}: expected a YAML map of string keys to string values",
            path.display()
        )
    })?;
    Ok(Secrets(map))
}

/// Creates the directory and returns its canonical path: mountpoints are compared with the
/// kernel's mount table, which never shows symlinks or `..`.
fn real_dir(p: &Path, what: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(p).with_context(|| format!("creating {what} {}", p.display()))?;
    std::fs::canonicalize(p).with_context(|| format!("resolving {what} {}", p.display()))
}

fn set_mount_timeout(secs: u64) -> anyhow::Result<()> {
    anyhow::ensure!(secs > 0, "--mount-timeout-secs must be positive");
    stowage_backends::command::set_mount_timeout(std::time::Duration::from_secs(secs));
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    set_mount_timeout(args.mount_timeout_secs)?;
    let config = stowage_backends::Config::load(&args.config)?;
    let controller = stowage_backends::build_controller(&config)
        .await
        .context("starting the backend")?;
    let node = stowage_backends::build_node(&config);
    let state_dir = real_dir(&args.state_dir, "--state-dir")?;
    let mount_dir = real_dir(
        &args.mount_dir.unwrap_or_else(|| state_dir.join("mounts")),
        "--mount-dir",
    )?;
    let settings = Settings {
        state_dir,
        mount_dir,
        node_id: node_id(args.node_id)?,
        secrets: load_secrets(
            args.secrets_file
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(Path::new),
        )?,
        scope: match args.scope {
            ScopeArg::Auto => None,
            ScopeArg::Local => Some(Scope::Local),
            ScopeArg::Global => Some(Scope::Global),
        },
    };
    let driver = Arc::new(Driver::new(controller, node, settings).await?);
    stowage_docker::serve(&args.socket, driver, stowage_csi::serve::shutdown_signal()).await?;
    tracing::info!("stowage-docker stopped");
    Ok(())
}

async fn csi(args: CsiArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_volumes >= 0, "--max-volumes must not be negative");
    set_mount_timeout(args.mount_timeout_secs)?;
    let endpoint = Endpoint::parse(&args.endpoint).context("--endpoint")?;
    let paths = stowage_node::paths::PathPolicy::new(&args.volume_root)
        .map_err(|e| anyhow::anyhow!("--volume-root: {e}"))?;
    let config = stowage_backends::Config::load(&args.config)?;
    let controller = stowage_backends::build_controller(&config)
        .await
        .context("starting the backend")?;
    let node = stowage_backends::build_node(&config);
    let node_id = node_id(args.node_id)?;
    stowage_docker::csi::register_in_background(
        controller.clone(),
        stowage_backends::NodeInfo {
            node_id: node_id.clone(),
            max_volumes: args.max_volumes,
            topology: node.topology(&node_id),
        },
    );
    tracing::info!(driver = controller.driver_name(), %node_id, %endpoint, "stowage-docker csi serving");
    stowage_csi::serve::serve(
        &endpoint,
        stowage_docker::csi::routes(controller, node, node_id, args.max_volumes, paths),
        stowage_csi::serve::shutdown_signal(),
    )
    .await?;
    Ok(())
}

#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    stowage_csi::identity::set_vendor_version(stowage_version::VERSION);
    stowage_csi::logging::init(&args.log_format)?;
    match args.cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Csi(a) => csi(a).await,
    }
}
