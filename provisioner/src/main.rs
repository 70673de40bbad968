//! `stowage-provisioner`: the Kubernetes provisioner for the Stowage drivers behind one or
//! more stowage-controller sockets (one process, one kube client, one lease per driver).
//!
//! ```sh
//! stowage-provisioner --csi-endpoint unix:///csi/controller.sock             # run (KCM binds)
//! stowage-provisioner --csi-endpoint unix:///csi/local.stowage.io.sock,unix:///csi/nfs.stowage.io.sock
//! stowage-provisioner --binder builtin ...                                    # Stowage binds
//! stowage-provisioner import --csi-endpoint ... [--all | VOLUME_ID...]        # static PVs
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use stowage_csi::endpoint::Endpoint;
use stowage_provisioner::binder::BinderMode;
use stowage_provisioner::client::Rate;
use stowage_provisioner::controller::Settings;
use stowage_provisioner::driver::Driver;
use stowage_provisioner::duties::{self, Duty};
use stowage_provisioner::import::{self, ImportOptions};
use stowage_provisioner::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(
    name = "stowage-provisioner",
    version = stowage_version::VERSION,
    about = "Stowage Kubernetes provisioner: provisions, binds and reclaims (Delete, Retain, Recycle), attaches and resizes volumes of a Stowage CSI driver"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Deprecated: use `stowage import`. List the driver's volumes that have no PV and create
    /// PVs for the chosen ones.
    Import(ImportArgs),
    /// Print the snapshot.storage.k8s.io CRDs (VolumeSnapshot, VolumeSnapshotContent,
    /// VolumeSnapshotClass) as YAML for kubectl apply.
    Crds,
}

#[derive(Args, Debug)]
struct Common {
    /// The stowage-controller socket (unix:///path or tcp://host:port), or a comma-separated
    /// list of them (one per driver; each driver's name comes from GetPluginInfo).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        global = true,
        default_value = "unix:///var/lib/stowage/controller.sock"
    )]
    csi_endpoint: String,
    /// Timeout of each CSI call.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Kubernetes API requests per second (client-side limit; external-provisioner's 5 is
    /// what its users hit first). A claim costs about five writes and no reads (the watch
    /// caches answer), so 200 lets ~40 claims/s through; the API server's own priority and
    /// fairness still protects it from any one client.
    #[arg(long, global = true, default_value_t = 200.0)]
    kube_api_qps: f64,
    /// Requests allowed in a burst above the QPS.
    #[arg(long, global = true, default_value_t = 400)]
    kube_api_burst: u32,
    /// Log format: text or json.
    #[arg(
        long,
        env = "STOWAGE_LOG_FORMAT",
        global = true,
        default_value = "text"
    )]
    log_format: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Binder {
    /// kube-controller-manager binds claims and sets phases.
    Kcm,
    /// Stowage binds and sets phases (KCM runs without its PV binder, or there is no KCM).
    Builtin,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "kcm")]
    binder: Binder,
    /// Duties to run, comma-separated: provision, attach (VolumeAttachments), resize (claim
    /// expansion), snapshot (VolumeSnapshots). Attach, resize and snapshot start only when the
    /// driver advertises PUBLISH_UNPUBLISH_VOLUME, EXPAND_VOLUME and CREATE_DELETE_SNAPSHOT.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "provision,attach,resize,snapshot"
    )]
    controllers: Vec<Duty>,
    /// The snapshot duty also does the snapshot-controller's common part (binding snapshots
    /// and contents); false where the cluster runs the upstream snapshot-controller.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    snapshot_common: bool,
    /// Concurrent syncs per controller (claims, volumes). A sync mostly waits on the API
    /// server and the driver, so many run at once on few threads.
    #[arg(long, default_value_t = 64)]
    workers: u16,
    /// Serve /metrics and /healthz here; empty disables.
    #[arg(long, default_value = "0.0.0.0:9809")]
    metrics_address: String,
    /// Re-check converged objects this often.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    resync: Duration,
    /// Re-check Pending claims this often (kube-controller-manager: 15s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pending_resync: Duration,
    /// Longest delay between retries of a failing operation.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    retry_max_delay: Duration,
    /// How long to wait at start for the CSI driver to answer.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    driver_wait: Duration,
    /// Elect a leader among replicas through a Lease, so only one acts at a time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// A leader that has not renewed its lease for this long is replaced.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: Duration,
    /// This replica's name in the Lease and in events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Args, Debug)]
