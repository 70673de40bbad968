//! Capacity of local directory volumes, through the real binaries over their sockets: a write
//! past the volume's size fails (ENOSPC or EDQUOT), NodeGetVolumeStats reports the size and the
//! real usage, and ControllerExpandVolume (plus NodeExpandVolume for images) lets it grow.
//! Once with `capacity: image` (ext4 image on a loop device), once with project quotas on a
//! real XFS filesystem mounted with prjquota (made here on a loop device). Needs root.

use std::io::Write;
use std::path::{Path, PathBuf};

use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, is_root, node_client, wire};

const MIB: i64 = 1 << 20;

struct Env {
    dir: tempfile::TempDir,
    ctl: Plugin,
    node: Plugin,
    c: stowage_tests::Clients,
    n: v1::node_client::NodeClient<tonic::transport::Channel>,
}

async fn start(dir: tempfile::TempDir, base: &Path, capacity: &str) -> Env {
    let cfg = dir.path().join("local.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: local\ninstances:\n  default:\n    baseDir: {}\n{capacity}",
            base.display()
        ),
    )
    .unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut node = Plugin::node(dir.path(), &cfg, "node-1").unwrap();
    let c = controller_clients(ctl.ready().await.unwrap());
    let n = node_client(node.ready().await.unwrap());
    Env {
        dir,
        ctl,
        node,
        c,
        n,
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever the test did (a failed assertion included), leave no mount or loop device.
        let base = self.dir.path().to_path_buf();
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut mps: Vec<String> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
                .filter(|m| Path::new(m).starts_with(&base))
                .collect();
            mps.sort();
            for m in mps.iter().rev() {
                let _ = std::process::Command::new("umount")
                    .args(["-l", m])
                    .status();
            }
        }
        if base.exists() {
            for l in loops_under(&base) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &format!("/dev/{l}")])
                    .status();
            }
        }
    }
}

impl Env {
    /// A new 16 MiB volume named `name`.
    async fn create(&mut self, name: &str) -> v1::Volume {
        self.c
            .controller
            .create_volume(wire::create(name, 16 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    /// Deletes `vol`, checks its directory `dir` is gone, stops both plugins.
    async fn delete_and_stop(mut self, vol: v1::Volume, dir: &Path) {
        self.c
            .controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!dir.exists(), "{} left after DeleteVolume", dir.display());
        self.node.kill();
        self.ctl.kill();
    }
}

/// Writes `bytes` to a new file, flushed to disk; the first error, if any.
fn write_file(path: &Path, bytes: usize) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()
}

fn assert_full(e: std::io::Error) {
    // ENOSPC from a full filesystem (images; XFS project quotas), EDQUOT from ext4 quotas.
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    assert!(
        matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT)),
        "expected ENOSPC or EDQUOT, got {e:?}"
    );
}

async fn stats(e: &mut Env, vol: &v1::Volume, target: &Path) -> (i64, i64) {
    let s =
        e.n.node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == v1::volume_usage::Unit::Bytes as i32)
        .unwrap();
    (bytes.total, bytes.used)
}

