//! The krbd path for real: stowage-node runs inside the QEMU node VM (a stock Debian kernel
//! with the rbd module this host lacks) and maps images with `rbd device map`; the controller
//! runs on the host. Bytes written in the guest are checked on the cluster with `rbd export`,
//! watchers with `rbd status`, and ext4 grows online in the guest's kernel.
//!
//! Started by tests/suites/60-rbd.sh (`--krbd-vm`), which exports STOWAGE_NODE_VM_* and
//! STOWAGE_CEPH_ENV; with STOWAGE_REQUIRE_NODE_VM=1 a missing VM is a failure.

#[path = "rbd_common.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use stowage_csi::v1;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

struct Vm {
    endpoint: String,
    state: String,
    share: PathBuf,
    script: String,
}

fn vm() -> Option<Vm> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let vm = (|| {
        Some(Vm {
            endpoint: get("STOWAGE_NODE_VM_ENDPOINT")?,
            state: get("STOWAGE_NODE_VM_STATE")?,
            share: PathBuf::from(get("STOWAGE_NODE_VM_SHARE")?),
            script: get("STOWAGE_NODE_VM_SH")?,
        })
    })();
    if vm.is_none() {
        assert!(
            std::env::var("STOWAGE_REQUIRE_NODE_VM").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_NODE_VM=1 but the node VM variables are not set"
        );
        eprintln!("skipped: node VM not running (STOWAGE_NODE_VM_*)");
    }
    vm
}

