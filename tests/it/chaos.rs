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
//! the controller), local raw block (loop devices), GlusterFS, and NFS through nfs-ganesha on
//! the controller side only (the kernel NFS client is missing on these hosts, so NFS cycles are
//! create -> write on the server -> expand -> delete with only the controller killed), plus two
//! backends checked through their own APIs rather than a directory tree:
//!
//! - S3 (`chaos_s3`, a real Ceph RADOS Gateway): each cycle's volume is at random a bucket of
//!   its own (`<run tag>-<name>`) or a prefix of the run's shared bucket, mounted by rclone or
//!   s3fs (at random). Checked through the S3 API with the test user's keys: no bucket of the
//!   run and no prefix of the shared bucket (objects or `.stowage/volumes/` record) without an
//!   owner; every acknowledged volume has its bucket and record (bucket tags or the record
//!   object); every acknowledged write reads back with GetObject. The write is acknowledged
//!   once fsync and close returned (the mounters upload on flush/close; "fsync returned"
//!   alone is all a pod gets from s3fs and rclone).
//! - RBD (`chaos_rbd`, a real single-node Ceph): raw block volumes (ControllerPublish before
//!   staging, ControllerUnpublish after, as the driver is attachRequired), attached on the node
//!   through rbd-fuse and a loop device. Checked through librados/librbd (Stowage's FFI binding,
//!   the admin key): no image of the run (or one kept as `deleted-`, or a trash entry once no
//!   delete is in flight) without an owner; every acknowledged volume has its image and volume
//!   record; no publish record left once ControllerUnpublish was acknowledged (counted with
//!   the leftover mounts); every acknowledged write reads back from the image's first RADOS
//!   data object (`rbd_data.<id>.0000000000000000`). Block volumes only: reading a file of an
//!   unmounted ext4 image would need an export and debugfs per volume and check, too slow for
//!   hundreds of checks, so mkfs and ext4 mounts on RBD are not exercised here.
//!
//! For S3 and RBD the node-side checks also cover the mounter processes: no rclone, s3fs or
//! rbd-fuse of a volume that is not staged. A mounter exits on its own after its unmount
//! (rbd-fuse once unmounted; the S3 node waits up to 5 s, then stops it), so one still running
//! is given 10 s before it counts as left behind. The RBD run directory (rbd-fuse mounts,
//! their loop devices) is checked like the test directory.
//!
//! `STOWAGE_CHAOS_CYCLES` (default 15 per backend, the CI size: about 30 s for the four local
//! and NFS ones, about 25 s for S3, 40-130 s for RBD, whose retries after a kill inside a
//! librbd call wait for the dead client's watch to time out, 30 s) and `STOWAGE_CHAOS_SEED` (printed at start and
//! in every failure) size and replay a schedule. Timing makes a replay land kills at nearly,
//! not exactly, the same instants. Full size: `STOWAGE_CHAOS_CYCLES=200` (see
//! docs/reliability.md for the command). GlusterFS, S3 and RBD need their servers (suites
//! 45-gluster, 50-s3, 60-rbd); without them the tests return at once, unless
//! `STOWAGE_REQUIRE_GLUSTER`/`_S3`/`_RBD=1`, which makes a missing server a failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_csi::v1;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::volume_capability::access_mode::Mode;
#[path = "gluster_common.rs"]
mod gluster_common;
#[path = "rbd_common.rs"]
mod rbd_common;
#[path = "s3_common.rs"]
mod s3_common;

use stowage_backends::rbd::ffi;
use stowage_backends::s3::aws_sdk_s3;

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
    /// S3 buckets and prefixes on a real Ceph RADOS Gateway, rclone and s3fs mounts.
    S3,
    /// Ceph RBD raw block images, attached on the node through rbd-fuse and a loop device.
    Rbd,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Dir => "local-dir",
            Kind::Image => "local-image",
            Kind::Block => "local-block",
            Kind::Nfs => "nfs-controller",
            Kind::Gluster => "glusterfs",
            Kind::S3 => "s3",
            Kind::Rbd => "rbd",
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
    /// RBD only (attachRequired): the publish record on the image, before staging.
    Attach(v1::ControllerPublishVolumeRequest),
    Detach(v1::ControllerUnpublishVolumeRequest),
}

