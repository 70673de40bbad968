//! End to end on the local backend: the real binaries over their sockets, real bind mounts and
//! loop devices, bytes checked on the backend directory. Needs root (CI runs as root).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Plugin, controller_clients, is_root, local_config, node_client, wire};
use tonic::Code;

struct Env {
    dir: tempfile::TempDir,
    base: std::path::PathBuf,
    ctl: Plugin,
    node: Plugin,
}

async fn env() -> (
    Env,
    stowage_tests::Clients,
    v1::node_client::NodeClient<tonic::transport::Channel>,
) {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut node = Plugin::node(dir.path(), &cfg, "node-1").unwrap();
    let c = controller_clients(ctl.ready().await.unwrap());
    let n = node_client(node.ready().await.unwrap());
    (
        Env {
            dir,
            base,
            ctl,
            node,
        },
        c,
        n,
    )
}

fn stage_req(
    vol: &v1::Volume,
    staging: &Path,
    cap: v1::VolumeCapability,
) -> v1::NodeStageVolumeRequest {
    v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

fn publish_req(
    vol: &v1::Volume,
    staging: &Path,
    target: &Path,
    cap: v1::VolumeCapability,
    ro: bool,
) -> v1::NodePublishVolumeRequest {
    v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        readonly: ro,
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

#[tokio::test]
async fn filesystem_volume_lifecycle_with_bytes_on_the_backend() {
    let (e, mut c, mut n) = env().await;
    let vol = c
        .controller
        .create_volume(wire::create("pvc-life", 32 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = e.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = e.dir.path().join("pods/a/mount");
    let ro_target = e.dir.path().join("pods/b/mount");
    for _ in 0..2 {
        n.node_stage_volume(stage_req(&vol, &staging, wire::rwo()))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        n.node_publish_volume(publish_req(&vol, &staging, &target, wire::rwo(), false))
            .await
            .unwrap();
    }
    n.node_publish_volume(publish_req(&vol, &staging, &ro_target, wire::rwo(), true))
        .await
        .unwrap();
    std::fs::write(target.join("data"), b"stowage").unwrap();
    assert_eq!(
        std::fs::read(e.base.join("pvc-life/data")).unwrap(),
        b"stowage"
    );
    assert_eq!(std::fs::read(ro_target.join("data")).unwrap(), b"stowage");
    let err = std::fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // The same target with a different read-only flag is a conflict.
    let st = n
        .node_publish_volume(publish_req(&vol, &staging, &target, wire::rwo(), true))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");

    let stats = n
        .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage[0].total > 0);
    assert!(!stats.volume_condition.unwrap().abnormal);

    for t in [&target, &ro_target] {
        for _ in 0..2 {
            n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: t.to_string_lossy().into(),
            })
            .await
            .unwrap();
        }
        assert!(!t.exists());
    }
    for _ in 0..2 {
        n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    assert!(!is_mounted(&staging));
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!e.base.join("pvc-life").exists());
    drop(e);
}

#[tokio::test]
async fn stats_report_a_mount_that_went_away() {
    let (e, mut c, mut n) = env().await;
    let vol = c
        .controller
        .create_volume(wire::create("pvc-gone", 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("target");
    n.node_stage_volume(stage_req(&vol, &staging, wire::rwo()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&vol, &staging, &target, wire::rwo(), false))
        .await
        .unwrap();
    let st = std::process::Command::new("umount")
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success());
    let stats = n
        .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("no longer a mount point"),
        "{}",
        cond.message
    );
    // A path that does not exist at all is NOT_FOUND.
    let st = n
        .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: "/nonexistent/stowage".into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    drop(e);
}

#[tokio::test]
async fn block_volume_through_a_loop_device_and_online_expand() {
    let (e, mut c, mut n) = env().await;
    let mut req = wire::create("pvc-block", 8 << 20);
    req.volume_capabilities = vec![wire::block_cap(Mode::SingleNodeWriter)];
    let vol = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("pod/dev");
    let cap = wire::block_cap(Mode::SingleNodeWriter);
    n.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    n.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    assert!(
        std::fs::metadata(&target)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"BLOCKDATA").unwrap();
        f.sync_all().unwrap();
    }
    let img = std::fs::read(e.base.join("pvc-block/disk.img")).unwrap();
    assert_eq!(&img[4096..4105], b"BLOCKDATA");

    let ex = c
        .controller
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 16 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ex.node_expansion_required);
    let nx = n
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 16 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nx.capacity_bytes, 16 << 20);
    let stats = n
        .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 << 20);

    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(!target.exists());
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    // The loop device is detached: nothing in sysfs still points at the image.
    let img_path = std::fs::canonicalize(e.base.join("pvc-block/disk.img")).unwrap();
    for ent in std::fs::read_dir("/sys/block").unwrap() {
        let p = ent.unwrap().path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(p) {
            assert_ne!(Path::new(b.trim_end()), img_path);
        }
    }
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(e);
}

