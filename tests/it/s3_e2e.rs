//! S3 backend end to end against a real Ceph RADOS Gateway (the suite starts one): the real
//! binaries over their sockets, real s3fs mounts, and every check made on the gateway through
//! the S3 API. Needs root (FUSE mounts).

#[path = "s3_common.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::stowage_v1;
use stowage_csi::v1;
use stowage_tests::metrics::sample;
use tonic::Code;

/// create → stage → publish → write files → read them through the S3 API → stats → unpublish
/// → unstage → delete → the bucket (bucket mode) or the prefix (prefix mode) is gone.
async fn lifecycle(
    env: &S3Env,
    extra: &str,
    params: &[(&str, &str)],
    name: &str,
) -> (String, Option<String>) {
    let mut p = start(&env.endpoint, extra).await;
    let s3 = env.client();
    let vol =
        p.c.controller
            .create_volume(create_req(env, name, 64 << 20, params))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    // A repeat is the same volume.
    let again =
        p.c.controller
            .create_volume(create_req(env, name, 64 << 20, params))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let bucket = vol.volume_context["bucket"].clone();
    let prefix = vol.volume_context.get("prefix").cloned();
    assert!(bucket_exists(&s3, &bucket).await);

    let staging = p.dir.path().join("staging");
    let target = p.dir.path().join("pods/a/mount");
    let ro_target = p.dir.path().join("pods/b/mount");
    for _ in 0..2 {
        p.n.node_stage_volume(stage_req(env, &vol, &staging))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        p.n.node_publish_volume(publish_req(&vol, &staging, &target, false))
            .await
            .unwrap();
    }
    p.n.node_publish_volume(publish_req(&vol, &staging, &ro_target, true))
        .await
        .unwrap();

    let big: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(target.join("hello.txt"), b"stowage on s3").unwrap();
    std::fs::create_dir_all(target.join("dir/sub")).unwrap();
    std::fs::write(target.join("dir/sub/big.bin"), &big).unwrap();
    let kp = prefix.as_ref().map(|p| format!("{p}/")).unwrap_or_default();
    assert_eq!(
        get(&s3, &bucket, &format!("{kp}hello.txt")).await,
        b"stowage on s3"
    );
    assert_eq!(
        get(&s3, &bucket, &format!("{kp}dir/sub/big.bin")).await,
        big
    );
    // Written through S3, read through the mount (and the read-only publish).
    s3.put_object()
        .bucket(&bucket)
        .key(format!("{kp}from-s3.txt"))
        .body(b"via the API".to_vec().into())
        .send()
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(ro_target.join("from-s3.txt")).unwrap(),
        b"via the API"
    );
    assert_eq!(
        std::fs::read(ro_target.join("hello.txt")).unwrap(),
        b"stowage on s3"
    );
    let err = std::fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    let st =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    let bytes = &st.usage[0];
    assert_eq!(bytes.total, 64 << 20);
    assert!(bytes.used >= big.len() as i64 + 13, "{st:?}");
    assert!(!st.volume_condition.unwrap().abnormal);

    for t in [&target, &ro_target] {
        for _ in 0..2 {
            p.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: t.to_string_lossy().into(),
            })
            .await
            .unwrap();
        }
        assert!(!t.exists());
    }
    for _ in 0..2 {
        p.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    assert!(!is_mounted(&staging));
    assert!(
        mounter_pids(p.dir.path()).is_empty(),
        "mounter left running"
    );
    assert_eq!(
        std::fs::read_dir(&p.state).unwrap().count(),
        0,
        "mount record (with credentials) left behind"
    );
    for _ in 0..2 {
        p.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                secrets: env.secrets(),
            })
            .await
            .unwrap();
    }
    (bucket, prefix)
}

