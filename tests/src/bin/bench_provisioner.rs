//! Benchmark: N claims against the real API server on the local backend, until all are Bound.
//! Prints the time, claims per second and the provisioner's peak RSS, for Stowage's defaults and
//! for a baseline run in the same process with external-provisioner's defaults (client QPS 5,
//! burst 10, 100 workers), and the ratio of the two rates.
//!
//!   cargo run -p stowage-tests --bin stowage-bench-provisioner -- [--claims 1000] [--baseline-claims 100] [--binder kcm|builtin]
//!
//! Uses the cluster of a sourced `kube.sh` env file, or starts (and stops) its own with
//! tests/infra/kube.sh (`--no-pv-binder` for --binder builtin).

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
}

impl Run {
    fn rate(&self) -> f64 {
        self.claims as f64 / self.bound_s
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn run_once(cluster: &Cluster, label: &str, n: usize, extra: &[&str]) -> Result<Run> {
    let mut w = World::bare("bench", cluster.clone()).await?;
    let r = measure(&mut w, label, n, extra).await;
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

async fn measure(w: &mut World, label: &str, n: usize, extra: &[&str]) -> Result<Run> {
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
    let start = Instant::now();
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
        let list = pvcs.list(&ListParams::default()).await?;
        let now = start.elapsed().as_secs_f64();
        for c in list.items {
            let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            if bound && seen.insert(c.metadata.name.clone().unwrap_or_default()) {
                bound_at.push(now);
            }
        }
        eprint!("\r{label}: {}/{n} bound after {now:.1}s   ", seen.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!();
    let bound_s = start.elapsed().as_secs_f64();
    bound_at.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| bound_at[((bound_at.len() as f64 * p) as usize).min(bound_at.len() - 1)];
    let pid = w.prov.as_ref().map(|p| p.pid()).context("no provisioner")?;
    let rss_kib = peak_rss_kib(pid).context("reading the provisioner's VmHWM")?;
    let backend = w.backend_dirs().len();
    if backend != n {
        bail!("{label}: {backend} backend volumes for {n} claims");
    }
    Ok(Run {
        label: label.to_owned(),
        claims: n,
        created_s,
        bound_s,
        p50_s: pct(0.5),
        p95_s: pct(0.95),
        rss_kib,
    })
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
        let base = run_once(
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
        )
        .await?;
        let ours = run_once(&cl, "stowage", n, &[]).await?;
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
    for (r, what) in [
        (
            &base,
            "external-provisioner defaults: QPS 5, burst 10, 100 workers",
        ),
        (&ours, "stowage defaults: QPS 50, burst 100, 32 workers"),
    ] {
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
    }
    println!(
        "ratio (claims/s, stowage / baseline): {:.2}x",
        ours.rate() / base.rate()
    );
    Ok(())
}
