//! Issue 14, R2: kill -9 at random points. Seeded cycles of create -> stage -> publish -> write
//! -> unpublish -> unstage -> delete through the real stowage-controller and stowage-node
//! binaries over their sockets; before some calls one of the two processes gets SIGKILL after
//! a random delay (inside the call, or after it answered: between calls). The harness restarts
//! it and retries the interrupted call the way a CO does (same request, same name) until it
//! succeeds. After every restart and at the end it checks the backend itself:
//!
//! - no volume directory or metadata record whose name the harness does not hold (or is
//!   creating/deleting), no half-made tree in `.stowage/tmp` or `.stowage/trash` once no
//!   create/delete is in flight;
//! - every name whose CreateVolume was acknowledged has its directory and metadata;
//! - no mount below the test directory but the staging/target paths of the cycle in progress,
//!   no loop device backed by a file of a volume that is not staged;
//! - every acknowledged write (fsync returned) reads back with the same bytes, from the backend
//!   (the volume directory, the block image, the ext4 image through debugfs, the NFS export).
//!
//! Backends: local directories (`capacity: off`), local ext4 images (`capacity: image`, mkfs in
//! the controller), local raw block (loop devices), and NFS through nfs-ganesha on the
//! controller side only (the kernel NFS client is missing on these hosts, so NFS cycles are
//! create -> write on the server -> expand -> delete with only the controller killed).
//!
//! `STOWAGE_CHAOS_CYCLES` (default 15 per backend, the CI size: about 30 s for all four) and
//! `STOWAGE_CHAOS_SEED` (printed at start and in every failure) size and replay a schedule.
//! Timing makes a replay land kills at nearly, not exactly, the same instants. Full size:
//! `STOWAGE_CHAOS_CYCLES=200` (see docs/reliability.md for the command).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_csi::v1;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::volume_capability::access_mode::Mode;
#[path = "gluster_common.rs"]
mod gluster_common;

use stowage_tests::{Plugin, controller_clients, is_root, nfs, node_client, wire};
use tonic::transport::Channel;

/// splitmix64: tiny, seedable, and the same schedule on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Proc {
    Controller,
    Node,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Local directory volumes, sizes recorded only.
    Dir,
    /// Local directory volumes, each an ext4 image made by the controller (mkfs, debugfs).
    Image,
    /// Local raw block volumes: a sparse image on a loop device.
    Block,
    /// NFS directories through nfs-ganesha, controller only.
    Nfs,
    /// GlusterFS directories (quota per volume) on a real glusterd, node FUSE mounts.
    Gluster,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Dir => "local-dir",
            Kind::Image => "local-image",
            Kind::Block => "local-block",
            Kind::Nfs => "nfs-controller",
            Kind::Gluster => "glusterfs",
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(v1::CreateVolumeRequest),
    Expand(v1::ControllerExpandVolumeRequest),
    Delete(v1::DeleteVolumeRequest),
    Stage(v1::NodeStageVolumeRequest),
    Publish(v1::NodePublishVolumeRequest),
    Unpublish(v1::NodeUnpublishVolumeRequest),
    Unstage(v1::NodeUnstageVolumeRequest),
}

impl Op {
    fn server(&self) -> Proc {
        match self {
            Op::Create(_) | Op::Expand(_) | Op::Delete(_) => Proc::Controller,
            _ => Proc::Node,
        }
    }
    fn label(&self) -> &'static str {
        match self {
            Op::Create(_) => "CreateVolume",
            Op::Expand(_) => "ControllerExpandVolume",
            Op::Delete(_) => "DeleteVolume",
            Op::Stage(_) => "NodeStageVolume",
            Op::Publish(_) => "NodePublishVolume",
            Op::Unpublish(_) => "NodeUnpublishVolume",
            Op::Unstage(_) => "NodeUnstageVolume",
        }
    }
}