#[tokio::test]
async fn bucket_mode_lifecycle_with_bytes_on_the_gateway() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("e2e"));
    let (bucket, prefix) = lifecycle(
        &env,
        &format!("    bucketPrefix: {bp}\n"),
        &[],
        "pvc-bucket-life",
    )
    .await;
    assert_eq!(bucket, format!("{bp}pvc-bucket-life"));
    assert!(prefix.is_none());
    assert!(
        !bucket_exists(&env.client(), &bucket).await,
        "bucket still there after DeleteVolume"
    );
}

#[tokio::test]
async fn prefix_mode_lifecycle_with_bytes_on_the_gateway() {
    let Some(env) = s3_env() else { return };
    let shared = unique("shared");
    let extra = format!("    mode: prefix\n    bucket: {shared}\n");
    let (bucket, prefix) = lifecycle(&env, &extra, &[], "pvc-prefix-life").await;
    assert_eq!(bucket, shared);
    assert_eq!(prefix.as_deref(), Some("pvc-prefix-life"));
    let s3 = env.client();
    assert!(
        bucket_exists(&s3, &shared).await,
        "the shared bucket must stay"
    );
    assert_eq!(
        keys(&s3, &shared, "pvc-prefix-life").await,
        Vec::<String>::new()
    );
    assert_eq!(keys(&s3, &shared, ".stowage/").await, Vec::<String>::new());
    // Cleanup of the shared bucket itself.
    s3.delete_bucket().bucket(&shared).send().await.unwrap();
}

#[tokio::test]
async fn templates_retain_archive_and_recycle() {
    let Some(env) = s3_env() else { return };
    let shared = unique("tpl");
    let mut p = start(
        &env.endpoint,
        &format!("    mode: prefix\n    bucket: {shared}\n"),
    )
    .await;
    let s3 = env.client();
    let params = [
        (
            "nameTemplate",
            "${pvc.metadata.namespace}-${pvc.metadata.name}",
        ),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "db"),
        ("onDelete", "archive"),
    ];
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-tpl", 1 << 20, &params))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert!(
        vol.volume_id.ends_with(&format!("/{shared}/db-data")),
        "{}",
        vol.volume_id
    );
    for k in ["a", "b/c"] {
        s3.put_object()
            .bucket(&shared)
            .key(format!("db-data/{k}"))
            .body(k.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    // Recycle: every object goes, the volume stays.
    p.c.stowage
        .recycle_volume(stowage_v1::RecycleVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
            volume_context: vol.volume_context.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        keys(&s3, &shared, "db-data/").await,
        vec!["db-data/".to_string()]
    );
    p.c.controller
        .controller_get_volume(v1::ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .unwrap();
    // Archive: the objects move under archived-<prefix>-<time>/.
    s3.put_object()
        .bucket(&shared)
        .key("db-data/keep.txt")
        .body(b"kept".to_vec().into())
        .send()
        .await
        .unwrap();
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    assert!(keys(&s3, &shared, "db-data/").await.is_empty());
    let archived = keys(&s3, &shared, "archived-db-data-").await;
    let kept = archived
        .iter()
        .find(|k| k.ends_with("/keep.txt"))
        .expect("archived copy");
    assert_eq!(get(&s3, &shared, kept).await, b"kept");

    // Retain (through ControllerModifyVolume): the data stays, the volume is gone, and the
    // same claim comes back to its data.
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-tpl", 1 << 20, &params))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    p.c.controller
        .controller_modify_volume(v1::ControllerModifyVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
            mutable_parameters: [("onDelete".to_string(), "retain".to_string())].into(),
        })
        .await
        .unwrap();
    s3.put_object()
        .bucket(&shared)
        .key("db-data/precious")
        .body(b"yes".to_vec().into())
        .send()
        .await
        .unwrap();
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    let st =
        p.c.controller
            .controller_get_volume(v1::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert_eq!(get(&s3, &shared, "db-data/precious").await, b"yes");
    // Cleanup.
    let all = keys(&s3, &shared, "").await;
    for k in all {
        s3.delete_object()
            .bucket(&shared)
            .key(k)
            .send()
            .await
            .unwrap();
    }
    s3.delete_bucket().bucket(&shared).send().await.unwrap();
    drop(p);
}

#[tokio::test]
async fn versioned_bucket_is_emptied_of_every_version() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("ver"));
    let p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let mut c = p.c.controller.clone();
    let s3 = env.client();
    let vol = c
        .create_volume(create_req(&env, "pvc-ver", 1 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let bucket = vol.volume_context["bucket"].clone();
    s3.put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            stowage_backends::s3::aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(stowage_backends::s3::aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    for i in 0..3 {
        s3.put_object()
            .bucket(&bucket)
            .key("f")
            .body(format!("v{i}").into_bytes().into())
            .send()
            .await
            .unwrap();
    }
    s3.delete_object()
        .bucket(&bucket)
        .key("f")
        .send()
        .await
        .unwrap();
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: env.secrets(),
    })
    .await
    .unwrap();
    assert!(!bucket_exists(&s3, &bucket).await);
}

#[tokio::test]
async fn volume_grown_past_its_size_is_abnormal_and_expansion_is_recorded() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("full"));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-small", 4096, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let staging = p.dir.path().join("staging");
    let target = p.dir.path().join("pod/mount");
    p.n.node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    p.n.node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("too-big"), vec![7u8; 10_000]).unwrap();
    let st =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("more than its size of 4096"),
        "{}",
        cond.message
    );
    assert_eq!(st.usage[0].used, 10_000);
    // Expansion records the new size; the node reads it from the gateway, not the context.
    let e =
        p.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                secrets: env.secrets(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(e.capacity_bytes, 1 << 20);
    assert!(!e.node_expansion_required);
    tokio::time::sleep(Duration::from_secs(11)).await; // the node's usage cache
    let st =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(st.usage[0].total, 1 << 20);
    cleanup(&env, &mut p, &vol, &staging, &[&target]).await;
}

