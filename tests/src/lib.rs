//! Test harness: starts the real `stowage-controller` / `stowage-node` binaries with a config,
//! waits for their sockets, and hands out gRPC clients. Processes are killed on drop, so a
//! failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use stowage_csi::endpoint::Endpoint;
use stowage_csi::stowage_v1::stowage_client::StowageClient;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::node_client::NodeClient;
use tonic::transport::Channel;

/// Directory holding the workspace's binaries (the test executable lives in `deps/` below it).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STOWAGE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// `stowage doctor -o json --no-cluster --config CONFIG --backend BACKEND`: the exit code and
/// the check named `name` (Null when there is none), with the whole report for messages.
pub fn doctor_check(
    config: &Path,
    backend: &str,
    name: &str,
) -> Result<(Option<i32>, serde_json::Value, serde_json::Value)> {
    let o = Command::new(bin("stowage")?)
        .args([
            "doctor",
            "-o",
            "json",
            "--no-cluster",
            "--backend",
            backend,
            "--config",
        ])
        .arg(config)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "doctor JSON: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    let c = v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or_default();
    Ok((o.status.code(), c, v))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A running plugin process.
pub struct Plugin {
    pub child: Child,
    pub endpoint: Endpoint,
    pub log: PathBuf,
}

impl Plugin {
    /// Starts `stowage-controller` on a unix socket in `dir`.
    pub fn controller(dir: &Path, config: &Path) -> Result<Plugin> {
        let sock = dir.join("controller.sock");
        Self::spawn(
            "stowage-controller",
            dir,
            &format!("unix://{}", sock.display()),
            &["--config", &config.to_string_lossy()],
        )
    }

    /// Starts `stowage-node` on a unix socket in `dir`, with `dir` as its kubelet root (so
    /// staging and target paths must lie under `dir`; the registration socket goes in
    /// `dir/plugins_registry/`).
    pub fn node(dir: &Path, config: &Path, node_id: &str) -> Result<Plugin> {
        Self::node_with_root(dir, dir, config, node_id)
    }

    /// Like [`Plugin::node`] with another kubelet root (several node plugins sharing one test
    /// directory for their paths). Registration is off unless the root is the plugin's own
    /// directory: two plugins of one driver would fight over one registration socket.
    pub fn node_with_root(dir: &Path, root: &Path, config: &Path, node_id: &str) -> Result<Plugin> {
        Self::node_with_args(dir, root, config, node_id, &[])
    }

    /// Like [`Plugin::node_with_root`] with more flags (e.g. `--metrics-address`).
    pub fn node_with_args(
        dir: &Path,
        root: &Path,
        config: &Path,
        node_id: &str,
        extra: &[&str],
    ) -> Result<Plugin> {
        let sock = dir.join("node.sock");
        let registration = if dir == root { "true" } else { "false" };
        let config = config.to_string_lossy();
        let root = root.to_string_lossy();
        let mut args = vec![
            "--config",
            &config,
            "--node-id",
            node_id,
            "--kubelet-root",
            &root,
            "--kubelet-registration",
            registration,
        ];
        args.extend_from_slice(extra);
        Self::spawn(
            "stowage-node",
            dir,
            &format!("unix://{}", sock.display()),
            &args,
        )
    }

    pub fn spawn(binary: &str, dir: &Path, endpoint: &str, args: &[&str]) -> Result<Plugin> {
        let log = dir.join(format!("{binary}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(bin(binary)?);
        // Tests get servers' credentials in their environment; the plugins must learn them
        // only from CSI secrets, as in production, so they never inherit them.
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy().to_ascii_uppercase();
            if ["SECRET", "KEY", "PASSWORD", "TOKEN"]
                .iter()
                .any(|w| name.contains(w))
            {
                cmd.env_remove(&k);
            }
        }
        let child = cmd
            .arg("--endpoint")
            .arg(endpoint)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let endpoint = Endpoint::parse(endpoint)?;
        Ok(Plugin {
            child,
            endpoint,
            log,
        })
    }

    /// Waits (bounded) until the plugin answers Probe.
    pub async fn ready(&mut self) -> Result<Channel> {
        let endpoint = self.endpoint.clone();
        self.ready_at(&endpoint).await
    }

    /// Waits (bounded) until the plugin answers Probe on `endpoint`: one of the per-driver
    /// sockets of a plugin started with `{driver}` in its endpoint.
    pub async fn ready_at(&mut self, endpoint: &Endpoint) -> Result<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "plugin exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(ch) = stowage_csi::client::connect(endpoint).await {
                let mut id = IdentityClient::new(ch.clone());
                if id.probe(stowage_csi::v1::ProbeRequest {}).await.is_ok() {
                    return Ok(ch);
                }
            }
            if Instant::now() > deadline {
                bail!("plugin not ready within 30s; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a graceful exit; returns whether it exited in time.
    /// Async so that the caller's runtime keeps driving its client connections (which must
    /// answer the server's GOAWAY for the drain to finish early).
    pub async fn terminate(&mut self) -> bool {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        false
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub stowage: StowageClient<Channel>,
}

pub fn controller_clients(ch: Channel) -> Clients {
    Clients {
        identity: IdentityClient::new(ch.clone()),
        controller: ControllerClient::new(ch.clone()),
        stowage: StowageClient::new(ch),
    }
}

pub fn node_client(ch: Channel) -> NodeClient<Channel> {
    NodeClient::new(ch)
}

/// The nfs-ganesha a suite started (tests/infra/ganesha.sh), from its STOWAGE_NFS_* variables.
pub struct Nfs {
    pub server: String,
    pub export: String,
    pub port: String,
    pub mount_port: String,
    /// The exported directory on this machine, where outcomes are checked.
    pub export_dir: PathBuf,
}

/// The suite's NFS server, or None (with a note) when there is none; with
/// STOWAGE_REQUIRE_NFS=1 a missing server is a failure.
pub fn nfs() -> Option<Nfs> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("STOWAGE_NFS_SERVER"),
        get("STOWAGE_NFS_EXPORT"),
        get("STOWAGE_NFS_PORT"),
        get("STOWAGE_NFS_MOUNT_PORT"),
        get("STOWAGE_NFS_EXPORT_DIR"),
    ) {
        (Some(server), Some(export), Some(port), Some(mount_port), Some(dir)) => Some(Nfs {
            server,
            export,
            port,
            mount_port,
            export_dir: PathBuf::from(dir),
        }),
        _ => {
            assert!(
                std::env::var("STOWAGE_REQUIRE_NFS").as_deref() != Ok("1"),
                "STOWAGE_REQUIRE_NFS=1 but the STOWAGE_NFS_* variables are not set"
            );
            eprintln!("NFS server not configured (STOWAGE_NFS_*): NFS tests not run");
            None
        }
    }
}

/// A local-backend config rooted at `base`.
pub fn local_config(dir: &Path, base: &Path) -> Result<PathBuf> {
    let cfg = dir.join("local.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: local\ninstances:\n  default:\n    baseDir: {}\n",
            base.display()
        ),
    )?;
    Ok(cfg)
}

pub mod wire {
    //! Small builders for CSI messages used across tests.
    use stowage_csi::v1;
    use stowage_csi::v1::volume_capability::access_mode::Mode;

    pub fn mount_cap(mode: Mode) -> v1::VolumeCapability {
        v1::VolumeCapability {
            access_type: Some(v1::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(v1::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    pub fn block_cap(mode: Mode) -> v1::VolumeCapability {
        v1::VolumeCapability {
            access_type: Some(v1::volume_capability::AccessType::Block(Default::default())),
            access_mode: Some(v1::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    pub fn rwo() -> v1::VolumeCapability {
        mount_cap(Mode::SingleNodeWriter)
    }

    pub fn create(name: &str, bytes: i64) -> v1::CreateVolumeRequest {
        v1::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        }
    }
}

/// A process seen in /proc: its pid, its command line split at NULs (empty arguments
/// dropped), and the program's file name.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub args: Vec<String>,
    pub prog: String,
}

/// Every process with a readable command line (a zombie's is empty: it is left out, an exited
/// mounter waiting for its parent is gone for the tests' purposes).
pub fn processes() -> Vec<Process> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(first) = args.first() else { continue };
        let prog = first.rsplit('/').next().unwrap_or_default().to_string();
        out.push(Process { pid, args, prog });
    }
    out
}

pub mod metrics;
pub mod provisioner;
pub mod secrets;
