//! Generated hostile CSI requests against the real controller and node binaries (local backend,
//! real gRPC sockets): traversal and absolute volume IDs, NUL and control bytes, 10 000-byte
//! names and parameters, negative, zero and huge sizes, contradictory or missing capabilities,
//! smuggled mount options, stray secrets, unknown parameters, target and staging paths outside
//! the kubelet root or through symlinks.
//!
//! Each answer must be a status the CSI spec names for the call (never INTERNAL, UNKNOWN or a
//! dropped connection), an INVALID_ARGUMENT must name a field, both plugins must still serve,
//! nothing outside the volume roots may change, and every volume a case managed to create is
//! gone once deleted. Prints the count per status.
//!
//! `STOWAGE_HOSTILE_CASES` (default 10 000, about 40 s) and
//! `STOWAGE_HOSTILE_SEED` (printed on every run) replay a run exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, local_config, node_client};
use tonic::Code;

/// One generated call.
#[derive(Debug, Clone)]
enum Call {
    Create(v1::CreateVolumeRequest),
    Delete(v1::DeleteVolumeRequest),
    Expand(v1::ControllerExpandVolumeRequest),
    Validate(v1::ValidateVolumeCapabilitiesRequest),
    Snapshot(v1::CreateSnapshotRequest),
    Stage(v1::NodeStageVolumeRequest),
    Unstage(v1::NodeUnstageVolumeRequest),
    Publish(v1::NodePublishVolumeRequest),
    Unpublish(v1::NodeUnpublishVolumeRequest),
    Stats(v1::NodeGetVolumeStatsRequest),
    NodeExpand(v1::NodeExpandVolumeRequest),
}

/// Strings a hostile or sloppy client sends where an ID or name goes.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        // Plausible IDs and names, so cases reach past the first field check.
        8 => "default/v[0-3]",
        4 => "v[0-3]",
        1 => Just(String::new()),
        1 => Just("default/ok".to_string()),
        1 => Just("default/../../etc".to_string()),
        1 => Just("../../etc/passwd".to_string()),
        1 => Just("/etc/passwd".to_string()),
        1 => Just("default//x".to_string()),
        1 => Just("default/.hidden".to_string()),
        1 => Just("default/x\0y".to_string()),
        1 => Just("default/\u{1b}[2J".to_string()),
        1 => Just("nosuchinstance/x".to_string()),
        1 => Just("a".repeat(10_000)),
        1 => Just(format!("default/{}", "b".repeat(300))),
        1 => "[a-z0-9./-]{0,40}",
        1 => "\\PC{0,24}",
        1 => any::<String>().prop_map(|s| s.chars().take(64).collect()),
    ]
}

/// Paths for staging/target/volume_path fields, relative to the kubelet root `root`.
fn hostile_path(root: PathBuf) -> impl Strategy<Value = String> {
    let r = root.to_string_lossy().into_owned();
    let r2 = r.clone();
    prop_oneof![
        8 => "[a-c]".prop_map(move |s| format!("{r2}/staging/{s}")),
        1 => Just(String::new()),
        1 => Just("relative/path".to_string()),
        1 => Just("/etc".to_string()),
        1 => Just("/etc/passwd".to_string()),
        1 => Just("/".to_string()),
        1 => Just(format!("{r}/../outside")),
        1 => Just(format!("{r}/link/inside-link")),
        1 => Just(format!("{r}/link")),
        1 => Just(format!("{r}/sentinel-dir")),
        1 => Just(format!("{r}/x\0y")),
        1 => Just(r.clone()),
        8 => "[a-c]".prop_map(move |s| format!("{r}/pods/{s}/mount")),
        1 => Just(format!("/tmp/{}", "c".repeat(5000))),
    ]
}

fn hostile_size() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => (1i64..64).prop_map(|m| m << 20),
        1 => Just(0i64),
        1 => Just(-1),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(4i64 << 60),
        1 => Just(1 << 20),
        1 => Just(16 << 20),
        1 => any::<i64>(),
    ]
}

fn hostile_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        6 => Just(BTreeMap::new()),
        1 => proptest::collection::btree_map("[a-zA-Z./-]{0,20}", "\\PC{0,20}", 0..4),
        1 => Just(BTreeMap::from([("k".repeat(10_000), "v".repeat(10_000))])),
        1 => Just(BTreeMap::from([("onDelete".into(), "explode".into())])),
        1 => Just(BTreeMap::from([("mode".into(), "0\x00777".into())])),
        1 => Just(BTreeMap::from([("uid".into(), "-1".into())])),
    ]
}