/// Unpublish, unstage, delete.
async fn cleanup(env: &S3Env, p: &mut Pair, vol: &v1::Volume, staging: &Path, targets: &[&Path]) {
    for t in targets {
        p.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: t.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    p.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
}

fn read_until_ok(p: &Path, want: &[u8], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read(p) {
            Ok(b) if b == want => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    return Err(format!("{}: {other:?}", p.display()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const HEALED: &str = r#"stowage_fuse_mounts_healed_total{backend="s3"}"#;
const RUNNING: &str = r#"stowage_fuse_mounts_running{backend="s3"}"#;
const MOUNTER_STARTS: &str = r#"stowage_backend_operation_duration_seconds_count{backend="s3",operation="mounter_start",result="success"}"#;

fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // Until the kernel has torn the connection down.
    std::thread::sleep(Duration::from_millis(300));
}

#[tokio::test]
async fn killed_mounter_is_healed_by_stats_publish_and_plugin_restart() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("heal"));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-heal", 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let staging = p.dir.path().join("staging");
    let target = p.dir.path().join("pod/mount");
    let target2 = p.dir.path().join("pod2/mount");
    p.n.node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    p.n.node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("data"), b"survives").unwrap();

    // 1. Mounter killed: the pod sees ENOTCONN until NodeGetVolumeStats heals it.
    let pids = mounter_pids(p.dir.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    kill9(pids[0]);
    let err = std::fs::read(target.join("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let st =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"survives");
    let new_pids = mounter_pids(p.dir.path());
    assert_eq!(new_pids.len(), 1);
    assert_ne!(new_pids, pids);
    let m = p.node_metrics(1).await;
    assert_eq!(sample(&m, HEALED), 1.0, "{m}");
    assert_eq!(sample(&m, RUNNING), 1.0, "{m}");
    // The first start and the heal.
    assert_eq!(sample(&m, MOUNTER_STARTS), 2.0, "{m}");

    // 2. Killed again: the next NodePublishVolume (another pod) heals it and the first pod's
    //    bind is replaced too.
    kill9(new_pids[0]);
    p.n.node_publish_volume(publish_req(&vol, &staging, &target2, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(target2.join("data")).unwrap(), b"survives");
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"survives");
    let m = p.node_metrics(1).await;
    assert_eq!(sample(&m, HEALED), 2.0, "{m}");

    // 3. The plugin restarts: the mounter is not its child and keeps serving.
    let before = mounter_pids(p.dir.path());
    p.restart_node().await;
    assert_eq!(
        mounter_pids(p.dir.path()),
        before,
        "plugin restart touched the mounter"
    );
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"survives");

    // 4. Plugin down, mounter killed, plugin up: it heals on its own at start.
    p.node.kill();
    kill9(before[0]);
    assert!(std::fs::read(target.join("data")).is_err());
    // Once its cached attributes expire, even a stat of the dead staging path fails
    // (ENOTCONN), as it does when a node pod restarts: the start-up pass must heal such a
    // mount, not take it for a path that is gone (it once forgot the record then).
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&staging).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::fs::metadata(&staging).is_err(),
        "the dead staging path still answers stat"
    );
    p.restart_node().await;
    read_until_ok(&target.join("data"), b"survives", Duration::from_secs(30)).unwrap();
    read_until_ok(&target2.join("data"), b"survives", Duration::from_secs(5)).unwrap();
    // The third plugin process healed the mount at its start, and counts it.
    // The gauge is set once the start-up healing pass is through: wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = p.node_metrics(3).await;
        if sample(&m, RUNNING) == 1.0 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&m, RUNNING), 1.0, "{m}");
    assert_eq!(sample(&m, HEALED), 1.0, "{m}");
    std::fs::write(target2.join("after"), b"healed").unwrap();
    assert_eq!(
        get(&env.client(), &vol.volume_context["bucket"], "after").await,
        b"healed"
    );

    cleanup(&env, &mut p, &vol, &staging, &[&target, &target2]).await;
}