/// create 16 MiB → stage → publish → refused past the size → usage → expand to 64 MiB →
/// the bigger file fits → unpublish → unstage → delete.
async fn bounded_cycle(e: &mut Env, name: &str, node_expansion: bool) {
    let vol =
        e.c.controller
            .create_volume(wire::create(name, 16 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("pods/a/mount");
    stage(e, &vol, &staging, &target).await;

    let (total, used0) = stats(e, &vol, &target).await;
    assert!(
        total <= 16 * MIB && total > 8 * MIB,
        "total {total} for a 16 MiB volume"
    );
    // Past the size: refused.
    let err = write_file(&target.join("big"), 20 << 20).unwrap_err();
    assert_full(err);
    std::fs::remove_file(target.join("big")).unwrap();
    // Within it: fine, and the usage shows it.
    write_file(&target.join("six"), 6 << 20).unwrap();
    let (_, used) = stats(e, &vol, &target).await;
    assert!(
        used - used0 >= 6 * MIB - MIB / 2,
        "used {used} (was {used0}) after writing 6 MiB"
    );

    // Grow to 64 MiB: the 20 MiB file now fits.
    let ex =
        e.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(ex.capacity_bytes, 64 * MIB);
    assert_eq!(ex.node_expansion_required, node_expansion);
    if node_expansion {
        let ne =
            e.n.node_expand_volume(v1::NodeExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: target.to_string_lossy().into(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                staging_target_path: staging.to_string_lossy().into(),
                ..Default::default()
            })
            .await;
        match ne {
            Ok(ne) => assert!(ne.into_inner().capacity_bytes >= 64 * MIB),
            // Online ext4 resize needs CAP_SYS_RESOURCE (privileged node plugins have it;
            // some sandboxes drop it): then the filesystem grows offline at the next stage,
            // which is what a pod restart does.
            Err(st) if !has_cap_sys_resource() => {
                assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
                assert!(st.message().contains("CAP_SYS_RESOURCE"), "{st:?}");
                eprintln!("no CAP_SYS_RESOURCE: growing offline through a restage");
                unstage(e, &vol, &staging, &target).await;
                stage(e, &vol, &staging, &target).await;
            }
            Err(st) => panic!("NodeExpandVolume: {st:?}"),
        }
    }
    let (total, _) = stats(e, &vol, &target).await;
    assert!(
        total > 48 * MIB && total <= 64 * MIB,
        "total {total} after expansion"
    );
    write_file(&target.join("big"), 20 << 20).unwrap();
    assert_full(write_file(&target.join("bigger"), 60 << 20).unwrap_err());

    if node_expansion {
        // Still staged, its image backing a loop device: DeleteVolume answers the spec's
        // "volume in use" and removes nothing.
        let st =
            e.c.controller
                .delete_volume(v1::DeleteVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
        assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
        assert!(st.message().contains("in use"), "{st:?}");
        assert_eq!(
            std::fs::metadata(target.join("big")).unwrap().len(),
            20 << 20
        );
    }
    unstage(e, &vol, &staging, &target).await;
    e.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn stage(e: &mut Env, vol: &v1::Volume, staging: &Path, target: &Path) {
    e.n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    e.n.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn unstage(e: &mut Env, vol: &v1::Volume, staging: &Path, target: &Path) {
    e.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    e.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
}

/// CAP_SYS_RESOURCE (bit 24) in this process's effective set.
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Loop devices backed by a file under `dir`, by the backing file's device and inode (as
/// losetup reports them), so also devices whose sysfs path is relative to a mount gone since.
fn loops_under(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut files = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for ent in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(md) = ent.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                todo.push(ent.path());
            } else if md.is_file() {
                let dev = md.dev();
                files.insert((libc::major(dev), libc::minor(dev), md.ino()));
            }
        }
    }
    let out = std::process::Command::new("losetup")
        .args(["--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"])
        .output()
        .unwrap();
    // No loop device at all: empty output, not an empty list.
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::json!({"loopdevices": []}));
    list["loopdevices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let name = d["name"].as_str()?;
            let ino = d["back-ino"].as_u64()?;
            let (ma, mi) = d["back-maj:min"].as_str()?.trim().split_once(':')?;
            let id = (ma.parse().ok()?, mi.parse().ok()?, ino);
            files
                .contains(&id)
                .then(|| name.trim_start_matches("/dev/").to_owned())
        })
        .collect()
}

#[tokio::test]
async fn image_volume_is_bounded_reports_usage_and_grows() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut e = start(dir, &base, "    capacity: image\n").await;
    bounded_cycle(&mut e, "pvc-img", true).await;
    assert!(
        e.ctl
            .log_text()
            .contains("a filesystem image per volume on a loop device"),
        "the controller must say which enforcement it picked:\n{}",
        e.ctl.log_text()
    );
    assert!(loops_under(&base).is_empty(), "a loop device was left");
    assert!(!base.join("pvc-img").exists());
    e.node.kill();
    e.ctl.kill();
}