fn hostile_cap() -> impl Strategy<Value = Option<v1::VolumeCapability>> {
    let mode = prop_oneof![1 => Just(None), 1 => (-2i32..10).prop_map(Some), 6 => (1i32..8).prop_map(Some)];
    let flags = proptest::collection::vec(
        prop_oneof![
            Just("noatime".to_string()),
            Just("ro,suid".to_string()),
            Just("dev".to_string()),
            Just("helper=/bin/sh".to_string()),
            Just("a b".to_string()),
            "\\PC{0,12}",
        ],
        0..3,
    );
    let access = prop_oneof![
        Just(None),
        Just(Some(v1::volume_capability::AccessType::Block(
            Default::default()
        ))),
        (flags, "[a-z0-9]{0,6}").prop_map(|(mount_flags, fs_type)| Some(
            v1::volume_capability::AccessType::Mount(v1::volume_capability::MountVolume {
                fs_type,
                mount_flags,
                volume_mount_group: String::new(),
            })
        )),
    ];
    prop_oneof![
        1 => Just(None),
        6 => (access, mode).prop_map(|(access_type, mode)| Some(v1::VolumeCapability {
            access_type,
            access_mode: mode.map(|mode| v1::volume_capability::AccessMode { mode }),
        })),
    ]
}

fn range() -> impl Strategy<Value = Option<v1::CapacityRange>> {
    prop_oneof![
        Just(None),
        (hostile_size(), hostile_size()).prop_map(|(required_bytes, limit_bytes)| Some(
            v1::CapacityRange {
                required_bytes,
                limit_bytes
            }
        )),
    ]
}

fn call(root: PathBuf) -> impl Strategy<Value = Call> {
    let p = || hostile_path(root.clone());
    let s = hostile_string;
    prop_oneof![
        (
            s(),
            range(),
            proptest::collection::vec(hostile_cap(), 0..3),
            hostile_map(),
            hostile_map()
        )
            .prop_map(
                |(name, capacity_range, caps, parameters, secrets)| Call::Create(
                    v1::CreateVolumeRequest {
                        name,
                        capacity_range,
                        volume_capabilities: caps.into_iter().flatten().collect(),
                        parameters: parameters.into_iter().collect(),
                        secrets: secrets.into_iter().collect(),
                        ..Default::default()
                    }
                )
            ),
        (s(), hostile_map()).prop_map(|(volume_id, secrets)| Call::Delete(
            v1::DeleteVolumeRequest {
                volume_id,
                secrets: secrets.into_iter().collect(),
            }
        )),
        (s(), range(), hostile_cap()).prop_map(|(volume_id, capacity_range, volume_capability)| {
            Call::Expand(v1::ControllerExpandVolumeRequest {
                volume_id,
                capacity_range,
                volume_capability,
                ..Default::default()
            })
        }),
        (s(), hostile_cap(), hostile_map()).prop_map(|(volume_id, cap, ctx)| Call::Validate(
            v1::ValidateVolumeCapabilitiesRequest {
                volume_id,
                volume_capabilities: cap.into_iter().collect(),
                volume_context: ctx.into_iter().collect(),
                ..Default::default()
            }
        )),
        (s(), s(), hostile_map()).prop_map(|(source_volume_id, name, parameters)| Call::Snapshot(
            v1::CreateSnapshotRequest {
                source_volume_id,
                name,
                parameters: parameters.into_iter().collect(),
                ..Default::default()
            }
        )),
        (s(), p(), hostile_cap(), hostile_map(), hostile_map()).prop_map(
            |(volume_id, staging_target_path, volume_capability, ctx, publish)| Call::Stage(
                v1::NodeStageVolumeRequest {
                    volume_id,
                    staging_target_path,
                    volume_capability,
                    volume_context: ctx.into_iter().collect(),
                    publish_context: publish.into_iter().collect(),
                    ..Default::default()
                }
            )
        ),
        (s(), p()).prop_map(|(volume_id, staging_target_path)| Call::Unstage(
            v1::NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path,
            }
        )),
        (s(), p(), p(), hostile_cap(), any::<bool>(), hostile_map()).prop_map(
            |(volume_id, staging_target_path, target_path, volume_capability, readonly, ctx)| {
                Call::Publish(v1::NodePublishVolumeRequest {
                    volume_id,
                    staging_target_path,
                    target_path,
                    volume_capability,
                    readonly,
                    volume_context: ctx.into_iter().collect(),
                    ..Default::default()
                })
            }
        ),
        (s(), p()).prop_map(|(volume_id, target_path)| Call::Unpublish(
            v1::NodeUnpublishVolumeRequest {
                volume_id,
                target_path,
            }
        )),
        (s(), p()).prop_map(|(volume_id, volume_path)| Call::Stats(
            v1::NodeGetVolumeStatsRequest {
                volume_id,
                volume_path,
                staging_target_path: String::new(),
            }
        )),
        (s(), p(), range()).prop_map(|(volume_id, volume_path, capacity_range)| Call::NodeExpand(
            v1::NodeExpandVolumeRequest {
                volume_id,
                volume_path,
                capacity_range,
                ..Default::default()
            }
        )),
    ]
}

