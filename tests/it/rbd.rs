//! The RBD backend against a real single-node Ceph (tests/infra/ceph.sh), with the real
//! binaries: images, snapshots, clones and locks checked on the cluster with the `rbd` CLI,
//! file and device contents through rbd-fuse + loop attachments on this host.
//!
//! Skipped without a cluster (STOWAGE_CEPH_ENV unset), failed when STOWAGE_REQUIRE_RBD=1.

#[path = "rbd_common.rs"]
mod common;

use common::*;
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_snapshot_restore_clone_and_expand_while_mounted() {
    let Some(mut r) = Rbd::start(1).await else {
        return;
    };
    let cap = fs_cap("xfs");
    let name = unique("fs");
    let vol = r
        .create(create_req(&name, 300 * MIB, cap.clone()))
        .await
        .unwrap();
    // Repeated create: the same volume; a different size under the same name: ALREADY_EXISTS.
    let again = r
        .create(create_req(&name, 300 * MIB, cap.clone()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let e = r
        .create(create_req(&name, 600 * MIB, cap.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let image = vol.volume_context["imageName"].clone();
    assert!(r.images().contains(&image), "{image} not in rbd ls");
    let info = r.rbd(&["info", &image]).unwrap();
    assert!(info.contains("layering, exclusive-lock"), "{info}");

    r.publish(&vol.volume_id, "node-0", cap.clone())
        .await
        .unwrap();
    r.stage(0, &vol, "a", cap.clone()).await.unwrap();
    r.stage(0, &vol, "a", cap.clone()).await.unwrap(); // idempotent
    let target = r.node_publish(0, &vol, "a", cap.clone()).await.unwrap();
    std::fs::write(target.join("data"), b"written through rbd-fuse").unwrap();
    rustix::fs::sync();

    // Snapshot, then change the volume: the snapshot keeps the old bytes.
    let snap = r.snapshot(&unique("snap"), &vol.volume_id).await.unwrap();
    assert!(snap.ready_to_use && snap.size_bytes >= 300 * MIB);
    let snaps = r.rbd(&["snap", "ls", &image]).unwrap();
    assert!(snaps.contains("csi-snap-"), "{snaps}");
    std::fs::write(target.join("data"), b"changed after the snapshot").unwrap();

    // Expand while mounted: controller resize, then the node grows xfs online.
    let before = fs_size(&target);
    let exp =
        r.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 600 * MIB,
                    limit_bytes: 0,
                }),
                secrets: r.secrets(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(exp.node_expansion_required && exp.capacity_bytes == 600 * MIB);
    assert!(r.rbd(&["info", &image]).unwrap().contains("600 MiB"));
    let grown = r
        .node(0)
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 600 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 600 * MIB);
    let after = fs_size(&target);
    assert!(
        after > before + 250 * 1024 * 1024,
        "xfs not grown: {before} -> {after}"
    );
    assert_eq!(
        std::fs::read(target.join("data")).unwrap(),
        b"changed after the snapshot"
    );

    // Restore the snapshot into a new volume: the bytes of snapshot time.
    let mut req = create_req(&unique("restored"), 300 * MIB, cap.clone());
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Snapshot(
            v1::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = r.create(req).await.unwrap();
    let rimage = &restored.volume_context["imageName"];
    assert!(
        r.rbd(&["info", rimage]).unwrap().contains("parent: rbd/"),
        "restored is a clone"
    );
    r.stage(0, &restored, "b", cap.clone()).await.unwrap();
    let rt = r
        .node_publish(0, &restored, "b", cap.clone())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(rt.join("data")).unwrap(),
        b"written through rbd-fuse"
    );

    // Clone of the (expanded, changed) volume, flattened at once.
    let mut req = create_req(&unique("clone"), 600 * MIB, cap.clone());
    req.parameters
        .insert("cloneFlatten".into(), "always".into());
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    let clone = r.create(req).await.unwrap();
    let cinfo = r
        .rbd(&["info", &clone.volume_context["imageName"]])
        .unwrap();
    assert!(
        !cinfo.contains("parent:"),
        "flattened clone still has a parent: {cinfo}"
    );
    // A clone of a live, mounted volume has what was synced at clone time.
    r.stage(0, &clone, "c", cap.clone()).await.unwrap();
    let ct = r.node_publish(0, &clone, "c", cap.clone()).await.unwrap();
    assert_eq!(
        std::fs::read(ct.join("data")).unwrap(),
        b"changed after the snapshot"
    );

    // Deleting a published volume is refused; the snapshot survives its volume's deletion.
    let e = r.delete(&vol.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for (v, n) in [(&vol, "a"), (&restored, "b"), (&clone, "c")] {
        r.node_unpublish(0, &v.volume_id, n).await.unwrap();
        r.unstage(0, &v.volume_id, n).await.unwrap();
        r.unstage(0, &v.volume_id, n).await.unwrap(); // idempotent
    }
    assert!(loops_below(r.dir.path()).is_empty(), "loop devices left");
    r.unpublish(&vol.volume_id, "node-0").await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();
    assert!(
        !r.images().contains(&image),
        "volume image still listed under its name"
    );
    assert!(
        r.images().iter().any(|i| i.starts_with("csi-vol-deleted-")),
        "kept for its snapshot"
    );
    let listed =
        r.c.controller
            .list_snapshots(v1::ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(listed.entries.len(), 1);
    r.delete(&restored.volume_id).await.unwrap();
    r.delete(&clone.volume_id).await.unwrap();
    r.delete_snapshot(&snap.snapshot_id).await.unwrap();
    r.delete_snapshot(&snap.snapshot_id).await.unwrap();
    // Last dependent gone: the deleted image is purged, nothing left in the trash either.
    let left: Vec<_> = r
        .images()
        .into_iter()
        .filter(|i| i.starts_with("csi-vol-deleted-") || *i == image)
        .collect();
    let id_of = snap.snapshot_id.split('/').nth(2).unwrap().to_string();
    assert!(
        !left.iter().any(|i| i.ends_with(&id_of)),
        "deleted image not purged: {left:?}"
    );
    assert!(!r.trash().contains(&id_of), "left in trash: {}", r.trash());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_bytes_reach_the_image_and_rwx_block_is_shared() {
    let Some(mut r) = Rbd::start(2).await else {
        return;
    };
    let cap = block_cap(Mode::MultiNodeMultiWriter);
    let vol = r
        .create(create_req(&unique("blk"), 64 * MIB, cap.clone()))
        .await
        .unwrap();
    let image = vol.volume_context["imageName"].clone();
    // RWX block: both nodes may publish.
    r.publish(&vol.volume_id, "node-0", cap.clone())
        .await
        .unwrap();
    r.publish(&vol.volume_id, "node-1", cap.clone())
        .await
        .unwrap();
    r.stage(0, &vol, "blk", cap.clone()).await.unwrap();
    let dev = r.node_publish(0, &vol, "blk", cap.clone()).await.unwrap();
    use std::os::unix::fs::{FileExt, FileTypeExt};
    assert!(
        std::fs::metadata(&dev)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(&pattern, 5 * MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    // The bytes are in the image on the cluster.
    let out = r.path("export.img");
    r.rbd(&["export", &image, out.to_str().unwrap()]).unwrap();
    let exported = std::fs::File::open(&out).unwrap();
    let mut got = vec![0u8; 4096];
    exported.read_exact_at(&mut got, 5 * MIB as u64).unwrap();
    assert_eq!(got, pattern);
    r.node_unpublish(0, &vol.volume_id, "blk").await.unwrap();
    r.unstage(0, &vol.volume_id, "blk").await.unwrap();

    // ControllerModifyVolume: QoS limits land as librbd config overrides on the image.
    r.c.controller
        .controller_modify_volume(v1::ControllerModifyVolumeRequest {
            volume_id: vol.volume_id.clone(),
            mutable_parameters: [("qosIopsLimit".to_string(), "500".to_string())].into(),
            secrets: r.secrets(),
        })
        .await
        .unwrap();
    let iops = r
        .rbd(&["image-meta", "get", &image, "conf_rbd_qos_iops_limit"])
        .unwrap();
    assert_eq!(iops.trim(), "500");
    let e =
        r.c.controller
            .controller_modify_volume(v1::ControllerModifyVolumeRequest {
                volume_id: vol.volume_id.clone(),
                mutable_parameters: [("qosIopsLimit".to_string(), "fast".to_string())].into(),
                secrets: r.secrets(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("qosIopsLimit"), "{e:?}");

    // Recycle: a fresh image of the same name and size; the old bytes are gone.
    r.unpublish(&vol.volume_id, "").await.unwrap();
    r.c.stowage
        .recycle_volume(stowage_csi::stowage_v1::RecycleVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: r.secrets(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.rbd(&["info", &image]).unwrap().contains("64 MiB"));
    r.rbd(&["export", &image, r.path("export2.img").to_str().unwrap()])
        .unwrap();
    let f = std::fs::File::open(r.path("export2.img")).unwrap();
    f.read_exact_at(&mut got, 5 * MIB as u64).unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "recycled image still has old data"
    );
    r.delete(&vol.volume_id).await.unwrap();
    assert!(!r.images().contains(&image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_is_refused_at_publish_and_at_stage() {
    let Some(mut r) = Rbd::start(2).await else {
        return;
    };
    let cap = fs_cap("ext4");
    let vol = r
        .create(create_req(&unique("rwo"), 64 * MIB, cap.clone()))
        .await
        .unwrap();
    r.publish(&vol.volume_id, "node-0", cap.clone())
        .await
        .unwrap();
    r.publish(&vol.volume_id, "node-0", cap.clone())
        .await
        .unwrap();
    let e = r
        .publish(&vol.volume_id, "node-1", cap.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("node-0"), "{e:?}");
    let e = r
        .publish(&vol.volume_id, "no-such-node", cap.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Node 0 stages and writes (taking the image's exclusive lock); node 1 staging the same
    // image is fenced by that lock even though it skipped ControllerPublish.
    r.stage(0, &vol, "n0", cap.clone()).await.unwrap();
    let t = r.node_publish(0, &vol, "n0", cap.clone()).await.unwrap();
    std::fs::write(t.join("f"), b"node-0").unwrap();
    rustix::fs::sync();
    let owners = r
        .rbd(&["lock", "ls", &vol.volume_context["imageName"]])
        .unwrap();
    assert!(owners.contains("auto"), "no exclusive lock owner: {owners}");
    let e = r.stage(1, &vol, "n1", cap.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("exclusive lock"), "{e:?}");

    // A restarted node plugin finds its attachment: unstage after restart detaches it.
    r.nodes[0].0.kill();
    let nd = r.path("node-0");
    let ncfg = nd.join("node.yaml");
    let mut p = stowage_tests::Plugin::node_with_root(&nd, &r.path(""), &ncfg, "node-0").unwrap();
    r.nodes[0].1 = stowage_tests::node_client(p.ready().await.unwrap());
    r.nodes[0].0 = p;
    assert_eq!(
        std::fs::read(t.join("f")).unwrap(),
        b"node-0",
        "mount survived the restart"
    );
    r.node_unpublish(0, &vol.volume_id, "n0").await.unwrap();
    r.unstage(0, &vol.volume_id, "n0").await.unwrap();
    assert!(
        loops_below(r.dir.path()).is_empty(),
        "loop device left after restart + unstage"
    );
    let fuse_left = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| {
            l.contains(r.dir.path().file_name().unwrap().to_str().unwrap()) && l.contains("fuse")
        });
    assert!(!fuse_left, "rbd-fuse mount left");

    // Now node 1 may take it (after the controller moves the publish record).
    r.unpublish(&vol.volume_id, "node-0").await.unwrap();
    r.publish(&vol.volume_id, "node-1", cap.clone())
        .await
        .unwrap();
    r.stage(1, &vol, "n1", cap.clone()).await.unwrap();
    let t1 = r.node_publish(1, &vol, "n1", cap.clone()).await.unwrap();
    assert_eq!(std::fs::read(t1.join("f")).unwrap(), b"node-0");

    // ext4 cannot be grown online in this sandbox: the error says so, and the next stage
    // grows it offline.
    r.c.controller
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            secrets: r.secrets(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = fs_size(&t1);
    let res = r
        .node(1)
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: t1.to_string_lossy().into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    match res {
        Ok(_) => assert!(
            fs_size(&t1) > before + 50 * 1024 * 1024,
            "ext4 grown online"
        ),
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("offline"), "{e:?}");
            r.node_unpublish(1, &vol.volume_id, "n1").await.unwrap();
            r.unstage(1, &vol.volume_id, "n1").await.unwrap();
            r.stage(1, &vol, "n1", cap.clone()).await.unwrap();
            let t1 = r.node_publish(1, &vol, "n1", cap.clone()).await.unwrap();
            assert!(
                fs_size(&t1) > before + 50 * 1024 * 1024,
                "ext4 not grown offline"
            );
            assert_eq!(std::fs::read(t1.join("f")).unwrap(), b"node-0");
        }
    }
    r.node_unpublish(1, &vol.volume_id, "n1").await.unwrap();
    r.unstage(1, &vol.volume_id, "n1").await.unwrap();
    r.unpublish(&vol.volume_id, "node-1").await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field_named() {
    let Some(mut r) = Rbd::start(0).await else {
        return;
    };
    let fs = fs_cap("");
    let p = |k: &str, v: &str| (k.to_string(), v.to_string());
    let mut multi_fs = fs_cap("ext4");
    multi_fs.access_mode = Some(v1::volume_capability::AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    let cases: Vec<(&str, v1::CreateVolumeRequest, Code, &str)> = vec![
        (
            "unknown parameter",
            {
                let mut q = create_req("b1", MIB, fs.clone());
                q.parameters.extend([p("imagefeatures", "layering")]);
                q
            },
            Code::InvalidArgument,
            "imagefeatures",
        ),
        (
            "unknown feature",
            {
                let mut q = create_req("b2", MIB, fs.clone());
                q.parameters
                    .extend([p("imageFeatures", "layering,journaling-x")]);
                q
            },
            Code::InvalidArgument,
            "imageFeatures",
        ),
        (
            "no layering",
            {
                let mut q = create_req("b3", MIB, fs.clone());
                q.parameters.extend([p("imageFeatures", "exclusive-lock")]);
                q
            },
            Code::InvalidArgument,
            "layering",
        ),
        (
            "bad attach",
            {
                let mut q = create_req("b4", MIB, fs.clone());
                q.parameters.extend([p("attach", "iscsi")]);
                q
            },
            Code::InvalidArgument,
            "attach",
        ),
        (
            "bad pool",
            {
                let mut q = create_req("b5", MIB, fs.clone());
                q.parameters.extend([p("pool", "../x")]);
                q
            },
            Code::InvalidArgument,
            "pool",
        ),
        (
            "missing pool",
            {
                let mut q = create_req("b6", MIB, fs.clone());
                q.parameters.extend([p("pool", "nopool")]);
                q
            },
            Code::InvalidArgument,
            "nopool",
        ),
        (
            "bad flatten",
            {
                let mut q = create_req("b7", MIB, fs.clone());
                q.parameters.extend([p("cloneFlatten", "sometimes")]);
                q
            },
            Code::InvalidArgument,
            "cloneFlatten",
        ),
        (
            "unknown instance",
            {
                let mut q = create_req("b8", MIB, fs.clone());
                q.parameters.extend([p("instance", "other")]);
                q
            },
            Code::InvalidArgument,
            "instance",
        ),
        (
            "multi-node filesystem",
            create_req("b9", MIB, multi_fs),
            Code::InvalidArgument,
            "single-node",
        ),
        (
            "btrfs",
            create_req("b10", MIB, fs_cap("btrfs")),
            Code::InvalidArgument,
            "fs_type",
        ),
        (
            "limit below 1 MiB",
            v1::CreateVolumeRequest {
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 1000,
                    limit_bytes: 4096,
                }),
                ..create_req("b11", 0, fs.clone())
            },
            Code::OutOfRange,
            "capacity_range",
        ),
        (
            "missing snapshot",
            v1::CreateVolumeRequest {
                volume_content_source: Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Snapshot(
                        v1::volume_content_source::SnapshotSource {
                            snapshot_id: "default/rbd/123456/csi-snap-nope".into(),
                        },
                    )),
                }),
                ..create_req("b12", MIB, fs.clone())
            },
            Code::NotFound,
            "snapshot",
        ),
        (
            "missing source volume",
            v1::CreateVolumeRequest {
                volume_content_source: Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Volume(
                        v1::volume_content_source::VolumeSource {
                            volume_id: "default/rbd/csi-vol-nope".into(),
                        },
                    )),
                }),
                ..create_req("b13", MIB, fs.clone())
            },
            Code::NotFound,
            "volume",
        ),
    ];
    for (what, req, code, needle) in cases {
        let e = r.create(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{what}: {e:?} should name {needle}"
        );
    }
    // Secrets: half given, or a wrong key.
    let mut q = create_req("b14", MIB, fs.clone());
    q.secrets = [p("userID", "admin")].into();
    let e = r.c.controller.create_volume(q).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("userKey"), "{e:?}");
    let mut q = create_req("b15", MIB, fs.clone());
    q.secrets = [
        p("userID", "admin"),
        p("userKey", "AQBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="),
    ]
    .into();
    let e = r.c.controller.create_volume(q).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::FailedPrecondition | Code::Unavailable),
        "{e:?}"
    );
    assert!(
        !e.message().contains("AQBAAAA"),
        "the key leaked into an error: {e:?}"
    );
    assert!(
        !r.ctl.log_text().contains(&r.env["CEPH_ADMIN_KEY"]),
        "key in the controller log"
    );
    // Snapshot of a volume that does not exist; snapshot name taken by another volume.
    let e = r
        .snapshot("s1", "default/rbd/csi-vol-nope")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let a = r
        .create(create_req(&unique("sa"), MIB, fs.clone()))
        .await
        .unwrap();
    let b = r
        .create(create_req(&unique("sb"), MIB, fs.clone()))
        .await
        .unwrap();
    let sname = unique("taken");
    let s = r.snapshot(&sname, &a.volume_id).await.unwrap();
    let e = r.snapshot(&sname, &b.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Restore into a smaller volume, or as block from a filesystem snapshot.
    let mut q = create_req(&unique("small"), MIB, block_cap(Mode::SingleNodeWriter));
    q.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Snapshot(
            v1::volume_content_source::SnapshotSource {
                snapshot_id: s.snapshot_id.clone(),
            },
        )),
    });
    let e = r.create(q).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("volume_content_source"), "{e:?}");
    // Node-side bad input: no secrets and no keyring is refused before any attach.
    r.delete_snapshot(&s.snapshot_id).await.unwrap();
    r.delete(&a.volume_id).await.unwrap();
    r.delete(&b.volume_id).await.unwrap();
    // IDs that are not ours: delete succeeds, get is NOT_FOUND.
    r.delete("default/rbd/csi-vol-never-made").await.unwrap();
    r.delete("not-an-id").await.unwrap();
    let e =
        r.c.controller
            .controller_get_volume(v1::ControllerGetVolumeRequest {
                volume_id: "default/rbd/csi-vol-never-made".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// `stowage doctor --backend rbd` against the real cluster: the configured pool is OK
/// (monitors reached with the instance's keyring, pool opened, images listed); a pool that
/// does not exist and monitors that do not answer are FAIL with a hint, exit code 1.
#[tokio::test]
async fn doctor_probes_the_ceph_pool() {
    let Some(env) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run =
        |cfg: &std::path::Path| stowage_tests::doctor_check(cfg, "rbd", "rbd/default").unwrap();
    let good = config(&env, dir.path(), "doctor", "");
    let (code, c, v) = run(&good);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(c["level"], "OK", "{v:#}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("pool rbd"),
        "{c:#}"
    );
    let dead_mon = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("127.0.0.1:{}", dead_mon.local_addr().unwrap().port());
    drop(dead_mon);
    for (i, (from, to, hint)) in [
        (
            "pool: rbd".to_string(),
            "pool: stowage-no-such-pool".to_string(),
            "ceph osd pool ls",
        ),
        (
            format!("monitors: \"{}\"", env["CEPH_MON_HOST"]),
            format!("monitors: \"{dead}\""),
            "ceph -s",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("bad{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = config(&env, &sub, "doctor", "    opTimeoutSecs: 5\n");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(&from), "{text}");
        std::fs::write(&cfg, text.replace(&from, &to)).unwrap();
        let started = std::time::Instant::now();
        let (code, c, v) = run(&cfg);
        assert_eq!(code, Some(1), "{to}: {v:#}");
        assert_eq!(c["level"], "FAIL", "{to}: {v:#}");
        assert!(
            c["hint"].as_str().unwrap_or_default().contains(hint),
            "{to}: {c:#}"
        );
        println!(
            "doctor with {to}: FAIL in {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            c["detail"]
        );
    }
}

/// R2 defect (chaos_rbd, seed 1796668271957277565): a DeleteVolume SIGKILLed inside
/// `rbd_remove` leaves the image in the trash with source REMOVING (gone by name, its data and
/// records in place). The retried DeleteVolume answered OK without touching it, and a new
/// volume of the same name was created beside it; both now finish the removal first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_killed_inside_rbd_remove_is_finished_by_the_retry() {
    let Some(mut r) = Rbd::start(0).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let name = unique("halfrm");
    let vol = r
        .create(create_req(&name, 64 * MIB, cap.clone()))
        .await
        .unwrap();
    let image = vol.volume_context["imageName"].clone();
    // Data the removal must give back.
    r.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "1M",
        "--io-total",
        "8M",
        &image,
    ])
    .unwrap();
    let id = r.half_remove(&image);
    let data = |r: &Rbd| {
        String::from_utf8_lossy(&r.rados(&["ls"], None).unwrap())
            .lines()
            .filter(|o| o.starts_with(&format!("rbd_data.{id}.")))
            .count()
    };
    assert!(data(&r) > 0, "no data objects of {id} before the retry");

    // The retried DeleteVolume: OK only once nothing of the image is left.
    r.delete(&vol.volume_id).await.unwrap();
    assert!(!r.images().contains(&image), "{:?}", r.images());
    assert_eq!(r.image_left(&id), None);
    assert_eq!(data(&r), 0, "data objects of {id} left");
    r.delete(&vol.volume_id).await.unwrap();

    // CreateVolume of the same name after a half removal: the old image does not stay
    // beside the new one.
    let vol = r
        .create(create_req(&name, 64 * MIB, cap.clone()))
        .await
        .unwrap();
    let old = r.half_remove(&image);
    let again = r
        .create(create_req(&name, 64 * MIB, cap.clone()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    assert_eq!(r.image_left(&old), None);
    assert_ne!(r.image_id(&image), old, "not a new image");
    assert_eq!(
        r.images().iter().filter(|i| **i == image).count(),
        1,
        "{:?}",
        r.images()
    );
    r.delete(&again.volume_id).await.unwrap();
    assert!(!r.images().contains(&image));
}

/// R2 defect (chaos_rbd, seed 1796668162261325215): a client killed while it holds an image's
/// exclusive lock (the controller writes its records with the lock) leaves the lock on the
/// header for ever. NodeStage refused such a volume on every retry; now a lock owner counts
/// only while it still watches the image: refused while the client lives (or while the OSD
/// still keeps a dead client's watch), staged once the watch expired, the dead owner's lock
/// broken and the owner blocklisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_clients_exclusive_lock_does_not_block_stage_a_live_ones_does() {
    let Some(mut r) = Rbd::start(1).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let vol = r
        .create(create_req(&unique("deadlock"), 64 * MIB, cap.clone()))
        .await
        .unwrap();
    let image = vol.volume_context["imageName"].clone();
    // A separate client that takes the exclusive lock and keeps writing.
    let mut bench = std::process::Command::new("rbd")
        .args(["-c", &r.env["CEPH_CONF"], "-p", "rbd", "bench"])
        .args(["--io-type", "write", "--io-size", "4K", "--io-threads", "1"])
        .args(["--io-total", "100G", "--io-pattern", "rand", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let owner = loop {
        let ls = r.rbd(&["lock", "ls", &image]).unwrap();
        if let Some(l) = ls.lines().find(|l| l.contains(" auto ")) {
            break l.split_whitespace().last().unwrap().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rbd bench took no lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };

    // Alive (watching and holding the lock): the single-node fence refuses.
    let e = r.stage(0, &vol, "s", cap.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("in use elsewhere") && e.message().contains(&owner),
        "{e:?}"
    );

    // SIGKILL: the lock stays on the header; the watch until the OSD's timeout.
    bench.kill().unwrap();
    bench.wait().unwrap();
    let killed = std::time::Instant::now();
    assert!(r.rbd(&["lock", "ls", &image]).unwrap().contains(&owner));
    let timeout: u64 = r
        .ceph(&["config", "get", "osd", "osd_client_watch_timeout"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let bound = std::time::Duration::from_secs(timeout + 30);
    let mut refused = 0;
    loop {
        match r.stage(0, &vol, "s", cap.clone()).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                // Refused only while the dead client's watch is still there.
                let watching = r.rbd(&["status", &image]).unwrap().contains(&owner);
                assert!(
                    watching || killed.elapsed() < std::time::Duration::from_secs(timeout + 5),
                    "refused {:.1}s after the kill with no watch of {owner} left: {e:?}",
                    killed.elapsed().as_secs_f64()
                );
                assert!(
                    killed.elapsed() < bound,
                    "NodeStage still refused {bound:?} after the lock owner was killed: {e:?}"
                );
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    println!(
        "staged {:.1}s after the lock owner's SIGKILL (osd_client_watch_timeout {timeout}s, {refused} refusals)",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        !r.rbd(&["lock", "ls", &image]).unwrap().contains(&owner),
        "the dead owner's lock is still there"
    );
    let bl = r.ceph(&["osd", "blocklist", "ls"]).unwrap();
    assert!(bl.contains(&owner), "dead owner not blocklisted: {bl}");
    // The node's client writes (taking the lock itself) and reads its bytes back.
    {
        use std::io::{Read, Seek, Write};
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.path("s/staging/device"))
            .unwrap();
        dev.write_all(&[0x5a; 4096]).unwrap();
        dev.sync_all().unwrap();
        let mut back = [0u8; 4096];
        dev.seek(std::io::SeekFrom::Start(0)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert_eq!(back, [0x5a; 4096]);
    }
    let ls = r.rbd(&["lock", "ls", &image]).unwrap();
    assert!(ls.contains(" auto ") && !ls.contains(&owner), "{ls}");
    r.unstage(0, &vol.volume_id, "s").await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();
}
