//! The `stowage` admin CLI against the real control plane of tests/infra/kube.sh, the real
//! stowage-controller (local backend) and stowage-provisioner: `stowage status` must list
//! what the API server holds and pick out the stuck items with the cluster's own reasons.
//! Suite tests/suites/87-cli.sh. One test at a time (they share the cluster).

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use stowage_tests::bin;
use stowage_tests::provisioner::{World, serial, wait_for, with_world};

const T: Duration = Duration::from_secs(60);

fn stowage(w: &World, args: &[&str]) -> Result<Output> {
    Command::new(bin("stowage")?)
        .args(args)
        .env("KUBECONFIG", &w.cluster.admin_kubeconfig)
        .output()
        .context("running stowage")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn status_json(w: &World) -> Result<Value> {
    let o = stowage(w, &["status", "-o", "json", "--pending-after", "0"])?;
    ensure!(o.status.success(), "stowage status failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).with_context(|| format!("status JSON: {}", text(&o)))
}

fn find(list: &Value, f: impl Fn(&Value) -> bool) -> Option<&Value> {
    list.as_array()?.iter().find(|v| f(v))
}

fn problem<'a>(r: &'a Value, kind: &str, name: &str) -> Option<&'a Value> {
    find(&r["problems"], |p| p["kind"] == kind && p["name"] == name)
}

