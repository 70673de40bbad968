//! Harness for the provisioner's integration tests and benchmark: a real control plane
//! (tests/infra/kube.sh), the real `stowage-controller` on the local backend and the real
//! `stowage-provisioner`, which runs with the token of the ServiceAccount in
//! provisioner/deploy/rbac.yaml so that the RBAC rules are tested too.
//!
//! The cluster comes from the env file `kube.sh start` writes (STOWAGE_KUBE_STATE, KUBECTL,
//! STOWAGE_KUBE_SERVER, STOWAGE_KUBE_CA, STOWAGE_KUBE_MODE). Without it the tests say they did
//! not run; with STOWAGE_REQUIRE_KUBE=1 they fail instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{
    Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;

use crate::{Plugin, bin};

/// Which binder the cluster leaves to us: KCM binds ("default" cluster) or Stowage does
/// (cluster started with --no-pv-binder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binder {
    Kcm,
    Builtin,
}

impl Binder {
    pub fn flag(self) -> &'static str {
        match self {
            Binder::Kcm => "kcm",
            Binder::Builtin => "builtin",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub state: PathBuf,
    pub kubectl: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub server: String,
    pub ca: PathBuf,
    pub binder: Binder,
}

fn required() -> bool {
    std::env::var("STOWAGE_REQUIRE_KUBE").is_ok_and(|v| v == "1")
}

/// The cluster under test, or None (after saying so) when none is configured.
pub fn cluster(test: &str) -> Option<Cluster> {
    let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let (Some(state), Some(kubectl), Some(server), Some(ca)) = (
        get("STOWAGE_KUBE_STATE"),
        get("KUBECTL"),
        get("STOWAGE_KUBE_SERVER"),
        get("STOWAGE_KUBE_CA"),
    ) else {
        if required() {
            panic!(
                "STOWAGE_REQUIRE_KUBE=1 but no cluster is configured: run tests/infra/kube.sh start and source its env file"
            );
        }
        eprintln!(
            "{test}: NOT RUN: no Kubernetes control plane configured (STOWAGE_KUBE_STATE unset)"
        );
        return None;
    };
    let binder = match get("STOWAGE_KUBE_MODE").as_deref() {
        Some("no-pv-binder") => Binder::Builtin,
        _ => Binder::Kcm,
    };
    let state = PathBuf::from(state);
    Some(Cluster {
        admin_kubeconfig: state.join("kubeconfig"),
        state,
        kubectl: PathBuf::from(kubectl),
        server,
        ca: PathBuf::from(ca),
        binder,
    })
}

/// Tests share one cluster and one driver name, so they take turns (each test has its own
/// runtime; tokio's mutex works across them).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

impl Cluster {
    /// The cluster described by the env file `kube.sh start` writes.
    pub fn from_env_file(path: &Path) -> Result<Cluster> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.trim().trim_start_matches("export ").split_once('='))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .map(|v| v.to_string())
                .with_context(|| format!("{} has no {k}", path.display()))
        };
        let state = PathBuf::from(get("STOWAGE_KUBE_STATE")?);
        Ok(Cluster {
            admin_kubeconfig: state.join("kubeconfig"),
            state,
            kubectl: PathBuf::from(get("KUBECTL")?),
            server: get("STOWAGE_KUBE_SERVER")?,
            ca: PathBuf::from(get("STOWAGE_KUBE_CA")?),
            binder: if get("STOWAGE_KUBE_MODE")? == "no-pv-binder" {
                Binder::Builtin
            } else {
                Binder::Kcm
            },
        })
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .env("KUBECACHEDIR", self.state.join("kubectl-cache"))
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn admin(&self) -> Result<Client> {
        client_for(&self.admin_kubeconfig).await
    }

    /// A kubeconfig with the provisioner ServiceAccount's token (RBAC from deploy/rbac.yaml),
    /// made once per test process.
    pub fn provisioner_kubeconfig(&self) -> Result<PathBuf> {
        static DONE: OnceLock<PathBuf> = OnceLock::new();
        if let Some(p) = DONE.get() {
            return Ok(p.clone());
        }
        let rbac = Path::new(env!("CARGO_MANIFEST_DIR")).join("../provisioner/deploy/rbac.yaml");
        self.kubectl(&["apply", "-f", &rbac.to_string_lossy()])?;
        let token = self
            .kubectl(&[
                "create",
                "token",
                "stowage-provisioner",
                "-n",
                "stowage-system",
                "--duration",
                "6h",
            ])?
            .trim()
            .to_owned();
        let ca = std::fs::read(&self.ca)?;
        let ca_b64 = base64_encode(&ca);
        let dir =
            std::env::temp_dir().join(format!("stowage-prov-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
                self.server
            ),
        )?;
        Ok(DONE.get_or_init(|| path).clone())
    }
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A running `stowage-provisioner`.
pub struct Provisioner {
    pub child: Child,
    pub log: PathBuf,
}

