//! Shared by the RBD integration tests: the cluster from tests/infra/ceph.sh, plugin configs,
//! request builders, and checks made with the `rbd` CLI (what is really on the cluster).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Plugin, controller_clients, node_client};
use tonic::transport::Channel;

/// The cluster the suite started: `$STOWAGE_CEPH_ENV` names ceph.sh's env file. None (test
/// skipped) when unset, unless `STOWAGE_REQUIRE_RBD=1`, which makes a missing cluster a failure.
pub fn cluster() -> Option<HashMap<String, String>> {
    let required = std::env::var("STOWAGE_REQUIRE_RBD").is_ok_and(|v| v == "1");
    let Ok(path) = std::env::var("STOWAGE_CEPH_ENV") else {
        assert!(
            !required,
            "STOWAGE_REQUIRE_RBD=1 but STOWAGE_CEPH_ENV is not set: start tests/infra/ceph.sh"
        );
        eprintln!(
            "skipped: no Ceph cluster (set STOWAGE_CEPH_ENV to tests/infra/ceph.sh's env file)"
        );
        return None;
    };
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("STOWAGE_CEPH_ENV={path}: {e}"));
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect();
    let ok = Command::new("ceph")
        .args(["-c", &env["CEPH_CONF"], "--connect-timeout", "10", "health"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "the Ceph cluster of {path} does not answer");
    Some(env)
}

pub struct Rbd {
    pub env: HashMap<String, String>,
    pub dir: tempfile::TempDir,
    pub ctl: Plugin,
    pub c: stowage_tests::Clients,
    pub nodes: Vec<(Plugin, v1::node_client::NodeClient<Channel>)>,
    pub config: PathBuf,
}

