//! A table of malformed requests per RPC against the real controller and node binaries: each
//! gets the right gRPC status and a message naming the offending field; the plugins stay up
//! and nothing is created.

use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Plugin, controller_clients, local_config, node_client, wire};
use tonic::Code;

fn expect(name: &str, r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("{name}: expected {code:?}, got Ok({v:?})"),
        Err(st) => {
            assert_eq!(st.code(), code, "{name}: {st:?}");
            assert!(
                st.message().contains(needle),
                "{name}: message {:?} does not name {needle:?}",
                st.message()
            );
        }
    }
}

fn cap_without_mode() -> v1::VolumeCapability {
    v1::VolumeCapability {
        access_type: Some(v1::volume_capability::AccessType::Mount(Default::default())),
        access_mode: None,
    }
}

fn cap_without_type() -> v1::VolumeCapability {
    v1::VolumeCapability {
        access_type: None,
        access_mode: Some(v1::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test]
async fn controller_refuses_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap()).controller;
    let long = "x".repeat(10_000);

    let create = |f: &dyn Fn(&mut v1::CreateVolumeRequest)| {
        let mut r = wire::create("pvc-bad", 1 << 20);
        f(&mut r);
        r
    };
    let table: Vec<(&str, v1::CreateVolumeRequest, Code, &str)> = vec![
        (
            "missing name",
            create(&|r| r.name.clear()),
            Code::InvalidArgument,
            "name",
        ),
        (
            "10k name",
            create(&|r| r.name = long.clone()),
            Code::InvalidArgument,
            "name",
        ),
        (
            "NUL in name",
            create(&|r| r.name = "a\0b".into()),
            Code::InvalidArgument,
            "name",
        ),
        (
            "no capabilities",
            create(&|r| r.volume_capabilities.clear()),
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            "capability without mode",
            create(&|r| r.volume_capabilities = vec![cap_without_mode()]),
            Code::InvalidArgument,
            "access_mode",
        ),
        (
            "capability without type",
            create(&|r| r.volume_capabilities = vec![cap_without_type()]),
            Code::InvalidArgument,
            "access_type",
        ),
        (
            "unknown mode",
            create(&|r| {
                r.volume_capabilities[0].access_mode =
                    Some(v1::volume_capability::AccessMode { mode: 42 })
            }),
            Code::InvalidArgument,
            "access_mode",
        ),
        (
            "negative capacity",
            create(&|r| {
                r.capacity_range = Some(v1::CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                })
            }),
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "limit below required",
            create(&|r| {
                r.capacity_range = Some(v1::CapacityRange {
                    required_bytes: 10,
                    limit_bytes: 5,
                })
            }),
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "unknown parameter",
            create(&|r| {
                r.parameters.insert("fsTyp".into(), "ext4".into());
            }),
            Code::InvalidArgument,
            "fsTyp",
        ),
        (
            "bad onDelete",
            create(&|r| {
                r.parameters.insert("onDelete".into(), "shred".into());
            }),
            Code::InvalidArgument,
            "onDelete",
        ),
        (
            "unknown instance",
            create(&|r| {
                r.parameters.insert("instance".into(), "nope".into());
            }),
            Code::InvalidArgument,
            "instance",
        ),
        (
            "template escaping",
            create(&|r| {
                r.parameters.insert("subDir".into(), "../x".into());
            }),
            Code::InvalidArgument,
            "subDir",
        ),
        (
            "template missing var",
            create(&|r| {
                r.parameters
                    .insert("subDir".into(), "${pvc.metadata.name}".into());
            }),
            Code::InvalidArgument,
            "csi.storage.k8s.io/pvc/name",
        ),
        (
            "source snapshot missing",
            create(&|r| {
                r.volume_content_source = Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Snapshot(Default::default())),
                })
            }),
            Code::InvalidArgument,
            "snapshot_id",
        ),
        (
            "source snapshot unknown",
            create(&|r| {
                r.volume_content_source = Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Snapshot(
                        v1::volume_content_source::SnapshotSource {
                            snapshot_id: "default/nope".into(),
                        },
                    )),
                })
            }),
            Code::NotFound,
            "snapshot",
        ),
        (
            "source volume unknown",
            create(&|r| {
                r.volume_content_source = Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Volume(
                        v1::volume_content_source::VolumeSource {
                            volume_id: "default/nope".into(),
                        },
                    )),
                })
            }),
            Code::NotFound,
            "volume",
        ),
    ];
    for (name, req, code, needle) in table {
        expect(name, c.create_volume(req).await, code, needle);
    }

    for (name, id, code, needle) in [
        ("empty id", "", Code::InvalidArgument, "volume_id"),
        (
            "dotdot id",
            "default/../../etc",
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "absolute id",
            "default//etc",
            Code::InvalidArgument,
            "volume_id",
        ),
        ("NUL id", "default/a\0b", Code::InvalidArgument, "volume_id"),
        (
            "hidden id",
            "default/.stowage",
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "long id",
            &format!("default/{long}"),
            Code::InvalidArgument,
            "volume_id",
        ),
    ] {
        expect(
            name,
            c.delete_volume(v1::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await,
            code,
            needle,
        );
        expect(
            name,
            c.controller_get_volume(v1::ControllerGetVolumeRequest {
                volume_id: id.into(),
            })
            .await,
            code,
            needle,
        );
    }
    expect(
        "expand without range",
        c.controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: "default/x".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "capacity_range",
    );
    expect(
        "expand unknown",
        c.controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: "default/x".into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 1,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "default/x",
    );
    expect(
        "validate no caps",
        c.validate_volume_capabilities(v1::ValidateVolumeCapabilitiesRequest {
            volume_id: "default/x".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    expect(
        "list negative",
        c.list_volumes(v1::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "max_entries",
    );
    expect(
        "list bad token",
        c.list_volumes(v1::ListVolumesRequest {
            max_entries: 1,
            starting_token: "garbage".into(),
        })
        .await,
        Code::Aborted,
        "starting_token",
    );
    expect(
        "snapshot no name",
        c.create_snapshot(v1::CreateSnapshotRequest {
            source_volume_id: "default/x".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "name",
    );
    expect(
        "snapshot no source",
        c.create_snapshot(v1::CreateSnapshotRequest {
            name: "s".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "source_volume_id",
    );
    expect(
        "snapshot unknown source",
        c.create_snapshot(v1::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: "default/nope".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "default/nope",
    );
    expect(
        "publish no volume",
        c.controller_publish_volume(v1::ControllerPublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect(
        "publish no node",
        c.controller_publish_volume(v1::ControllerPublishVolumeRequest {
            volume_id: "default/x".into(),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "node_id",
    );
    expect(
        "publish no capability",
        c.controller_publish_volume(v1::ControllerPublishVolumeRequest {
            volume_id: "default/x".into(),
            node_id: "n".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capability",
    );
    expect(
        "publish unknown volume",
        c.controller_publish_volume(v1::ControllerPublishVolumeRequest {
            volume_id: "default/x".into(),
            node_id: "n".into(),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "default/x",
    );
    let v = c
        .create_volume(wire::create("pvc-pub", 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    expect(
        "publish to a node that never registered",
        c.controller_publish_volume(v1::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "ghost".into(),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "ghost",
    );
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();

    // Nothing was created and the controller is still serving.
    let listed = c
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    assert!(ctl.child.try_wait().unwrap().is_none(), "controller died");
}

#[tokio::test]
async fn node_refuses_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut node = Plugin::node(dir.path(), &cfg, "n1").unwrap();
    let mut n = node_client(node.ready().await.unwrap());
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let stage = |f: &dyn Fn(&mut v1::NodeStageVolumeRequest)| {
        let mut r = v1::NodeStageVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: d("staging"),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (name, req, code, needle) in [
        (
            "no volume id",
            stage(&|r| r.volume_id.clear()),
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "no staging path",
            stage(&|r| r.staging_target_path.clear()),
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            "relative staging path",
            stage(&|r| r.staging_target_path = "rel/path".into()),
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            "dotdot staging path",
            stage(&|r| r.staging_target_path = "/tmp/../etc".into()),
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            "staging path outside the kubelet root",
            stage(&|r| r.staging_target_path = "/tmp/stowage-bad-input-staging".into()),
            Code::InvalidArgument,
            "outside",
        ),
        (
            "suid smuggled in a mount flag",
            stage(&|r| {
                let mut cap = wire::rwo();
                if let Some(v1::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
                    m.mount_flags = vec!["noatime".into(), "ro,suid".into()];
                }
                r.volume_capability = Some(cap);
            }),
            Code::InvalidArgument,
            "mount_flags",
        ),
        (
            "no capability",
            stage(&|r| r.volume_capability = None),
            Code::InvalidArgument,
            "volume_capability",
        ),
        (
            "dotdot volume",
            stage(&|r| r.volume_id = "default/../x".into()),
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "unknown volume",
            stage(&|r| r.volume_id = "default/missing".into()),
            Code::NotFound,
            "default/missing",
        ),
        (
            "unknown instance",
            stage(&|r| r.volume_id = "other/missing".into()),
            Code::NotFound,
            "other/missing",
        ),
    ] {
        expect(name, n.node_stage_volume(req).await, code, needle);
    }
    expect(
        "publish no target",
        n.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: d("s"),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "target_path",
    );
    expect(
        "publish no capability",
        n.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: d("s"),
            target_path: d("t"),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capability",
    );
    expect(
        "publish not staged",
        n.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: d("not-staged"),
            target_path: d("t"),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "not staged",
    );
    expect(
        "publish target outside the kubelet root",
        n.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: d("not-staged"),
            target_path: "/tmp/stowage-bad-input-t".into(),
            volume_capability: Some(wire::rwo()),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "target_path",
    );
    expect(
        "unpublish no target",
        n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: "default/v".into(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "target_path",
    );
    expect(
        "stats no path",
        n.node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: "default/v".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_path",
    );
    expect(
        "expand missing path",
        n.node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: "default/v".into(),
            volume_path: "/nonexistent/x".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "volume_path",
    );
    assert!(node.child.try_wait().unwrap().is_none(), "node plugin died");
}

/// NodeUnpublish and NodeUnstage only ever remove what the node plugin made: a path outside the
/// kubelet root, a path through a symlink, a directory or file holding data are refused and
/// left exactly as they were, whatever the volume ID says.
#[tokio::test]
async fn node_unpublish_never_deletes_what_it_did_not_make() {
    let outside = tempfile::tempdir().unwrap();
    let precious = outside.path().join("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut node = Plugin::node(dir.path(), &cfg, "n1").unwrap();
    let mut n = node_client(node.ready().await.unwrap());
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();

    let pods = dir.path().join("pods");
    let full_dir = pods.join("full-dir");
    std::fs::create_dir_all(&full_dir).unwrap();
    std::fs::write(full_dir.join("data"), b"data").unwrap();
    let full_file = pods.join("full-file");
    std::fs::write(&full_file, b"data").unwrap();
    let link = pods.join("link");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    let empty = pods.join("empty");
    std::fs::create_dir_all(&empty).unwrap();

    for (name, volume_id, target, code, needle) in [
        (
            "file outside the root",
            "default/v",
            s(&precious),
            Code::InvalidArgument,
            "outside",
        ),
        (
            "not a Stowage volume ID",
            "not-stowage",
            s(&precious),
            Code::InvalidArgument,
            "outside",
        ),
        (
            "directory outside the root",
            "default/v",
            s(outside.path()),
            Code::InvalidArgument,
            "outside",
        ),
        (
            "symlink below the root",
            "default/v",
            s(&link),
            Code::InvalidArgument,
            "symbolic link",
        ),
        (
            "through a symlink",
            "default/v",
            s(&link.join("precious")),
            Code::InvalidArgument,
            "symbolic link",
        ),
        (
            "directory with data",
            "default/v",
            s(&full_dir),
            Code::FailedPrecondition,
            "full-dir",
        ),
        (
            "file with data",
            "default/v",
            s(&full_file),
            Code::FailedPrecondition,
            "full-file",
        ),
    ] {
        expect(
            name,
            n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.clone(),
            })
            .await,
            code,
            needle,
        );
    }
    expect(
        "unstage outside the root",
        n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: "default/v".into(),
            staging_target_path: s(outside.path()),
        })
        .await,
        Code::InvalidArgument,
        "outside",
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    assert_eq!(std::fs::read(full_dir.join("data")).unwrap(), b"data");
    assert_eq!(std::fs::read(&full_file).unwrap(), b"data");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // What the plugin would have made itself (an empty mount point) goes, and a repeat is Ok.
    for _ in 0..2 {
        n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: "default/v".into(),
            target_path: s(&empty),
        })
        .await
        .unwrap();
    }
    assert!(!empty.exists());
    assert!(node.child.try_wait().unwrap().is_none(), "node plugin died");
}

/// A raw block volume larger than any file the base filesystem can hold is OUT_OF_RANGE, with
/// the field named, not INTERNAL "File too large"; nothing is left behind.
#[tokio::test]
async fn huge_block_volume_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap()).controller;
    for (name, bytes) in [("four-eib", 4i64 << 60), ("eight-eib", i64::MAX)] {
        let mut req = wire::create(name, bytes);
        req.volume_capabilities = vec![wire::block_cap(Mode::SingleNodeWriter)];
        expect(
            name,
            c.create_volume(req).await,
            Code::OutOfRange,
            "capacity_range",
        );
    }
    let listed = c
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    assert!(ctl.child.try_wait().unwrap().is_none(), "controller died");
}
