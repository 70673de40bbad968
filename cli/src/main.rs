//! `stowage`: the admin CLI of Stowage's drivers.
//!
//! ```sh
//! stowage status [-n NS] [-o wide|json|yaml]     # Stowage PVs and claims; stuck ones explained
//! stowage doctor [--node] [--backend NAME]       # node, backend and cluster checks
//! stowage import --csi-endpoint ... [--all | VOLUME_ID...]
//! stowage completions bash|zsh|fish ; stowage man
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use stowage_cli::output::Format;
use stowage_cli::status::{self, StatusOptions};
use stowage_csi::endpoint::Endpoint;
use stowage_provisioner::driver::Driver;
use stowage_provisioner::import::{self, ImportOptions};

#[derive(Parser, Debug)]
#[command(
    name = "stowage",
    version = stowage_version::VERSION,
    about = "Stowage admin CLI: status of Stowage volumes and claims, doctor checks, imports"
)]
struct Cli {
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then the in-cluster account).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// PVs and claims of Stowage drivers: phase, backend, class, capacity, attach state, age;
    /// stuck items picked out with the reason and a next step.
    Status(StatusArgs),
    /// Check this node, the configured backends and the cluster; OK/WARN/FAIL lines with a
    /// fix hint, exit code 1 on any FAIL.
    Doctor(DoctorArgs),
    /// Turn in-tree `nfs:` PVs into nfs.stowage.io CSI PVs on the same export path (no data
    /// copied; bound claims stay bound; Recycle keeps working through Stowage).
    MigrateIntree(MigrateArgs),
    /// Print a shell completion script: `source <(stowage completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from these definitions: `stowage man | man -l -`.
    Man,
    /// List a driver's volumes that have no PV and create PVs for the chosen ones (static
    /// provisioning).
    Import(ImportArgs),
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Only claims of this namespace (PVs are cluster-wide and always shown).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
    /// A claim Pending for longer than this many seconds is reported as stuck.
    #[arg(long, default_value_t = 60)]
    pending_after: i64,
    /// Keep running: print the report again whenever a PV or claim changes (on a terminal
    /// the new report replaces the old; otherwise only changed reports are printed).
    #[arg(short = 'w', long)]
    watch: bool,
    /// Do not ask the kubelets for the usage of mounted volumes (the USED column; needs get on
    /// nodes/proxy and list on pods).
    #[arg(long)]
    no_usage: bool,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    /// Also check this machine as a node: /dev/fuse, mount helpers, kubelet directory
    /// propagation, registration sockets, the CSINode entry.
    #[arg(long)]
    node: bool,
    /// Only this backend kind (nfs) or instance (nfs/main) of the configuration.
    #[arg(long)]
    backend: Option<String>,
    /// The Stowage configuration (as given to stowage-controller and stowage-node); without
    /// it the drivers come from the cluster's CSIDriver objects and backends are not probed.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: Option<PathBuf>,
    /// A YAML map with the keys of a CSI secret (S3 accessKeyID/secretAccessKey) for the
    /// backend probes that need credentials.
    #[arg(long)]
    secrets_file: Option<PathBuf>,
    /// The kubelet's root directory on this node.
    #[arg(long, env = "KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    kubelet_root: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The provisioner's ServiceAccount (namespace/name) whose RBAC is checked.
    #[arg(long, default_value = "stowage-system/stowage-provisioner")]
    service_account: String,
    /// Skip the cluster checks (no API server access needed, except for CSINode with --node).
    #[arg(long)]
    no_cluster: bool,
    /// text or json.
    #[arg(long, short = 'o', default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// The stowage-controller socket serving nfs.stowage.io.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/stowage/controller.sock"
    )]
    csi_endpoint: String,
    /// The configuration stowage-controller runs with (its NFS instances say which export
    /// path belongs to which instance).
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// Print each PV before and after (YAML) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// PVs to migrate (default: every in-tree nfs PV).
    pvs: Vec<String>,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The stowage-controller socket of the driver (unix:///path or tcp://host:port).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/stowage/controller.sock"
    )]
    csi_endpoint: String,
    /// Timeout of each CSI call, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Import every volume that has no PV.
    #[arg(long, conflicts_with = "volumes")]
    all: bool,
    /// Volume IDs to import (as the driver lists them); none and no --all: only list.
    volumes: Vec<String>,
    /// storageClassName of the new PVs ("" = no class: claims must ask for "").
    #[arg(long, default_value = "")]
    storage_class: String,
    /// Access modes of the new PVs (checked with the driver through ValidateVolumeCapabilities).
    #[arg(long = "access-mode", default_value = "ReadWriteOnce")]
    access_modes: Vec<String>,
    /// Filesystem or Block.
    #[arg(long, default_value = "Filesystem")]
    volume_mode: String,
    /// Retain (default: deleting the PV keeps the data), Delete or Recycle.
    #[arg(long, default_value = "Retain")]
    reclaim_policy: String,
    /// Show what would be created without creating anything.
    #[arg(long)]
    dry_run: bool,
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let kubeconfig = cli.kubeconfig.as_deref();
    match cli.cmd {
        Cmd::Status(a) => {
            let client = stowage_cli::kube::client(kubeconfig).await?;
            let opts = StatusOptions {
                namespace: a.namespace,
                pending_after_secs: a.pending_after,
                usage: !a.no_usage,
            };
            if a.watch {
                use std::io::IsTerminal;
                let tty = std::io::stdout().is_terminal();
                status::watch(&client, &opts, a.output, &mut std::io::stdout(), tty).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let report = status::gather(&client, &opts).await?;
            status::print(&mut std::io::stdout().lock(), a.output, &report)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor(a) => doctor(a, kubeconfig).await,
        Cmd::MigrateIntree(a) => migrate(a, kubeconfig).await,
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "stowage", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Import(a) => {
            let endpoint = Endpoint::parse(&a.csi_endpoint)
                .with_context(|| format!("--csi-endpoint {:?}", a.csi_endpoint))?;
            let client = stowage_cli::kube::client(kubeconfig).await?;
            let driver = Driver::connect(
                &endpoint,
                Duration::from_secs(a.timeout),
                Duration::from_secs(10),
            )
            .await
            .with_context(|| format!("connecting to the CSI driver at {endpoint}"))?;
            let opts = ImportOptions {
                all: a.all,
                volumes: a.volumes,
                storage_class: a.storage_class,
                access_modes: a.access_modes,
                volume_mode: a.volume_mode,
                reclaim_policy: a.reclaim_policy,
                dry_run: a.dry_run,
            };
            let mut bar = stowage_cli::progress::Bar::new("importing");
            let mut out = bar.writer(std::io::stdout());
            import::run_with(&client, &driver, &opts, &mut out, &mut bar).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn doctor(a: DoctorArgs, kubeconfig: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    use stowage_cli::doctor::{self, Check, backend, cluster, node};
    let mut checks = Vec::new();
    let backends = match &a.config {
        Some(p) => match stowage_backends::ConfigFile::load(p) {
            Ok(f) => f.backends,
            Err(e) => {
                checks.push(Check::fail(
                    "backend",
                    format!("config {}", p.display()),
                    e.to_string(),
                    "fix the file (examples/ has one per backend)",
                ));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let client = if a.no_cluster && !a.node {
        None
    } else {
        match stowage_cli::kube::client(kubeconfig).await {
            Ok(c) => Some(c),
            Err(e) => {
                checks.push(Check::fail(
                    "cluster",
                    "API server",
                    e.to_string(),
                    "pass --kubeconfig, or --no-cluster to check only node and backends",
                ));
                None
            }
        }
    };
    let mut drivers: Vec<String> = backends
        .iter()
        .map(|b| b.driver_name().to_owned())
        .collect();
    if a.config.is_none()
        && let Some(c) = &client
    {
        drivers = cluster::stowage_csidrivers(c).await.unwrap_or_default();
    }
    if a.node {
        let node_name = a.node_name.clone().or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        });
        checks.extend(
            node::checks(
                client.as_ref(),
                &node::NodeOptions {
                    kubelet_root: a.kubelet_root.clone(),
                    node_name,
                    drivers: drivers.clone(),
                    backends: backends.clone(),
                },
            )
            .await,
        );
    }
    let secrets = match &a.secrets_file {
        Some(p) => Some(backend::read_secrets(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    checks.extend(backend::checks(&backends, a.backend.as_deref(), secrets.as_ref()).await);
    if !a.no_cluster
        && let Some(c) = &client
    {
        checks.extend(cluster::checks(c, &drivers, &a.service_account).await);
    }
    let report = doctor::Report::new(checks);
    let mut out = std::io::stdout().lock();
    if a.output == "json" {
        stowage_cli::output::structured(&mut out, Format::Json, &report)?;
    } else {
        doctor::print(&mut out, &report)?;
    }
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn migrate(a: MigrateArgs, kubeconfig: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
    use kube::api::ListParams;
    use std::io::Write;
    use stowage_cli::migrate;
    let client = stowage_cli::kube::client(kubeconfig).await?;
    let all: Vec<PersistentVolume> = kube::Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing PersistentVolumes")?
        .items;
    for n in &a.pvs {
        anyhow::ensure!(
            all.iter()
                .any(|p| p.metadata.name.as_deref() == Some(n.as_str())),
            "PV {n} does not exist"
        );
    }
    let chosen: Vec<&PersistentVolume> = all
        .iter()
        .filter(|p| {
            let name = p.metadata.name.as_deref().unwrap_or("");
            if a.pvs.is_empty() {
                p.spec.as_ref().is_some_and(|s| s.nfs.is_some())
            } else {
                a.pvs.iter().any(|n| n == name)
            }
        })
        .collect();
    if chosen.is_empty() {
        println!("no in-tree nfs PVs to migrate");
        return Ok(ExitCode::SUCCESS);
    }
    let pods: Vec<Pod> = kube::Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Pods (to refuse PVs in use)")?
        .items;
    let endpoint = Endpoint::parse(&a.csi_endpoint)
        .with_context(|| format!("--csi-endpoint {:?}", a.csi_endpoint))?;
    let driver = Driver::connect(&endpoint, Duration::from_secs(30), Duration::from_secs(10))
        .await
        .with_context(|| format!("connecting to the CSI driver at {endpoint}"))?;
    anyhow::ensure!(
        driver.name == migrate::NFS_DRIVER,
        "--csi-endpoint {endpoint} serves {}, not {}",
        driver.name,
        migrate::NFS_DRIVER
    );
    let instances = stowage_backends::ConfigFile::load(&a.config)?
        .backends
        .into_iter()
        .find_map(|b| match b {
            stowage_backends::Config::Nfs(i) => Some(i.instances),
            _ => None,
        })
        .with_context(|| format!("--config {}: no nfs backend in it", a.config.display()))?;
    let mut refused = 0;
    let mut bar = stowage_cli::progress::Bar::new("migrating");
    bar.start(chosen.len());
    let mut out = bar.writer(std::io::stdout().lock());
    for old in chosen {
        let name = old.metadata.name.clone().unwrap_or_default();
        bar.step(&name);
        let located =
            migrate::check_unused(old, &pods).and_then(|()| migrate::locate(old, &instances));
        let (instance, sub_dir) = match located {
            Ok(l) => l,
            Err(e) => {
                bar.suspend(|| eprintln!("refused: {e}"));
                refused += 1;
                continue;
            }
        };
        let vol = if a.dry_run {
            migrate::predicted_volume(old, &instance, &sub_dir)
        } else {
            driver
                .create_volume(migrate::adopt_request(old, &instance, &sub_dir))
                .await
                .with_context(|| {
                    format!("PV {name}: adopting {instance}/{sub_dir} as a Stowage volume")
                })?
        };
        let new = match migrate::plan(old, &vol) {
            Ok(n) => n,
            Err(e) => {
                bar.suspend(|| eprintln!("refused: {e}"));
                refused += 1;
                continue;
            }
        };
        let handle = new
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        if a.dry_run {
            let mut before = old.clone();
            before.metadata.managed_fields = None;
            before.status = None;
            writeln!(out, "# PV {name}: before")?;
            stowage_cli::output::structured(&mut out, Format::Yaml, &before)?;
            writeln!(out, "# PV {name}: after (nfs.stowage.io volume {handle})")?;
            stowage_cli::output::structured(&mut out, Format::Yaml, &new)?;
            continue;
        }
        migrate::apply(&client, old, &new)
            .await
            .with_context(|| format!("migrating PV {name}"))?;
        let s = migrate::summary(&new);
        writeln!(
            out,
            "migrated PV {name} to nfs.stowage.io volume {handle} (reclaim {}, claim {})",
            s["reclaim"],
            if s["claim"].is_empty() {
                "-"
            } else {
                &s["claim"]
            }
        )?;
    }
    bar.finish();
    Ok(if refused > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[tokio::main]
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stowage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn status_flags() {
        let c = Cli::try_parse_from(["stowage", "status", "-o", "json", "-n", "app"]).unwrap();
        let Cmd::Status(a) = c.cmd else {
            panic!("not status")
        };
        assert_eq!(a.output, Format::Json);
        assert_eq!(a.namespace.as_deref(), Some("app"));
        assert!(Cli::try_parse_from(["stowage", "status", "-o", "xml"]).is_err());
    }
}
