//! Benchmark: N claims against the real API server on the local backend, until all are Bound.
//! Prints the time, claims per second and the provisioner's peak RSS, for Stowage's defaults and
//! for a baseline run in the same process with external-provisioner's defaults (client QPS 5,
//! burst 10, 100 workers), and the ratio of the two rates.
//!
//!   cargo run -p stowage-tests --bin stowage-bench-provisioner -- [--claims 1000] [--baseline-claims 100] [--binder kcm|builtin] [--no-resync]
//!
//! After the run the provisioner is restarted over the Bound claims and the bench times that
//! full resync and counts its API writes (`--no-resync` skips it).
//!
//! Uses the cluster of a sourced `kube.sh` env file, or starts (and stops) its own with
//! tests/infra/kube.sh (`--no-pv-binder` for --binder builtin).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use stowage_tests::provisioner::{Binder, Cluster, Provisioner, World, cluster, peak_rss_kib};

struct Run {
    label: String,
    claims: usize,
    created_s: f64,
    bound_s: f64,
    p50_s: f64,
    p95_s: f64,
    rss_kib: u64,
    /// API writes during the run (claim creation by the bench excluded), by verb and resource.
    writes: BTreeMap<String, f64>,
    /// A restarted provisioner's full resync of the Bound claims.
    resync: Option<Resync>,
}