struct ImportArgs {
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 5m, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn identity(arg: Option<String>) -> String {
    arg.unwrap_or_else(|| {
        let host = rustix_hostname();
        format!("{host}-{}", std::process::id())
    })
}

fn rustix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "stowage-provisioner".into())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `--csi-endpoint`: one socket or a comma-separated list, each parsed on its own so an error
/// names the bad one.
fn parse_endpoints(list: &str) -> anyhow::Result<Vec<Endpoint>> {
    let endpoints = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| Endpoint::parse(e).with_context(|| format!("--csi-endpoint {e:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!endpoints.is_empty(), "--csi-endpoint: no socket given");
    Ok(endpoints)
}

#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Crds) = cli.cmd {
        print!("{}", stowage_provisioner::snapshot::types::crds_yaml()?);
        return Ok(());
    }
    stowage_csi::logging::init(&cli.common.log_format)?;
    let endpoints = parse_endpoints(&cli.common.csi_endpoint)?;
    let rate = Rate {
        qps: cli.common.kube_api_qps,
        burst: cli.common.kube_api_burst,
    };
    anyhow::ensure!(rate.qps > 0.0, "--kube-api-qps must be positive");
    let client = stowage_provisioner::client::client(rate).await?;
    match cli.cmd {
        Some(Cmd::Import(a)) => {
            eprintln!(
                "stowage-provisioner import is deprecated and will be removed: use `stowage import` (same flags)"
            );
            let [endpoint] = endpoints.as_slice() else {
                anyhow::bail!(
                    "import: --csi-endpoint names {} sockets; import works on one driver at a time",
                    endpoints.len()
                );
            };
            let driver = Driver::connect(endpoint, cli.common.timeout, Duration::from_secs(10))
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
            let mut out = std::io::stdout();
            import::run(&client, &driver, &opts, &mut out).await?;
            Ok(())
        }
        Some(Cmd::Crds) => Ok(()),
        None => run(cli.common, cli.run, client, endpoints).await,
    }
}

