//! GlusterFS backend end to end against a real glusterd (tests/infra/gluster.sh): the real
//! binaries over their sockets, real FUSE mounts, quota enforced by gluster, bytes checked on
//! the brick, limits checked with the gluster CLI. Needs root.

#[path = "gluster_common.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Plugin, node_client, wire};
use tonic::Code;

const MIB: i64 = 1 << 20;

async fn create(e: &mut Env, name: &str, bytes: i64, params: &[(&str, &str)]) -> v1::Volume {
    let mut req = wire::create(name, bytes);
    req.parameters = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>();
    e.c.controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

async fn stats(
    e: &mut Env,
    vol: &v1::Volume,
    path: &std::path::Path,
) -> v1::NodeGetVolumeStatsResponse {
    e.n.node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn quota_is_enforced_and_expands_online() {
    let Some(g) = gluster() else { return };
    let mut e = env(&g, "life", "").await;
    let vol = create(&mut e, "pvc-life", 8 * MIB, &[]).await;
    let dir = dir_of(&vol);
    let gpath = format!("/{}/{dir}", e.base);
    assert_eq!(
        g.quota_settled(&gpath, Some(8 << 20)),
        Some(8 << 20),
        "limit on {gpath}"
    );
    assert_eq!(vol.volume_context["server"], g.host);
    assert_eq!(vol.volume_context["path"], gpath);

    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("pods/a/mount");
    for _ in 0..2 {
        e.n.node_stage_volume(stage_req(&vol, &staging))
            .await
            .unwrap();
        e.n.node_publish_volume(publish_req(&vol, &staging, &target))
            .await
            .unwrap();
    }
    std::fs::write(target.join("hello"), b"stowage on gluster").unwrap();
    assert_eq!(
        std::fs::read(g.on_brick(&e.base, &dir).join("hello")).unwrap(),
        b"stowage on gluster"
    );
    // df on the mount shows the quota as the size.
    let s = stats(&mut e, &vol, &target).await;
    assert_eq!(s.usage[0].total, 8 * MIB, "{s:?}");
    assert!(!s.volume_condition.unwrap().abnormal);

    // Past the limit: EDQUOT. Gluster's quota accounting trails the writes the FUSE client has
    // already acknowledged (write-behind, marker updates), so some overshoot gets through before
    // the refusal: ~1 MiB on an idle machine, 4.8 MiB seen under CI load. The point is that a
    // write of 4x the limit is cut off, so the bound is twice the limit, not a timing guess.
    let err = write_zeros(&target.join("big"), 32 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    let used = std::fs::metadata(target.join("big")).unwrap().len();
    assert!(used < 16 << 20, "{used} bytes went into an 8 MiB volume");
    std::fs::remove_file(target.join("big")).unwrap();

    // Expand online (no unmount): the same write now fits and df shows the new size.
    let r =
        e.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, 32 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(g.quota_settled(&gpath, Some(32 << 20)), Some(32 << 20));
    write_zeros(&target.join("big"), 16 << 20).unwrap();
    assert_eq!(
        std::fs::metadata(g.on_brick(&e.base, &dir).join("big"))
            .unwrap()
            .len(),
        16 << 20
    );
    let mut total = 0;
    for _ in 0..50 {
        total = stats(&mut e, &vol, &target).await.usage[0].total;
        if total == 32 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, 32 * MIB);

    for _ in 0..2 {
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
    // The client exits on its own once the kernel tells it the mount is gone.
    let mut left = fuse_pid(&staging);
    for _ in 0..100 {
        if left.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = fuse_pid(&staging);
    }
    assert!(
        left.is_none(),
        "FUSE client {left:?} still running 5 s after unstage"
    );
    for _ in 0..2 {
        e.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!g.on_brick(&e.base, &dir).exists());
    assert_eq!(g.quota_settled(&gpath, None), None);
}

#[tokio::test]
async fn concurrent_creates_on_one_volume() {
    let Some(g) = gluster() else { return };
    let e = env(&g, "conc", "").await;
    // 10 different volumes plus 4 duplicates of one name, all at once: quota commands on one
    // gluster volume are refused when concurrent, so this only works if they are serialized.
    let mut tasks = Vec::new();
    for i in 0..14 {
        let mut c = e.c.controller.clone();
        let name = if i < 10 {
            format!("pvc-c{i}")
        } else {
            "pvc-dup".to_string()
        };
        tasks.push(tokio::spawn(async move {
            c.create_volume(wire::create(&name, (4 + i) * MIB)).await
        }));
    }
    let mut vols = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        match r {
            Ok(v) => vols.push(v.into_inner().volume.unwrap()),
            // Duplicates with a different size are a conflict, not a failure of the backend.
            Err(st) if i >= 10 && st.code() == Code::AlreadyExists => {}
            Err(st) => panic!("create {i}: {st:?}"),
        }
    }
    let mut ids: Vec<_> = vols.iter().map(|v| v.volume_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "{ids:?}");
    for v in &vols {
        let path = format!("/{}/{}", e.base, dir_of(v));
        assert_eq!(
            g.quota_settled(&path, Some(v.capacity_bytes as u64)),
            Some(v.capacity_bytes as u64),
            "{path}"
        );
        assert!(g.on_brick(&e.base, &dir_of(v)).is_dir());
    }
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let mut c = e.c.controller.clone();
        tasks.push(tokio::spawn(async move {
            c.delete_volume(v1::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for id in ids {
        let dir = id.split_once('/').unwrap().1;
        assert!(
            !g.on_brick(&e.base, dir).exists(),
            "{dir} left on the brick"
        );
        assert_eq!(g.quota_settled(&format!("/{}/{dir}", e.base), None), None);
    }
}

#[tokio::test]
async fn dead_fuse_mounts_are_healed_and_survive_plugin_restarts() {
    let Some(g) = gluster() else { return };
    let mut e = env(&g, "heal", "").await;
    let vol = create(&mut e, "pvc-heal", 16 * MIB, &[]).await;
    let staging = e.dir.path().join("staging");
    let target = e.dir.path().join("pods/a/mount");
    let ro_target = e.dir.path().join("pods/b/mount");
    e.n.node_stage_volume(stage_req(&vol, &staging))
        .await
        .unwrap();
    e.n.node_publish_volume(publish_req(&vol, &staging, &target))
        .await
        .unwrap();
    let mut ro = publish_req(&vol, &staging, &ro_target);
    ro.readonly = true;
    e.n.node_publish_volume(ro.clone()).await.unwrap();
    std::fs::write(target.join("data"), b"before").unwrap();

    // The FUSE client outlives the node plugin.
    let pid = fuse_pid(&staging).expect("FUSE client for the staging mount");
    e.node.kill();
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"before");
    e.node = Plugin::node(e.dir.path(), &e.cfg, "node-1").unwrap();
    e.n = node_client(e.node.ready().await.unwrap());
    assert_eq!(fuse_pid(&staging), Some(pid));

    // 1. NodeGetVolumeStats notices a dead client and remounts; both targets come back.
    kill9(pid);
    let err = std::fs::metadata(target.join("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let s = stats(&mut e, &vol, &target).await;
    assert!(
        !s.volume_condition.unwrap().abnormal,
        "not healed; node log:\n{}",
        e.node.log_text()
    );
    assert_eq!(s.usage[0].total, 16 * MIB);
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"before");
    assert_eq!(std::fs::read(ro_target.join("data")).unwrap(), b"before");
    let err = std::fs::write(ro_target.join("x"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "read-only target re-bound read-write"
    );
    let pid2 = fuse_pid(&staging).expect("a new FUSE client");
    assert_ne!(pid2, pid);

    // 2. NodePublish (a repeat, as kubelet does after a restart) heals too.
    kill9(pid2);
    e.n.node_publish_volume(publish_req(&vol, &staging, &target))
        .await
        .unwrap();
    std::fs::write(target.join("data"), b"after").unwrap();
    assert_eq!(
        std::fs::read(g.on_brick(&e.base, &dir_of(&vol)).join("data")).unwrap(),
        b"after"
    );

    // 3. And NodeStage.
    let pid3 = fuse_pid(&staging).unwrap();
    kill9(pid3);
    e.n.node_stage_volume(stage_req(&vol, &staging))
        .await
        .unwrap();
    assert_eq!(std::fs::read(staging.join("data")).unwrap(), b"after");
    assert_eq!(std::fs::read(ro_target.join("data")).unwrap(), b"after");

    for t in [&target, &ro_target] {
        e.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: t.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    e.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn snapshots_clones_recycle_and_delete_policies() {
    let Some(g) = gluster() else { return };
    let mut e = env(&g, "snap", "").await;
    let vol = create(&mut e, "pvc-src", 8 * MIB, &[("onDelete", "retain")]).await;
    let src_dir = g.on_brick(&e.base, &dir_of(&vol));
    // Written through the management path's brick view is not allowed (bypasses gluster):
    // write through a node mount.
    let staging = e.dir.path().join("staging");
    e.n.node_stage_volume(stage_req(&vol, &staging))
        .await
        .unwrap();
    std::fs::create_dir(staging.join("sub")).unwrap();
    std::fs::write(staging.join("sub/file"), b"snapshot me").unwrap();

    let snap =
        e.c.controller
            .create_snapshot(v1::CreateSnapshotRequest {
                source_volume_id: vol.volume_id.clone(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    std::fs::write(staging.join("sub/file"), b"changed").unwrap();

    let mut req = wire::create("pvc-restored", 16 * MIB);
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
    let rdir = g.on_brick(&e.base, &dir_of(&restored));
    assert_eq!(
        std::fs::read(rdir.join("sub/file")).unwrap(),
        b"snapshot me"
    );
    assert_eq!(
        g.quota_settled(
            &format!("/{}/{}", e.base, dir_of(&restored)),
            Some(16 << 20)
        ),
        Some(16 << 20)
    );

    let mut req = wire::create("pvc-clone", 8 * MIB);
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    let clone =
        e.c.controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(
        std::fs::read(g.on_brick(&e.base, &dir_of(&clone)).join("sub/file")).unwrap(),
        b"changed"
    );

    // Recycle empties the directory but keeps the volume and its limit.
    e.c.stowage
        .recycle_volume(stowage_csi::stowage_v1::RecycleVolumeRequest {
            volume_id: clone.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(g.on_brick(&e.base, &dir_of(&clone)))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        g.quota_settled(&format!("/{}/{}", e.base, dir_of(&clone)), Some(8 << 20)),
        Some(8 << 20)
    );

    // onDelete: retain keeps the data (and its limit); archive renames it; delete removes.
    e.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    let del = |id: &str| v1::DeleteVolumeRequest {
        volume_id: id.to_string(),
        ..Default::default()
    };
    e.c.controller
        .delete_volume(del(&vol.volume_id))
        .await
        .unwrap();
    assert_eq!(std::fs::read(src_dir.join("sub/file")).unwrap(), b"changed");
    let ids: Vec<String> =
        e.c.controller
            .list_volumes(v1::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|x| x.volume.unwrap().volume_id)
            .collect();
    assert!(!ids.contains(&vol.volume_id), "{ids:?}");

    let arch = create(&mut e, "pvc-arch", 4 * MIB, &[("onDelete", "archive")]).await;
    e.c.controller
        .delete_volume(del(&arch.volume_id))
        .await
        .unwrap();
    let archived: Vec<String> = std::fs::read_dir(g.brick.join(&e.base))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-pvc-arch-"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert!(!g.on_brick(&e.base, &dir_of(&arch)).exists());

    for v in [&restored, &clone] {
        e.c.controller
            .delete_volume(del(&v.volume_id))
            .await
            .unwrap();
        assert!(!g.on_brick(&e.base, &dir_of(v)).exists());
    }
    e.c.controller
        .delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn expect<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(st) => {
            assert_eq!(st.code(), code, "{what}: {st:?}");
            assert!(
                st.message().contains(needle),
                "{what}: {:?} does not name {needle:?}",
                st.message()
            );
        }
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() {
    let Some(g) = gluster() else { return };
    let mut e = env(&g, "bad", "    maxVolumeBytes: 67108864\n").await;
    let with = |f: &dyn Fn(&mut v1::CreateVolumeRequest)| {
        let mut r = wire::create("pvc-bad", 4 * MIB);
        f(&mut r);
        r
    };
    let table: Vec<(&str, v1::CreateVolumeRequest, Code, &str)> = vec![
        (
            "unknown parameter",
            with(&|r| {
                r.parameters.insert("quota".into(), "1".into());
            }),
            Code::InvalidArgument,
            "quota",
        ),
        (
            "bad onDelete",
            with(&|r| {
                r.parameters.insert("onDelete".into(), "shred".into());
            }),
            Code::InvalidArgument,
            "onDelete",
        ),
        (
            "unknown instance",
            with(&|r| {
                r.parameters.insert("instance".into(), "other".into());
            }),
            Code::InvalidArgument,
            "instance",
        ),
        (
            "escaping subDir",
            with(&|r| {
                r.parameters.insert("subDir".into(), "../x".into());
            }),
            Code::InvalidArgument,
            "subDir",
        ),
        (
            "dot subDir",
            with(&|r| {
                r.parameters.insert("subDir".into(), ".stowage".into());
            }),
            Code::InvalidArgument,
            "subDir",
        ),
        (
            "block volume",
            with(&|r| r.volume_capabilities = vec![wire::block_cap(Mode::SingleNodeWriter)]),
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            "over maxVolumeBytes",
            with(&|r| {
                r.capacity_range = Some(v1::CapacityRange {
                    required_bytes: 128 * MIB,
                    limit_bytes: 0,
                })
            }),
            Code::OutOfRange,
            "capacity",
        ),
        (
            "limit below required",
            with(&|r| {
                r.capacity_range = Some(v1::CapacityRange {
                    required_bytes: 8 * MIB,
                    limit_bytes: 4 * MIB,
                })
            }),
            Code::InvalidArgument,
            "capacity",
        ),
        (
            "missing snapshot",
            with(&|r| {
                r.volume_content_source = Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Snapshot(
                        v1::volume_content_source::SnapshotSource {
                            snapshot_id: "main/nope".into(),
                        },
                    )),
                })
            }),
            Code::NotFound,
            "snapshot",
        ),
    ];
    for (what, req, code, needle) in table {
        expect(what, e.c.controller.create_volume(req).await, code, needle);
    }
    // Nothing was created by any of them.
    let left: Vec<_> = std::fs::read_dir(g.brick.join(&e.base))
        .map(|d| {
            d.map(|x| x.unwrap().file_name())
                .filter(|n| n != ".stowage")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    let vol = create(&mut e, "pvc-ok", 4 * MIB, &[]).await;
    expect(
        "expand past maxVolumeBytes",
        e.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 1 << 40,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "capacity",
    );
    expect(
        "expand escaping id",
        e.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: "main/../../etc".into(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "volume_id",
    );

    // Node: contexts and options that must never reach mount(8).
    let staging = e.dir.path().join("staging-bad");
    let ctx = |kv: &[(&str, &str)]| -> HashMap<String, String> {
        let mut c = vol.volume_context.clone();
        for (k, v) in kv {
            if v.is_empty() {
                c.remove(*k);
            } else {
                c.insert(k.to_string(), v.to_string());
            }
        }
        c
    };
    type Row<'a> = (&'a str, HashMap<String, String>, Vec<String>, Code, &'a str);
    let node_table: Vec<Row> = vec![
        (
            "no server",
            ctx(&[("server", "")]),
            vec![],
            Code::InvalidArgument,
            "volume_context",
        ),
        (
            "option-like server",
            ctx(&[("server", "-oexec")]),
            vec![],
            Code::InvalidArgument,
            "server",
        ),
        (
            "bad volume",
            ctx(&[("volume", "a b")]),
            vec![],
            Code::InvalidArgument,
            "volume",
        ),
        (
            "escaping path",
            ctx(&[("path", "/x/../../etc")]),
            vec![],
            Code::InvalidArgument,
            "path",
        ),
        (
            "relative path",
            ctx(&[("path", "x")]),
            vec![],
            Code::InvalidArgument,
            "path",
        ),
        (
            "bad mount flag",
            ctx(&[]),
            vec!["ro evil".into()],
            Code::InvalidArgument,
            "mount_flags",
        ),
        (
            "option-like flag",
            ctx(&[]),
            vec!["--help".into()],
            Code::InvalidArgument,
            "mount_flags",
        ),
    ];
    for (what, context, flags, code, needle) in node_table {
        let mut req = stage_req(&vol, &staging);
        req.volume_context = context;
        req.volume_capability = Some(v1::VolumeCapability {
            access_type: Some(v1::volume_capability::AccessType::Mount(
                v1::volume_capability::MountVolume {
                    mount_flags: flags,
                    ..Default::default()
                },
            )),
            access_mode: Some(v1::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        });
        expect(what, e.n.node_stage_volume(req).await, code, needle);
    }
    let mut req = stage_req(&vol, &staging);
    req.volume_capability = Some(wire::block_cap(Mode::SingleNodeWriter));
    expect(
        "block stage",
        e.n.node_stage_volume(req).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    // A subdirectory that does not exist: mount.glusterfs fails, the error says what it mounted.
    let mut req = stage_req(&vol, &staging);
    req.volume_context = ctx(&[("path", "/no-such-dir-here")]);
    let st = e.n.node_stage_volume(req).await.unwrap_err();
    assert!(st.message().contains("no-such-dir-here"), "{st:?}");
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&*staging.to_string_lossy()),
        "a failed stage left a mount"
    );
    e.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn controller_drives_glusterd_over_ssh() {
    // The production path for a controller that does not run beside glusterd: the CLI runs on
    // a gluster server over SSH (tests/infra/sshd.sh: a real sshd on 127.0.0.1, key auth,
    // pinned host key).
    let Some(g) = gluster() else { return };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(port), Some(key), Some(known)) = (
        var("STOWAGE_SSHD_PORT"),
        var("STOWAGE_SSHD_KEY"),
        var("STOWAGE_SSHD_KNOWN_HOSTS"),
    ) else {
        assert!(
            var("STOWAGE_REQUIRE_GLUSTER").as_deref() != Some("1"),
            "STOWAGE_REQUIRE_GLUSTER=1 but STOWAGE_SSHD_* is not set (tests/infra/sshd.sh start)"
        );
        eprintln!("sshd not configured (STOWAGE_SSHD_*): test not run");
        return;
    };
    let extra = format!(
        "    glusterd:\n      socket: {}\n      ssh:\n        host: 127.0.0.1\n        port: {port}\n        user: root\n        identityFile: {key}\n        knownHostsFile: {known}\n",
        g.sock.display()
    );
    // The config helper writes its own glusterd section: replace it.
    let dir = tempfile::tempdir().unwrap();
    let base = unique("ssh");
    let cfg = dir.path().join("gluster.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: glusterfs\ninstances:\n  main:\n    servers: [{}]\n    volume: {}\n    baseDir: {base}\n    stateDir: {}\n{extra}",
            g.host,
            g.volume,
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = stowage_tests::controller_clients(ctl.ready().await.unwrap()).controller;
    let vol = c
        .create_volume(wire::create("pvc-ssh", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let gpath = format!("/{base}/{}", dir_of(&vol));
    assert_eq!(g.quota_settled(&gpath, Some(4 << 20)), Some(4 << 20));
    c.controller_expand_volume(v1::ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: 8 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(g.quota_settled(&gpath, Some(8 << 20)), Some(8 << 20));
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(g.quota_settled(&gpath, None), None);
    assert!(!g.on_brick(&base, &dir_of(&vol)).exists());
    drop(ctl);
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for m in text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&*dir.path().to_string_lossy()))
    {
        let _ = std::process::Command::new("umount")
            .args(["-l", m])
            .status();
    }
}

/// `stowage doctor --backend glusterfs` against the real glusterd: the configured volume is
/// OK (mounted and listed through the controller's own code); a volume that does not exist
/// and an unreachable glusterd socket are FAIL with the volume named and a hint, exit code 1.
#[tokio::test]
async fn doctor_probes_the_gluster_volume() {
    let Some(g) = gluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = unique("doctor");
    let good = g.config(dir.path(), &base, "");
    let run = |cfg: &std::path::Path| {
        let (code, _, v) = stowage_tests::doctor_check(cfg, "glusterfs", "glusterfs/main").unwrap();
        (code, v)
    };
    let (code, v) = run(&good);
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    assert_eq!(code, Some(0), "{v:#}");
    assert!(
        checks.iter().any(|c| c["level"] == "OK"
            && c["name"] == "glusterfs/main"
            && c["detail"].as_str().unwrap_or_default().contains(&g.volume)),
        "{v:#}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "doctor left its management mount behind:\n{mounts}"
    );
    // Another directory: a volume that glusterd does not have, then a glusterd socket that
    // nothing serves.
    for (i, (from, to)) in [
        (
            format!("volume: {}", g.volume),
            "volume: stowage-no-such-volume".to_string(),
        ),
        (
            format!("socket: {}", g.sock.display()),
            format!("socket: {}", dir.path().join("nothing.sock").display()),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("bad{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = g.config(&sub, &base, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(&from, &to);
        std::fs::write(&cfg, text).unwrap();
        let (code, v) = run(&cfg);
        assert_eq!(code, Some(1), "{to}: {v:#}");
        let c = v["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == "glusterfs/main").cloned())
            .unwrap_or_default();
        assert_eq!(c["level"], "FAIL", "{to}: {v:#}");
        assert!(
            c["hint"].as_str().unwrap_or_default().contains("glusterd"),
            "{to}: {c:#}"
        );
    }
}