struct Resync {
    /// From the restart until every claim and volume was synced once.
    secs: f64,
    /// API writes from the restart until 3 s after the last sync (should be none).
    writes: BTreeMap<String, f64>,
    /// The restarted provisioner's VmRSS once its caches hold everything.
    rss_kib: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.claims as f64 / self.bound_s
    }

    fn writes_per_claim(&self) -> f64 {
        self.writes.values().sum::<f64>() / self.claims as f64
    }

    fn writes_detail(&self) -> String {
        self.writes
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", v / self.claims as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const WRITE_VERBS: [&str; 5] = ["POST", "PUT", "PATCH", "DELETE", "APPLY"];

/// kube-apiserver's `apiserver_request_total` summed by "VERB resource[/subresource]" (all
/// response codes, conflicts included: they cost the server as much as a success).
pub fn request_totals(cluster: &Cluster) -> Result<BTreeMap<String, f64>> {
    let text = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(",")
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
        let key = if sub.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{sub}")
        };
        *out.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// Writes between two `request_totals` snapshots.
fn write_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| WRITE_VERBS.iter().any(|v| k.starts_with(&format!("{v} "))))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn run_once(
    cluster: &Cluster,
    label: &str,
    n: usize,
    extra: &[&str],
    resync: bool,
) -> Result<Run> {
    let mut w = World::bare("bench", cluster.clone()).await?;
    let r = measure(&mut w, label, n, extra, resync).await;
    // The provisioner's logs outlive the run's temporary directory, for a look afterwards.
    let keep = std::env::temp_dir().join("stowage-bench-provisioner-logs");
    if std::fs::create_dir_all(&keep).is_ok()
        && let Ok(dir) = std::fs::read_dir(w.dir.path())
    {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        eprintln!("logs kept in {}", keep.display());
    }
    eprintln!("cleaning up {label}...");
    // Delete claims and PVs directly: the point is to measure provisioning, not deletion.
    if let Some(p) = w.prov.as_mut() {
        p.kill();
    }
    let pvs: Api<PersistentVolume> = w.pvs();
    if let Ok(list) = pvs.list(&ListParams::default()).await {
        for pv in list.items {
            let ns = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.namespace.clone());
            if ns.as_deref() == Some(w.ns.as_str()) {
                let name = pv.metadata.name.unwrap_or_default();
                let _ = pvs
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = pvs.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
    w.cleanup().await;
    r
}

async fn measure(
    w: &mut World,
    label: &str,
    n: usize,
    extra: &[&str],
    resync: bool,
) -> Result<Run> {
    let class = w
        .create_class("bench", json!({"reclaimPolicy": "Delete"}))
        .await?;
    w.prov = Some(Provisioner::start(
        w.dir.path(),
        label,
        &w.sa_kubeconfig,
        &w.ctl_endpoint,
        w.binder(),
        extra,
    )?);
    // Let it connect and fill its caches before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pvcs: Api<PersistentVolumeClaim> = w.pvcs();
    let before = request_totals(&w.cluster)?;
    let start = Instant::now();
    // A watch, not a LIST per poll: listing a thousand claims four times a second would cost
    // the API server more than the provisioner does.
    let (bound_tx, mut bound_rx) = tokio::sync::mpsc::unbounded_channel::<(String, f64)>();
    let watch = {
        let pvcs = pvcs.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            use kube::runtime::{WatchStreamExt, watcher};
            let mut s = std::pin::pin!(
                watcher(pvcs, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(ev) = s.next().await {
                let Ok(c) = ev else { continue };
                if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
                    && bound_tx
                        .send((
                            c.metadata.name.clone().unwrap_or_default(),
                            start.elapsed().as_secs_f64(),
                        ))
                        .is_err()
                {
                    return;
                }
            }
        })
    };
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let pvcs = pvcs.clone();
        let next = next.clone();
        let class = class.clone();
        let ns = w.ns.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": {"name": format!("c{i:05}"), "namespace": ns},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                             "resources": {"requests": {"storage": "1Mi"}}}
                }))?;
                pvcs.create(&PostParams::default(), &pvc).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let created_s = start.elapsed().as_secs_f64();
    let mut bound_at: Vec<f64> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    let deadline = start + Duration::from_secs(3600);
    let mut last_print = Instant::now();
    while seen.len() < n {
        if Instant::now() > deadline {
            bail!(
                "{label}: only {} of {n} claims bound after an hour",
                seen.len()
            );
        }
        if w.prov.as_mut().is_some_and(|p| p.exited()) {
            bail!("{label}: the provisioner exited:\n{}", w.prov_log());
        }
        match tokio::time::timeout(Duration::from_millis(250), bound_rx.recv()).await {
            Ok(Some((name, at))) => {
                if seen.insert(name) {
                    bound_at.push(at);
                }
            }
            Ok(None) => bail!("{label}: the claim watch ended"),
            Err(_) => {}
        }
        if last_print.elapsed() > Duration::from_millis(500) {
            last_print = Instant::now();
            eprint!(
                "\r{label}: {}/{n} bound after {:.1}s   ",
                seen.len(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    watch.abort();
    eprintln!();
    let bound_s = start.elapsed().as_secs_f64();
    // Trailing writes (a phase written after the claim is Bound, events) belong to the run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut writes = write_delta(&before, &request_totals(&w.cluster)?);
    // The bench's own claim creation is not the provisioner's work.
    if let Some(v) = writes.get_mut("POST persistentvolumeclaims") {
        *v -= n as f64;
    }
    writes.retain(|_, v| *v > 0.0);
    bound_at.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| bound_at[((bound_at.len() as f64 * p) as usize).min(bound_at.len() - 1)];
    let pid = w.prov.as_ref().map(|p| p.pid()).context("no provisioner")?;
    let rss_kib = peak_rss_kib(pid).context("reading the provisioner's VmHWM")?;
    let backend = w.backend_dirs().len();
    if backend != n {
        bail!("{label}: {backend} backend volumes for {n} claims");
    }
    let resync = if resync {
        Some(measure_resync(w, label, n, extra).await?)
    } else {
        None
    };
    Ok(Run {
        resync,
        label: label.to_owned(),
        claims: n,
        created_s,
        bound_s,
        p50_s: pct(0.5),
        p95_s: pct(0.95),
        rss_kib,
        writes,
    })
}

/// What the provisioner's flags default to (provisioner/src/main.rs).
const STOWAGE_DEFAULTS: &str = "stowage defaults: QPS 200, burst 400, 64 workers";

/// Restarts the provisioner over the Bound claims (a full resync: every claim and volume is
/// synced again from a fresh list) and counts what that writes: nothing, when every decision
/// sees the world as converged.
async fn measure_resync(w: &mut World, label: &str, n: usize, extra: &[&str]) -> Result<Resync> {
    if let Some(p) = w.prov.as_mut() {
        p.kill();
    }
    let before = request_totals(&w.cluster)?;
    let start = Instant::now();
    let prov = Provisioner::start(
        w.dir.path(),
        &format!("{label}-resync"),
        &w.sa_kubeconfig,
        &w.ctl_endpoint,
        w.binder(),
        extra,
    )?;
    w.prov = Some(prov);
    let synced = |text: &str, kind: &str| -> f64 {
        let want = format!("stowage_provisioner_syncs_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = start + Duration::from_secs(600);
    let secs = loop {
        let p = w.prov.as_mut().context("no provisioner")?;
        if p.exited() {
            bail!(
                "{label}: the restarted provisioner exited:\n{}",
                p.log_text()
            );
        }
        if let Ok((_, text)) = p.http_get("/metrics")
            && synced(&text, "claim") >= n as f64
            && synced(&text, "volume") >= n as f64
        {
            break start.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("{label}: the restarted provisioner did not sync {n} claims in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = write_delta(&before, &request_totals(&w.cluster)?);
    let pid = w.prov.as_ref().map(|p| p.pid()).context("no provisioner")?;
    let rss_kib = rss_kib(pid).context("reading the provisioner's VmRSS")?;
    Ok(Resync {
        secs,
        writes,
        rss_kib,
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn kube_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("infra/kube.sh")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = arg(&args, "--claims")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let nb: usize = arg(&args, "--baseline-claims")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);
    let no_resync = args.iter().any(|a| a == "--no-resync");
    let want = match arg(&args, "--binder").as_deref() {
        None | Some("kcm") => Binder::Kcm,
        Some("builtin") => Binder::Builtin,
        Some(o) => bail!("--binder {o}: expected kcm or builtin"),
    };

    // Our own cluster unless one is configured in the environment.
    let mut own_state: Option<PathBuf> = None;
    let cl = match cluster("bench-provisioner") {
        Some(c) => c,
        None => {
            let state =
                std::env::temp_dir().join(format!("stowage-bench-kube-{}", std::process::id()));
            let mut cmd = Command::new(kube_sh());
            cmd.arg("start").arg("--state").arg(&state);
            if want == Binder::Builtin {
                cmd.arg("--no-pv-binder");
            }
            // kube.sh prints the state dir on stdout; our stdout is the report.
            let st = cmd
                .stdout(std::process::Stdio::null())
                .status()
                .context("running tests/infra/kube.sh start")?;
            if !st.success() {
                bail!("kube.sh start failed");
            }
            own_state = Some(state.clone());
            Cluster::from_env_file(&state.join("env"))?
        }
    };
    if cl.binder != want {
        bail!(
            "the configured cluster's binder is {:?}, --binder asks for {want:?}",
            cl.binder
        );
    }

    let result = async {
        // --baseline-claims 0 skips the baseline run.
        let base = if nb == 0 {
            None
        } else {
            Some(
                run_once(
                    &cl,
                    "baseline",
                    nb,
                    &[
                        "--kube-api-qps",
                        "5",
                        "--kube-api-burst",
                        "10",
                        "--workers",
                        "100",
                    ],
                    false,
                )
                .await?,
            )
        };
        let ours = run_once(&cl, "stowage", n, &[], !no_resync).await?;
        Ok::<_, anyhow::Error>((base, ours))
    }
    .await;
    if let Some(state) = &own_state {
        let _ = Command::new(kube_sh())
            .arg("stop")
            .arg("--state")
            .arg(state)
            .status();
        let _ = std::fs::remove_dir_all(state);
    }
    let (base, ours) = result?;
    println!(
        "bench-provisioner: binder {}, local backend, real kube-apiserver",
        want.flag()
    );
    let runs = [
        base.as_ref().map(|b| {
            (
                b,
                "external-provisioner defaults: QPS 5, burst 10, 100 workers",
            )
        }),
        Some((&ours, STOWAGE_DEFAULTS)),
    ];
    for (r, what) in runs.into_iter().flatten() {
        println!(
            "{:<9} ({what}): {} claims created in {:.1}s, all Bound after {:.1}s = {:.1} claims/s; p50 {:.1}s p95 {:.1}s; provisioner peak RSS {:.1} MiB",
            r.label,
            r.claims,
            r.created_s,
            r.bound_s,
            r.rate(),
            r.p50_s,
            r.p95_s,
            r.rss_kib as f64 / 1024.0
        );
        println!(
            "{:<9} API writes per claim (all clients, bench's claim creation excluded): {:.2} = {}",
            r.label,
            r.writes_per_claim(),
            r.writes_detail()
        );
        if let Some(rs) = &r.resync {
            // kube-apiserver renews its own identity Lease every 10 s; the provisioner runs
            // without leader election here, so leases are not its writes.
            let total: f64 = rs
                .writes
                .iter()
                .filter(|(k, _)| !k.ends_with(" leases"))
                .map(|(_, v)| v)
                .fold(0.0, |a, b| a + b);
            println!(
                "{:<9} resync after a restart: {} claims and volumes synced in {:.1}s, {total:.0} API writes by the provisioner (all writes: {}); provisioner RSS {:.1} MiB with every claim and volume cached",
                r.label,
                r.claims,
                rs.secs,
                rs.writes
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                rs.rss_kib as f64 / 1024.0
            );
        }
    }
    if let Some(base) = &base {
        println!(
            "ratio (claims/s, stowage / baseline): {:.2}x",
            ours.rate() / base.rate()
        );
    }
    Ok(())
}