/// Found by tests/it/chaos.rs (seed 1796630458460567125): a node killed while its
/// `losetup --find` ran leaves that helper running; it attaches a second loop device to the
/// image after the restarted node's retry attached (and mounted) its own. The unstage then
/// detached one device and left the other attached for the node's life. Here the orphan's
/// device is attached by hand: the unstage must leave no loop device on the image.
#[tokio::test]
async fn unstage_detaches_every_loop_device_of_the_image() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut e = start(dir, &base, "    capacity: image\n").await;
    let vol = e.create("pvc-twice").await;
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("target");
    stage(&mut e, &vol, &staging, &target).await;
    write_file(&target.join("kept"), 1 << 20).unwrap();
    let img = base.join("pvc-twice/fs.img");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        loops_under(&base).len(),
        2,
        "the orphan's device is attached"
    );
    // A repeated stage keeps using the mounted device.
    stage(&mut e, &vol, &staging, &target).await;
    assert_eq!(
        std::fs::metadata(target.join("kept")).unwrap().len(),
        1 << 20
    );
    unstage(&mut e, &vol, &staging, &target).await;
    assert!(
        loops_under(&base).is_empty(),
        "a loop device of the image was left: {:?}",
        loops_under(&base)
    );
    // Staged again, the bytes are there: nothing was lost by detaching the spare device.
    stage(&mut e, &vol, &staging, &target).await;
    assert_eq!(
        std::fs::metadata(target.join("kept")).unwrap().len(),
        1 << 20
    );
    unstage(&mut e, &vol, &staging, &target).await;
    assert!(loops_under(&base).is_empty());
    e.delete_and_stop(vol, &base.join("pvc-twice")).await;
}

/// Loop devices backed by `img`, found the way `losetup -j` finds them (device and inode of
/// the backing file), so also those whose sysfs path no longer names the image.
fn loops_of(img: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args(["--associated"])
        .arg(img)
        .args(["--noheadings", "--output", "NAME"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Attaches `img` to a loop device from inside a mount namespace that ends right after, through
/// a bind of `base` at another path: what a node container that was restarted (an upgrade) left
/// behind. sysfs then names the backing file relative to a mount that no longer exists.
fn attach_from_a_gone_namespace(base: &Path, img: &Path, view: &Path) -> String {
    std::fs::create_dir_all(view).unwrap();
    let rel = img.strip_prefix(base).unwrap();
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && losetup --find --show -- "$2/$3""#)
        .arg("sh")
        .arg(base)
        .arg(view)
        .arg(rel)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = dev.trim_start_matches("/dev/");
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap();
    assert!(
        !Path::new(backing.trim_end()).starts_with(base)
            && !Path::new(backing.trim_end()).starts_with(view),
        "sysfs should no longer name the image by a path of this namespace: {backing}"
    );
    dev
}

/// A node restarted in a new mount namespace (its container replaced by an upgrade) must still
/// know the loop devices its previous run attached: before, it matched sysfs's path, which then
/// names the image relative to a mount that is gone, so the unstage after the restart left the
/// device attached, a stage attached a second device (two ext4 instances on one file) and
/// DeleteVolume deleted the image under the device.
#[tokio::test]
async fn devices_attached_by_a_node_before_its_restart_are_still_its_own() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut e = start(
        dir,
        &base,
        "    capacity: image
",
    )
    .await;
    let vol = e.create("pvc-restart").await;
    let img = base.join("pvc-restart/fs.img");
    let view = e.dir.path().join("old-node-view");
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("target");

    // 1. Staged (mounted) by the previous node: the new one publishes it, then unstages it.
    let dev = attach_from_a_gone_namespace(&base, &img, &view);
    std::fs::create_dir_all(&staging).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "ext4", &dev])
        .arg(&staging)
        .status()
        .unwrap();
    assert!(st.success());
    stage(&mut e, &vol, &staging, &target).await;
    write_file(&target.join("before"), 1 << 20).unwrap();
    assert_eq!(
        loops_of(&img),
        vec![dev.clone()],
        "the stage must reuse the mounted device"
    );
    unstage(&mut e, &vol, &staging, &target).await;
    assert!(
        loops_of(&img).is_empty(),
        "the unstage left {:?} attached",
        loops_of(&img)
    );

    // 2. Attached, not mounted, by the previous node: DeleteVolume refuses, a stage reuses it.
    let dev = attach_from_a_gone_namespace(&base, &img, &view);
    let err =
        e.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(img.exists(), "the refused delete must keep the image");
    stage(&mut e, &vol, &staging, &target).await;
    assert_eq!(
        loops_of(&img),
        vec![dev],
        "the stage must reuse the attached device"
    );
    assert_eq!(
        std::fs::metadata(target.join("before")).unwrap().len(),
        1 << 20
    );
    unstage(&mut e, &vol, &staging, &target).await;
    assert!(
        loops_of(&img).is_empty(),
        "the unstage left {:?} attached",
        loops_of(&img)
    );

    e.delete_and_stop(vol, &base.join("pvc-restart")).await;
}

