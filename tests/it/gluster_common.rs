//! Shared by the GlusterFS integration tests: the real server from tests/infra/gluster.sh
//! (its env file's STOWAGE_GLUSTER_* variables), plugin start-up, CLI look-ups of quota limits
//! and FUSE client processes. With STOWAGE_REQUIRE_GLUSTER=1 a missing server is a failure;
//! without it the tests say they did not run.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use stowage_backends::glusterfs::cli::{is_busy, parse_reply};
use stowage_csi::v1;
use stowage_tests::{Clients, Plugin, controller_clients, node_client};
use tonic::transport::Channel;

pub struct Gluster {
    pub host: String,
    pub volume: String,
    pub sock: PathBuf,
    pub brick: PathBuf,
    pub state: PathBuf,
}

/// The server, or None (test not run) when it is not configured and not required.
pub fn gluster() -> Option<Gluster> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let required = var("STOWAGE_REQUIRE_GLUSTER").as_deref() == Some("1");
    match (
        var("STOWAGE_GLUSTER_HOST"),
        var("STOWAGE_GLUSTER_VOLUME"),
        var("STOWAGE_GLUSTER_SOCK"),
        var("STOWAGE_GLUSTER_BRICK"),
        var("STOWAGE_GLUSTER_STATE"),
    ) {
        (Some(host), Some(volume), Some(sock), Some(brick), Some(state)) => Some(Gluster {
            host,
            volume,
            sock: sock.into(),
            brick: brick.into(),
            state: state.into(),
        }),
        _ => {
            assert!(
                !required,
                "STOWAGE_REQUIRE_GLUSTER=1 but the STOWAGE_GLUSTER_* variables are not set \
                 (tests/infra/gluster.sh start, then `set -a; . STATE/env`)"
            );
            eprintln!("GlusterFS not configured (STOWAGE_GLUSTER_*): test not run");
            None
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid_like()[..10])
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Gluster {
    /// A controller+node config with its own base dir and state dir.
    pub fn config(&self, dir: &Path, base: &str, extra: &str) -> PathBuf {
        let cfg = dir.join("gluster.yaml");
        std::fs::write(
            &cfg,
            format!(
                "backend: glusterfs\ninstances:\n  main:\n    servers: [{}]\n    volume: {}\n    baseDir: {base}\n    glusterd:\n      socket: {}\n    stateDir: {}\n{extra}",
                self.host,
                self.volume,
                self.sock.display(),
                dir.join("state").display()
            ),
        )
        .unwrap();
        cfg
    }

    /// A volume's directory as the brick holds it: where its bytes really are.
    pub fn on_brick(&self, base: &str, dir: &str) -> PathBuf {
        self.brick.join(base).join(dir)
    }

    /// `gluster volume quota VOL list PATH --xml`: the hard limit, or None when no limit.
    pub fn quota_limit(&self, path: &str) -> Option<u64> {
        // Tests run in parallel against one gluster volume, and glusterd refuses a quota
        // command while another one holds the volume's lock: ask again, as the controller does.
        let mut attempts = 0;
        let r = loop {
            let out = std::process::Command::new("timeout")
                .args(["60", "gluster", "--mode=script"])
                .arg(format!("--glusterd-sock={}", self.sock.display()))
                .args(["volume", "quota", &self.volume, "list", path, "--xml"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let r = parse_reply(&text).unwrap_or_else(|e| panic!("quota list {path}: {e}: {text}"));
            attempts += 1;
            if r.op_ret != 0 && is_busy(&r.op_errstr) && attempts < 60 {
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            break r;
        };
        if r.op_ret != 0 {
            eprintln!("quota list {path}: {} ({})", r.op_errstr, r.op_ret);
            return None;
        }
        let mut limits = Vec::new();
        r.root.find_all("limit", &mut limits);
        limits
            .iter()
            .find(|l| l.text_at("path") == Some(path))
            .and_then(|l| l.text_at("hard_limit"))
            .and_then(|s| s.parse().ok())
    }

    /// The limit on `path` once it reads `want`, or what it reads after 10 s. `quota list`
    /// reads the limit through glusterd's auxiliary FUSE mount of the volume, which can lag
    /// the command that set it; a lag is printed, so a slow read is visible in the log.
    pub fn quota_settled(&self, path: &str, want: Option<u64>) -> Option<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let first = self.quota_limit(path);
        let mut got = first;
        while got != want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            got = self.quota_limit(path);
        }
        if got != first {
            eprintln!("quota on {path}: first read {first:?}, later {got:?}");
        }
        got
    }

    pub fn infra(&self, cmd: &str) -> std::process::Output {
        let root = std::env::var("STOWAGE_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
        std::process::Command::new(root.join("tests/infra/gluster.sh"))
            .args([cmd, "--state"])
            .arg(&self.state)
            .output()
            .unwrap()
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub base: String,
    pub cfg: PathBuf,
    pub ctl: Plugin,
    pub node: Plugin,
    pub c: Clients,
    pub n: v1::node_client::NodeClient<Channel>,
}

pub async fn env(g: &Gluster, name: &str, extra: &str) -> Env {
    assert!(
        stowage_tests::is_root(),
        "these tests mount; run them as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let base = unique(name);
    let cfg = g.config(dir.path(), &base, extra);
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut node = Plugin::node(dir.path(), &cfg, "node-1").unwrap();
    let c = controller_clients(ctl.ready().await.unwrap());
    let n = node_client(node.ready().await.unwrap());
    Env {
        dir,
        base,
        cfg,
        ctl,
        node,
        c,
        n,
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Mounts this test made (staging, targets, the controller's management mount) go
        // before the temp dir does.
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut mps: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .map(String::from)
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            let _ = std::process::Command::new("umount")
                .args(["-l", &m])
                .status();
        }
    }
}

pub fn stage_req(vol: &v1::Volume, staging: &Path) -> v1::NodeStageVolumeRequest {
    v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(stowage_tests::wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

pub fn publish_req(
    vol: &v1::Volume,
    staging: &Path,
    target: &Path,
) -> v1::NodePublishVolumeRequest {
    v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(stowage_tests::wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

/// The directory name a volume ID points at (after the instance).
pub fn dir_of(vol: &v1::Volume) -> String {
    vol.volume_id.split_once('/').unwrap().1.to_string()
}

/// PID of the glusterfs FUSE client serving the mount at `mountpoint`.
pub fn fuse_pid(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.to_string_lossy();
    stowage_tests::processes()
        .into_iter()
        .find(|p| p.prog == "glusterfs" && p.args.last().is_some_and(|a| *a == want))
        .map(|p| p.pid as i32)
}

pub fn kill9(pid: i32) {
    let p = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(p, rustix::process::Signal::KILL).unwrap();
    // The kernel answers ENOTCONN once the FUSE connection is gone.
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `len` bytes of zeros to `path` in 1 MiB chunks and syncs; the first error.
pub fn write_zeros(path: &Path, len: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()
}