/// A config for the test cluster. `extra` is appended to the instance (YAML lines).
pub fn config(env: &HashMap<String, String>, dir: &Path, name: &str, extra: &str) -> PathBuf {
    // Outside the test's temp dir: its recursive removal must never walk into an rbd-fuse
    // mount a failed test left (unlinking the file there removes the image).
    let run = Path::new(&env["CEPH_MNT_ROOT"]).join(format!(
        "run-{}-{name}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let p = dir.join(format!("{name}.yaml"));
    let timeout = if extra.contains("opTimeoutSecs") {
        ""
    } else {
        "    opTimeoutSecs: 15\n"
    };
    std::fs::write(
        &p,
        format!(
            "backend: rbd\ninstances:\n  default:\n    monitors: \"{}\"\n    pool: rbd\n    attach: rbd-fuse\n    keyringFile: {}\n    runDir: {}\n{timeout}{extra}",
            env["CEPH_MON_HOST"],
            env["CEPH_KEYRING"],
            run.display()
        ),
    )
    .unwrap();
    p
}

impl Rbd {
    /// Controller plus `nodes` node plugins (node-0, node-1...), each with its own run dir.
    pub async fn start(nodes: usize) -> Option<Rbd> {
        Self::start_with(nodes, "").await
    }

    pub async fn start_with(nodes: usize, extra: &str) -> Option<Rbd> {
        let env = cluster()?;
        assert!(
            stowage_tests::is_root(),
            "RBD node tests attach and mount: run as root"
        );
        let dir = tempfile::Builder::new()
            .prefix("rbd-it-")
            .tempdir_in(&env["CEPH_MNT_ROOT"])
            .unwrap();
        let cfg = config(&env, dir.path(), "ctl", extra);
        let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
        let c = controller_clients(ctl.ready().await.unwrap());
        let mut out = Vec::new();
        for i in 0..nodes {
            let nd = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            let ncfg = config(&env, &nd, "node", extra);
            let mut p =
                Plugin::node_with_root(&nd, dir.path(), &ncfg, &format!("node-{i}")).unwrap();
            let n = node_client(p.ready().await.unwrap());
            wait_registered(&p.log, &format!("node-{i}"));
            out.push((p, n));
        }
        Some(Rbd {
            env,
            dir,
            ctl,
            c,
            nodes: out,
            config: cfg,
        })
    }

    pub fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".to_string(), "admin".to_string()),
            ("userKey".to_string(), self.env["CEPH_ADMIN_KEY"].clone()),
        ])
    }

    pub fn node(&mut self, i: usize) -> &mut v1::node_client::NodeClient<Channel> {
        &mut self.nodes[i].1
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `rbd ...` against the test cluster; stdout on success.
    pub fn rbd(&self, args: &[&str]) -> Result<String, String> {
        stdout_of(
            Command::new("rbd")
                .args(["-c", &self.env["CEPH_CONF"], "-p", "rbd"])
                .args(args),
        )
    }

    /// `rados -p rbd ...` against the test cluster; stdout on success. `stdin`: fed to it.
    pub fn rados(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, String> {
        use std::io::Write;
        let mut child = Command::new("rados")
            .args(["-c", &self.env["CEPH_CONF"], "-p", "rbd"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or_default()).unwrap();
        drop(input);
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(o.stdout)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// `ceph ...` against the test cluster; stdout on success.
    pub fn ceph(&self, args: &[&str]) -> Result<String, String> {
        stdout_of(
            Command::new("ceph")
                .args(["-c", &self.env["CEPH_CONF"], "--connect-timeout", "15"])
                .args(args),
        )
    }

    /// The image ID of `image` (`rbd info`).
    pub fn image_id(&self, image: &str) -> String {
        let info = self.rbd(&["info", image]).unwrap();
        info.lines()
            .find_map(|l| l.trim().strip_prefix("id: "))
            .unwrap_or_else(|| panic!("no id in rbd info: {info}"))
            .to_string()
    }

    /// Leaves `image` exactly as an `rbd_remove` SIGKILLed while deleting its objects does: in
    /// the trash with source REMOVING and state REMOVING, header, metadata and data in place.
    /// `rbd trash mv` makes a source USER entry; the two enum bytes of its encoded
    /// cls::rbd::TrashImageSpec (v2: 6-byte header, source u8, name, two utime_t, state u8)
    /// are then set as librbd's Image::remove and Trash::remove set them. (An `rbd rm` killed
    /// in the middle of a 2 TiB image gave the same bytes on this Pacific cluster.) Returns
    /// the image ID.
    pub fn half_remove(&self, image: &str) -> String {
        let id = self.image_id(image);
        self.rbd(&["trash", "mv", image]).unwrap();
        let key = format!("id_{id}");
        let tmp = self.dir.path().join(format!("trash-{id}"));
        self.rados(
            &["getomapval", "rbd_trash", &key, tmp.to_str().unwrap()],
            None,
        )
        .unwrap();
        let mut spec = std::fs::read(&tmp).unwrap();
        assert_eq!(
            (spec[0], spec[6], spec[spec.len() - 1]),
            (2, 0, 0),
            "not a v2 TrashImageSpec of source USER, state NORMAL: {spec:?}"
        );
        spec[6] = 3; // RBD_TRASH_IMAGE_SOURCE_REMOVING
        *spec.last_mut().unwrap() = 2; // TRASH_IMAGE_STATE_REMOVING
        self.rados(&["setomapval", "rbd_trash", &key], Some(&spec))
            .unwrap();
        // What the killed delete left: gone by name, still listed, hidden from the trash list.
        assert!(self.rbd(&["info", image]).is_err());
        assert!(self.images().contains(&image.to_string()));
        assert!(!self.trash().contains(&id), "{}", self.trash());
        id
    }

    /// Whether anything of image `id` is left on the cluster: trash entry or header object.
    pub fn image_left(&self, id: &str) -> Option<String> {
        let keys = self.rados(&["listomapkeys", "rbd_trash"], None).unwrap();
        if String::from_utf8_lossy(&keys).contains(id) {
            return Some(format!("trash entry id_{id}"));
        }
        self.rados(&["stat", &format!("rbd_header.{id}")], None)
            .ok()
            .map(|_| format!("object rbd_header.{id}"))
    }

    pub fn images(&self) -> Vec<String> {
        self.rbd(&["ls"])
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    pub fn trash(&self) -> String {
        self.rbd(&["trash", "ls", "--all"]).unwrap()
    }

    pub async fn create(
        &mut self,
        req: v1::CreateVolumeRequest,
    ) -> Result<v1::Volume, tonic::Status> {
        let mut req = req;
        req.secrets = self.secrets();
        self.c
            .controller
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        let secrets = self.secrets();
        self.c
            .controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets,
            })
            .await
            .map(|_| ())
    }

    pub async fn snapshot(&mut self, name: &str, vol: &str) -> Result<v1::Snapshot, tonic::Status> {
        let secrets = self.secrets();
        self.c
            .controller
            .create_snapshot(v1::CreateSnapshotRequest {
                name: name.into(),
                source_volume_id: vol.into(),
                secrets,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    pub async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        let secrets = self.secrets();
        self.c
            .controller
            .delete_snapshot(v1::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                secrets,
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &mut self,
        vol: &str,
        node: &str,
        cap: v1::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.c
            .controller
            .controller_publish_volume(v1::ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&mut self, vol: &str, node: &str) -> Result<(), tonic::Status> {
        self.c
            .controller
            .controller_unpublish_volume(v1::ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// NodeStage on node `i` at `<dir>/<name>/staging`.
    pub async fn stage(
        &mut self,
        i: usize,
        vol: &v1::Volume,
        name: &str,
        cap: v1::VolumeCapability,
    ) -> Result<PathBuf, tonic::Status> {
        let staging = self.path(&format!("{name}/staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let secrets = self.secrets();
        self.node(i)
            .node_stage_volume(v1::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap),
                volume_context: vol.volume_context.clone(),
                secrets,
                ..Default::default()
            })
            .await
            .map(|_| staging)
    }

    pub async fn unstage(&mut self, i: usize, vol: &str, name: &str) -> Result<(), tonic::Status> {
        let staging = self.path(&format!("{name}/staging"));
        self.node(i)
            .node_unstage_volume(v1::NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }

    /// NodePublish at `<dir>/<name>/target`.
    pub async fn node_publish(
        &mut self,
        i: usize,
        vol: &v1::Volume,
        name: &str,
        cap: v1::VolumeCapability,
    ) -> Result<PathBuf, tonic::Status> {
        let staging = self.path(&format!("{name}/staging"));
        let target = self.path(&format!("{name}/target"));
        self.node(i)
            .node_publish_volume(v1::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map(|_| target)
    }

    pub async fn node_unpublish(
        &mut self,
        i: usize,
        vol: &str,
        name: &str,
    ) -> Result<(), tonic::Status> {
        let target = self.path(&format!("{name}/target"));
        self.node(i)
            .node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }
}

/// stowage-node registers itself with the cluster in the background at start; ControllerPublish
/// refuses a node before that (NOT_FOUND), as it should.
pub fn wait_registered(log: &Path, node: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("node registered with the backend") && l.contains(node))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {node} did not register within 30 s; log:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn fs_cap(fs: &str) -> v1::VolumeCapability {
    v1::VolumeCapability {
        access_type: Some(v1::volume_capability::AccessType::Mount(
            v1::volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            },
        )),
        access_mode: Some(v1::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap(mode: Mode) -> v1::VolumeCapability {
    stowage_tests::wire::block_cap(mode)
}

pub fn create_req(name: &str, bytes: i64, cap: v1::VolumeCapability) -> v1::CreateVolumeRequest {
    v1::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// A name no other test run uses (several runs may share one cluster).
pub fn unique(name: &str) -> String {
    format!("{name}-{}", &uuid_like()[..8])
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &f, &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// Total bytes of the filesystem at `p` (statvfs).
pub fn fs_size(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_blocks * st.f_frsize
}

/// Loop devices whose backing file is below `root` (sysfs).
pub fn loops_below(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && b.trim_end().starts_with(root.to_str().unwrap())
        {
            out.push(name);
        }
    }
    out
}

/// Runs a Ceph CLI: its stdout on success, its stderr as the error.
fn stdout_of(cmd: &mut Command) -> Result<String, String> {
    let o = cmd.output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}
