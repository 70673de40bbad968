//! The real gateway goes away: radosgw is killed (SIGKILL) while a volume is mounted, calls
//! fail with a clear UNAVAILABLE, and once tests/infra/ceph.sh has started it again the same
//! calls succeed and the mount carries on; and radosgw killed in the middle of deleting a
//! bucket full of objects. Its own test binary: it takes the gateway away from everything
//! else, so nothing may run beside it (and its two tests take turns).

#[path = "s3_common.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use stowage_backends::s3::aws_sdk_s3;
use stowage_csi::v1;
use tonic::Code;

/// The two tests kill the one gateway: one at a time.
static GATEWAY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// ceph.sh's state dir and path, to kill and restart radosgw; None (skipped) without them.
fn gateway_control() -> Option<(String, String)> {
    let (Ok(state), Ok(ceph_sh)) = (
        std::env::var("STOWAGE_CEPH_STATE"),
        std::env::var("STOWAGE_CEPH_SH"),
    ) else {
        assert!(
            std::env::var("STOWAGE_REQUIRE_S3").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_S3=1 but STOWAGE_CEPH_STATE/STOWAGE_CEPH_SH are not set"
        );
        eprintln!("skipped: no ceph.sh state to restart the gateway with");
        return None;
    };
    Some((state, ceph_sh))
}

/// SIGKILL to radosgw, then wait (bounded) until it is gone.
fn kill_gateway(state: &str) {
    let pidfile = PathBuf::from(state).join("run/client.rgw.gw.pid");
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let gone = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && gone.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_gateway(ceph_sh: &str, state: &str) {
    let out = std::process::Command::new(ceph_sh)
        .args(["start", "--state", state, "--rgw"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ceph.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The gateway held for this test, plugins on a fresh bucket prefix and one volume `name`:
/// None (test not run) without a gateway or ceph.sh to restart it.
async fn setup(
    prefix: &str,
    name: &str,
) -> Option<(
    S3Env,
    (String, String),
    tokio::sync::MutexGuard<'static, ()>,
    Pair,
    v1::Volume,
)> {
    let env = s3_env()?;
    let control = gateway_control()?;
    let turn = GATEWAY.lock().await;
    let bp = format!("{}-", unique(prefix));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let vol =
        p.c.controller
            .create_volume(create_req(&env, name, 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    Some((env, control, turn, p, vol))
}

#[tokio::test]
async fn radosgw_killed_then_restarted() {
    let Some((env, (state, ceph_sh), _turn, mut p, vol)) = setup("outage", "pvc-up").await else {
        return;
    };
    let staging = p.dir.path().join("staging");
    let target = p.dir.path().join("pod/mount");
    p.n.node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    p.n.node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("before"), b"1").unwrap();

    kill_gateway(&state);

    let t = Instant::now();
    let st =
        p.c.controller
            .create_volume(create_req(&env, "pvc-during", 1 << 20, &[]))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("cannot reach S3 endpoint"), "{st:?}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // The node says the volume is in trouble instead of inventing numbers.
    let s =
        p.n.node_get_volume_stats(stats_req(&vol, &target))
            .await
            .unwrap()
            .into_inner();
    let cond = s.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("cannot reach"),
        "{cond:?}"
    );

    start_gateway(&ceph_sh, &state);

    // The CO retries with backoff. A restarted radosgw answers at once, but its first metadata
    // change waits for the killed process's RADOS watches to time out (~30 s): until then the
    // answer must stay a clear UNAVAILABLE, never another error.
    let t = Instant::now();
    let vol2 = loop {
        match p
            .c
            .controller
            .create_volume(create_req(&env, "pvc-during", 1 << 20, &[]))
            .await
        {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(st) => {
                assert_eq!(st.code(), Code::Unavailable, "{st:?}");
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "still failing after {:?}: {st:?}",
                    t.elapsed()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    eprintln!(
        "CreateVolume succeeded {:?} after the gateway was started again",
        t.elapsed()
    );
    // The mount made before the outage works again (s3fs retries), and data lands on the gateway.
    std::fs::write(target.join("after"), b"2").unwrap();
    let s3 = env.client();
    assert_eq!(get(&s3, &vol.volume_context["bucket"], "after").await, b"2");
    assert_eq!(
        get(&s3, &vol.volume_context["bucket"], "before").await,
        b"1"
    );

    p.n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    p.n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    for v in [vol, vol2] {
        p.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id,
                secrets: env.secrets(),
            })
            .await
            .unwrap();
    }
}

/// radosgw SIGKILLed while DeleteVolume empties a bucket of 3000 objects (three DeleteObjects
/// batches): the call ends UNAVAILABLE within a bound, not OK; the volume is not reported gone
/// while its bucket still holds objects; once the gateway is back the CO's retry deletes the
/// rest and the bucket.
#[tokio::test]
async fn radosgw_killed_mid_bucket_delete() {
    let Some((env, (state, ceph_sh), _turn, mut p, vol)) = setup("middel", "pvc-full").await else {
        return;
    };
    let bucket = vol.volume_context["bucket"].clone();
    let s3 = env.client();
    // What a pod left: 3000 small objects.
    let puts = (0..3000).map(|i| {
        let (s3, bucket) = (s3.clone(), bucket.clone());
        async move {
            s3.put_object()
                .bucket(bucket)
                .key(format!("data/obj-{i:05}"))
                .body(aws_sdk_s3::primitives::ByteStream::from(
                    format!("{i}").into_bytes(),
                ))
                .send()
                .await
                .unwrap();
        }
    });
    futures::stream::iter(puts)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let first = keys(&s3, &bucket, "").await;
    assert!(first.len() >= 3000, "{} keys", first.len());

    // Kill the gateway as soon as the first batch is gone: the delete is then in its middle.
    let mut ctl = p.c.controller.clone();
    let del = tokio::spawn({
        let (id, secrets) = (vol.volume_id.clone(), env.secrets());
        async move {
            let t = Instant::now();
            let r = ctl
                .delete_volume(v1::DeleteVolumeRequest {
                    volume_id: id,
                    secrets,
                })
                .await;
            (r, t.elapsed())
        }
    });
    let probe = first[0].clone();
    let t = Instant::now();
    loop {
        let gone = s3
            .head_object()
            .bucket(&bucket)
            .key(&probe)
            .send()
            .await
            .is_err();
        if gone {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the delete never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill_gateway(&state);
    let (res, took) = del.await.unwrap();
    let st = res.expect_err("DeleteVolume said OK with the gateway killed mid-delete");
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");

    start_gateway(&ceph_sh, &state);
    // Half-deleted, but not gone: objects are left in the bucket.
    let left = keys(&s3, &bucket, "").await;
    assert!(
        !left.is_empty(),
        "the kill came after the last batch: nothing to check"
    );
    // The CO retries with backoff until OK (UNAVAILABLE while the restarted gateway waits
    // out the killed one's RADOS watches).
    let t = Instant::now();
    loop {
        match p
            .c
            .controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                secrets: env.secrets(),
            })
            .await
        {
            Ok(_) => break,
            Err(st) => {
                assert_eq!(st.code(), Code::Unavailable, "{st:?}");
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "still failing after {:?}: {st:?}",
                    t.elapsed()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    assert!(
        !bucket_exists(&s3, &bucket).await,
        "bucket {bucket} left after the retried DeleteVolume"
    );
    eprintln!(
        "DeleteVolume with radosgw killed after the first batch: {:?} after {took:.1?}, {} of {} objects left; the retry deleted them and the bucket {:?} after the restart",
        st.code(),
        left.len(),
        first.len(),
        t.elapsed()
    );
}