impl Provisioner {
    /// Starts the provisioner against `endpoint` with the ServiceAccount's kubeconfig.
    /// Retries are fast (max 4 s) and Pending claims are re-checked every 2 s, so tests wait
    /// seconds, not minutes; everything else is the default.
    pub fn start(
        dir: &Path,
        name: &str,
        kubeconfig: &Path,
        endpoint: &str,
        binder: Binder,
        extra: &[&str],
    ) -> Result<Provisioner> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut args: Vec<&str> = vec![
            "--csi-endpoint",
            endpoint,
            "--binder",
            binder.flag(),
            "--metrics-address",
            "127.0.0.1:0",
            "--retry-max-delay",
            "4s",
            "--pending-resync",
            "2s",
        ];
        if !extra.iter().any(|a| a.starts_with("--leader-elect")) {
            args.push("--leader-elect=false");
        }
        args.extend_from_slice(extra);
        let child = Command::new(bin("stowage-provisioner")?)
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting stowage-provisioner")?;
        Ok(Provisioner { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address its log says /metrics is served on (it binds port 0 in tests).
    pub fn metrics_address(&self) -> Option<String> {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("serving /metrics and /healthz"))?;
        line.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
            .find(|w| w.contains(':') && w.split(':').count() == 2 && w.contains('.'))
            .map(str::to_owned)
    }

    /// GET `path` from the metrics server: (status line, body).
    pub fn http_get(&self, path: &str) -> Result<(String, String)> {
        use std::io::{Read, Write};
        let addr = self
            .metrics_address()
            .context("the provisioner did not log its metrics address")?;
        let mut conn = std::net::TcpStream::connect(&addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status = head.lines().next().unwrap_or("").to_owned();
        Ok((status, body.to_owned()))
    }

    /// SIGKILL: no cleanup, no lease release (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 200 ms until it yields Some, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The backend under the controller: the local backend (default), or NFS against the
/// nfs-ganesha of tests/infra/ganesha.sh when STOWAGE_PROVISIONER_BACKEND=nfs (with the
/// STOWAGE_NFS_* variables of its env file).
#[derive(Debug, Clone)]
pub enum Backend {
    Local,
    Nfs {
        server: String,
        export: String,
        port: String,
        mount_port: String,
        export_dir: PathBuf,
        /// ganesha.sh state dir, to stop and start the server.
        state: PathBuf,
    },
}

impl Backend {
    pub fn from_env() -> Backend {
        if std::env::var("STOWAGE_PROVISIONER_BACKEND").as_deref() != Ok("nfs") {
            return Backend::Local;
        }
        let get = |n: &str| {
            std::env::var(n)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| {
                    panic!(
                        "STOWAGE_PROVISIONER_BACKEND=nfs needs {n} (source the ganesha.sh env file)"
                    )
                })
        };
        Backend::Nfs {
            server: get("STOWAGE_NFS_SERVER"),
            export: get("STOWAGE_NFS_EXPORT"),
            port: get("STOWAGE_NFS_PORT"),
            mount_port: get("STOWAGE_NFS_MOUNT_PORT"),
            export_dir: PathBuf::from(get("STOWAGE_NFS_EXPORT_DIR")),
            state: PathBuf::from(get("STOWAGE_NFS_STATE")),
        }
    }

    pub fn driver(&self) -> &'static str {
        match self {
            Backend::Local => "local.stowage.io",
            Backend::Nfs { .. } => "nfs.stowage.io",
        }
    }

    /// Writes the controller's config; returns it and the directory holding the volumes.
    fn config(&self, dir: &Path, ns: &str) -> Result<(PathBuf, PathBuf)> {
        match self {
            Backend::Local => {
                let base = dir.join("base");
                Ok((crate::local_config(dir, &base)?, base))
            }
            Backend::Nfs {
                server,
                export,
                port,
                mount_port,
                export_dir,
                ..
            } => {
                // A base directory per test keeps their volumes apart on the shared export.
                let base_dir = format!("prov-{ns}");
                let cfg = dir.join("nfs.yaml");
                std::fs::write(
                    &cfg,
                    format!(
                        "backend: nfs\ninstances:\n  default:\n    server: {server}\n    export: {export}\n    baseDir: {base_dir}\n    nfsPort: {port}\n    mountPort: {mount_port}\n    timeoutSecs: 5\n"
                    ),
                )?;
                Ok((cfg, export_dir.join(base_dir)))
            }
        }
    }

    /// Takes the storage away (the NFS server, or the controller for the local backend).
    pub fn stop_server(&self) -> Result<()> {
        if let Backend::Nfs { state, .. } = self {
            ganesha(state, "stop")?;
        }
        Ok(())
    }

    pub fn start_server(&self) -> Result<()> {
        if let Backend::Nfs { state, .. } = self {
            ganesha(state, "start")?;
        }
        Ok(())
    }
}

fn ganesha(state: &Path, cmd: &str) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/ganesha.sh");
    let out = Command::new(script)
        .arg(cmd)
        .arg("--state")
        .arg(state)
        .output()
        .context("running ganesha.sh")?;
    if !out.status.success() {
        bail!(
            "ganesha.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One test's world: a namespace, StorageClasses named after it, a controller on a fresh
/// backend directory, and (usually) a provisioner.
pub struct World {
    pub cluster: Cluster,
    pub client: Client,
    pub ns: String,
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub ctl: Plugin,
    pub ctl_endpoint: String,
    pub sa_kubeconfig: PathBuf,
    pub prov: Option<Provisioner>,
    pub backend: Backend,
    /// The CSI driver name (and StorageClass provisioner) of the backend.
    pub driver: &'static str,
    cfg: PathBuf,
}

impl World {
    /// Cluster, namespace and controller; no provisioner yet.
    pub async fn bare(test: &str, cluster: Cluster) -> Result<World> {
        let client = cluster.admin().await?;
        let suffix: String = uuid_like();
        let ns = format!("{}-{suffix}", test.replace('_', "-"));
        let ns = ns
            .chars()
            .take(50)
            .collect::<String>()
            .trim_end_matches('-')
            .to_owned();
        let nsapi: Api<Namespace> = Api::all(client.clone());
        nsapi
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
        let dir = tempfile::tempdir()?;
        let backend = Backend::from_env();
        let (cfg, base) = backend.config(dir.path(), &ns)?;
        let mut ctl = Plugin::controller(dir.path(), &cfg)?;
        ctl.ready().await?;
        let ctl_endpoint = format!("unix://{}", dir.path().join("controller.sock").display());
        let sa_kubeconfig = cluster.provisioner_kubeconfig()?;
        Ok(World {
            cluster,
            client,
            ns,
            dir,
            base,
            ctl,
            ctl_endpoint,
            sa_kubeconfig,
            prov: None,
            driver: backend.driver(),
            backend,
            cfg,
        })
    }

    pub async fn new(test: &str, cluster: Cluster) -> Result<World> {
        let mut w = Self::bare(test, cluster).await?;
        w.start_provisioner(&[])?;
        Ok(w)
    }

    pub fn binder(&self) -> Binder {
        self.cluster.binder
    }

    pub fn start_provisioner(&mut self, extra: &[&str]) -> Result<()> {
        let ep = self.ctl_endpoint.clone();
        self.start_provisioner_at(&ep, extra)
    }

    pub fn start_provisioner_at(&mut self, endpoint: &str, extra: &[&str]) -> Result<()> {
        self.prov = Some(Provisioner::start(
            self.dir.path(),
            "provisioner",
            &self.sa_kubeconfig,
            endpoint,
            self.binder(),
            extra,
        )?);
        Ok(())
    }

    pub fn prov_log(&self) -> String {
        self.prov.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// Restarts the controller on the same socket and base (after `ctl.kill()`).
    pub async fn restart_controller(&mut self) -> Result<()> {
        self.ctl = Plugin::controller(self.dir.path(), &self.cfg)?;
        self.ctl.ready().await?;
        Ok(())
    }

    pub fn class_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ns)
    }

    pub fn pvs(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    pub fn pvcs(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_class(&self, suffix: &str, extra: serde_json::Value) -> Result<String> {
        let name = self.class_name(suffix);
        let mut v = json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": self.driver,
        });
        merge(&mut v, extra);
        let sc: StorageClass = serde_json::from_value(v)?;
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &sc)
            .await
            .with_context(|| format!("creating StorageClass {name}"))?;
        Ok(name)
    }

    /// A claim: `class` (None: no storageClassName field), `size` e.g. "1Gi", access modes.
    pub async fn create_claim(
        &self,
        name: &str,
        class: Option<&str>,
        size: &str,
        modes: &[&str],
        extra: serde_json::Value,
    ) -> Result<PersistentVolumeClaim> {
        let mut v = json!({
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "accessModes": modes,
                "resources": {"requests": {"storage": size}},
            }
        });
        if let Some(c) = class {
            v["spec"]["storageClassName"] = json!(c);
        }
        merge(&mut v, extra);
        let pvc: PersistentVolumeClaim = serde_json::from_value(v)?;
        Ok(self.pvcs().create(&PostParams::default(), &pvc).await?)
    }