#[tokio::test]
async fn status_lists_and_explains() -> Result<()> {
    let _g = serial().await;
    with_world("cli_status", true, async |w: &mut World| {
        let ns = w.ns.clone();
        // A bound claim.
        let good = w.create_class("fast", json!({"reclaimPolicy": "Delete"})).await?;
        w.create_claim("data", Some(&good), "64Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let pv_name = pv.metadata.name.clone().unwrap_or_default();
        // A claim whose class has a parameter the driver refuses: Pending with an event.
        let bad = w
            .create_class("bad", json!({"parameters": {"bogusParam": "1"}}))
            .await?;
        w.create_claim("stuck", Some(&bad), "64Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        w.wait_event(&ns, "PersistentVolumeClaim", "stuck", "ProvisioningFailed", T)
            .await?;
        // A PV whose claim is gone: Released, kept by Retain.
        let kept = format!("{ns}-kept");
        let pv_obj = json!({
            "metadata": {"name": kept},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": format!("{ns}-none"),
                     "claimRef": {"namespace": ns, "name": "gone", "uid": "6b1c7b0e-0000-4000-8000-000000000001"},
                     "csi": {"driver": w.driver, "volumeHandle": "default/not-there"}}
        });
        w.pvs()
            .create(&PostParams::default(), &serde_json::from_value(pv_obj)?)
            .await?;
        w.wait_pv_phase(&kept, "Released", T).await?;
        // An attachment to a node without a CSINode: the provisioner's attach duty sets
        // attachError.
        let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
        let va_name = format!("{ns}-va");
        let va: VolumeAttachment = serde_json::from_value(json!({
            "metadata": {"name": va_name},
            "spec": {"attacher": w.driver, "nodeName": format!("{ns}-ghost"),
                     "source": {"persistentVolumeName": pv_name}}
        }))?;
        vas.create(&PostParams::default(), &va).await?;
        wait_for("attachError", T, || {
            let vas = vas.clone();
            let n = va_name.clone();
            async move {
                Ok(vas
                    .get_opt(&n)
                    .await?
                    .filter(|v| v.status.as_ref().is_some_and(|s| s.attach_error.is_some())))
            }
        })
        .await?;

        let r = status_json(w)?;
        let c = find(&r["claims"], |c| c["namespace"] == ns.as_str() && c["name"] == "data")
            .context("claim data not listed")?;
        ensure!(c["phase"] == "Bound" && c["volume"] == pv_name.as_str(), "{c}");
        ensure!(c["backend"] == "local" && c["class"] == good.as_str(), "{c}");
        let v = find(&r["volumes"], |v| v["name"] == pv_name.as_str()).context("PV not listed")?;
        ensure!(v["phase"] == "Bound" && v["claim"] == format!("{ns}/data"), "{v}");
        ensure!(v["capacity"] == "64Mi" && v["attach"] == "error", "{v}");
        let p = problem(&r, "PersistentVolumeClaim", "stuck").context("stuck claim not reported")?;
        let reason = p["reason"].as_str().unwrap_or_default();
        ensure!(p["state"] == "Pending", "{p}");
        ensure!(
            reason.contains("ProvisioningFailed") && reason.contains("bogusParam"),
            "{p}"
        );
        let p = problem(&r, "PersistentVolume", &kept).context("released PV not reported")?;
        ensure!(p["state"] == "Released", "{p}");
        ensure!(p["reason"].as_str().unwrap_or_default().contains("Retain"), "{p}");
        let p = problem(&r, "VolumeAttachment", &va_name).context("attachError not reported")?;
        ensure!(
            p["reason"].as_str().unwrap_or_default().contains("CSINode"),
            "{p}"
        );
        ensure!(
            problem(&r, "PersistentVolumeClaim", "data").is_none(),
            "a bound claim reported as stuck: {r}"
        );

        // The table and YAML forms say the same.
        let o = stowage(w, &["status", "--pending-after", "0", "-n", &ns])?;
        let t = text(&o);
        ensure!(o.status.success(), "{t}");
        ensure!(t.contains("STUCK") && t.contains(&format!("{ns}/stuck")), "{t}");
        ensure!(t.contains("fix: "), "{t}");
        println!("stowage status (table):\n{}", String::from_utf8_lossy(&o.stdout));
        let o = stowage(w, &["status", "-o", "yaml", "-n", &ns])?;
        ensure!(o.status.success(), "{}", text(&o));
        let y = String::from_utf8_lossy(&o.stdout);
        ensure!(y.contains("problems:") && y.contains(&pv_name), "{y}");
        let o = stowage(w, &["status", "-o", "wide", "-n", &ns])?;
        ensure!(
            String::from_utf8_lossy(&o.stdout).contains("default/"),
            "wide output lacks the handle: {}",
            text(&o)
        );
        let _ = vas.delete(&va_name, &DeleteParams::default()).await;
        Ok(())
    })
    .await
}

/// The NFS server of the suite (tests/infra/ganesha.sh's env file): (server, export, nfs
/// port, mount port).
fn ganesha() -> Result<(String, String, String, String)> {
    let path = std::env::var("STOWAGE_CLI_GANESHA_ENV")
        .context("STOWAGE_CLI_GANESHA_ENV unset: doctor's NFS checks need nfs-ganesha (tests/suites/87-cli.sh starts it)")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
            .with_context(|| format!("{path} has no {k}"))
    };
    Ok((
        get("NFS_SERVER")?,
        get("NFS_EXPORT")?,
        get("NFS_PORT")?,
        get("MNT_PORT")?,
    ))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A kubelet root that is a shared bind mount of itself (what a node with systemd has), undone
/// on drop.
struct SharedRoot(std::path::PathBuf);

impl SharedRoot {
    fn new(path: std::path::PathBuf) -> Result<SharedRoot> {
        std::fs::create_dir_all(&path)?;
        let p = path.to_string_lossy().into_owned();
        for args in [vec!["--bind", &p, &p], vec!["--make-shared", &p]] {
            let st = Command::new("mount").args(&args).status()?;
            ensure!(st.success(), "mount {args:?} failed (root needed)");
        }
        Ok(SharedRoot(path))
    }
}

impl Drop for SharedRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn doctor_json(w: &World, args: &[&str]) -> Result<(i32, Value, String)> {
    let mut all = vec!["doctor", "-o", "json"];
    all.extend_from_slice(args);
    let o = stowage(w, &all)?;
    let v: Value =
        serde_json::from_slice(&o.stdout).with_context(|| format!("doctor JSON: {}", text(&o)))?;
    Ok((o.status.code().unwrap_or(-1), v, text(&o)))
}

fn check<'a>(r: &'a Value, level: &str, name_part: &str) -> Option<&'a Value> {
    find(&r["checks"], |c| {
        c["level"] == level && c["name"].as_str().unwrap_or_default().contains(name_part)
    })
}

