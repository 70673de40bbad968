//! The real gateway goes away: radosgw is killed (SIGKILL) while a volume is mounted, calls
//! fail with a clear UNAVAILABLE, and once tests/infra/ceph.sh has started it again the same
//! calls succeed and the mount carries on. Its own test binary: it takes the gateway away from
//! everything else, so nothing may run beside it.

#[path = "s3_common.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::v1;
use tonic::Code;

#[tokio::test]
async fn radosgw_killed_then_restarted() {
    let Some(env) = s3_env() else { return };
    let (Ok(state), Ok(ceph_sh)) = (
        std::env::var("STOWAGE_CEPH_STATE"),
        std::env::var("STOWAGE_CEPH_SH"),
    ) else {
        assert!(
            std::env::var("STOWAGE_REQUIRE_S3").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_S3=1 but STOWAGE_CEPH_STATE/STOWAGE_CEPH_SH are not set"
        );
        eprintln!("skipped: no ceph.sh state to restart the gateway with");
        return;
    };
    let bp = format!("{}-", unique("outage"));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-up", 1 << 20, &[]))
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
    std::fs::write(target.join("before"), b"1").unwrap();

    let pidfile = PathBuf::from(&state).join("run/client.rgw.gw.pid");
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

    let out = std::process::Command::new(&ceph_sh)
        .args(["start", "--state", &state, "--rgw"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ceph.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );

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