    pub async fn claim(&self, name: &str) -> Result<Option<PersistentVolumeClaim>> {
        Ok(self.pvcs().get_opt(name).await?)
    }

    pub async fn wait_bound(&self, claim: &str, timeout: Duration) -> Result<PersistentVolume> {
        let pvcs = self.pvcs();
        let pvs = self.pvs();
        let r = wait_for(&format!("claim {claim} to be Bound"), timeout, || async {
            let Some(c) = pvcs.get_opt(claim).await? else {
                return Ok(None);
            };
            let phase = c.status.as_ref().and_then(|s| s.phase.clone());
            let vn = c
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .unwrap_or_default();
            if phase.as_deref() != Some("Bound") || vn.is_empty() {
                return Ok(None);
            }
            let Some(pv) = pvs.get_opt(&vn).await? else {
                return Ok(None);
            };
            let pv_phase = pv.status.as_ref().and_then(|s| s.phase.clone());
            Ok((pv_phase.as_deref() == Some("Bound")).then_some(pv))
        })
        .await;
        r.with_context(|| format!("provisioner log:\n{}", tail(&self.prov_log(), 40)))
    }

    pub async fn wait_pv_phase(
        &self,
        pv: &str,
        phase: &str,
        timeout: Duration,
    ) -> Result<PersistentVolume> {
        let pvs = self.pvs();
        wait_for(&format!("volume {pv} to be {phase}"), timeout, || async {
            let p = pvs.get_opt(pv).await?;
            Ok(p.filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase)))
        })
        .await
        .with_context(|| format!("provisioner log:\n{}", tail(&self.prov_log(), 40)))
    }

    pub async fn wait_pv_gone(&self, pv: &str, timeout: Duration) -> Result<()> {
        let pvs = self.pvs();
        wait_for(&format!("volume {pv} to be deleted"), timeout, || async {
            Ok(pvs.get_opt(pv).await?.is_none().then_some(()))
        })
        .await
        .with_context(|| format!("provisioner log:\n{}", tail(&self.prov_log(), 40)))
    }

    /// Events about an object (PV events live in "default").
    pub async fn events(&self, namespace: &str, kind: &str, name: &str) -> Result<Vec<Event>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&ListParams::default().fields(&format!(
                "involvedObject.kind={kind},involvedObject.name={name}"
            )))
            .await?;
        Ok(list.items)
    }

    pub async fn wait_event(
        &self,
        namespace: &str,
        kind: &str,
        name: &str,
        reason: &str,
        timeout: Duration,
    ) -> Result<Event> {
        wait_for(
            &format!("event {reason} on {kind} {name}"),
            timeout,
            || async {
                Ok(self
                    .events(namespace, kind, name)
                    .await?
                    .into_iter()
                    .find(|e| e.reason.as_deref() == Some(reason)))
            },
        )
        .await
        .with_context(|| format!("provisioner log:\n{}", tail(&self.prov_log(), 40)))
    }

    /// Backend volume directories (what the local backend holds), excluding its bookkeeping.
    pub fn backend_dirs(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.base)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The directory of a PV's volume on the backend (`default/<dir>` handles).
    pub fn volume_dir(&self, pv: &PersistentVolume) -> PathBuf {
        let handle = pv
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        let rel = handle
            .split_once('/')
            .map(|(_, r)| r.to_owned())
            .unwrap_or_default();
        self.base.join(rel)
    }

    /// Removes everything the test made in the cluster: claims (with the namespace), PVs of
    /// its classes or claims (finalizers stripped), classes.
    pub async fn cleanup(&mut self) {
        if let Some(p) = self.prov.as_mut() {
            p.kill();
        }
        let pvs = self.pvs();
        if let Ok(list) = pvs.list(&ListParams::default()).await {
            for pv in list.items {
                let spec = pv.spec.as_ref();
                let class = spec
                    .and_then(|s| s.storage_class_name.clone())
                    .unwrap_or_default();
                let claim_ns = spec
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.namespace.clone())
                    .unwrap_or_default();
                let mine = class.starts_with(&self.ns) || claim_ns == self.ns;
                let name = pv.metadata.name.clone().unwrap_or_default();
                if mine {
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
        // Pods on fake nodes never get a kubelet to confirm their deletion: force it, else
        // the namespace (and the claims the pods hold) stay forever.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let _ = pods
            .delete_collection(
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
                &ListParams::default(),
            )
            .await;
        let scs: Api<StorageClass> = Api::all(self.client.clone());
        if let Ok(list) = scs.list(&ListParams::default()).await {
            for sc in list.items {
                let name = sc.metadata.name.unwrap_or_default();
                if name.starts_with(&self.ns) {
                    let _ = scs.delete(&name, &DeleteParams::default()).await;
                }
            }
        }
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
        if matches!(self.backend, Backend::Nfs { .. }) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    /// Waits for the namespace's default ServiceAccount (pods need it to be admitted).
    pub async fn wait_service_account(&self) -> Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(30),
            || async { Ok(api.get_opt("default").await?.map(|_| ())) },
        )
        .await
    }
}