/// The world of the doctor tests: a stowage-node registering local and NFS drivers in a
/// shared kubelet root, the CSINode the kubelet would write, the CSIDrivers and a
/// StorageClass per driver, and a config with one good instance of each.
struct Node {
    node: stowage_tests::Plugin,
    root: SharedRoot,
    cfg: std::path::PathBuf,
    name: String,
}

async fn doctor_world(w: &World) -> Result<Node> {
    let (server, export, port, mport) = ganesha()?;
    let cfg = w.dir.path().join("doctor.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backends:\n  - backend: local\n    instances:\n      default: {{ baseDir: {} }}\n  - backend: nfs\n    instances:\n      main: {{ server: {server}, export: {export}, nfsPort: {port}, mountPort: {mport}, timeoutSecs: 5 }}\n",
            w.base.display()
        ),
    )?;
    let root = SharedRoot::new(w.dir.path().join("kubelet"))?;
    let name = format!("{}-node", w.ns);
    let node_dir = w.dir.path().join("node");
    std::fs::create_dir_all(&node_dir)?;
    let rootp = root.0.to_string_lossy().into_owned();
    let node = stowage_tests::Plugin::spawn(
        "stowage-node",
        &node_dir,
        &format!("unix://{}", node_dir.join("{driver}.sock").display()),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "--node-id",
            &name,
            "--kubelet-root",
            &rootp,
            "--kubelet-registration",
            "true",
        ],
    )?;
    for d in ["local.stowage.io", "nfs.stowage.io"] {
        let sock = root
            .0
            .join("plugins_registry")
            .join(format!("{d}-reg.sock"));
        wait_for(&format!("{} to appear", sock.display()), T, || {
            let s = sock.clone();
            async move { Ok(s.exists().then_some(())) }
        })
        .await?;
    }
    let csidriver =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../provisioner/deploy/csidriver");
    for f in ["local.yaml", "nfs.yaml"] {
        w.cluster
            .kubectl(&["apply", "-f", &csidriver.join(f).to_string_lossy()])?;
    }
    let csinode: k8s_openapi::api::storage::v1::CSINode = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"drivers": [{"name": "local.stowage.io", "nodeID": name}, {"name": "nfs.stowage.io", "nodeID": name}]}
    }))?;
    Api::<k8s_openapi::api::storage::v1::CSINode>::all(w.client.clone())
        .create(&PostParams::default(), &csinode)
        .await?;
    w.create_class("local", json!({})).await?;
    let nfs_class: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": {"name": w.class_name("nfs")}, "provisioner": "nfs.stowage.io"
    }))?;
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(w.client.clone())
        .create(&PostParams::default(), &nfs_class)
        .await?;
    Ok(Node {
        node,
        root,
        cfg,
        name,
    })
}

async fn drop_csinode(w: &World, name: &str) {
    let _ = Api::<k8s_openapi::api::storage::v1::CSINode>::all(w.client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

fn node_args<'a>(n: &'a Node, root: &'a str, cfg: &'a str) -> Vec<&'a str> {
    vec![
        "--node",
        "--node-name",
        &n.name,
        "--kubelet-root",
        root,
        "--config",
        cfg,
    ]
}