#[tokio::test]
async fn rwop_refuses_a_second_target() {
    let (e, mut c, mut n) = env().await;
    let cap = wire::mount_cap(Mode::SingleNodeSingleWriter);
    let mut req = wire::create("pvc-rwop", 0);
    req.volume_capabilities = vec![cap.clone()];
    let vol = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = e.dir.path().join("staging");
    n.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    let t1 = e.dir.path().join("t1");
    let t2 = e.dir.path().join("t2");
    n.node_publish_volume(publish_req(&vol, &staging, &t1, cap.clone(), false))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&vol, &staging, &t1, cap.clone(), false))
        .await
        .unwrap();
    let st = n
        .node_publish_volume(publish_req(&vol, &staging, &t2, cap.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: t1.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    drop(e);
}

#[tokio::test]
async fn hundred_identical_creates_give_one_directory_and_identical_answers() {
    let (e, c, _n) = env().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut ctl = c.controller.clone();
        tasks.push(tokio::spawn(async move {
            ctl.create_volume(wire::create("pvc-burst", 1 << 20))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    let dirs: Vec<_> = std::fs::read_dir(&e.base)
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    drop(e);
}

#[tokio::test]
async fn controller_killed_mid_create_leaves_nothing_half_made() {
    let (mut e, mut c, _n) = env().await;
    // A source big enough that cloning it takes a while, so the kill lands mid-copy.
    let src = c
        .controller
        .create_volume(wire::create("big-src", 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    for i in 0..8 {
        std::fs::write(e.base.join(format!("big-src/f{i}")), vec![7u8; 32 << 20]).unwrap();
    }
    let mut clone = wire::create("pvc-clone", 1 << 30);
    clone.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            },
        )),
    });
    let mut ctl2 = c.controller.clone();
    let req2 = clone.clone();
    let call = tokio::spawn(async move { ctl2.create_volume(req2).await });
    // Wait until the copy is visibly under way, then SIGKILL.
    let tmp = e.base.join(".stowage/tmp");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "copy never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.ctl.kill();
    assert!(call.await.unwrap().is_err());
    // The copy it had started died with it (it would otherwise keep writing into the tree
    // the retry cleans up).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while copies_running(&e.base) {
        assert!(
            std::time::Instant::now() < deadline,
            "a copy outlived the killed controller"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !e.base.join("pvc-clone").exists(),
        "a half-made volume is visible"
    );

    let cfg = e.dir.path().join("local.yaml");
    e.ctl = Plugin::controller(e.dir.path(), &cfg).unwrap();
    c = controller_clients(e.ctl.ready().await.unwrap());
    let vol = c
        .controller
        .create_volume(clone)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "default/pvc-clone");
    for i in 0..8 {
        assert_eq!(
            std::fs::metadata(e.base.join(format!("pvc-clone/f{i}")))
                .unwrap()
                .len(),
            32 << 20
        );
    }
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temporary leftovers remain"
    );
    drop(e);
}

#[tokio::test]
async fn sigterm_removes_the_socket_and_a_stale_socket_is_replaced() {
    let (mut e, _c, _n) = env().await;
    let sock = e.dir.path().join("controller.sock");
    assert!(sock.exists());
    let exited = e.ctl.terminate().await;
    assert!(
        exited,
        "controller did not exit on SIGTERM; log:\n{}",
        e.ctl.log_text()
    );
    assert!(!sock.exists());
    // A socket file left by a killed process does not stop the next start.
    let _stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(_stale);
    let cfg = e.dir.path().join("local.yaml");
    e.ctl = Plugin::controller(e.dir.path(), &cfg).unwrap();
    e.ctl.ready().await.unwrap();
    let _ = &e.node;
    drop(e);
}