#[tokio::test]
async fn list_and_get_use_remembered_credentials() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("list"));
    let p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let mut c = p.c.controller.clone();
    // Nothing received yet: a lookup says why it cannot answer.
    let st = c
        .controller_get_volume(v1::ControllerGetVolumeRequest {
            volume_id: format!("rgw/{bp}nothing"),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("no credentials"), "{st:?}");
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = c
            .create_volume(create_req(&env, &format!("pvc-l{i}"), 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.push(v.volume_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(v1::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    for id in &ids {
        assert!(seen.contains(id), "{id} not listed in {seen:?}");
        let v = c
            .controller_get_volume(v1::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.volume.unwrap().capacity_bytes, 1 << 20);
    }
    for id in ids {
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
        let st = c
            .controller_get_volume(v1::ControllerGetVolumeRequest { volume_id: id })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn rclone_mounter_end_to_end_and_healed() {
    let Some(env) = s3_env() else { return };
    let shared = unique("rcl");
    let mut p = start(
        &env.endpoint,
        &format!("    mode: prefix\n    bucket: {shared}\n"),
    )
    .await;
    let s3 = env.client();
    let vol =
        p.c.controller
            .create_volume(create_req(
                &env,
                "pvc-rclone",
                1 << 20,
                &[("mounter", "rclone")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(vol.volume_context["mounter"], "rclone");
    let staging = p.dir.path().join("staging");
    let target = p.dir.path().join("pod/mount");
    p.n.node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    p.n.node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    let pids = mounter_pids(p.dir.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(
        std::fs::read_to_string(format!("/proc/{}/cmdline", pids[0]))
            .unwrap()
            .starts_with("rclone"),
        "not an rclone mount"
    );
    std::fs::create_dir_all(target.join("d")).unwrap();
    std::fs::write(target.join("d/f.txt"), b"through rclone").unwrap();
    // Uploaded when the file is closed (--vfs-write-back=0s): give the uploader a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys(&s3, &shared, "pvc-rclone/d/f.txt").await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(&s3, &shared, "pvc-rclone/d/f.txt").await,
        b"through rclone"
    );
    kill9(pids[0]);
    let st =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(
        std::fs::read(target.join("d/f.txt")).unwrap(),
        b"through rclone"
    );
    cleanup(&env, &mut p, &vol, &staging, &[&target]).await;
    assert!(keys(&s3, &shared, "pvc-rclone").await.is_empty());
    s3.delete_bucket().bucket(&shared).send().await.unwrap();
}

#[tokio::test]
async fn clone_copies_every_object_server_side() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("clone"));
    let p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let mut c = p.c.controller.clone();
    let s3 = env.client();
    let src = c
        .create_volume(create_req(&env, "pvc-src", 1 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let sb = src.volume_context["bucket"].clone();
    for k in ["a", "dir/b", "dir/ü c"] {
        s3.put_object()
            .bucket(&sb)
            .key(k)
            .body(k.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    let mut req = create_req(&env, "pvc-clone", 1 << 20, &[]);
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            },
        )),
    });
    let mut small = req.clone();
    small.name = "pvc-clone-small".into();
    small.capacity_range = Some(v1::CapacityRange {
        required_bytes: 1024,
        limit_bytes: 0,
    });
    assert_eq!(
        c.create_volume(small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let clone = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(clone.content_source.is_some());
    let cb = clone.volume_context["bucket"].clone();
    assert_ne!(cb, sb);
    let mut got = keys(&s3, &cb, "").await;
    got.sort();
    assert_eq!(got, vec!["a", "dir/b", "dir/ü c"]);
    assert_eq!(get(&s3, &cb, "dir/ü c").await, "dir/ü c".as_bytes());
    for v in [clone, src] {
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    }
    assert!(!bucket_exists(&s3, &cb).await && !bucket_exists(&s3, &sb).await);
}

/// Runs NodeStageVolume and SIGKILLs the node plugin the moment a mount appears at `staging`:
/// the mounter is up (in its own process group, so it survives), the plugin never answered.
/// The window is at least the 20 ms `mounter::start` waits after the first live stat, plus
/// the record's write; the watcher polls every millisecond.
async fn stage_killed_once_mounted(p: &mut Pair, req: v1::NodeStageVolumeRequest, staging: &Path) {
    let pid = p.node.child.id() as i32;
    let s = staging.to_path_buf();
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(&s) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        true
    });
    let r = p.n.node_stage_volume(req).await;
    assert!(
        watcher.join().unwrap(),
        "no mount appeared at {}",
        staging.display()
    );
    assert!(r.is_err(), "NodeStage answered before the kill: {r:?}");
    p.node.kill();
    assert!(is_mounted(staging), "the mount did not outlive the plugin");
    assert_eq!(
        mounter_pids(staging).len(),
        1,
        "one mounter at {}",
        staging.display()
    );
}

/// A NodeStageVolume killed between its mounter's start and its answer (found by chaos_s3,
/// seed 1796668349766657163 at 50 cycles): the orphaned mount once made every retry answer
/// FAILED_PRECONDITION for ever. Now the retry succeeds, NodeUnstage cleans such a mount up, a
/// crash of an older plugin (mount and mounter, no record) is recognised by the mounter's
/// command line, and a mount that is not the volume's is still refused.
#[tokio::test]
async fn stage_killed_while_the_mounter_starts_is_retried_or_unstaged() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("orph"));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let s3 = env.client();
    let mut vols = Vec::new();
    for (name, mounter) in [("pvc-a", "rclone"), ("pvc-b", "rclone"), ("pvc-c", "s3fs")] {
        vols.push(
            p.c.controller
                .create_volume(create_req(&env, name, 1 << 20, &[("mounter", mounter)]))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap(),
        );
    }
    let (a, b, c) = (&vols[0], &vols[1], &vols[2]);
    let st_a = p.dir.path().join("st-a");
    let st_b = p.dir.path().join("st-b");
    let st_c = p.dir.path().join("st-c");
    let st_x = p.dir.path().join("st-x");
    let target = p.dir.path().join("pod/mount");

    // 1. rclone, bucket mode (the chaos case): killed once mounted, plugin restarted.
    stage_killed_once_mounted(&mut p, stage_req(&env, a, &st_a), &st_a).await;
    p.restart_node().await;
    // Another volume at that staging path: refused, the mount left alone.
    let st =
        p.n.node_stage_volume(stage_req(&env, b, &st_a))
            .await
            .unwrap_err();
    assert!(
        matches!(st.code(), Code::AlreadyExists | Code::FailedPrecondition),
        "{st:?}"
    );
    assert!(is_mounted(&st_a));
    // The CO's retry succeeds, and the volume works.
    p.n.node_stage_volume(stage_req(&env, a, &st_a))
        .await
        .unwrap();
    // Idempotent: a duplicate answers OK and starts nothing.
    let pids = mounter_pids(&st_a);
    p.n.node_stage_volume(stage_req(&env, a, &st_a))
        .await
        .unwrap();
    assert_eq!(mounter_pids(&st_a), pids);
    assert_eq!(pids.len(), 1, "{pids:?}");
    p.n.node_publish_volume(publish_req(a, &st_a, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"after the crash").unwrap();
    let bucket_a = &a.volume_context["bucket"];
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys(&s3, bucket_a, "f").await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&s3, bucket_a, "f").await, b"after the crash");

    // 2. Killed the same way, plugin restarted, then NodeUnstage without a retry (the CO gave
    //    up on the pod): no mount, no mounter, no record left.
    stage_killed_once_mounted(&mut p, stage_req(&env, b, &st_b), &st_b).await;
    p.restart_node().await;
    p.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: b.volume_id.clone(),
        staging_target_path: st_b.to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(!is_mounted(&st_b));
    assert!(mounter_pids(&st_b).is_empty(), "{:?}", mounter_pids(&st_b));

    // 3. s3fs, and the state an older plugin left (mount and mounter, credential files, no
    //    record): the mounter's command line names this volume, its files and this path, so
    //    the retry replaces it.
    stage_killed_once_mounted(&mut p, stage_req(&env, c, &st_c), &st_c).await;
    for d in std::fs::read_dir(&p.state).unwrap().flatten() {
        let rec = d.path().join("record.json");
        if std::fs::read_to_string(&rec).is_ok_and(|r| r.contains(&c.volume_id)) {
            std::fs::remove_file(&rec).unwrap();
        }
    }
    let old = mounter_pids(&st_c);
    p.restart_node().await;
    p.n.node_stage_volume(stage_req(&env, c, &st_c))
        .await
        .unwrap();
    let new = mounter_pids(&st_c);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new, old, "the old mounter was adopted without a record");
    std::fs::write(st_c.join("g"), b"s3fs again").unwrap();
    assert_eq!(
        get(&s3, &c.volume_context["bucket"], "g").await,
        b"s3fs again"
    );

    // 4. A mount that is not the volume's (no record, no mounter of it): still refused.
    std::fs::create_dir_all(&st_x).unwrap();
    let tmpfs = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&st_x)
        .status()
        .unwrap();
    assert!(tmpfs.success());
    let st =
        p.n.node_stage_volume(stage_req(&env, c, &st_x))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("not this volume's"), "{st:?}");
    assert!(is_mounted(&st_x), "the foreign mount was touched");
    assert!(
        std::process::Command::new("umount")
            .arg(&st_x)
            .status()
            .unwrap()
            .success()
    );

    // Credential files and records stay private.
    for d in std::fs::read_dir(&p.state).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            if f.file_type().unwrap().is_file() && f.file_name() != "mounter.log" {
                use std::os::unix::fs::PermissionsExt;
                let mode = f.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", f.path().display());
            }
        }
    }

    p.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: a.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    for (v, s) in [(a, &st_a), (c, &st_c)] {
        p.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: s.to_string_lossy().into(),
        })
        .await
        .unwrap();
        assert!(!is_mounted(s));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounter_pids(p.dir.path()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(mounter_pids(p.dir.path()).is_empty(), "a mounter was left");
    for v in &vols {
        p.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: env.secrets(),
            })
            .await
            .unwrap();
    }
}