#[tokio::test]
async fn doctor_healthy_then_broken_node() -> Result<()> {
    let _g = serial().await;
    with_world("cli_doctor_node", false, async |w: &mut World| {
        let mut n = doctor_world(w).await?;
        let root = n.root.0.to_string_lossy().into_owned();
        let cfg = n.cfg.to_string_lossy().into_owned();
        let r = async {
            let (code, r, t) = doctor_json(w, &node_args(&n, &root, &cfg))?;
            // A kernel without an NFS client (these hosts) is the one thing doctor may find
            // wrong here: NodeStage of an NFS volume could not mount on it.
            let fails: Vec<&Value> = r["checks"]
                .as_array()
                .context("checks")?
                .iter()
                .filter(|c| c["level"] == "FAIL")
                .collect();
            ensure!(
                fails.iter().all(|c| c["name"] == "kernel: nfs"),
                "healthy setup reported failures other than the kernel's NFS client: {t}"
            );
            ensure!((code == 0) == fails.is_empty(), "exit code {code}: {t}");
            let no_nfs_here = !std::fs::read_to_string("/proc/filesystems")?
                .lines()
                .any(|l| l.split_whitespace().last() == Some("nfs"))
                && !std::path::Path::new("/sys/module/nfs").exists()
                && !std::path::Path::new("/proc/modules").exists();
            if no_nfs_here {
                let c = check(&r, "FAIL", "kernel: nfs").context(t.clone())?;
                ensure!(
                    c["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("cannot load modules"),
                    "{c}"
                );
            }
            for part in [
                "kernel: loop",
                "/dev/fuse",
                "mount propagation",
                "local.stowage.io-reg.sock",
                "nfs.stowage.io-reg.sock",
                "local.stowage.io",
                "nfs/main",
                "local/default",
                "RBAC of system:serviceaccount:stowage-system:stowage-provisioner",
                "CSIDriver nfs.stowage.io",
            ] {
                ensure!(
                    check(&r, "OK", part).is_some(),
                    "no OK check for {part}: {t}"
                );
            }
            let o = stowage(
                w,
                &[
                    "doctor",
                    "--node",
                    "--node-name",
                    &n.name,
                    "--kubelet-root",
                    &root,
                    "--config",
                    &cfg,
                ],
            )?;
            println!(
                "stowage doctor (healthy):\n{}",
                String::from_utf8_lossy(&o.stdout)
            );

            // RBAC of an account that has none.
            let other = format!("{}/nobody", w.ns);
            let (code, r, t) = doctor_json(w, &["--config", &cfg, "--service-account", &other])?;
            ensure!(code == 1, "{t}");
            let c = check(&r, "FAIL", "RBAC of").context(t.clone())?;
            ensure!(
                c["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("create persistentvolumes"),
                "{c}"
            );

            // The node plugin dies (SIGKILL): its registration sockets stay behind, stale.
            n.node.kill();
            let (code, r, t) = doctor_json(w, &node_args(&n, &root, &cfg))?;
            ensure!(code == 1, "a dead node plugin was not caught: {t}");
            let c = check(&r, "FAIL", "local.stowage.io-reg.sock").context(t.clone())?;
            ensure!(
                c["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("does not answer"),
                "{c}"
            );
            ensure!(!c["hint"].as_str().unwrap_or_default().is_empty(), "{c}");
            // ... and removed: missing; the CSINode gone: caught too.
            let _ = std::fs::remove_file(n.root.0.join("plugins_registry/nfs.stowage.io-reg.sock"));
            drop_csinode(w, &n.name).await;
            let (code, r, t) = doctor_json(w, &node_args(&n, &root, &cfg))?;
            ensure!(code == 1, "{t}");
            let c = check(&r, "FAIL", "nfs.stowage.io-reg.sock").context(t.clone())?;
            ensure!(
                c["detail"].as_str().unwrap_or_default().contains("missing"),
                "{c}"
            );
            ensure!(
                check(&r, "FAIL", &format!("CSINode {}", n.name)).is_some(),
                "{t}"
            );
            let o = stowage(
                w,
                &[
                    "doctor",
                    "--node",
                    "--node-name",
                    &n.name,
                    "--kubelet-root",
                    &root,
                    "--config",
                    &cfg,
                ],
            )?;
            println!(
                "stowage doctor (broken node):\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
            Ok(())
        }
        .await;
        drop_csinode(w, &n.name).await;
        r
    })
    .await
}

#[tokio::test]
async fn doctor_broken_backend() -> Result<()> {
    let _g = serial().await;
    with_world("cli_doctor_backend", false, async |w: &mut World| {
        let (server, export, port, mport) = ganesha()?;
        let (p1, p2) = (free_port()?, free_port()?);
        let cfg = w.dir.path().join("broken.yaml");
        std::fs::write(
            &cfg,
            format!(
                "backend: nfs\ninstances:\n  good: {{ server: {server}, export: {export}, nfsPort: {port}, mountPort: {mport}, timeoutSecs: 5 }}\n  wrongport: {{ server: {server}, export: {export}, nfsPort: {p1}, mountPort: {p2}, timeoutSecs: 3 }}\n  wrongexport: {{ server: {server}, export: /no-such-export, nfsPort: {port}, mountPort: {mport}, timeoutSecs: 5 }}\n"
            ),
        )?;
        let cfg = cfg.to_string_lossy().into_owned();
        let (code, r, t) = doctor_json(w, &["--no-cluster", "--config", &cfg])?;
        ensure!(code == 1, "a broken backend was not caught: {t}");
        ensure!(check(&r, "OK", "nfs/good").is_some(), "{t}");
        let c = check(&r, "FAIL", "nfs/wrongport").context(t.clone())?;
        let d = c["detail"].as_str().unwrap_or_default();
        ensure!(d.contains(&p2.to_string()) || d.contains(&p1.to_string()), "{c}");
        ensure!(c["hint"].as_str().unwrap_or_default().contains("NFSv3"), "{c}");
        let c = check(&r, "FAIL", "nfs/wrongexport").context(t.clone())?;
        ensure!(c["detail"].as_str().unwrap_or_default().contains("/no-such-export"), "{c}");
        // --backend picks one instance; the good one alone passes.
        let (code, r, t) = doctor_json(w, &["--no-cluster", "--config", &cfg, "--backend", "nfs/good"])?;
        ensure!(code == 0 && r["checks"].as_array().map(Vec::len) == Some(1), "{t}");
        let (code, _, t) = doctor_json(w, &["--no-cluster", "--config", &cfg, "--backend", "nfs/none"])?;
        ensure!(code == 1, "{t}");
        let o = stowage(w, &["doctor", "--no-cluster", "--config", &cfg])?;
        println!("stowage doctor (broken backend):\n{}", String::from_utf8_lossy(&o.stdout));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn import_version_completions_man() -> Result<()> {
    let _g = serial().await;
    with_world("cli_import", false, async |w: &mut World| {
        // `stowage import` does what `stowage-provisioner import` did, with the same flags.
        let mut c =
            stowage_tests::controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
        c.controller
            .create_volume(stowage_tests::wire::create("legacy-cli", 1 << 30))
            .await?;
        let ep = w.ctl_endpoint.clone();
        let o = stowage(w, &["import", "--csi-endpoint", &ep])?;
        ensure!(o.status.success(), "{}", text(&o));
        ensure!(
            String::from_utf8_lossy(&o.stdout).contains("default/legacy-cli"),
            "{}",
            text(&o)
        );
        let class = w.class_name("imported");
        let o = stowage(
            w,
            &[
                "import",
                "--csi-endpoint",
                &ep,
                "--storage-class",
                &class,
                "default/legacy-cli",
            ],
        )?;
        let t = text(&o);
        ensure!(
            o.status.success() && t.contains("created PV stowage-default-legacy-cli-"),
            "{t}"
        );
        let pvs = w.pvs().list(&Default::default()).await?;
        let pv = pvs
            .items
            .iter()
            .find(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.storage_class_name.as_deref())
                    == Some(class.as_str())
            })
            .context("no imported PV in the API server")?;
        let spec = pv.spec.clone().unwrap_or_default();
        ensure!(
            spec.csi.map(|c| c.volume_handle) == Some("default/legacy-cli".into()),
            "{pv:?}"
        );
        ensure!(
            spec.persistent_volume_reclaim_policy.as_deref() == Some("Retain"),
            "{pv:?}"
        );
        // Not on a terminal (above): no escape codes. On one (a pseudo-terminal from
        // util-linux `script`): a progress bar over the volumes, and the report lines too.
        ensure!(!t.contains('\x1b'), "escape codes without a terminal: {t}");
        for n in ["tty-a", "tty-b", "tty-c"] {
            c.controller
                .create_volume(stowage_tests::wire::create(n, 1 << 20))
                .await?;
        }
        let tty_class = w.class_name("imported-tty");
        // The command line reaches the shell of `script -c` through the environment only.
        let o = Command::new("script")
            .args(["-qefc", r#"exec "$BIN" import --csi-endpoint "$EP" --storage-class "$SC" default/tty-a default/tty-b default/tty-c"#, "/dev/null"])
            .env("BIN", bin("stowage")?)
            .env("EP", &ep)
            .env("SC", &tty_class)
            .env("KUBECONFIG", &w.cluster.admin_kubeconfig)
            .env("COLUMNS", "120")
            .stdin(std::process::Stdio::null())
            .output()
            .context("running stowage import under script(1)")?;
        let t = text(&o);
        ensure!(o.status.success(), "{t}");
        ensure!(
            t.matches("created PV stowage-default-tty-").count() == 3,
            "three report lines expected: {t}"
        );
        ensure!(
            t.contains("importing") && t.contains('\x1b') && t.contains("/3"),
            "no progress bar drawn on a terminal: {t:?}"
        );
        // The old spelling still works and says it is deprecated.
        let o = Command::new(bin("stowage-provisioner")?)
            .args(["--csi-endpoint", &ep, "import"])
            .env("KUBECONFIG", &w.cluster.admin_kubeconfig)
            .output()?;
        ensure!(o.status.success(), "{}", text(&o));
        ensure!(
            String::from_utf8_lossy(&o.stderr).contains("deprecated"),
            "{}",
            text(&o)
        );

        // --version of every binary names the commit, and GetPluginInfo says the same.
        let mut lines = Vec::new();
        for b in [
            "stowage",
            "stowage-controller",
            "stowage-node",
            "stowage-provisioner",
        ] {
            let o = Command::new(bin(b)?).arg("--version").output()?;
            let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            ensure!(
                o.status.success() && line.starts_with(&format!("{b} 0.")),
                "{b}: {}",
                text(&o)
            );
            let v = line
                .split_once(' ')
                .map(|x| x.1.to_owned())
                .unwrap_or_default();
            ensure!(v.contains("(commit ") && !v.contains("unknown"), "{line}");
            lines.push(v);
        }
        ensure!(
            lines.windows(2).all(|p| p[0] == p[1]),
            "binaries disagree: {lines:?}"
        );
        let info = c
            .identity
            .get_plugin_info(stowage_csi::v1::GetPluginInfoRequest {})
            .await?
            .into_inner();
        ensure!(
            info.vendor_version == lines[0],
            "GetPluginInfo {:?} vs --version {:?}",
            info.vendor_version,
            lines[0]
        );

        // Completions that the shell accepts, and a man page that man renders.
        let dir = w.dir.path();
        for (shell, check) in [
            ("bash", vec!["bash", "-n"]),
            ("zsh", vec![]),
            ("fish", vec![]),
        ] {
            let o = stowage(w, &["completions", shell])?;
            let script = String::from_utf8_lossy(&o.stdout).into_owned();
            ensure!(
                o.status.success() && script.contains("doctor") && script.contains("status"),
                "{shell}: {}",
                text(&o)
            );
            if let [prog, args @ ..] = check.as_slice() {
                let f = dir.join(format!("completion.{shell}"));
                std::fs::write(&f, &script)?;
                let st = Command::new(prog).args(args).arg(&f).status()?;
                ensure!(st.success(), "{shell} rejects the completion script");
            }
        }
        let o = stowage(w, &["man"])?;
        let page = String::from_utf8_lossy(&o.stdout).into_owned();
        ensure!(
            o.status.success() && page.contains(".TH stowage 1"),
            "{}",
            text(&o)
        );
        let f = dir.join("stowage.1");
        std::fs::write(&f, &page)?;
        if let Ok(out) = Command::new("man")
            .arg("-l")
            .arg(&f)
            .env("MANPAGER", "cat")
            .env("COLUMNS", "100")
            .output()
        {
            let r = String::from_utf8_lossy(&out.stdout);
            ensure!(
                r.contains("SUBCOMMANDS") || r.contains("stowage-status") || r.contains("status"),
                "man output: {r}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn migrate_intree_nfs() -> Result<()> {
    let _g = serial().await;
    with_world("cli_migrate", false, async |w: &mut World| {
        use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
        let (server, export, port, mport) = ganesha()?;
        let env = std::fs::read_to_string(std::env::var("STOWAGE_CLI_GANESHA_ENV")?)?;
        let export_dir = env
            .lines()
            .find_map(|l| l.strip_prefix("NFS_EXPORT_DIR="))
            .context("no NFS_EXPORT_DIR")?
            .to_owned();
        // The data the in-tree PV points at, as a user's course would have made it.
        let dir = format!("{}-wp", w.ns);
        let data = std::path::Path::new(&export_dir).join(&dir);
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("index.html"), b"hello from the in-tree era\n")?;
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _gone = Gone(data.clone());
        // stowage-controller for NFS on the same export, and a provisioner on it (Recycle).
        let nfs_dir = w.dir.path().join("nfs");
        std::fs::create_dir_all(&nfs_dir)?;
        let cfg = nfs_dir.join("nfs.yaml");
        std::fs::write(
            &cfg,
            format!("backend: nfs\ninstances:\n  default: {{ server: {server}, export: {export}, nfsPort: {port}, mountPort: {mport}, timeoutSecs: 5 }}\n"),
        )?;
        let mut ctl = stowage_tests::Plugin::controller(&nfs_dir, &cfg)?;
        ctl.ready().await?;
        let ep = format!("unix://{}", nfs_dir.join("controller.sock").display());

        let class = w.class_name("intree");
        let pv_name = format!("{}-legacy", w.ns);
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": pv_name},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Recycle", "storageClassName": class,
                     "mountOptions": ["nfsvers=3", "hard"],
                     "nfs": {"server": server, "path": format!("{export}/{dir}")}}
        }))?;
        w.pvs().create(&PostParams::default(), &pv).await?;
        w.create_claim("wp", Some(&class), "1Gi", &["ReadWriteMany"], json!({})).await?;
        let bound = w.wait_bound("wp", T).await?;
        ensure!(bound.metadata.name.as_deref() == Some(pv_name.as_str()), "bound to {:?}", bound.metadata.name);
        let claim_uid = w.claim("wp").await?.and_then(|c| c.metadata.uid).context("claim uid")?;

        // A pod using the claim: refused, the PV untouched.
        w.wait_service_account().await?;
        let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.ns);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "wordpress"},
            "spec": {"containers": [{"name": "c", "image": "busybox:local"}],
                     "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "wp"}}]}
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let cfgs = cfg.to_string_lossy().into_owned();
        let o = stowage(w, &["migrate-intree", "--config", &cfgs, "--csi-endpoint", &ep, &pv_name])?;
        let t = text(&o);
        ensure!(!o.status.success() && t.contains("refused") && t.contains(&format!("{}/wordpress", w.ns)), "{t}");
        ensure!(w.pvs().get(&pv_name).await?.spec.and_then(|s| s.nfs).is_some(), "PV changed after a refusal");
        pods.delete("wordpress", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
        wait_for("the pod to go", T, || {
            let pods = pods.clone();
            async move { Ok(pods.get_opt("wordpress").await?.is_none().then_some(())) }
        })
        .await?;

        // --dry-run shows before and after and changes nothing.
        let o = stowage(w, &["migrate-intree", "--config", &cfgs, "--csi-endpoint", &ep, "--dry-run", &pv_name])?;
        let t = text(&o);
        ensure!(o.status.success() && t.contains("before") && t.contains("nfs.stowage.io") && t.contains(&format!("default/{dir}")), "{t}");
        ensure!(w.pvs().get(&pv_name).await?.spec.and_then(|s| s.nfs).is_some(), "dry run changed the PV");

        let o = stowage(w, &["migrate-intree", "--config", &cfgs, "--csi-endpoint", &ep, &pv_name])?;
        let t = text(&o);
        ensure!(o.status.success() && t.contains(&format!("migrated PV {pv_name}")), "{t}");
        println!("{}", String::from_utf8_lossy(&o.stdout));
        let pv = w.pvs().get(&pv_name).await?;
        let spec = pv.spec.clone().unwrap_or_default();
        let csi = spec.csi.clone().context("no csi source after migration")?;
        ensure!(spec.nfs.is_none() && csi.driver == "nfs.stowage.io", "{spec:?}");
        ensure!(csi.volume_handle == format!("default/{dir}"), "{csi:?}");
        let attrs = csi.volume_attributes.clone().unwrap_or_default();
        ensure!(attrs.get("share") == Some(&format!("{export}/{dir}")) && attrs.get("server") == Some(&server), "{attrs:?}");
        ensure!(spec.persistent_volume_reclaim_policy.as_deref() == Some("Recycle"), "{spec:?}");
        ensure!(spec.mount_options == Some(vec!["nfsvers=3".into(), "hard".into()]), "{spec:?}");
        let claim = w.claim("wp").await?.context("claim gone")?;
        ensure!(claim.metadata.uid.as_deref() == Some(claim_uid.as_str()), "another claim");
        ensure!(claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"), "{claim:?}");
        ensure!(claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == Some(pv_name.as_str()), "{claim:?}");
        ensure!(std::fs::read(data.join("index.html"))? == b"hello from the in-tree era\n", "data changed");
        // Nothing left to migrate: a second run is a no-op for this PV.
        let o = stowage(w, &["migrate-intree", "--config", &cfgs, "--csi-endpoint", &ep, "--dry-run"])?;
        ensure!(!String::from_utf8_lossy(&o.stdout).contains(&pv_name), "{}", text(&o));

        // Recycle now goes through Stowage: the claim deleted, the data scrubbed, the PV
        // Available again.
        w.start_provisioner_at(&ep, &[])?;
        w.pvcs().delete("wp", &DeleteParams::default()).await?;
        w.wait_pv_phase(&pv_name, "Available", Duration::from_secs(90)).await?;
        ensure!(!data.join("index.html").exists(), "Recycle left the old data");
        ensure!(data.is_dir(), "Recycle removed the volume directory");
        Ok(())
    })
    .await
}

/// `stowage status --watch` on a pipe: a first report at once, a new one after a claim is
/// created (and bound), and no terminal control codes.
#[tokio::test]
async fn status_watch_reports_changes() -> Result<()> {
    let _g = serial().await;
    with_world("cli_watch", true, async |w: &mut World| {
        let ns = w.ns.clone();
        let mut child = Command::new(bin("stowage")?)
            .args(["status", "--watch", "-n", &ns])
            .env("KUBECONFIG", &w.cluster.admin_kubeconfig)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting stowage status --watch")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let text = || seen.lock().map(|s| s.clone()).unwrap_or_default();
        let started = std::time::Instant::now();
        let result = async {
            wait_for("first report", T, || {
                let t = text();
                async move { Ok((!t.is_empty()).then_some(())) }
            })
            .await?;
            let first = text();
            let class = w
                .create_class("watch", json!({"reclaimPolicy": "Delete"}))
                .await?;
            w.create_claim(
                "watched",
                Some(&class),
                "16Mi",
                &["ReadWriteOnce"],
                json!({}),
            )
            .await?;
            w.wait_bound("watched", T).await?;
            wait_for("a report naming the bound claim", T, || {
                let t = text();
                let later = t.get(first.len()..).unwrap_or("").to_string();
                async move {
                    Ok((later.contains("watched") && later.contains("Bound")).then_some(()))
                }
            })
            .await?;
            let all = text();
            ensure!(!all.contains('\x1b'), "control codes on a pipe: {all:?}");
            println!(
                "status --watch: {} bytes of reports in {:.1}s",
                all.len(),
                started.elapsed().as_secs_f64()
            );
            anyhow::Ok(())
        }
        .await;
        let _ = child.kill();
        let _ = child.wait();
        result.with_context(|| format!("watch output:\n{}", text()))
    })
    .await
}