/// Runs a test body in a fresh world and cleans up afterwards, also when the body fails.
pub async fn with_world<F>(test: &str, start_provisioner: bool, body: F) -> Result<()>
where
    F: AsyncFnOnce(&mut World) -> Result<()>,
{
    let Some(cluster) = cluster(test) else {
        return Ok(());
    };
    let mut w = if start_provisioner {
        World::new(test, cluster).await?
    } else {
        World::bare(test, cluster).await?
    };
    let r = body(&mut w).await;
    if r.is_err() {
        // Keep every log of the failed test (the temp dir goes away with the world).
        let keep = std::env::temp_dir()
            .join("stowage-provisioner-failures")
            .join(&w.ns);
        let _ = std::fs::create_dir_all(&keep);
        if let Ok(rd) = std::fs::read_dir(w.dir.path()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".log") {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
        }
        eprintln!(
            "--- provisioner log ({test}), all logs in {} ---\n{}",
            keep.display(),
            tail(&w.prov_log(), 40)
        );
        eprintln!(
            "--- controller log ({test}) ---\n{}",
            tail(&w.ctl.log_text(), 20)
        );
    }
    w.cleanup().await;
    r
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:08x}", h.finish() as u32)
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub mod proxy {
    //! A gRPC proxy in front of the controller that forwards everything, but holds the answer
    //! to CreateVolume after the controller has produced it: the volume exists on the backend
    //! and the provisioner has not heard of it, the exact moment a crash hurts most.

    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::UnixListener;
    use tokio::sync::watch;
    use tonic::transport::Channel;
    use tower::{Service, ServiceExt};

    pub struct HoldingProxy {
        pub socket: PathBuf,
        held: watch::Receiver<u32>,
        task: tokio::task::JoinHandle<()>,
    }

    impl HoldingProxy {
        pub async fn start(socket: &Path, upstream: Channel) -> anyhow::Result<HoldingProxy> {
            let listener = UnixListener::bind(socket)?;
            let (tx, rx) = watch::channel(0u32);
            let tx = Arc::new(tx);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: http::Request<Incoming>| {
                            let mut ch = upstream.clone();
                            let tx = tx.clone();
                            async move {
                                let hold = req.uri().path() == "/csi.v1.Controller/CreateVolume";
                                let req = req.map(tonic::body::Body::new);
                                let resp = ch.ready().await?.call(req).await?;
                                if hold {
                                    tx.send_modify(|n| *n += 1);
                                    std::future::pending::<()>().await;
                                }
                                Ok::<_, tonic::transport::Error>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Ok(HoldingProxy {
                socket: socket.to_owned(),
                held: rx,
                task,
            })
        }

        /// Waits until a CreateVolume answer is being held.
        pub async fn wait_held(&mut self) -> anyhow::Result<()> {
            self.held.wait_for(|n| *n > 0).await?;
            Ok(())
        }
    }

    impl Drop for HoldingProxy {
        fn drop(&mut self) {
            self.task.abort();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Labels and status for a fake Node (no kubelet): schedulable, with room for pods.
pub fn node_json(name: &str, labels: &BTreeMap<String, String>) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test node"}]
        }
    })
}
