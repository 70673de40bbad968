//! S3 snapshots and restores against a real Ceph RADOS Gateway (the suite starts one), through
//! the real stowage-controller. Every check is made on the gateway through the S3 API: the
//! snapshot's objects really exist there, survive changes to and deletion of the source, come
//! back byte for byte in the restored volume, and are gone after DeleteSnapshot. Needs root only
//! because the shared test harness starts a node plugin too (nothing is mounted here).

#[path = "s3_common.rs"]
mod common;

use common::*;
use stowage_backends::s3::aws_sdk_s3;
use stowage_csi::v1;
use tonic::Code;

const FILES: [&str; 3] = ["a", "dir/b", "dir/ü c"];

fn snap_req(env: &S3Env, name: &str, source: &str) -> v1::CreateSnapshotRequest {
    v1::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        secrets: env.secrets(),
        ..Default::default()
    }
}

fn from_snapshot(req: &mut v1::CreateVolumeRequest, snapshot_id: &str) {
    req.volume_content_source = Some(v1::VolumeContentSource {
        r#type: Some(v1::volume_content_source::Type::Snapshot(
            v1::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &[u8]) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
}

/// Keys under `prefix`, with `prefix` taken off, sorted.
async fn rel_keys(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut k: Vec<String> = keys(s3, bucket, prefix)
        .await
        .into_iter()
        .map(|k| k[prefix.len()..].to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    k.sort();
    k
}

/// The whole cycle on one mode: `vol_prefix` is the key prefix of a volume in its bucket ("" in
/// bucket mode), `snap_bucket` says where the snapshot must be (given the source's bucket and
/// the snapshot ID).
async fn snapshot_restore_cycle(env: &S3Env, extra: &str, tag: &str) -> Vec<String> {
    let p = start(&env.endpoint, extra).await;
    let mut c = p.c.controller.clone();
    let s3 = env.client();
    let src = c
        .create_volume(create_req(env, &format!("{tag}-src"), 1 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let sb = src.volume_context["bucket"].clone();
    let sp = src
        .volume_context
        .get("prefix")
        .map(|p| format!("{p}/"))
        .unwrap_or_default();
    for k in FILES {
        put(&s3, &sb, &format!("{sp}{k}"), k.as_bytes()).await;
    }

    let snap = c
        .create_snapshot(snap_req(env, &format!("{tag}-snap"), &src.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert_eq!(snap.size_bytes, 1 << 20);
    // The ID names where the snapshot is: <instance>/<snap>/<bucket>.
    let parts: Vec<&str> = snap.snapshot_id.split('/').collect();
    assert_eq!(parts.len(), 3, "{}", snap.snapshot_id);
    let (snap_bucket, data) = (
        parts[2].to_owned(),
        format!(".stowage/snapshots/{}/", parts[1]),
    );
    if sp.is_empty() {
        assert_ne!(
            snap_bucket, sb,
            "a bucket-mode snapshot needs its own bucket"
        );
    } else {
        assert_eq!(
            snap_bucket, sb,
            "a prefix-mode snapshot stays in the shared bucket"
        );
    }
    // The objects really are on the gateway, copied server side.
    assert_eq!(rel_keys(&s3, &snap_bucket, &data).await, FILES.to_vec());
    assert_eq!(
        get(&s3, &snap_bucket, &format!("{data}dir/ü c")).await,
        "dir/ü c".as_bytes()
    );
    assert!(
        !keys(&s3, &snap_bucket, ".stowage/snapshots/")
            .await
            .iter()
            .all(|k| k.starts_with(&data)),
        "the record sits next to the data"
    );

    // Idempotent: same name and source is the same snapshot; another source is a conflict.
    let again = c
        .create_snapshot(snap_req(env, &format!("{tag}-snap"), &src.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    let other = c
        .create_volume(create_req(env, &format!("{tag}-other"), 1 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        c.create_snapshot(snap_req(env, &format!("{tag}-snap"), &other.volume_id))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let missing_src = format!("rgw/{}", unique("nosuchbucket"));
    assert_eq!(
        c.create_snapshot(snap_req(env, &format!("{tag}-snap2"), &missing_src))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Listed, by ID and by source.
    let listed = c
        .list_snapshots(v1::ListSnapshotsRequest {
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = listed
        .entries
        .iter()
        .filter_map(|e| e.snapshot.as_ref().map(|s| s.snapshot_id.clone()))
        .collect();
    assert_eq!(ids, vec![snap.snapshot_id.clone()]);
    let by_id = c
        .list_snapshots(v1::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);

    // Change and then delete the source: the snapshot must not follow.
    put(&s3, &sb, &format!("{sp}a"), b"changed after the snapshot").await;
    put(&s3, &sb, &format!("{sp}new"), b"new").await;
    for v in [&src, &other] {
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    }
    assert_eq!(rel_keys(&s3, &snap_bucket, &data).await, FILES.to_vec());

    // Restore: a new volume with the snapshot's objects, byte for byte.
    let mut req = create_req(env, &format!("{tag}-restored"), 1 << 20, &[]);
    from_snapshot(&mut req, &snap.snapshot_id);
    let mut small = req.clone();
    small.name = format!("{tag}-restored-small");
    small.capacity_range = Some(v1::CapacityRange {
        required_bytes: 1024,
        limit_bytes: 0,
    });
    assert_eq!(
        c.create_volume(small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let restored = c
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(matches!(
        restored
            .content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref()),
        Some(v1::volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
    ));
    let rb = restored.volume_context["bucket"].clone();
    let rp = restored
        .volume_context
        .get("prefix")
        .map(|p| format!("{p}/"))
        .unwrap_or_default();
    assert_eq!(rel_keys(&s3, &rb, &rp).await, FILES.to_vec());
    for k in FILES {
        assert_eq!(get(&s3, &rb, &format!("{rp}{k}")).await, k.as_bytes());
    }
    // A repeat is the same volume; the same name without the source is a conflict.
    let again = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert_eq!(
        c.create_volume(create_req(env, &format!("{tag}-restored"), 1 << 20, &[]))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let mut gone = create_req(env, &format!("{tag}-from-nothing"), 1 << 20, &[]);
    from_snapshot(&mut gone, &format!("rgw/nosnap/{snap_bucket}"));
    assert_eq!(
        c.create_volume(gone).await.unwrap_err().code(),
        Code::NotFound
    );

    // Delete the snapshot (twice: the second is a no-op) and the restored volume.
    for _ in 0..2 {
        c.delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    }
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: restored.volume_id.clone(),
        secrets: env.secrets(),
    })
    .await
    .unwrap();
    if sp.is_empty() {
        assert!(!bucket_exists(&s3, &snap_bucket).await);
        assert!(!bucket_exists(&s3, &rb).await);
    } else {
        assert!(
            keys(&s3, &snap_bucket, ".stowage/snapshots/")
                .await
                .is_empty()
        );
    }
    let left = c
        .list_snapshots(v1::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        left.entries
            .iter()
            .all(|e| e.snapshot.as_ref().map(|s| &s.snapshot_id) != Some(&snap.snapshot_id))
    );
    vec![sb, rb]
}

#[tokio::test]
async fn bucket_mode_snapshot_and_restore_are_copies_on_the_gateway() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("snapb"));
    let buckets = snapshot_restore_cycle(&env, &format!("    bucketPrefix: {bp}\n"), "pvc").await;
    let s3 = env.client();
    for b in buckets {
        assert!(!bucket_exists(&s3, &b).await, "{b} left behind");
    }
}

#[tokio::test]
async fn prefix_mode_snapshot_and_restore_are_copies_on_the_gateway() {
    let Some(env) = s3_env() else { return };
    let shared = unique("snapshared");
    let extra = format!("    mode: prefix\n    bucket: {shared}\n");
    snapshot_restore_cycle(&env, &extra, "pvc").await;
    let s3 = env.client();
    // Only the (empty) shared bucket is left, which the test made.
    assert_eq!(keys(&s3, &shared, "").await, Vec::<String>::new());
    s3.delete_bucket().bucket(&shared).send().await.unwrap();
}