async fn wait_registered(base: &Path, node: &str) {
    let f = base.join(format!(".stowage/nodes/{node}.json"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "node {node} never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn publish(
    vol: &str,
    node: &str,
    cap: v1::VolumeCapability,
    ro: bool,
) -> v1::ControllerPublishVolumeRequest {
    v1::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly: ro,
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_publish_enforces_single_node_access_and_node_limits() {
    let (e, mut c, _n) = env().await;
    // A second node plugin with a limit of one volume.
    let cfg = e.dir.path().join("local.yaml");
    let d2 = e.dir.path().join("node2");
    std::fs::create_dir_all(&d2).unwrap();
    let mut node2 = Plugin::spawn(
        "stowage-node",
        &d2,
        &format!("unix://{}", d2.join("node.sock").display()),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "--node-id",
            "node-2",
            "--max-volumes",
            "1",
            "--kubelet-root",
            &e.dir.path().to_string_lossy(),
            "--kubelet-registration=false",
        ],
    )
    .unwrap();
    node2.ready().await.unwrap();
    wait_registered(&e.base, "node-1").await;
    wait_registered(&e.base, "node-2").await;

    let rwo = c
        .controller
        .create_volume(wire::create("pvc-rwo", 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.controller
        .controller_publish_volume(publish(&rwo.volume_id, "node-1", wire::rwo(), false))
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(publish(&rwo.volume_id, "node-1", wire::rwo(), false))
        .await
        .unwrap();
    let st = c
        .controller
        .controller_publish_volume(publish(&rwo.volume_id, "node-2", wire::rwo(), false))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("node-1"), "{}", st.message());
    let got = c
        .controller
        .controller_get_volume(v1::ControllerGetVolumeRequest {
            volume_id: rwo.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["node-1".to_string()]
    );
    // Once node-1 lets go, node-2 may have it.
    c.controller
        .controller_unpublish_volume(v1::ControllerUnpublishVolumeRequest {
            volume_id: rwo.volume_id.clone(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(publish(&rwo.volume_id, "node-2", wire::rwo(), false))
        .await
        .unwrap();

    // A multi-node volume goes to both, but node-2 is at its limit of one.
    let rwx_cap = wire::mount_cap(Mode::MultiNodeMultiWriter);
    let mut req = wire::create("pvc-rwx", 0);
    req.volume_capabilities = vec![rwx_cap.clone()];
    let rwx = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.controller
        .controller_publish_volume(publish(&rwx.volume_id, "node-1", rwx_cap.clone(), false))
        .await
        .unwrap();
    let st = c
        .controller
        .controller_publish_volume(publish(&rwx.volume_id, "node-2", rwx_cap.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    drop(node2);
    drop(e);
}

fn copies_running(base: &Path) -> bool {
    let needle = base.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.starts_with("cp ") && c.contains(&needle)
            })
            .unwrap_or(false)
    })
}

/// Found by tests/it/chaos.rs: a node killed inside NodeUnstageVolume of a raw block volume,
/// after it removed the staged device file but before `losetup -d`, left the loop device
/// attached; the retried unstage found no device file and answered OK, and DeleteVolume then
/// refused the volume as in use for ever. The retry now detaches a loop device of the volume
/// that nothing binds any more, and leaves one alone that is staged at another path.
#[tokio::test]
async fn unstage_retried_after_a_kill_detaches_the_loop_device() {
    let (e, mut c, mut n) = env().await;
    let mut req = wire::create("pvc-cut", 8 << 20);
    req.volume_capabilities = vec![wire::block_cap(Mode::SingleNodeWriter)];
    let vol = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let cap = wire::block_cap(Mode::SingleNodeWriter);
    let staging = e.dir.path().join("staging");
    let other = e.dir.path().join("elsewhere");
    n.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    let img = std::fs::canonicalize(e.base.join("pvc-cut/disk.img")).unwrap();
    let attached = || {
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .any(|ent| {
                std::fs::read_to_string(ent.path().join("loop/backing_file"))
                    .is_ok_and(|b| Path::new(b.trim_end()) == img)
            })
    };
    assert!(attached());
    let unstage = |p: &Path| v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: p.to_string_lossy().into(),
    };
    // An unstage at a path where the volume is not staged leaves its device alone.
    std::fs::create_dir_all(&other).unwrap();
    n.node_unstage_volume(unstage(&other)).await.unwrap();
    assert!(attached(), "a device staged elsewhere was detached");
    // The state the kill leaves: the bind of the device gone, the loop device attached.
    let device = staging.join("device");
    let st = std::process::Command::new("umount")
        .arg(&device)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&device).unwrap();
    n.node_unstage_volume(unstage(&staging)).await.unwrap();
    assert!(
        !attached(),
        "the retried unstage left the loop device attached"
    );
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!e.base.join("pvc-cut").exists());
    drop(e);
}