/// Runs a shell command in the guest; (exit code, stdout).
fn guest(v: &Vm, cmd: &str) -> (i32, String) {
    let out = Command::new(&v.script)
        .args([
            "exec",
            "--state",
            &v.state,
            "--timeout",
            "120",
            "--",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .expect("node-vm.sh exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn vm_node(v: &Vm) -> NodeClient<Channel> {
    let ep = stowage_csi::endpoint::Endpoint::parse(&v.endpoint).unwrap();
    NodeClient::new(stowage_csi::client::connect(&ep).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn krbd_and_nbd_in_the_node_vm_filesystem_block_and_online_ext4_grow() {
    let Some(v) = vm() else { return };
    let Some(mut r) = Rbd::start(0).await else {
        return;
    };
    let mut n = vm_node(&v).await;
    wait_registered(&PathBuf::from(&v.state).join("guest.log"), "vm-node");
    let info = n
        .node_get_info(v1::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "vm-node");
    let secrets = r.secrets();
    let dir = v.share.join(unique("krbd"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |s: &str| dir.join(s).to_string_lossy().into_owned();

    // Filesystem volume through krbd.
    let cap = fs_cap("ext4");
    let mut req = create_req(&unique("kfs"), 64 * MIB, cap.clone());
    req.parameters.insert("attach".into(), "krbd".into());
    let vol = r.create(req).await.unwrap();
    assert_eq!(vol.volume_context["attach"], "krbd");
    let image = vol.volume_context["imageName"].clone();
    r.publish(&vol.volume_id, "vm-node", cap.clone())
        .await
        .unwrap();
    let stage = v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path("staging"),
        volume_capability: Some(cap.clone()),
        volume_context: vol.volume_context.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    };
    n.node_stage_volume(stage.clone()).await.unwrap();
    n.node_stage_volume(stage.clone()).await.unwrap();
    let (_, mapped) = guest(&v, "cat /sys/bus/rbd/devices/*/name");
    assert!(
        mapped.lines().any(|l| l == image),
        "krbd did not map {image}: {mapped:?}"
    );
    let publish = v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path("staging"),
        target_path: path("target"),
        volume_capability: Some(cap.clone()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    };
    n.node_publish_volume(publish.clone()).await.unwrap();
    let t = path("target");
    let (rc, _) = guest(&v, &format!("echo through-krbd > {t}/f && sync"));
    assert_eq!(rc, 0);
    let status = r.rbd(&["status", &image]).unwrap();
    assert!(
        status.contains("watcher="),
        "no watcher while mapped: {status}"
    );

    // Online ext4 grow in the guest's kernel.
    let size_of = |v: &Vm| {
        let (_, out) = guest(v, &format!("stat -f -c '%b %S' {t}"));
        let mut it = out.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    };
    let before = size_of(&v);
    r.c.controller
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    n.node_expand_volume(v1::NodeExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: t.clone(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: 128 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let after = size_of(&v);
    assert!(
        after > before + 50 * 1024 * 1024,
        "ext4 not grown online: {before} -> {after}"
    );
    let (_, back) = guest(&v, &format!("cat {t}/f"));
    assert_eq!(back.trim(), "through-krbd");

    // Unpublish + unstage unmap the image: no device, no watcher.
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: t.clone(),
    })
    .await
    .unwrap();
    let unstage = v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path("staging"),
    };
    n.node_unstage_volume(unstage.clone()).await.unwrap();
    n.node_unstage_volume(unstage).await.unwrap();
    let (_, mapped) = guest(&v, "cat /sys/bus/rbd/devices/*/name 2>/dev/null; true");
    assert!(
        !mapped.lines().any(|l| l == image),
        "still mapped: {mapped:?}"
    );
    let status = r.rbd(&["status", &image]).unwrap();
    assert!(!status.contains("watcher="), "watcher left: {status}");

    // Stage again: the data is there (the filesystem was not made twice).
    n.node_stage_volume(stage).await.unwrap();
    n.node_publish_volume(publish).await.unwrap();
    let (_, back) = guest(&v, &format!("cat {t}/f"));
    assert_eq!(back.trim(), "through-krbd");
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: t.clone(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path("staging"),
    })
    .await
    .unwrap();
    r.unpublish(&vol.volume_id, "vm-node").await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();

    // Raw block through krbd: bytes written in the guest are in the image.
    let bcap = block_cap(Mode::SingleNodeWriter);
    let mut req = create_req(&unique("kblk"), 32 * MIB, bcap.clone());
    req.parameters.insert("attach".into(), "krbd".into());
    let bvol = r.create(req).await.unwrap();
    let bimage = bvol.volume_context["imageName"].clone();
    r.publish(&bvol.volume_id, "vm-node", bcap.clone())
        .await
        .unwrap();
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: bvol.volume_id.clone(),
        staging_target_path: path("bstaging"),
        volume_capability: Some(bcap.clone()),
        volume_context: bvol.volume_context.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: bvol.volume_id.clone(),
        staging_target_path: path("bstaging"),
        target_path: path("bdev"),
        volume_capability: Some(bcap.clone()),
        volume_context: bvol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let bdev = path("bdev");
    let (rc, _) = guest(
        &v,
        &format!(
            "printf 'krbd-block-bytes' | dd of={bdev} bs=512 seek=8192 conv=fsync,notrunc 2>/dev/null"
        ),
    );
    assert_eq!(rc, 0);
    let out = r.path("b.img");
    r.rbd(&["export", &bimage, out.to_str().unwrap()]).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[4 << 20..(4 << 20) + 16], b"krbd-block-bytes");
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: bvol.volume_id.clone(),
        target_path: bdev,
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: bvol.volume_id.clone(),
        staging_target_path: path("bstaging"),
    })
    .await
    .unwrap();
    r.unpublish(&bvol.volume_id, "vm-node").await.unwrap();
    r.delete(&bvol.volume_id).await.unwrap();
    assert!(!r.images().contains(&bimage));

    // rbd-nbd: the same image path through the nbd module and a user-space daemon.
    let mut req = create_req(&unique("knbd"), 64 * MIB, cap.clone());
    req.parameters.insert("attach".into(), "rbd-nbd".into());
    let nvol = r.create(req).await.unwrap();
    let nimage = nvol.volume_context["imageName"].clone();
    r.publish(&nvol.volume_id, "vm-node", cap.clone())
        .await
        .unwrap();
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: nvol.volume_id.clone(),
        staging_target_path: path("nstaging"),
        volume_capability: Some(cap.clone()),
        volume_context: nvol.volume_context.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = path("nstaging");
    let (_, src) = guest(&v, &format!("grep ' {ns} ' /proc/mounts"));
    assert!(src.starts_with("/dev/nbd"), "not on an nbd device: {src:?}");
    let (rc, _) = guest(&v, &format!("echo through-nbd > {ns}/f && sync"));
    assert_eq!(rc, 0);
    let status = r.rbd(&["status", &nimage]).unwrap();
    assert!(
        status.contains("watcher="),
        "no watcher while mapped: {status}"
    );
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: nvol.volume_id.clone(),
        staging_target_path: ns.clone(),
    })
    .await
    .unwrap();
    let (_, mapped) = guest(&v, "rbd-nbd list-mapped 2>/dev/null; true");
    assert!(!mapped.contains(&nimage), "still mapped: {mapped}");
    r.unpublish(&nvol.volume_id, "vm-node").await.unwrap();
    r.delete(&nvol.volume_id).await.unwrap();
}