/// Codes a call may answer with (the spec's error tables plus the generic ones); INTERNAL and
/// UNKNOWN mean a case reached code that did not expect it.
fn allowed(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

/// Every file below `dir` with its contents (directories as None), to prove nothing changed.
fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), Some(std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_requests_get_spec_statuses_and_touch_nothing_outside() {
    let cases: usize = std::env::var("STOWAGE_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("STOWAGE_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("hostile requests: {cases} cases, STOWAGE_HOSTILE_SEED={seed}");

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let root = dir.path().join("kubelet");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("pods")).unwrap();
    std::fs::create_dir_all(root.join("sentinel-dir")).unwrap();
    std::fs::write(root.join("sentinel-dir/keep"), b"keep").unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"precious").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let before_outside = snapshot_tree(&outside);
    let passwd = std::fs::read("/etc/passwd").unwrap();

    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let nd = dir.path().join("node");
    std::fs::create_dir_all(&nd).unwrap();
    let mut node = Plugin::node_with_root(&nd, &root, &cfg, "hostile-node").unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap()).controller;
    let mut n = node_client(node.ready().await.unwrap());

    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = call(root.clone());
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for i in 0..cases {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let answer: Result<(), tonic::Status> = match case.clone() {
            Call::Create(r) => c.create_volume(r).await.map(drop),
            Call::Delete(r) => c.delete_volume(r).await.map(drop),
            Call::Expand(r) => c.controller_expand_volume(r).await.map(drop),
            Call::Validate(r) => c.validate_volume_capabilities(r).await.map(drop),
            Call::Snapshot(r) => c.create_snapshot(r).await.map(drop),
            Call::Stage(r) => n.node_stage_volume(r).await.map(drop),
            Call::Unstage(r) => n.node_unstage_volume(r).await.map(drop),
            Call::Publish(r) => n.node_publish_volume(r).await.map(drop),
            Call::Unpublish(r) => n.node_unpublish_volume(r).await.map(drop),
            Call::Stats(r) => n.node_get_volume_stats(r).await.map(drop),
            Call::NodeExpand(r) => n.node_expand_volume(r).await.map(drop),
        };
        let key = match &answer {
            Ok(()) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *counts.entry(key).or_default() += 1;
        if let Err(s) = &answer {
            let names_field = s.message().contains('_')
                || s.message().contains("name")
                || s.message().contains("parameter")
                || s.message().contains("secret");
            if !allowed(s.code()) || (s.code() == Code::InvalidArgument && !names_field) {
                let mut shown = format!("{case:?}");
                shown.truncate(400);
                bad.push(format!(
                    "case {i}: {:?} {:?} for {shown}",
                    s.code(),
                    s.message()
                ));
            }
        }
        assert!(
            ctl.child.try_wait().unwrap().is_none(),
            "controller died at case {i}: {case:?}"
        );
        assert!(
            node.child.try_wait().unwrap().is_none(),
            "node died at case {i}: {case:?}"
        );
    }
    let total: usize = counts.values().sum();
    println!("hostile requests: {total} answered; by status: {counts:?}");

    // Clean up whatever the cases made the way a CO would: unpublish and unstage every volume
    // at every path the generator can name (the wrong pairs are refused or no-ops), so loop
    // devices are detached by the plugin itself. Then nothing may be mounted or attached.
    let listed = c
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = listed
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
        .collect();
    // Staging and target fields draw from the same paths, so a volume may be staged at a pod
    // path or published at a staging path: try both kinds at each.
    let paths: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|s| {
            [
                root.join(format!("pods/{s}/mount")),
                root.join(format!("staging/{s}")),
            ]
        })
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    // Several passes: a volume staged at a path another volume was later mounted over is only
    // reachable once that one is gone (kubelet never stacks two volumes on one path; the
    // generator does). Each pass peels one layer.
    for _pass in 0..3 {
        for id in &ids {
            for p in &paths {
                let _ = n
                    .node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: p.clone(),
                    })
                    .await;
            }
        }
        for id in &ids {
            for p in &paths {
                let _ = n
                    .node_unstage_volume(v1::NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: p.clone(),
                    })
                    .await;
            }
        }
    }
    let prefix = dir.path().to_string_lossy().into_owned();
    let mounted: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|mp| mp.starts_with(&prefix))
        .collect();
    let loops: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|f| f.starts_with(&prefix))
        .collect();
    // Leave the machine clean even when the checks below fail.
    for mp in &mounted {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(mp)
            .status();
    }
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if std::fs::read_to_string(e.path().join("loop/backing_file"))
            .is_ok_and(|f| f.starts_with(&prefix))
        {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{}", e.file_name().to_string_lossy()))
                .status();
        }
    }
    assert!(
        mounted.is_empty(),
        "left mounted after unpublish/unstage: {mounted:?}"
    );
    assert!(loops.is_empty(), "loop devices left attached: {loops:?}");
    let listed = c
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    for e in listed.entries {
        let id = e.volume.unwrap().volume_id;
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("deleting {id}: {s:?}"));
    }
    let left = c
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(left.is_empty(), "volumes leaked: {left:?}");

    assert_eq!(
        snapshot_tree(&outside),
        before_outside,
        "files outside the roots changed"
    );
    assert_eq!(
        std::fs::read(root.join("sentinel-dir/keep")).unwrap(),
        b"keep"
    );
    assert!(
        std::fs::symlink_metadata(root.join("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(
        bad.is_empty(),
        "{} of {total} answers were not what the spec names (seed {seed}):\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}