async fn run(
    common: Common,
    args: RunArgs,
    client: kube::Client,
    endpoints: Vec<Endpoint>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    if !args.metrics_address.is_empty() {
        let addr: SocketAddr = args.metrics_address.parse().context("--metrics-address")?;
        let (bound, server) = stowage_provisioner::metrics::serve(addr, metrics.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(address = %bound, "serving /metrics and /healthz");
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    // Every driver must answer before any duty starts, and no two sockets may serve the same
    // driver (they would contend for one lease under one identity).
    let (timeout, wait) = (common.timeout, args.driver_wait);
    let drivers = futures::future::try_join_all(endpoints.iter().map(|endpoint| async move {
        Driver::connect(endpoint, timeout, wait)
            .await
            .with_context(|| format!("connecting to the CSI driver at {endpoint}"))
            .map(|d| (d, endpoint.clone()))
    }))
    .await?;
    for (i, (d, e)) in drivers.iter().enumerate() {
        if let Some((_, first)) = drivers[..i].iter().find(|(o, _)| o.name == d.name) {
            anyhow::bail!(
                "--csi-endpoint: {first} and {e} both serve driver {}",
                d.name
            );
        }
    }
    let id = identity(args.identity.clone());
    // One set of duties per driver. If one driver's duties fail (a lost lease), the process
    // exits: a restarted replica is the one way back to a known state for all of them.
    futures::future::try_join_all(drivers.into_iter().map(|(driver, endpoint)| {
        run_driver(
            &args,
            client.clone(),
            metrics.clone(),
            id.clone(),
            driver,
            endpoint,
        )
    }))
    .await?;
    Ok(())
}

/// One driver's duties, behind its own leader lease (`stowage-provisioner-<driver>`).
async fn run_driver(
    args: &RunArgs,
    client: kube::Client,
    metrics: Arc<Metrics>,
    id: String,
    driver: Driver,
    endpoint: Endpoint,
) -> anyhow::Result<()> {
    // Kept for the log lines after `driver` moved into the duties.
    let name = driver.name.clone();
    let mode = match args.binder {
        Binder::Kcm => BinderMode::Kcm,
        Binder::Builtin => BinderMode::Builtin,
    };
    tracing::info!(driver = %driver.name, caps = ?driver.caps, binder = ?mode, %endpoint, "stowage-provisioner starting");
    let settings = Settings {
        mode,
        workers: args.workers.max(1),
        resync: args.resync,
        pending_resync: args.pending_resync,
        max_backoff: args.retry_max_delay,
        snapshot_common: args.snapshot_common,
    };
    let (duties, skipped) = duties::select(&args.controllers, driver.caps);
    for (d, why) in skipped {
        tracing::info!(
            controller = d.as_str(),
            reason = why,
            "controller not started"
        );
    }
    anyhow::ensure!(
        !duties.is_empty(),
        "--controllers: nothing to run for driver {}",
        driver.name
    );

    if !args.leader_elect {
        metrics.leader.inc();
        duties::run(
            client,
            driver,
            settings,
            metrics,
            id,
            duties,
            shutdown_signal(),
        )
        .await;
        tracing::info!(driver = %name, "stowage-provisioner stopped");
        return Ok(());
    }

    let lease_secs = args.leader_election_lease_duration.as_secs().max(2);
    let lease = format!("stowage-provisioner-{name}");
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease)
        .with_namespace(&args.leader_election_namespace)
        .with_identity(&id)
        .with_duration(lease_secs)
        .with_grace((lease_secs / 3).max(1))
        .build()
        .await
        .with_context(|| format!("setting up leader election for {name}"))?;
    let (mut leader, task) = manager.watch().await;
    tracing::info!(lease = %lease, namespace = %args.leader_election_namespace, identity = %id, "waiting to become the leader");
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            r = leader.changed() => r.with_context(|| format!("{name}: leader election stopped"))?,
            _ = &mut signal => {
                drop(leader);
                let _ = task.await;
                return Ok(());
            }
        }
    }
    tracing::info!(driver = %name, identity = %id, "became the leader");
    metrics.leader.inc();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watch_leader = async move {
        let lost = loop {
            tokio::select! {
                r = leader.changed() => {
                    if r.is_err() || !*leader.borrow_and_update() {
                        break true;
                    }
                }
                _ = &mut signal => break false,
            }
        };
        let _ = stop_tx.send(());
        // Dropping the receiver makes the lease manager release the lease, so a standby
        // replica takes over at once instead of after the lease expires.
        drop(leader);
        lost
    };
    let controllers = duties::run(
        client,
        driver,
        settings,
        metrics.clone(),
        id,
        duties,
        async move {
            let _ = stop_rx.await;
        },
    );
    let (lost, ()) = tokio::join!(watch_leader, controllers);
    metrics.leader.dec();
    let _ = task.await;
    if lost {
        // Another replica may already act; going on would risk two writers.
        anyhow::bail!("{name}: lost the leader lease; exiting so that only one replica acts");
    }
    tracing::info!(driver = %name, "stowage-provisioner stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn endpoint_lists() {
        let e = parse_endpoints("unix:///csi/a.sock, unix:///csi/b.sock,").unwrap();
        assert_eq!(
            e,
            [
                Endpoint::Unix("/csi/a.sock".into()),
                Endpoint::Unix("/csi/b.sock".into())
            ]
        );
        assert_eq!(parse_endpoints("/csi/a.sock").unwrap().len(), 1);
        let err = format!(
            "{:#}",
            parse_endpoints("unix:///a.sock,relative.sock").unwrap_err()
        );
        assert!(err.contains("--csi-endpoint \"relative.sock\""), "{err}");
        assert!(parse_endpoints(" , ").is_err());
    }

    #[test]
    fn cli_parses() {
        Cli::command_for_test();
    }

    impl Cli {
        fn command_for_test() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
            let c = Cli::try_parse_from(["p", "--binder", "builtin", "--leader-elect", "false"])
                .unwrap();
            assert!(matches!(c.run.binder, Binder::Builtin));
            assert!(!c.run.leader_elect);
            assert_eq!(
                c.run.controllers,
                [Duty::Provision, Duty::Attach, Duty::Resize, Duty::Snapshot]
            );
            assert!(c.run.snapshot_common);
            let c = Cli::try_parse_from(["p", "--snapshot-common=false"]).unwrap();
            assert!(!c.run.snapshot_common);
            let c = Cli::try_parse_from(["p", "--controllers", "attach,resize"]).unwrap();
            assert_eq!(c.run.controllers, [Duty::Attach, Duty::Resize]);
            assert!(Cli::try_parse_from(["p", "--controllers", "snapshots"]).is_err());
            let c = Cli::try_parse_from(["p", "import", "--all", "--reclaim-policy", "Delete"])
                .unwrap();
            assert!(matches!(
                c.cmd,
                Some(Cmd::Import(ImportArgs { all: true, .. }))
            ));
        }
    }
}
