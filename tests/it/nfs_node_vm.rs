//! The NFS node side for real: stowage-node runs inside the QEMU node VM (a stock Debian kernel
//! with the NFS client this host lacks) and does `mount -t nfs` there, NFSv3 and NFSv4.1, against
//! nfs-ganesha on the host; bytes written in the guest are checked in the export on the host and
//! the other way round. Started by tests/suites/31-nfs-node-vm.sh, which exports STOWAGE_NODE_VM_*
//! and STOWAGE_NFS_*; with STOWAGE_REQUIRE_NODE_VM=1 a missing VM is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stowage_csi::v1;
use stowage_csi::v1::node_client::NodeClient;
use stowage_tests::{Plugin, controller_clients, wire};
use tonic::Code;
use tonic::transport::Channel;

struct Vm {
    endpoint: String,
    state: String,
    share: PathBuf,
    infra: PathBuf,
    server: String,
    export: String,
    port: String,
    mount_port: String,
    export_dir: PathBuf,
}

fn vm() -> Option<Vm> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let vm = (|| {
        Some(Vm {
            endpoint: get("STOWAGE_NODE_VM_ENDPOINT")?,
            state: get("STOWAGE_NODE_VM_STATE")?,
            share: PathBuf::from(get("STOWAGE_NODE_VM_SHARE")?),
            infra: PathBuf::from(get("STOWAGE_ROOT")?).join("tests/infra"),
            server: get("STOWAGE_NFS_GUEST_SERVER")?,
            export: get("STOWAGE_NFS_EXPORT")?,
            port: get("STOWAGE_NFS_PORT")?,
            mount_port: get("STOWAGE_NFS_MOUNT_PORT")?,
            export_dir: PathBuf::from(get("STOWAGE_NFS_EXPORT_DIR")?),
        })
    })();
    if vm.is_none() {
        assert!(
            std::env::var("STOWAGE_REQUIRE_NODE_VM").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_NODE_VM=1 but the node VM variables are not set"
        );
        eprintln!("node VM not running (STOWAGE_NODE_VM_*): NFS node tests not run");
    }
    vm
}

/// Runs a command in the guest; (exit code, stdout).
fn guest(v: &Vm, args: &[&str]) -> (i32, String) {
    let out = Command::new(v.infra.join("node-vm.sh"))
        .args(["exec", "--state", &v.state, "--timeout", "60", "--"])
        .args(args)
        .output()
        .expect("node-vm.sh exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn node(v: &Vm) -> NodeClient<Channel> {
    let ep = stowage_csi::endpoint::Endpoint::parse(&v.endpoint).unwrap();
    NodeClient::new(stowage_csi::client::connect(&ep).await.unwrap())
}

fn cap(flags: &[String]) -> v1::VolumeCapability {
    let mut c = wire::rwo();
    if let Some(v1::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
        m.mount_flags = flags.to_vec();
    }
    c
}

async fn controller(v: &Vm, dir: &Path, base: &str) -> (Plugin, stowage_tests::Clients) {
    let cfg = dir.join("nfs.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: nfs\ninstances:\n  main:\n    server: {}\n    export: {}\n    baseDir: {base}\n    nfsPort: {}\n    mountPort: {}\n",
            v.server, v.export, v.port, v.mount_port
        ),
    )
    .unwrap();
    let mut p = Plugin::controller(dir, &cfg).unwrap();
    let c = controller_clients(p.ready().await.unwrap());
    (p, c)
}

