//! Shared by the Docker plugin tests and the Docker bench: start the real `stowage-docker`
//! binary on a private socket, speak the plugin protocol to it, and drive a real dockerd
//! through the `docker` CLI.
//!
//! Everything is blocking (std only): the tests call the docker CLI, and plain threads are
//! the simplest way to send concurrent duplicate requests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where Docker discovers legacy plugins. Its location is fixed in dockerd, so tests put their
/// sockets here, each under a name no other run uses.
pub const DOCKER_PLUGIN_DIR: &str = "/run/docker/plugins";

/// A name unique to this process and call: `<prefix>-<pid>-<n>-<nanos>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

/// One plugin-protocol call: POST `endpoint` with a JSON body; returns (HTTP status, body).
pub fn call(socket: &Path, endpoint: &str, body: &Value) -> Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.to_string();
    // Like Docker: no Content-Type, only the plugin Accept header. One write: `write!` on the
    // bare stream sends each fragment separately, and a handler that ignores the body
    // (Plugin.Activate) answers and closes after the headers, so a body written after that
    // got EPIPE (about 1 run in 20 of docker_api's first call).
    let request = format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let json = if payload.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(payload).with_context(|| format!("body {payload:?}"))?
    };
    Ok((status, json))
}

/// A call that must succeed: returns the body, fails with Docker's `Err` text otherwise.
pub fn ok(socket: &Path, endpoint: &str, body: Value) -> Value {
    let (status, v) = call(socket, endpoint, &body).expect("plugin call");
    let err = v.get("Err").and_then(Value::as_str).unwrap_or("");
    assert!(
        status == 200 && err.is_empty(),
        "{endpoint} {body}: HTTP {status}, {v}"
    );
    v
}

/// A call that must fail: returns the `Err` message.
pub fn err(socket: &Path, endpoint: &str, body: Value) -> String {
    let (status, v) = call(socket, endpoint, &body).expect("plugin call");
    let err = v
        .get("Err")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    assert!(
        status != 200 && !err.is_empty(),
        "{endpoint} {body} was expected to fail: HTTP {status}, {v}"
    );
    err
}

pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var("STOWAGE_BIN_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.parent().map(Path::to_path_buf).unwrap_or(dir)
            } else {
                dir
            }
        }
    };
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the binaries first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// A running `stowage-docker serve`. Stopped with SIGTERM on drop, so its socket never stays
/// behind in /run/docker/plugins (a dead socket there makes dockerd retry it for 30 s).
pub struct DockerPlugin {
    pub name: String,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub mounts: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// More arguments for `stowage-docker serve` (--secrets-file...).
    extra: Vec<String>,
    /// RUST_LOG for the plugin; None: this process's RUST_LOG, else `info`. When set, the
    /// plugin also starts with an environment of PATH and RUST_LOG only (as a service manager
    /// would start it), so that secrets this test process holds in its environment (the
    /// suites export them) cannot reach it that way.
    rust_log: Option<String>,
    child: Option<Child>,
}

impl DockerPlugin {
    /// Starts a plugin for `config` with its state under `dir`, serving `socket`.
    pub fn start(dir: &Path, config: &Path, socket: &Path) -> Result<Self> {
        Self::start_with(dir, config, socket, &[])
    }

    pub fn start_with(dir: &Path, config: &Path, socket: &Path, extra: &[String]) -> Result<Self> {
        Self::start_logging(dir, config, socket, extra, None)
    }