impl Op {
    fn server(&self) -> Proc {
        match self {
            Op::Create(_) | Op::Expand(_) | Op::Delete(_) | Op::Attach(_) | Op::Detach(_) => {
                Proc::Controller
            }
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
            Op::Attach(_) => "ControllerPublishVolume",
            Op::Detach(_) => "ControllerUnpublishVolume",
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
            Op::Attach(r) => c.controller_publish_volume(r).await.map(|_| None),
            Op::Detach(r) => c.controller_unpublish_volume(r).await.map(|_| None),
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

/// What the harness needs to look at a backend that is not a local directory tree.
enum Remote {
    /// The volume tree is a path on this machine (`Harness::base`).
    Tree,
    S3(S3Side),
    Rbd(RbdSide),
}

struct S3Side {
    /// A client of its own (not the plugins'), with the test user's keys.
    client: aws_sdk_s3::Client,
    /// Every bucket-mode volume of this run is `<bucket_prefix><name>`.
    bucket_prefix: String,
    /// The shared bucket of the prefix-mode volumes (`<shared>/<name>/...`).
    shared: String,
    /// Names made in prefix mode; the others are buckets.
    prefix_mode: BTreeSet<String>,
}

struct RbdSide {
    // Before the cluster: fields drop in order, and a pool must not outlive its cluster.
    pool: ffi::Pool,
    _cluster: ffi::Cluster,
    /// Every image of this run is `<image_prefix><name>`.
    image_prefix: String,
    /// The node's runDir: rbd-fuse mounts and their loop devices' backing files.
    run_dir: PathBuf,
}

/// The node ID of the one node plugin (RBD publish records name it).
const NODE_ID: &str = "chaos-node";

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
    /// RBD: names whose ControllerPublish was sent and ControllerUnpublish not acknowledged.
    attached: BTreeSet<String>,
    remote: Remote,
    /// CSI secrets of every controller call and NodeStage (S3 and RBD take their keys there).
    secrets: HashMap<String, String>,
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
        let ceph = match kind {
            Kind::Rbd => Some(rbd_common::cluster()?),
            _ => None,
        };
        let s3 = match kind {
            Kind::S3 => Some(s3_common::s3_env()?),
            _ => None,
        };
        let dir = match &ceph {
            // Below ceph.sh's mount root, whose `stop` cleans up whatever a failed run left.
            Some(env) => tempfile::Builder::new()
                .prefix("chaos-")
                .tempdir_in(&env["CEPH_MNT_ROOT"])
                .unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let cfg = dir.path().join("config.yaml");
        // Names of this run's buckets and images: several runs may share one server.
        let tag = format!("chaos{:x}", seed & 0xff_ffff_ffff);
        let mut remote = Remote::Tree;
        let mut secrets = HashMap::new();
        let base = match kind {
            Kind::S3 => {
                let env = s3.as_ref().unwrap();
                let bucket_prefix = format!("{tag}-");
                std::fs::write(
                    &cfg,
                    format!(
                        "backend: s3\nnodeStateDir: {}\ninstances:\n  rgw:\n    endpoint: {}\n    pathStyle: true\n    timeoutSecs: 10\n    bucketPrefix: {bucket_prefix}\n",
                        dir.path().join("node-state").display(),
                        env.endpoint
                    ),
                )
                .unwrap();
                secrets = env.secrets();
                remote = Remote::S3(S3Side {
                    client: env.client(),
                    bucket_prefix,
                    shared: format!("{tag}-shared"),
                    prefix_mode: BTreeSet::new(),
                });
                dir.path().join("base")
            }
            Kind::Rbd => {
                let env = ceph.as_ref().unwrap();
                let image_prefix = format!("{tag}-");
                let made = rbd_common::config(
                    env,
                    dir.path(),
                    "chaos",
                    &format!("    imagePrefix: {image_prefix}\n"),
                );
                let text = std::fs::read_to_string(&made).unwrap();
                let run_dir = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("runDir: "))
                    .map(PathBuf::from)
                    .expect("rbd_common::config writes runDir");
                std::fs::rename(&made, &cfg).unwrap();
                let cluster = ffi::Cluster::connect(&ffi::ConnectOptions {
                    monitors: &env["CEPH_MON_HOST"],
                    user: "admin",
                    key: &env["CEPH_ADMIN_KEY"],
                    op_timeout_secs: 15,
                })
                .unwrap_or_else(|e| panic!("connecting to the test cluster: {e}"));
                let pool = cluster.pool("rbd").unwrap();
                secrets = HashMap::from([
                    ("userID".to_string(), "admin".to_string()),
                    ("userKey".to_string(), env["CEPH_ADMIN_KEY"].clone()),
                ]);
                remote = Remote::Rbd(RbdSide {
                    pool,
                    _cluster: cluster,
                    image_prefix,
                    run_dir,
                });
                dir.path().join("base")
            }
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
            let mut p = Plugin::node(dir.path(), &cfg, NODE_ID).unwrap();
            let n = node_client(p.ready().await.unwrap());
            if kind == Kind::Rbd {
                // ControllerPublish refuses a node that has not registered with the cluster
                // yet (it does so in the background at its first start; restarts find it).
                rbd_common::wait_registered(&p.log, NODE_ID);
            }
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
            attached: BTreeSet::new(),
            remote,
            secrets,
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
                let mut nd = Plugin::node(self.dir.path(), &self.cfg, NODE_ID).unwrap();
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
            // Bucket or prefix operations on the gateway; a mounter started or stopped.
            (Kind::S3, Op::Create(_) | Op::Delete(_)) => 300,
            (Kind::S3, Op::Stage(_) | Op::Unstage(_)) => 800,
            // librbd calls (create, record, remove); rbd-fuse + losetup on the node.
            (Kind::Rbd, Op::Create(_) | Op::Delete(_)) => 100,
            (Kind::Rbd, Op::Stage(_)) => 250,
            (Kind::Rbd, Op::Unstage(_)) => 120,
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
                    ))
                    .await;
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
                        "{} {}: {} still failing after 60 s of retries: {:?} {} (seed {}; first \
                         attempt: {})",
                        self.kind.label(),
                        op.label(),
                        op_name(&op),
                        s.code(),
                        s.message(),
                        self.seed,
                        match plan {
                            Some((victim, delay)) =>
                                format!("{victim:?} killed {} ms into it", delay.as_millis()),
                            None => "no kill planned".into(),
                        }
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

    /// The invariants, read from the backend itself and the kernel's tables.
    async fn check(&mut self, when: &str) {
        self.fig.checks += 1;
        match self.kind {
            Kind::S3 => self.check_s3(when).await,
            Kind::Rbd => self.check_rbd(when),
            _ => self.check_dirs(when),
        }
        self.check_node_side(when).await;
    }

    /// Whether `name` may have something on the backend: held, or its create/delete in flight.
    fn may_exist(&self, name: &str) -> bool {
        self.held.contains_key(name)
            || self.creating.as_deref() == Some(name)
            || self.deleting.as_deref() == Some(name)
    }

    /// The directory-per-volume backends (local, NFS, GlusterFS): the volume tree itself.
    fn check_dirs(&mut self, when: &str) {
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
                let got = self.read_back(name);
                self.judge_bytes(when, name, want, got);
            }
        }
    }

    /// S3, through the S3 API: no bucket of this run and no prefix (objects or record) in the
    /// shared bucket without an owner; every acknowledged volume has its bucket and its record
    /// (bucket tags, or the record object of a prefix); every acknowledged write reads back
    /// with GetObject.
    async fn check_s3(&mut self, when: &str) {
        let Remote::S3(s3) = &self.remote else {
            return;
        };
        let c = s3.client.clone();
        let (bucket_prefix, shared) = (s3.bucket_prefix.clone(), s3.shared.clone());
        let prefix_mode = s3.prefix_mode.clone();
        let listed = c
            .list_buckets()
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListBuckets: {e:?} (seed {})", self.seed));
        let buckets: BTreeSet<String> = listed
            .buckets()
            .iter()
            .filter_map(|b| b.name())
            .filter(|n| n.starts_with(&bucket_prefix))
            .map(str::to_owned)
            .collect();
        for b in &buckets {
            let name = &b[bucket_prefix.len()..];
            if *b != shared && (!self.may_exist(name) || prefix_mode.contains(name)) {
                self.problem("leaked volumes", when, format!("bucket {b} has no owner"));
            }
        }
        // The shared bucket: `<name>/...` objects and `.stowage/volumes/<name>.json` records.
        let mut records = BTreeSet::new();
        let mut owners = BTreeSet::new();
        if buckets.contains(&shared) {
            for k in s3_common::keys(&c, &shared, "").await {
                if let Some(p) = k
                    .strip_prefix(stowage_backends::s3::META_PREFIX)
                    .and_then(|r| r.strip_suffix(".json"))
                {
                    records.insert(p.to_string());
                    owners.insert(p.to_string());
                } else {
                    // Anything else under .stowage/ shows up as an owner ".stowage".
                    owners.insert(k.split('/').next().unwrap_or_default().to_string());
                }
            }
        }
        for p in &owners {
            if !self.may_exist(p) || !prefix_mode.contains(p) {
                self.problem(
                    "leaked volumes",
                    when,
                    format!("s3://{shared}/{p}/ (objects or record) has no owner"),
                );
            }
        }
        let held: Vec<(String, Option<Vec<u8>>)> = self
            .held
            .iter()
            .filter(|(n, _)| self.deleting.as_deref() != Some(n.as_str()))
            .map(|(n, h)| (n.clone(), h.written.clone()))
            .collect();
        // One GetBucketTagging and one GetObject per volume, all at once: the checks run
        // hundreds of times with up to a quarter of the names held.
        let reads = held.iter().map(|(name, written)| {
            let c = c.clone();
            let in_prefix = prefix_mode.contains(name);
            let (bucket, key) = if in_prefix {
                (shared.clone(), format!("{name}/data"))
            } else {
                (format!("{bucket_prefix}{name}"), "data".to_string())
            };
            let recorded = records.contains(name);
            let exists = buckets.contains(&bucket);
            async move {
                let recorded: Result<bool, String> = if !exists {
                    Err(format!("bucket {bucket} is gone"))
                } else if in_prefix {
                    Ok(recorded)
                } else {
                    match c.get_bucket_tagging().bucket(&bucket).send().await {
                        Ok(t) => Ok(t
                            .tag_set()
                            .iter()
                            .any(|t| t.key() == stowage_backends::s3::TAG_VOLUME)),
                        Err(e) => Err(format!(
                            "GetBucketTagging {bucket}: {}",
                            aws_sdk_s3::error::DisplayErrorContext(&e)
                        )),
                    }
                };
                let bytes = match written {
                    None => None,
                    Some(_) => Some(
                        match c.get_object().bucket(&bucket).key(&key).send().await {
                            Ok(o) => o
                                .body
                                .collect()
                                .await
                                .map(|b| b.into_bytes().to_vec())
                                .map_err(|e| format!("reading s3://{bucket}/{key}: {e}")),
                            Err(e) => Err(format!(
                                "GetObject s3://{bucket}/{key}: {}",
                                aws_sdk_s3::error::DisplayErrorContext(&e)
                            )),
                        },
                    ),
                };
                (recorded, bytes)
            }
        });
        let seen = futures::future::join_all(reads).await;
        for ((name, written), (recorded, bytes)) in held.iter().zip(seen) {
            match recorded {
                Ok(true) => {}
                Ok(false) => self.problem(
                    "lost volumes",
                    when,
                    format!("{name} acknowledged but its record is missing"),
                ),
                Err(e) => self.problem("lost volumes", when, format!("{name}: {e}")),
            }
            if let (Some(want), Some(got)) = (written, bytes) {
                self.judge_bytes(when, name, want, got);
            }
        }
    }

    /// RBD, through librados/librbd with the admin key: no image (or trash entry, or image
    /// kept as "deleted") of this run without an owner; every acknowledged volume has its
    /// image and volume record; no publish record on a volume whose ControllerUnpublish was
    /// acknowledged; every acknowledged write reads back from the image's first data object.
    fn check_rbd(&mut self, when: &str) {
        let Remote::Rbd(r) = &self.remote else {
            return;
        };
        let seed = self.seed;
        let images: BTreeMap<String, String> = r
            .pool
            .list_images()
            .unwrap_or_else(|e| panic!("listing images: {e} (seed {seed})"))
            .into_iter()
            .filter_map(|(id, name)| {
                name.strip_prefix(&r.image_prefix)
                    .map(|n| (n.to_string(), id.clone()))
            })
            .collect();
        let trash: Vec<String> = r
            .pool
            .trash_list()
            .unwrap_or_else(|e| panic!("listing the trash: {e} (seed {seed})"))
            .into_iter()
            .filter(|t| t.name.starts_with(&r.image_prefix))
            .map(|t| format!("{} (id {})", t.name, t.id))
            .collect();
        let held: Vec<(String, Option<Vec<u8>>)> = self
            .held
            .iter()
            .filter(|(n, _)| self.deleting.as_deref() != Some(n.as_str()))
            .map(|(n, h)| (n.clone(), h.written.clone()))
            .collect();
        // A few librbd/librados calls per volume, on a thread each: with up to a quarter of
        // the names held, one after the other they would dominate a long run.
        type Seen = (
            Result<bool, String>,
            Vec<String>,
            Option<Result<Vec<u8>, String>>,
        );
        let seen: Vec<Seen> = std::thread::scope(|sc| {
            let handles: Vec<_> = held
                .iter()
                .map(|(name, written)| {
                    let image = format!("{}{name}", r.image_prefix);
                    let id = images.get(name).cloned();
                    let pool = &r.pool;
                    sc.spawn(move || -> Seen {
                        let (recorded, attach) = match pool.open(&image) {
                            Ok(img) => {
                                let rec = img
                                    .metadata_get(stowage_backends::rbd::META_VOLUME)
                                    .map(|m| m.is_some())
                                    .map_err(|e| format!("reading the record of {image}: {e}"));
                                let attach = img
                                    .metadata_list()
                                    .map(|all| {
                                        all.into_iter()
                                            .filter(|(k, _)| {
                                                k.starts_with(stowage_backends::rbd::META_ATTACH)
                                            })
                                            .map(|(_, v)| v)
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                (rec, attach)
                            }
                            Err(e) => (Err(format!("opening image {image}: {e}")), Vec::new()),
                        };
                        // Format 2 data objects: rbd_data.<image id>.<object number>, 4 MiB
                        // each (order 22), so the test bytes lie in object 0.
                        let bytes = written.as_ref().map(|w| {
                            let id = id.ok_or_else(|| format!("image {image} is gone"))?;
                            let oid = format!("rbd_data.{id}.{:016x}", 0);
                            let obj = pool
                                .read_object(&oid)
                                .map_err(|e| format!("reading {oid}: {e}"))?
                                .ok_or_else(|| format!("{oid} does not exist"))?;
                            let at = BLOCK_OFFSET as usize;
                            Ok(obj
                                .get(at..(at + w.len()).min(obj.len()))
                                .unwrap_or(&[])
                                .to_vec())
                        });
                        (recorded, attach, bytes)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for n in images.keys() {
            if n.starts_with("deleted-") {
                // Kept for snapshots or clones, and this harness makes none.
                self.problem("leaked volumes", when, format!("image {n} kept as deleted"));
            } else if !self.may_exist(n) {
                self.problem("leaked volumes", when, format!("image of {n} has no owner"));
            }
        }
        if self.deleting.is_none() {
            for t in trash {
                self.problem("leaked volumes", when, format!("trash holds {t}"));
            }
        }
        for ((name, written), (recorded, attach, bytes)) in held.iter().zip(seen) {
            match recorded {
                Ok(true) => {}
                Ok(false) => self.problem(
                    "lost volumes",
                    when,
                    format!("{name} acknowledged but its image has no volume record"),
                ),
                Err(e) => self.problem("lost volumes", when, format!("{name}: {e}")),
            }
            if !attach.is_empty() && !self.attached.contains(name) {
                // A publish record outliving its ControllerUnpublish keeps DeleteVolume
                // refusing the volume; counted with the node-side leftovers.
                self.problem(
                    "leftover mounts",
                    when,
                    format!("publish record of {name} after ControllerUnpublish: {attach:?}"),
                );
            }
            if let (Some(want), Some(got)) = (written, bytes) {
                self.judge_bytes(when, name, want, got);
            }
        }
    }

    fn judge_bytes(&mut self, when: &str, name: &str, want: &[u8], got: Result<Vec<u8>, String>) {
        match got {
            Ok(got) if got == want => {}
            Ok(got) => self.problem(
                "lost writes",
                when,
                format!("{name}: {} bytes read, other than written", got.len()),
            ),
            Err(e) => self.problem("lost writes", when, format!("{name}: {e}")),
        }
    }

    /// Mounts, loop devices and mounter processes: below the test directory (and the RBD run
    /// directory), only those of volumes whose stage was sent and whose unstage was not yet
    /// acknowledged.
    async fn check_node_side(&mut self, when: &str) {
        let mut roots = vec![self.dir.path().to_path_buf()];
        if let Remote::Rbd(r) = &self.remote {
            roots.push(r.run_dir.clone());
        }
        for root in &roots {
            for mp in mount_points_below(root) {
                if !self.allowed_mounts.iter().any(|a| mp.starts_with(a)) {
                    self.problem("leftover mounts", when, format!("{}", mp.display()));
                }
            }
            for (dev, backing) in loops_below(root) {
                let owner = match &self.remote {
                    // <runDir>/<hash>/fuse/<image>: the image's name says whose it is.
                    Remote::Rbd(r) => backing
                        .file_name()
                        .and_then(|f| f.to_str())
                        .and_then(|f| f.strip_prefix(&r.image_prefix))
                        .map(str::to_owned),
                    _ => backing
                        .strip_prefix(&self.base)
                        .ok()
                        .and_then(|r| r.components().next())
                        .map(|c| c.as_os_str().to_string_lossy().into_owned()),
                };
                if !owner.is_some_and(|o| self.staged.contains(&o)) {
                    self.problem(
                        "leftover mounts",
                        when,
                        format!("loop device {dev} backed by {}", backing.display()),
                    );
                }
            }
        }
        if matches!(self.kind, Kind::S3 | Kind::Rbd) {
            // A mounter leaves after its unmount, on its own: rbd-fuse exits once unmounted,
            // and the S3 node waits for its mounter at most 5 s before it stops it. So one
            // still running is given 10 s to go before it counts as left behind.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left: Vec<String> = mounters(&roots, &self.dir.path().join("staging"))
                    .into_iter()
                    .filter(|(_, _, owner)| {
                        !self
                            .owner_name(owner)
                            .is_some_and(|o| self.staged.contains(&o))
                    })
                    .map(|(pid, prog, owner)| format!("{prog} (pid {pid}) of {owner}"))
                    .collect();
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    for l in left {
                        self.problem("leftover mounts", when, format!("mounter {l} still runs"));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The volume name a mounter serves: its rbd-fuse image (prefix removed) or its S3
    /// staging directory's name.
    fn owner_name(&self, owner: &str) -> Option<String> {
        match &self.remote {
            Remote::Rbd(r) => owner.strip_prefix(&r.image_prefix).map(str::to_owned),
            _ => Some(owner.to_owned()),
        }
    }

    /// The bytes of a volume's test file, read on the backend side (directory trees; S3 and
    /// RBD read theirs in their own checks).
    fn read_back(&self, name: &str) -> Result<Vec<u8>, String> {
        let vol = self.base.join(name);
        match self.kind {
            Kind::S3 | Kind::Rbd => Err("not a directory tree".into()),
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
            Kind::Block | Kind::Rbd => wire::block_cap(Mode::SingleNodeWriter),
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
        req.secrets = self.secrets.clone();
        // S3: half the volumes are prefixes of one shared bucket, half buckets of their own;
        // rclone and s3fs mount them by turns.
        let mut want_id = None;
        if let Remote::S3(s3) = &mut self.remote {
            let prefix = self.rng.chance(50);
            let mounter = if self.rng.chance(50) {
                "rclone"
            } else {
                "s3fs"
            };
            req.parameters.insert("mounter".into(), mounter.into());
            if prefix {
                req.parameters.insert("mode".into(), "prefix".into());
                req.parameters.insert("bucket".into(), s3.shared.clone());
                s3.prefix_mode.insert(name.to_string());
                want_id = Some(format!("rgw/{}/{name}", s3.shared));
            } else {
                want_id = Some(format!("rgw/{}{name}", s3.bucket_prefix));
            }
        }
        self.creating = Some(name.to_string());
        let vol = self
            .run(Op::Create(req))
            .await
            .unwrap_or_else(|| panic!("CreateVolume of {name} returned no volume"));
        if let Some(want) = want_id {
            // The checks look for the bucket or prefix by name: it must be where they look.
            assert_eq!(vol.volume_id, want, "where the S3 volume {name} lives");
        }
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
        self.check(&format!("end of cycle {name}")).await;
        if !keep {
            self.delete(name).await;
        }
    }

    /// The node part: stage, publish, write through the mount, unpublish, unstage.
    async fn node_middle(&mut self, name: &str, vol: &v1::Volume) {
        let staging = self.dir.path().join("staging").join(name);
        let target = self.dir.path().join("pods").join(name).join("mount");
        let id = vol.volume_id.clone();
        if self.kind == Kind::Rbd {
            self.attached.insert(name.to_string());
            self.run(Op::Attach(v1::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE_ID.into(),
                volume_capability: Some(self.cap()),
                secrets: self.secrets.clone(),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            }))
            .await;
        }
        self.allowed_mounts.insert(staging.clone());
        let fuse = self.rbd_fuse_mount(&id);
        if let Some(f) = &fuse {
            self.allowed_mounts.insert(f.clone());
        }
        self.staged.insert(name.to_string());
        self.run(Op::Stage(v1::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(self.cap()),
            volume_context: vol.volume_context.clone(),
            secrets: self.secrets.clone(),
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
            self.check(&format!("after node killed during the write to {name}"))
                .await;
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
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
        }))
        .await;
        self.allowed_mounts.remove(&staging);
        if let Some(f) = &fuse {
            self.allowed_mounts.remove(f);
        }
        self.staged.remove(name);
        if self.kind == Kind::Rbd {
            self.run(Op::Detach(v1::ControllerUnpublishVolumeRequest {
                volume_id: id,
                node_id: NODE_ID.into(),
                secrets: self.secrets.clone(),
            }))
            .await;
            self.attached.remove(name);
        }
    }

    /// RBD: where the node's rbd-fuse mounts a volume's image (`<runDir>/<hash>/fuse`, the
    /// hash being the first 24 hex digits of the volume ID's SHA-256, as the node makes it).
    fn rbd_fuse_mount(&self, volume_id: &str) -> Option<PathBuf> {
        match &self.remote {
            Remote::Rbd(r) => Some(
                r.run_dir
                    .join(stowage_backends::s3::hash_hex(volume_id, 24))
                    .join("fuse"),
            ),
            _ => None,
        }
    }

    /// Writes the payload through the published target and records it once fsync returned.
    fn write(&mut self, target: &Path, bytes: &[u8], name: &str) {
        let res = if matches!(self.kind, Kind::Block | Kind::Rbd) {
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
            secrets: self.secrets.clone(),
        }))
        .await;
        self.held.remove(name);
        if let Remote::S3(s3) = &mut self.remote {
            s3.prefix_mode.remove(name);
        }
        self.deleting = None;
        self.check(&format!("after deleting {name}")).await;
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
        self.check("at the end").await;
        if let Remote::S3(s3) = &self.remote {
            // The harness's own shared bucket, empty once every prefix volume is deleted
            // (a leak keeps it, and the failure names what is in it).
            let _ = s3.client.delete_bucket().bucket(&s3.shared).send().await;
        }
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
        let mut roots = vec![self.dir.path().to_path_buf()];
        if let Remote::Rbd(r) = &self.remote {
            roots.push(r.run_dir.clone());
        }
        for prefix in &roots {
            let mut mps = mount_points_below(prefix);
            mps.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for mp in mps {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&mp)
                    .status();
            }
            for (dev, _) in loops_below(prefix) {
                let _ = std::process::Command::new("losetup")
                    .arg("-d")
                    .arg(&dev)
                    .status();
            }
        }
        // Mounters whose mounts went above: nothing of this run may keep running.
        for (pid, _, _) in mounters(&roots, &self.dir.path().join("staging")) {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
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
        if let Remote::Rbd(r) = &self.remote {
            // Only when empty (never recursively: a live rbd-fuse mount below would have its
            // image file unlinked, which removes the image).
            let _ = std::fs::remove_dir(&r.run_dir);
        }
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
        Op::Attach(r) => r.volume_id.clone(),
        Op::Detach(r) => r.volume_id.clone(),
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

/// Mounter processes (rclone, s3fs, rbd-fuse) with a path below one of `roots` on their
/// command line, as (pid, program, whose): the image rbd-fuse serves (`-r`), or the name of
/// the S3 mounter's staging directory below `staging`.
fn mounters(roots: &[PathBuf], staging: &Path) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    for stowage_tests::Process { pid, args, prog } in stowage_tests::processes() {
        if !matches!(prog.as_str(), "rclone" | "s3fs" | "rbd-fuse")
            || !args
                .iter()
                .any(|a| roots.iter().any(|r| Path::new(a).starts_with(r)))
        {
            continue;
        }
        let owner = if prog == "rbd-fuse" {
            args.iter()
                .position(|a| a == "-r")
                .and_then(|i| args.get(i + 1))
                .cloned()
        } else {
            args.iter().find_map(|a| {
                Path::new(a)
                    .strip_prefix(staging)
                    .ok()
                    .and_then(|r| r.components().next())
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
            })
        };
        out.push((pid, prog, owner.unwrap_or_else(|| "?".into())));
    }
    out
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

/// Run by tests/suites/50-s3.sh, which starts Ceph with radosgw (not run without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_s3() {
    let Some(h) = Harness::new(Kind::S3).await else {
        return;
    };
    h.campaign(cycles()).await;
}

/// Run by tests/suites/60-rbd.sh, which starts Ceph (not run without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_rbd() {
    let Some(h) = Harness::new(Kind::Rbd).await else {
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