fn in_guest_mounts(v: &Vm, path: &Path) -> bool {
    let (_, out) = guest(v, &["cat", "/proc/mounts"]);
    out.lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

#[tokio::test]
async fn nfs_v3_and_v41_mounts_carry_bytes_both_ways() {
    let Some(v) = vm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = format!("vm-{}", std::process::id());
    let (_p, mut c) = controller(&v, dir.path(), &base).await;
    let mut n = node(&v).await;
    let variants: Vec<(&str, Vec<String>)> = vec![
        (
            "v3",
            vec![
                "vers=3".into(),
                "proto=tcp".into(),
                format!("port={}", v.port),
                format!("mountport={}", v.mount_port),
                "mountproto=tcp".into(),
                "nolock".into(),
            ],
        ),
        ("v41", vec!["vers=4.1".into(), format!("port={}", v.port)]),
    ];
    for (tag, flags) in variants {
        let vol = c
            .controller
            .create_volume(wire::create(&format!("pvc-{tag}"), 1 << 20))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let work = v.share.join(format!("{tag}-{}", std::process::id()));
        let staging = work.join("staging");
        let target = work.join("pod/mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let t = Instant::now();
        n.node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap(&flags)),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{tag}: stage: {e:?}"));
        eprintln!(
            "{tag}: NodeStageVolume (kernel NFS mount in the guest) took {:?}",
            t.elapsed()
        );
        for _ in 0..2 {
            n.node_publish_volume(v1::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap(&flags)),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let (_, mounts) = guest(&v, &["cat", "/proc/mounts"]);
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(staging.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{tag}: not mounted:\n{mounts}"));
        assert!(
            line.contains(" nfs") && line.contains(if tag == "v3" { "vers=3" } else { "vers=4.1" }),
            "{tag}: {line}"
        );

        // Guest → server.
        let file = target.join("from-guest");
        let (rc, _) = guest(
            &v,
            &[
                "/bin/sh",
                "-c",
                &format!("echo hello-{tag} > '{}' && sync", file.display()),
            ],
        );
        assert_eq!(rc, 0);
        let on_server = v
            .export_dir
            .join(&base)
            .join(format!("pvc-{tag}/from-guest"));
        assert_eq!(
            std::fs::read_to_string(&on_server).unwrap(),
            format!("hello-{tag}\n")
        );
        // Server → guest.
        std::fs::write(
            v.export_dir
                .join(&base)
                .join(format!("pvc-{tag}/from-host")),
            b"from the server",
        )
        .unwrap();
        let (rc, out) = guest(&v, &["cat", &target.join("from-host").to_string_lossy()]);
        assert_eq!((rc, out.as_str()), (0, "from the server"));

        let stats = n
            .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: target.to_string_lossy().into(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!stats.volume_condition.unwrap().abnormal);
        assert!(stats.usage[0].total > 0);

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
        assert!(
            !in_guest_mounts(&v, &staging),
            "{tag}: staging still mounted"
        );
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!on_server.exists());
    }
}

#[tokio::test]
async fn a_hung_server_does_not_poison_later_calls() {
    let Some(v) = vm() else { return };
    // A "server" that accepts connections and never answers, reachable from the guest.
    let sink = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in sink.incoming().flatten() {
            held.push(s);
        }
    });
    let mut n = node(&v).await;
    let work = v.share.join(format!("hung-{}", std::process::id()));
    let staging = work.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let ctx = [
        ("server".to_string(), v.server.clone()),
        ("share".to_string(), "/export/nothing".to_string()),
    ]
    .into_iter()
    .collect();
    let flags = vec![
        "vers=3".into(),
        "proto=tcp".into(),
        format!("port={port}"),
        format!("mountport={port}"),
        "mountproto=tcp".into(),
        "nolock".into(),
    ];
    let t = Instant::now();
    let st = n
        .node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: "main/hung".into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap(&flags)),
            volume_context: ctx,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let hung_for = t.elapsed();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("killed"), "{}", st.message());
    // The suite starts the node with --mount-timeout-secs 8.
    assert!(
        hung_for < Duration::from_secs(40),
        "the hung mount held the call for {hung_for:?}"
    );

    // The next call, to a healthy server, is not stuck behind the dead one.
    let dir = tempfile::tempdir().unwrap();
    let (_p, mut c) = controller(&v, dir.path(), &format!("hung-{}", std::process::id())).await;
    let vol = c
        .controller
        .create_volume(wire::create("pvc-after", 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let good = work.join("good");
    std::fs::create_dir_all(&good).unwrap();
    let flags = vec!["vers=4.1".into(), format!("port={}", v.port)];
    let t = Instant::now();
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: good.to_string_lossy().into(),
        volume_capability: Some(cap(&flags)),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "healthy stage took {:?}",
        t.elapsed()
    );
    assert!(in_guest_mounts(&v, &good));
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id,
        staging_target_path: good.to_string_lossy().into(),
    })
    .await
    .unwrap();
}
