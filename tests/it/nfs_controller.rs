//! The NFS backend's controller against a real nfs-ganesha: the real stowage-controller binary
//! over its socket, every outcome checked in the server's exported directory on disk.
//!
//! Needs the ganesha started by tests/infra/ganesha.sh (the cargo suite does it) and its
//! STOWAGE_NFS_* variables. With STOWAGE_REQUIRE_NFS=1 a missing server is a failure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_csi::v1;
use stowage_tests::{Nfs, Plugin, controller_clients, nfs, wire};
use tonic::Code;

/// A controller on a fresh base directory inside the export.
async fn controller(n: &Nfs, dir: &Path, extra: &str) -> (Plugin, stowage_tests::Clients, PathBuf) {
    let base = format!("it-{}", std::process::id()) + &format!("-{}", rand_suffix());
    let cfg = dir.join("nfs.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: nfs\ninstances:\n  main:\n    server: {}\n    export: {}\n    baseDir: {base}\n    nfsPort: {}\n    mountPort: {}\n    timeoutSecs: 5\n{extra}",
            n.server, n.export, n.port, n.mount_port
        ),
    )
    .unwrap();
    let mut p = Plugin::controller(dir, &cfg).unwrap();
    let c = controller_clients(p.ready().await.unwrap());
    (p, c, n.export_dir.join(base))
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{t:x}")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn volumes_snapshots_and_clones_are_directories_on_the_server() {
    let Some(n) = nfs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_p, mut c, base) = controller(&n, dir.path(), "").await;

    let vol = c
        .controller
        .create_volume(wire::create("pvc-nfs", 5 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "main/pvc-nfs");
    assert_eq!(vol.capacity_bytes, 5 << 20);
    assert_eq!(
        vol.volume_context.get("server").map(String::as_str),
        Some(n.server.as_str())
    );
    assert!(
        vol.volume_context["share"].ends_with("/pvc-nfs"),
        "{:?}",
        vol.volume_context
    );
    assert!(base.join("pvc-nfs").is_dir());
    // Data written by a "pod" (here: straight into the export) is what a snapshot copies.
    std::fs::create_dir(base.join("pvc-nfs/sub")).unwrap();
    std::fs::write(base.join("pvc-nfs/sub/data.bin"), vec![42u8; 3 << 20]).unwrap();

    let snap = c
        .controller
        .create_snapshot(v1::CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap-nfs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    std::fs::write(base.join("pvc-nfs/sub/data.bin"), b"changed").unwrap();
    let mut restore = wire::create("pvc-restored", 5 << 20);
    restore.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Snapshot(
            v1::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    c.controller.create_volume(restore).await.unwrap();
    assert_eq!(
        std::fs::read(base.join("pvc-restored/sub/data.bin")).unwrap(),
        vec![42u8; 3 << 20]
    );

    let mut clone = wire::create("pvc-clone", 5 << 20);
    clone.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    c.controller.create_volume(clone).await.unwrap();
    assert_eq!(
        std::fs::read(base.join("pvc-clone/sub/data.bin")).unwrap(),
        b"changed"
    );

    // Capacity reported by GetCapacity comes from the server's FSSTAT.
    let cap = c
        .controller
        .get_capacity(v1::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);

    for id in ["main/pvc-nfs", "main/pvc-restored", "main/pvc-clone"] {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.controller
        .delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(entries(&base), vec![".stowage".to_string()]);
    assert!(entries(&base.join(".stowage/snapshots")).is_empty());
    assert!(entries(&base.join(".stowage/trash")).is_empty());
}

#[tokio::test]
async fn hundred_concurrent_identical_creates_make_one_directory_on_the_server() {
    let Some(n) = nfs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_p, c, base) = controller(&n, dir.path(), "").await;
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
    assert_eq!(answers.len(), 100);
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "answers differ");
    assert_eq!(
        entries(&base),
        vec![".stowage".to_string(), "pvc-burst".to_string()]
    );
}

#[tokio::test]
async fn archive_and_retain_keep_the_data_on_the_server() {
    let Some(n) = nfs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_p, mut c, base) = controller(&n, dir.path(), "").await;
    for (name, policy) in [("keep", "retain"), ("arch", "archive")] {
        let mut r = wire::create(name, 0);
        r.parameters.insert("onDelete".into(), policy.into());
        let v = c
            .controller
            .create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        std::fs::write(base.join(name).join("f"), b"data").unwrap();
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(std::fs::read(base.join("keep/f")).unwrap(), b"data");
    let archived: Vec<_> = entries(&base)
        .into_iter()
        .filter(|e| e.starts_with("archived-arch-"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert_eq!(
        std::fs::read(base.join(&archived[0]).join("f")).unwrap(),
        b"data"
    );
}

#[tokio::test]
async fn controller_killed_mid_create_on_nfs_leaves_nothing_half_made() {
    let Some(n) = nfs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut p, mut c, base) = controller(&n, dir.path(), "").await;
    let src = c
        .controller
        .create_volume(wire::create("src", 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    for i in 0..32 {
        std::fs::write(base.join(format!("src/f{i}")), vec![1u8; 2 << 20]).unwrap();
    }
    let mut clone = wire::create("pvc-clone", 1 << 30);
    clone.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            },
        )),
    });
    let mut ctl = c.controller.clone();
    let req = clone.clone();
    let call = tokio::spawn(async move { ctl.create_volume(req).await });
    let tmp = base.join(".stowage/tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Kill once the copy has written a few files into the temporary tree.
    loop {
        let copied = entries(&tmp)
            .first()
            .map(|t| entries(&tmp.join(t)).len())
            .unwrap_or(0);
        if copied >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never got under way");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill();
    assert!(call.await.unwrap().is_err());
    assert!(
        !base.join("pvc-clone").exists(),
        "a half-made volume is visible"
    );

    let cfg = dir.path().join("nfs.yaml");
    let mut p2 = Plugin::controller(dir.path(), &cfg).unwrap();
    c = controller_clients(p2.ready().await.unwrap());
    let vol = c
        .controller
        .create_volume(clone)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "main/pvc-clone");
    for i in 0..32 {
        assert_eq!(
            std::fs::metadata(base.join(format!("pvc-clone/f{i}")))
                .unwrap()
                .len(),
            2 << 20
        );
    }
    assert!(entries(&tmp).is_empty(), "leftovers: {:?}", entries(&tmp));
}

#[tokio::test]
async fn a_server_that_does_not_answer_gives_unavailable_in_bounded_time() {
    let Some(n) = nfs() else { return };
    // A listener that accepts and never answers: the NFS client's calls must time out.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in sink.incoming().flatten() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nfs.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: nfs\ninstances:\n  main:\n    server: 127.0.0.1\n    export: {}\n    nfsPort: {port}\n    mountPort: {port}\n    timeoutSecs: 2\n",
            n.export
        ),
    )
    .unwrap();
    let mut p = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = controller_clients(p.ready().await.unwrap());
    let t = Instant::now();
    let st = c
        .controller
        .create_volume(wire::create("pvc-x", 0))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    // The plugin is still serving after the failure.
    assert!(p.child.try_wait().unwrap().is_none());
}