/// One call over the wire, bounded; a created volume comes back.
async fn send(
    mut c: ControllerClient<Channel>,
    n: Option<NodeClient<Channel>>,
    op: &Op,
) -> Result<Option<v1::Volume>, tonic::Status> {
    let node = || {
        n.clone()
            .ok_or_else(|| tonic::Status::internal("no node plugin"))
    };
    let call = async {
        match op.clone() {
            Op::Create(r) => Ok(c.create_volume(r).await?.into_inner().volume),
            Op::Expand(r) => c.controller_expand_volume(r).await.map(|_| None),
            Op::Delete(r) => c.delete_volume(r).await.map(|_| None),
            Op::Stage(r) => node()?.node_stage_volume(r).await.map(|_| None),
            Op::Publish(r) => node()?.node_publish_volume(r).await.map(|_| None),
            Op::Unpublish(r) => node()?.node_unpublish_volume(r).await.map(|_| None),
            Op::Unstage(r) => node()?.node_unstage_volume(r).await.map(|_| None),
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 30 s")),
    }
}

/// A name the harness holds (CreateVolume acknowledged, DeleteVolume not yet).
#[derive(Clone, Debug)]
struct Held {
    volume: v1::Volume,
    /// Bytes of the last acknowledged write.
    written: Option<Vec<u8>>,
}

#[derive(Default)]
struct Figures {
    cycles: usize,
    kills: BTreeMap<Proc, usize>,
    /// Answers that made the harness retry, by status code (transport errors included).
    retried: BTreeMap<String, usize>,
    /// The answers other than a dead or missing process (call, code, message), to print.
    odd_answers: Vec<String>,
    checks: usize,
    /// Problems by kind: leaked volume, lost volume, lost write, leftover mount, leftover loop.
    /// Distinct problems by kind (leaked volume, lost volume, lost write, leftover mount or
    /// loop device), each with the check that first saw it.
    problems: BTreeMap<&'static str, BTreeMap<String, String>>,
}

/// Offset of the block volumes' test bytes: past where a filesystem signature would go.
const BLOCK_OFFSET: u64 = 4096;

struct Harness {
    kind: Kind,
    seed: u64,
    rng: Rng,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    /// The backend's volume tree, as the server holds it.
    base: PathBuf,
    ctl: Plugin,
    node: Option<Plugin>,
    c: ControllerClient<Channel>,
    n: Option<NodeClient<Channel>>,
    held: BTreeMap<String, Held>,
    /// The name whose CreateVolume / DeleteVolume is in flight.
    creating: Option<String>,
    deleting: Option<String>,
    /// Mount points that may exist now (sent stage/publish not yet undone by an acknowledged
    /// unstage/unpublish), and names whose images may back a loop device.
    allowed_mounts: BTreeSet<PathBuf>,
    staged: BTreeSet<String>,
    fig: Figures,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Harness {
    async fn new(kind: Kind) -> Option<Harness> {
        assert!(is_root(), "the chaos cycles mount; run them as root");
        let seed = env_u64("STOWAGE_CHAOS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.yaml");
        let base = match kind {
            Kind::Nfs => {
                let n = nfs()?;
                let sub = format!("chaos-{}-{seed:x}", std::process::id());
                std::fs::write(
                    &cfg,
                    format!(
                        "backend: nfs\ninstances:\n  main:\n    server: {}\n    export: {}\n    baseDir: {sub}\n    nfsPort: {}\n    mountPort: {}\n    timeoutSecs: 5\n",
                        n.server, n.export, n.port, n.mount_port
                    ),
                )
                .unwrap();
                n.export_dir.join(sub)
            }
            Kind::Gluster => {
                let g = gluster_common::gluster()?;
                let sub = format!("chaos-{}-{seed:x}", std::process::id());
                // The config's own file name; the harness restarts plugins with `cfg`.
                let made = g.config(dir.path(), &sub, "");
                std::fs::rename(&made, &cfg).unwrap();
                g.brick.join(sub)
            }
            _ => {
                let base = dir.path().join("base");
                // Quoted: a bare `off` is YAML's false.
                let capacity = if kind == Kind::Image {
                    "image"
                } else {
                    "\"off\""
                };
                std::fs::write(
                    &cfg,
                    format!(
                        "backend: local\ninstances:\n  default:\n    baseDir: {}\n    capacity: {capacity}\n",
                        base.display()
                    ),
                )
                .unwrap();
                base
            }
        };
        println!(
            "chaos {}: STOWAGE_CHAOS_SEED={seed} (replay with it)",
            kind.label()
        );
        let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
        let c = controller_clients(ctl.ready().await.unwrap()).controller;
        let (node, n) = if kind == Kind::Nfs {
            (None, None)
        } else {
            let mut p = Plugin::node(dir.path(), &cfg, "chaos-node").unwrap();
            let n = node_client(p.ready().await.unwrap());
            (Some(p), Some(n))
        };
        // The GlusterFS controller keeps one management FUSE mount under its state dir.
        let allowed_mounts = if kind == Kind::Gluster {
            BTreeSet::from([dir.path().join("state")])
        } else {
            BTreeSet::new()
        };
        Some(Harness {
            kind,
            seed,
            rng: Rng(seed),
            dir,
            cfg,
            base,
            ctl,
            node,
            c,
            n,
            held: BTreeMap::new(),
            creating: None,
            deleting: None,
            allowed_mounts,
            staged: BTreeSet::new(),
            fig: Figures::default(),
        })
    }

    fn pid(&self, p: Proc) -> Option<i32> {
        match p {
            Proc::Controller => Some(self.ctl.child.id() as i32),
            Proc::Node => self.node.as_ref().map(|n| n.child.id() as i32),
        }
    }

    /// Reaps the killed process and starts a fresh one on the same socket and config.
    async fn restart(&mut self, p: Proc) {
        match p {
            Proc::Controller => {
                self.ctl.kill();
                self.ctl = Plugin::controller(self.dir.path(), &self.cfg).unwrap();
                let ch = self.ctl.ready().await.unwrap_or_else(|e| {
                    panic!("controller restart failed (seed {}): {e:#}", self.seed)
                });
                self.c = controller_clients(ch).controller;
            }
            Proc::Node => {
                if let Some(old) = self.node.as_mut() {
                    old.kill();
                }
                let mut nd = Plugin::node(self.dir.path(), &self.cfg, "chaos-node").unwrap();
                let ch = nd
                    .ready()
                    .await
                    .unwrap_or_else(|e| panic!("node restart failed (seed {}): {e:#}", self.seed));
                self.n = Some(node_client(ch));
                self.node = Some(nd);
            }
        }
    }

    fn kill(&self, p: Proc) {
        if let Some(pid) = self.pid(p).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// How long a kill waits after the call went out: up to about the call's own duration in
    /// a debug build, so kills land inside calls as often as between them.
    fn max_delay_ms(&self, op: &Op) -> u64 {
        match (self.kind, op) {
            (Kind::Image, Op::Create(_)) => 400,
            (Kind::Image | Kind::Block, Op::Stage(_) | Op::Unstage(_)) => 120,
            // Quota commands to glusterd, FUSE mounts.
            (Kind::Gluster, Op::Create(_) | Op::Delete(_)) => 800,
            (Kind::Gluster, Op::Stage(_) | Op::Unstage(_)) => 300,
            _ => 60,
        }
    }

    /// Sends `op`, maybe with a SIGKILL of one process after a random delay, then retries the
    /// same request until it is answered OK, restarting and checking after each kill.
    async fn run(&mut self, op: Op) -> Option<v1::Volume> {
        let plan = if self.rng.chance(40) {
            let victim = if self.node.is_none() || self.rng.chance(75) {
                op.server()
            } else if op.server() == Proc::Node {
                Proc::Controller
            } else {
                Proc::Node
            };
            let delay = if self.rng.chance(20) {
                0
            } else {
                self.rng.below(self.max_delay_ms(&op) + 1)
            };
            Some((victim, Duration::from_millis(delay)))
        } else {
            None
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = true;
        loop {
            let answer = match plan.filter(|_| first) {
                None => send(self.c.clone(), self.n.clone(), &op).await,
                Some((victim, delay)) => {
                    let killer = async {
                        tokio::time::sleep(delay).await;
                        self.kill(victim);
                    };
                    let (answer, ()) =
                        tokio::join!(send(self.c.clone(), self.n.clone(), &op), killer);
                    *self.fig.kills.entry(victim).or_default() += 1;
                    self.restart(victim).await;
                    self.check(&format!(
                        "after {victim:?} killed {} ms into {}",
                        delay.as_millis(),
                        op.label()
                    ));
                    answer
                }
            };
            first = false;
            match answer {
                Ok(v) => return v,
                Err(s) => {
                    *self
                        .fig
                        .retried
                        .entry(format!("{:?}", s.code()))
                        .or_default() += 1;
                    if !matches!(s.code(), tonic::Code::Unknown | tonic::Code::Unavailable) {
                        self.fig.odd_answers.push(format!(
                            "{} {}: {:?} {}",
                            op.label(),
                            op_name(&op),
                            s.code(),
                            s.message()
                        ));
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} {}: {} still failing after 60 s of retries: {:?} {} (seed {})",
                        self.kind.label(),
                        op.label(),
                        op_name(&op),
                        s.code(),
                        s.message(),
                        self.seed
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Records a problem once (the same leak shows at every later check), with where it was
    /// first seen.
    fn problem(&mut self, kind: &'static str, when: &str, what: String) {
        self.fig
            .problems
            .entry(kind)
            .or_default()
            .entry(what)
            .or_insert_with(|| when.to_string());
    }

    /// The invariants, read from the backend's own tree and the kernel's tables.
    fn check(&mut self, when: &str) {
        self.fig.checks += 1;
        let may_exist = |h: &Harness, name: &str| {
            h.held.contains_key(name)
                || h.creating.as_deref() == Some(name)
                || h.deleting.as_deref() == Some(name)
        };
        // Volume directories and metadata records: every one belongs to a name we hold.
        let mut dirs = BTreeSet::new();
        for name in list(&self.base) {
            if name != ".stowage" {
                dirs.insert(name);
            }
        }
        let mut records = BTreeSet::new();
        // Record key (hash of the directory) -> volume name, for the temporaries below.
        let mut keys = BTreeMap::new();
        let mut temps = Vec::new();
        for f in list(&self.base.join(".stowage/volumes")) {
            if let Some(key) = f
                .strip_prefix('.')
                .and_then(|t| t.split_once(".json.tmp-"))
                .map(|(k, _)| k.to_string())
            {
                // An atomic metadata write cut short: the volume's, while it lives.
                temps.push((key, f));
                continue;
            }
            let p = self.base.join(".stowage/volumes").join(&f);
            let meta: serde_json::Value = match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(v) => v,
                None => {
                    self.problem("leaked volumes", when, format!("unreadable record {f}"));
                    continue;
                }
            };
            let name = meta["name"].as_str().unwrap_or_default().to_string();
            if let Some(key) = f.strip_suffix(".json") {
                keys.insert(key.to_string(), name.clone());
            }
            records.insert(name);
        }
        let in_flight = self.creating.is_some() || self.deleting.is_some();
        for (key, f) in temps {
            let owned = match keys.get(&key) {
                Some(name) => may_exist(self, name),
                None => in_flight,
            };
            if !owned {
                self.problem(
                    "leaked volumes",
                    when,
                    format!("metadata temporary {f} has no owner"),
                );
            }
        }
        for d in &dirs {
            if !may_exist(self, d) {
                self.problem(
                    "leaked volumes",
                    when,
                    format!("directory {d} has no owner"),
                );
            }
        }
        for r in &records {
            if !may_exist(self, r) {
                self.problem(
                    "leaked volumes",
                    when,
                    format!("record of {r} has no owner"),
                );
            }
        }
        for (what, busy) in [
            ("tmp", self.creating.is_some()),
            ("trash", self.deleting.is_some()),
        ] {
            let left = list(&self.base.join(".stowage").join(what));
            if !busy && !left.is_empty() {
                self.problem(
                    "leaked volumes",
                    when,
                    format!(".stowage/{what} holds {left:?} with no call in flight"),
                );
            }
        }
        let held: Vec<(String, Held)> = self
            .held
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, h) in &held {
            if self.deleting.as_deref() == Some(name) {
                continue;
            }
            if !dirs.contains(name) || !records.contains(name) {
                self.problem(
                    "lost volumes",
                    when,
                    format!(
                        "{when}: {name} acknowledged but directory {} record {}",
                        dirs.contains(name),
                        records.contains(name)
                    ),
                );
                continue;
            }
            if let Some(want) = &h.written {
                match self.read_back(name) {
                    Ok(got) if &got == want => {}
                    Ok(got) => self.problem(
                        "lost writes",
                        when,
                        format!("{name}: {} bytes read, other than written", got.len()),
                    ),
                    Err(e) => self.problem("lost writes", when, format!("{name}: {e}")),
                }
            }
        }
        // Mounts and loop devices below the test directory.
        let prefix = self.dir.path().to_path_buf();
        for mp in mount_points_below(&prefix) {
            if !self.allowed_mounts.iter().any(|a| mp.starts_with(a)) {
                self.problem("leftover mounts", when, format!("{}", mp.display()));
            }
        }
        for (dev, backing) in loops_below(&prefix) {
            let owner = backing
                .strip_prefix(&self.base)
                .ok()
                .and_then(|r| r.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            if !owner.is_some_and(|o| self.staged.contains(&o)) {
                self.problem(
                    "leftover mounts",
                    when,
                    format!("loop device {dev} backed by {}", backing.display()),
                );
            }
        }
    }

    /// The bytes of a volume's test file, read on the backend side.
    fn read_back(&self, name: &str) -> Result<Vec<u8>, String> {
        let vol = self.base.join(name);
        match self.kind {
            // The brick holds a volume's files as they are (one-brick volume).
            Kind::Dir | Kind::Nfs | Kind::Gluster => {
                std::fs::read(vol.join("data")).map_err(|e| e.to_string())
            }
            Kind::Block => {
                let mut f = std::fs::File::open(vol.join("disk.img")).map_err(|e| e.to_string())?;
                let len = self.held[name].written.as_ref().map_or(0, Vec::len);
                let mut buf = vec![0u8; len];
                f.seek(SeekFrom::Start(BLOCK_OFFSET))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| e.to_string())?;
                Ok(buf)
            }
            Kind::Image => {
                let staging = self.dir.path().join("staging").join(name);
                if mount_points_below(&staging).contains(&staging) {
                    // A mounted ext4's metadata may sit in its journal: read through the mount.
                    return std::fs::read(staging.join("data")).map_err(|e| e.to_string());
                }
                let img = vol.join("fs.img");
                let out = std::process::Command::new("debugfs")
                    .arg("-R")
                    .arg("cat /data")
                    .arg(&img)
                    .output()
                    .map_err(|e| e.to_string())?;
                Ok(out.stdout)
            }
        }
    }

    fn cap(&self) -> v1::VolumeCapability {
        match self.kind {
            Kind::Block => wire::block_cap(Mode::SingleNodeWriter),
            _ => wire::rwo(),
        }
    }

    fn payload(&mut self, name: &str) -> Vec<u8> {
        let mut v = format!("{name} seed {} ", self.seed).into_bytes();
        v.extend((0..4000).map(|_| self.rng.below(256) as u8));
        v
    }

    /// One cycle for volume `name`; with `keep` the volume outlives the cycle (unstaged).
    async fn cycle(&mut self, name: &str, keep: bool) {
        let mut req = wire::create(name, 16 << 20);
        req.volume_capabilities = vec![self.cap()];
        self.creating = Some(name.to_string());
        let vol = self
            .run(Op::Create(req))
            .await
            .unwrap_or_else(|| panic!("CreateVolume of {name} returned no volume"));
        self.creating = None;
        self.held.insert(
            name.to_string(),
            Held {
                volume: vol.clone(),
                written: None,
            },
        );
        if self.kind == Kind::Nfs {
            self.nfs_middle(name, &vol).await;
        } else {
            self.node_middle(name, &vol).await;
        }
        self.check(&format!("end of cycle {name}"));
        if !keep {
            self.delete(name).await;
        }
    }

    /// The node part: stage, publish, write through the mount, unpublish, unstage.
    async fn node_middle(&mut self, name: &str, vol: &v1::Volume) {
        let staging = self.dir.path().join("staging").join(name);
        let target = self.dir.path().join("pods").join(name).join("mount");
        let id = vol.volume_id.clone();
        self.allowed_mounts.insert(staging.clone());
        self.staged.insert(name.to_string());
        self.run(Op::Stage(v1::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(self.cap()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        }))
        .await;
        self.allowed_mounts.insert(target.clone());
        self.run(Op::Publish(v1::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(self.cap()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        }))
        .await;
        // A plugin that dies while the workload writes must not take the mount with it.
        if self.rng.chance(20) {
            self.kill(Proc::Node);
            *self.fig.kills.entry(Proc::Node).or_default() += 1;
            let bytes = self.payload(name);
            self.write(&target, &bytes, name);
            self.restart(Proc::Node).await;
            self.check(&format!("after node killed during the write to {name}"));
        } else {
            let bytes = self.payload(name);
            self.write(&target, &bytes, name);
        }
        self.run(Op::Unpublish(v1::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.to_string_lossy().into(),
        }))
        .await;
        self.allowed_mounts.remove(&target);
        self.run(Op::Unstage(v1::NodeUnstageVolumeRequest {
            volume_id: id,
            staging_target_path: staging.to_string_lossy().into(),
        }))
        .await;
        self.allowed_mounts.remove(&staging);
        self.staged.remove(name);
    }

    /// Writes the payload through the published target and records it once fsync returned.
    fn write(&mut self, target: &Path, bytes: &[u8], name: &str) {
        let res = if self.kind == Kind::Block {
            std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(BLOCK_OFFSET))?;
                    f.write_all(bytes)?;
                    f.sync_all()
                })
        } else {
            std::fs::File::create(target.join("data")).and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
        };
        res.unwrap_or_else(|e| {
            panic!(
                "write to {} failed: {e} (seed {})",
                target.display(),
                self.seed
            )
        });
        if let Some(h) = self.held.get_mut(name) {
            h.written = Some(bytes.to_vec());
        }
    }

    /// The controller-only middle (NFS): the bytes a node would write, put on the server, then
    /// an expansion (a metadata rewrite a kill can cut).
    async fn nfs_middle(&mut self, name: &str, vol: &v1::Volume) {
        let bytes = self.payload(name);
        let path = self.base.join(name).join("data");
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(h) = self.held.get_mut(name) {
            h.written = Some(bytes);
        }
        self.run(Op::Expand(v1::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await;
    }

    async fn delete(&mut self, name: &str) {
        let id = self.held[name].volume.volume_id.clone();
        self.deleting = Some(name.to_string());
        self.run(Op::Delete(v1::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }))
        .await;
        self.held.remove(name);
        self.deleting = None;
        self.check(&format!("after deleting {name}"));
    }

    /// Runs `cycles` cycles, deletes what was kept, prints the figures, asserts zero problems.
    async fn campaign(mut self, cycles: usize) {
        let started = Instant::now();
        for i in 0..cycles {
            let name = format!("chaos-{i}");
            let keep = self.rng.chance(25);
            self.cycle(&name, keep).await;
            self.fig.cycles += 1;
        }
        let kept: Vec<String> = self.held.keys().cloned().collect();
        for name in kept {
            self.delete(&name).await;
        }
        self.check("at the end");
        let count = |k: &str| self.fig.problems.get(k).map_or(0, BTreeMap::len);
        println!(
            "chaos {}: seed {}, {} cycles in {:.1} s, kills: controller {}, node {}; retried answers {:?}; \
             {} checks: leaked volumes {}, lost volumes {}, lost writes {}, leftover mounts/loop devices {}",
            self.kind.label(),
            self.seed,
            self.fig.cycles,
            started.elapsed().as_secs_f64(),
            self.fig.kills.get(&Proc::Controller).unwrap_or(&0),
            self.fig.kills.get(&Proc::Node).unwrap_or(&0),
            self.fig.retried,
            self.fig.checks,
            count("leaked volumes"),
            count("lost volumes"),
            count("lost writes"),
            count("leftover mounts"),
        );
        for a in &self.fig.odd_answers {
            println!("chaos {}: retried after {a}", self.kind.label());
        }
        let all: Vec<String> = self
            .fig
            .problems
            .iter()
            .flat_map(|(k, v)| {
                v.iter()
                    .map(move |(what, when)| format!("{k}: {what} (first seen {when})"))
            })
            .collect();
        if !all.is_empty() {
            self.cleanup();
            for log in [&self.ctl.log, &self.dir.path().join("stowage-node.log")] {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let notable: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                println!(
                    "{}: last warnings and errors:\n{}",
                    log.display(),
                    notable[notable.len().saturating_sub(20)..].join("\n")
                );
            }
        }
        assert!(
            all.is_empty(),
            "chaos {} (STOWAGE_CHAOS_SEED={}): {} problems:\n{}",
            self.kind.label(),
            self.seed,
            all.len(),
            all.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// After a failed campaign: leave no mount or loop device behind for the next test.
    fn cleanup(&self) {
        let prefix = self.dir.path().to_path_buf();
        let mut mps = mount_points_below(&prefix);
        mps.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for mp in mps {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&mp)
                .status();
        }
        for (dev, _) in loops_below(&prefix) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .status();
        }
    }
}

impl Drop for Harness {
    /// Whatever happened, unmount before the temp dir goes: its removal must never walk into
    /// a mount (the GlusterFS controller's management mount is the whole gluster volume).
    fn drop(&mut self) {
        self.ctl.kill();
        if let Some(n) = self.node.as_mut() {
            n.kill();
        }
        self.cleanup();
    }
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Create(r) => r.name.clone(),
        Op::Expand(r) => r.volume_id.clone(),
        Op::Delete(r) => r.volume_id.clone(),
        Op::Stage(r) => r.volume_id.clone(),
        Op::Publish(r) => r.volume_id.clone(),
        Op::Unpublish(r) => r.volume_id.clone(),
        Op::Unstage(r) => r.volume_id.clone(),
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mount_points_below(prefix: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|mp| mp.starts_with(prefix))
        .collect()
}

/// Loop devices whose backing file lies below `prefix` (from sysfs, like the plugin).
fn loops_below(prefix: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let f = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                    let f = PathBuf::from(f.trim_end());
                    f.starts_with(prefix)
                        .then(|| (format!("/dev/{}", e.file_name().to_string_lossy()), f))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cycles() -> usize {
    env_u64("STOWAGE_CHAOS_CYCLES").map_or(15, |n| n as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_local_directories() {
    let h = Harness::new(Kind::Dir).await.unwrap();
    h.campaign(cycles()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_local_ext4_images() {
    let h = Harness::new(Kind::Image).await.unwrap();
    h.campaign(cycles()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_local_raw_block() {
    let h = Harness::new(Kind::Block).await.unwrap();
    h.campaign(cycles()).await;
}

/// Run by tests/suites/45-gluster.sh, which starts glusterd (not run without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_glusterfs() {
    let Some(h) = Harness::new(Kind::Gluster).await else {
        return;
    };
    h.campaign(cycles()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nfs_controller() {
    let Some(h) = Harness::new(Kind::Nfs).await else {
        return;
    };
    h.campaign(cycles()).await;
}