#[tokio::test]
async fn image_is_made_on_create_and_its_files_are_not_in_the_directory() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut e = start(dir, &base, "    capacity: image\n").await;
    let vol =
        e.c.controller
            .create_volume(wire::create("pvc-made", 16 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let img = base.join("pvc-made/fs.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    // Sparse: the 16 MiB are not all allocated.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 16 << 20);
    // A repeat keeps the image (and whatever is in it).
    e.c.controller
        .create_volume(wire::create("pvc-made", 16 * MIB))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(base.join("pvc-made")).unwrap().count(),
        1,
        "only fs.img"
    );
    e.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
    e.node.kill();
    e.ctl.kill();
}

#[tokio::test]
async fn image_snapshot_restores_into_a_bigger_volume_with_its_files() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut e = start(dir, &base, "    capacity: image\n").await;
    let src =
        e.c.controller
            .create_volume(wire::create("pvc-src", 16 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("pods/a/mount");
    stage(&mut e, &src, &staging, &target).await;
    std::fs::write(target.join("kept"), b"from the source").unwrap();
    // The snapshot copies the image: unstaged first, so the copy is of a clean filesystem.
    unstage(&mut e, &src, &staging, &target).await;
    let snap =
        e.c.controller
            .create_snapshot(v1::CreateSnapshotRequest {
                name: "snap-img".into(),
                source_volume_id: src.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    let mut req = wire::create("pvc-restored", 32 * MIB);
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Snapshot(
            v1::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored =
        e.c.controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(
        std::fs::metadata(base.join("pvc-restored").join("fs.img"))
            .unwrap()
            .len(),
        32 << 20,
        "the restored image is grown to the new size"
    );
    // Staging grows the filesystem (offline, before the mount) and the files are there.
    stage(&mut e, &restored, &staging, &target).await;
    assert_eq!(
        std::fs::read(target.join("kept")).unwrap(),
        b"from the source"
    );
    let (total, _) = stats(&mut e, &restored, &target).await;
    assert!(total > 24 * MIB && total <= 32 * MIB, "total {total}");
    write_file(&target.join("twenty"), 20 << 20).unwrap();
    unstage(&mut e, &restored, &staging, &target).await;
    for v in [&restored, &src] {
        e.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    e.c.controller
        .delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(loops_under(&base).is_empty(), "a loop device was left");
}

#[tokio::test]
async fn auto_without_project_quotas_records_only_and_says_so() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let e = start(dir, &base, "").await;
    let log = e.ctl.log_text();
    if log.contains("project quotas") && !log.contains("no project quotas") {
        return; // this machine's temp dir has project quotas on
    }
    assert!(
        log.contains("recorded, not enforced"),
        "the controller must say sizes are not enforced:\n{log}"
    );
}

/// An XFS filesystem with project quotas on, on a loop device; unmounted on drop.
struct Xfs {
    mnt: PathBuf,
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

fn xfs_with_prjquota(dir: &Path) -> Option<Xfs> {
    let have = |p: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("mkfs.xfs") || !have("xfs_quota") {
        eprintln!("skipped: mkfs.xfs or xfs_quota missing");
        return None;
    }
    let img = dir.join("xfs.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(320 << 20).unwrap(); // XFS's minimum is 300 MB
    drop(f);
    let ok = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-f"])
        .arg(&img)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.xfs failed");
    let mnt = dir.join("xfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-o", "loop,prjquota"])
        .arg(&img)
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !ok {
        // e.g. "quota support not available in this kernel"
        eprintln!("skipped: this kernel cannot mount XFS with project quotas");
        return None;
    }
    Some(Xfs { mnt })
}

#[tokio::test]
async fn project_quota_on_xfs_is_picked_bounds_and_grows() {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let Some(xfs) = xfs_with_prjquota(dir.path()) else {
        return;
    };
    let base = xfs.mnt.join("base");
    let mut e = start(dir, &base, "").await;
    assert!(
        e.ctl.log_text().contains("XFS project quotas"),
        "auto must pick project quotas here:\n{}",
        e.ctl.log_text()
    );
    bounded_cycle(&mut e, "pvc-quota", false).await;
    assert!(!base.join("pvc-quota").exists());
    e.node.kill();
    e.ctl.kill();
    drop(xfs);
}
