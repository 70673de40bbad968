//! RBD under an OSD outage: the OSD is stopped while CreateVolume runs. The call must end with
//! a clear, retryable error within the configured bound, and once the OSD is back no half-made
//! image may remain visible: a retry gives one complete volume, a delete leaves nothing.
//!
//! Its own test binary: it stops the cluster's only OSD, which no other test may see.

#[path = "rbd_common.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;

fn ceph_sh(env: &std::collections::HashMap<String, String>, cmd: &str) {
    let script = std::env::var("STOWAGE_CEPH_SH")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/infra/ceph.sh").to_string());
    let st = Command::new(script)
        .args([cmd, "--state", &env["CEPH_STATE"]])
        .status()
        .unwrap();
    assert!(st.success(), "ceph.sh {cmd} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osd_stopped_mid_create_gives_a_clear_error_and_no_half_image() {
    // A short bound so the test does not wait 30 s per call.
    let Some(mut r) = Rbd::start_with(0, "    opTimeoutSecs: 5\n").await else {
        return;
    };
    let name = unique("outage");
    let cap = fs_cap("ext4");
    // Connect first, so the outage hits the image creation, not the login.
    let warm = r
        .create(create_req(&unique("warm"), 1 << 20, cap.clone()))
        .await
        .unwrap();

    ceph_sh(&r.env, "stop-osd");
    let started = Instant::now();
    let res = r.create(create_req(&name, 64 << 20, cap.clone())).await;
    let took = started.elapsed();
    ceph_sh(&r.env, "start-osd");
    let e = res.expect_err("CreateVolume succeeded with the only OSD down");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(e.message().contains("did not answer in time"), "{e:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // Recovered: nothing half-made is listed as a volume...
    let listed =
        r.c.controller
            .list_volumes(stowage_csi::v1::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(
        !listed
            .entries
            .iter()
            .any(|v| v.volume.as_ref().unwrap().volume_id.ends_with(&name)),
        "a volume from the failed create is listed"
    );
    // ...and the retry the CO makes yields exactly one complete image.
    let vol = r
        .create(create_req(&name, 64 << 20, cap.clone()))
        .await
        .unwrap();
    let image = &vol.volume_context["imageName"];
    assert_eq!(r.images().iter().filter(|i| *i == image).count(), 1);
    let meta = r
        .rbd(&["image-meta", "get", image, "stowage.volume"])
        .unwrap();
    assert!(meta.contains(&name), "{meta}");
    r.delete(&vol.volume_id).await.unwrap();
    r.delete(&warm.volume_id).await.unwrap();
    assert!(!r.images().contains(image), "image left after delete");
}

/// The OSD stopped while CreateSnapshot runs: a clear, retryable error within the bound; once
/// the OSD is back no half-made snapshot is listed, the CO's retry gives exactly one snapshot
/// on the image, and deleting it (and the volume) leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osd_stopped_mid_snapshot_gives_a_clear_error_and_no_half_snapshot() {
    let Some(mut r) = Rbd::start_with(0, "    opTimeoutSecs: 5\n").await else {
        return;
    };
    let vol = r
        .create(create_req(&unique("snapsrc"), 16 << 20, fs_cap("ext4")))
        .await
        .unwrap();
    let image = vol.volume_context["imageName"].clone();
    let snap_name = unique("outage-snap");

    ceph_sh(&r.env, "stop-osd");
    let started = Instant::now();
    let res = r.snapshot(&snap_name, &vol.volume_id).await;
    let took = started.elapsed();
    ceph_sh(&r.env, "start-osd");
    let e = res.expect_err("CreateSnapshot succeeded with the only OSD down");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    println!(
        "CreateSnapshot with the OSD down: {:?} after {took:.1?}: {}",
        e.code(),
        e.message()
    );

    // Recovered: nothing of the failed call is listed as a snapshot of the volume.
    let listed =
        r.c.controller
            .list_snapshots(stowage_csi::v1::ListSnapshotsRequest {
                source_volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let ready: Vec<_> = listed
        .entries
        .iter()
        .filter_map(|s| s.snapshot.as_ref())
        .filter(|s| s.ready_to_use)
        .collect();
    assert!(ready.len() <= 1, "{ready:?}");
    // The retry yields one snapshot, the same on a repeat.
    let snap = r.snapshot(&snap_name, &vol.volume_id).await.unwrap();
    let again = r.snapshot(&snap_name, &vol.volume_id).await.unwrap();
    assert_eq!(snap.snapshot_id, again.snapshot_id);
    let snaps = r.rbd(&["snap", "ls", &image]).unwrap();
    assert_eq!(
        snaps.lines().filter(|l| l.contains("csi-snap-")).count(),
        1,
        "one snapshot on the image after the retry:\n{snaps}"
    );
    r.delete_snapshot(&snap.snapshot_id).await.unwrap();
    let snaps = r.rbd(&["snap", "ls", &image]).unwrap();
    assert!(!snaps.contains("csi-snap-"), "{snaps}");
    r.delete(&vol.volume_id).await.unwrap();
    assert!(!r.images().contains(&image), "image left after delete");
}

/// The monitor stopped. A controller already connected keeps the OSD map, so creating an image
/// (OSD operations only) may still work; a snapshot needs the monitor (it allocates the snap
/// ID), so CreateSnapshot must end with a clear, retryable error within the bound and leave no
/// half-made snapshot; a controller started while the monitor is down answers too, with
/// UNAVAILABLE, instead of hanging. Once the monitor is back the CO's retries succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mon_stopped_gives_clear_errors_and_the_retries_succeed() {
    let Some(mut r) = Rbd::start_with(0, "    opTimeoutSecs: 5\n").await else {
        return;
    };
    let cap = fs_cap("ext4");
    let vol = r
        .create(create_req(&unique("monsrc"), 16 << 20, cap.clone()))
        .await
        .unwrap();
    let image = vol.volume_context["imageName"].clone();
    let snap_name = unique("mon-snap");
    let during = unique("during-mon");

    ceph_sh(&r.env, "stop-mon");
    let started = Instant::now();
    let snap_res = r.snapshot(&snap_name, &vol.volume_id).await;
    let snap_took = started.elapsed();
    let started = Instant::now();
    let create_res = r.create(create_req(&during, 16 << 20, cap.clone())).await;
    let create_took = started.elapsed();
    // A controller that starts now cannot even log in.
    let cfg = config(&r.env, r.dir.path(), "cold", "    opTimeoutSecs: 5\n");
    let cold_dir = r.path("cold");
    std::fs::create_dir_all(&cold_dir).unwrap();
    let mut cold = stowage_tests::Plugin::controller(&cold_dir, &cfg).unwrap();
    let mut cold_c = stowage_tests::controller_clients(cold.ready().await.unwrap());
    let started = Instant::now();
    let mut req = create_req(&unique("cold"), 16 << 20, cap.clone());
    req.secrets = r.secrets();
    let cold_res = cold_c.controller.create_volume(req).await;
    let cold_took = started.elapsed();
    cold.kill();
    ceph_sh(&r.env, "start-mon");

    let snap_e = snap_res.expect_err("CreateSnapshot succeeded with the monitor down");
    assert!(
        matches!(snap_e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{snap_e:?}"
    );
    assert!(snap_took < Duration::from_secs(60), "took {snap_took:?}");
    let cold_e = cold_res.expect_err("a controller with no monitor created a volume");
    assert!(
        matches!(cold_e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{cold_e:?}"
    );
    assert!(cold_took < Duration::from_secs(60), "took {cold_took:?}");
    let connected = match &create_res {
        Ok(_) => "OK".to_string(),
        Err(e) => format!("{:?} ({})", e.code(), e.message()),
    };
    println!(
        "monitor down: CreateSnapshot {:?} after {snap_took:.1?} ({}); CreateVolume, connected controller: {connected} after {create_took:.1?}; new controller: {:?} after {cold_took:.1?} ({})",
        snap_e.code(),
        snap_e.message(),
        cold_e.code(),
        cold_e.message()
    );
    assert!(
        create_took < Duration::from_secs(60),
        "took {create_took:?}"
    );

    // Recovered: the retries give one snapshot and one volume, each complete.
    let snap = r.snapshot(&snap_name, &vol.volume_id).await.unwrap();
    let snaps = r.rbd(&["snap", "ls", &image]).unwrap();
    assert_eq!(
        snaps.lines().filter(|l| l.contains("csi-snap-")).count(),
        1,
        "one snapshot on the image after the retry:\n{snaps}"
    );
    let made = r
        .create(create_req(&during, 16 << 20, cap.clone()))
        .await
        .unwrap();
    let made_image = made.volume_context["imageName"].clone();
    assert_eq!(r.images().iter().filter(|i| **i == made_image).count(), 1);
    if let Ok(v) = &create_res {
        assert_eq!(v.volume_id, made.volume_id, "the retry is the same volume");
    }
    r.delete_snapshot(&snap.snapshot_id).await.unwrap();
    r.delete(&made.volume_id).await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();
    let images = r.images();
    assert!(
        !images.contains(&image) && !images.contains(&made_image),
        "images left after delete: {images:?}"
    );
}