    fn start_logging(
        dir: &Path,
        config: &Path,
        socket: &Path,
        extra: &[String],
        rust_log: Option<String>,
    ) -> Result<Self> {
        let name = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut p = DockerPlugin {
            name,
            socket: socket.to_owned(),
            // Not "state": backend configs in the same test dir keep their own state there.
            state: dir.join("plugin-state"),
            mounts: dir.join("plugin-mounts"),
            config: config.to_owned(),
            log: dir.join("stowage-docker.log"),
            extra: extra.to_vec(),
            rust_log,
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    /// As [`Self::start_for_docker_with`], logging at `trace` (for the secret scans).
    pub fn start_for_docker_traced(dir: &Path, config: &Path, extra: &[String]) -> Result<Self> {
        let socket = Path::new(DOCKER_PLUGIN_DIR).join(format!("{}.sock", unique("stowage-t")));
        Self::start_logging(dir, config, &socket, extra, Some("trace".into()))
    }

    /// The plugin process's ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A plugin Docker can find: a unique name, its socket in /run/docker/plugins.
    pub fn start_for_docker(dir: &Path, config: &Path) -> Result<Self> {
        Self::start_for_docker_with(dir, config, &[])
    }

    pub fn start_for_docker_with(dir: &Path, config: &Path, extra: &[String]) -> Result<Self> {
        let socket = Path::new(DOCKER_PLUGIN_DIR).join(format!("{}.sock", unique("stowage-t")));
        Self::start_with(dir, config, &socket, extra)
    }

    fn spawn(&mut self) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin("stowage-docker")?);
        if self.rust_log.is_some() {
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
        }
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--mount-dir")
            .arg(&self.mounts)
            .arg("--node-id")
            .arg("docker-test-node")
            .args(&self.extra)
            .env(
                "RUST_LOG",
                self.rust_log
                    .clone()
                    .unwrap_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting stowage-docker")?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!(
                    "stowage-docker exited with {st} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, v)) = call(&self.socket, "Plugin.Activate", &Value::Null)
                && v["Implements"][0] == "VolumeDriver"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "stowage-docker not ready within 30s; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, bounded wait, SIGKILL; then make sure the socket is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Kills the process without letting it clean up (a crash), leaving its mounts in place.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts again after [`crash`](Self::crash): the stale socket must be taken over.
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    pub fn ok(&self, endpoint: &str, body: Value) -> Value {
        ok(&self.socket, endpoint, body)
    }

    pub fn err(&self, endpoint: &str, body: Value) -> String {
        err(&self.socket, endpoint, body)
    }
}

impl Drop for DockerPlugin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A local-backend config with its base directory under `dir`.
pub fn local_config(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join("base");
    let cfg = dir.join("local.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: local\ninstances:\n  default:\n    baseDir: {}\n",
            base.display()
        ),
    )?;
    Ok((cfg, base))
}

pub fn is_mounted(p: &Path) -> bool {
    let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == p)
}

/// The `docker` CLI pointed at the suite's private dockerd.
#[derive(Clone, Debug)]
pub struct Docker {
    pub cli: PathBuf,
    pub host: String,
    pub image: String,
}

impl Docker {
    /// The daemon `tests/infra/docker.sh` started (env STOWAGE_DOCKER_HOST...). None when there
    /// is none; a test that needs it then skips, unless STOWAGE_REQUIRE_DOCKER=1 (the docker
    /// suite), where a missing daemon is a failure.
    pub fn from_env() -> Option<Docker> {
        let required = std::env::var("STOWAGE_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
        let Ok(host) = std::env::var("STOWAGE_DOCKER_HOST") else {
            assert!(
                !required,
                "STOWAGE_REQUIRE_DOCKER=1 but STOWAGE_DOCKER_HOST is not set: start dockerd with tests/infra/docker.sh"
            );
            eprintln!(
                "skipped: no dockerd (STOWAGE_DOCKER_HOST unset; tests/suites/70-docker.sh runs these)"
            );
            return None;
        };
        let d = Docker {
            cli: PathBuf::from(
                std::env::var("STOWAGE_DOCKER_CLI").unwrap_or_else(|_| "/usr/bin/docker".into()),
            ),
            host,
            image: std::env::var("STOWAGE_DOCKER_IMAGE").unwrap_or_else(|_| "busybox:local".into()),
        };
        let out = d.run(&["version", "--format", "{{.Server.Version}}"]);
        assert!(
            out.status.success(),
            "dockerd at {} does not answer: {}",
            d.host,
            String::from_utf8_lossy(&out.stderr)
        );
        Some(d)
    }

    /// Runs the CLI, bounded (a wedged daemon must fail the test, not hang it).
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("180")
            .arg(&self.cli)
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .stdin(Stdio::null())
            .output()
            .expect("running the docker CLI")
    }

    /// A command that must succeed; returns its trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "docker {} was expected to fail: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn swarm_active(&self) -> bool {
        self.ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]) == "active"
    }
}
