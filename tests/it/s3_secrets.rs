//! Secrets never leave the places they must be: with every plugin at `trace` log level, a full
//! volume life on both S3 mounters (s3fs, rclone) leaves the secret key in no log line, no
//! process command line or environment; the credential files a mounter needs are 0600, live
//! only under the node's state directory, and are gone after unstage; the plugin sockets are
//! closed to other users.

#[path = "s3_common.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use stowage_csi::v1;
use stowage_tests::secrets::{files_containing, processes_exposing, scrub_env};

async fn one_life(mounter: &str) {
    let Some(env) = s3_env() else { return };
    let secret = env.secret_key.as_bytes().to_vec();
    assert!(
        secret.len() >= 8,
        "a secret this short would match by chance"
    );
    let bucket = unique(&format!("sec{mounter}"));
    let mut p = start(
        &env.endpoint,
        &format!("    mode: prefix\n    bucket: {bucket}\n"),
    )
    .await;
    let vol =
        p.c.controller
            .create_volume(create_req(
                &env,
                "pvc-secret",
                1 << 20,
                &[("mounter", mounter)],
            ))
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
    std::fs::write(target.join("f"), b"x").unwrap();
    assert_eq!(mounter_pids(p.dir.path()).len(), 1, "one {mounter} running");

    let mut pids = mounter_pids(p.dir.path());
    pids.extend([p.ctl.child.id(), p.node.child.id()]);
    let exposed = processes_exposing(&pids, &secret);
    assert!(
        exposed.is_empty(),
        "{mounter}: secret visible in {exposed:?}"
    );
    let holders = files_containing(p.dir.path(), &secret);
    assert!(!holders.is_empty(), "{mounter}: no credential file found");
    for (path, mode) in &holders {
        assert!(
            path.starts_with(&p.state),
            "{mounter}: credentials at {} outside the state dir",
            path.display()
        );
        assert_eq!(
            *mode & 0o077,
            0,
            "{mounter}: {} is {mode:o}",
            path.display()
        );
    }
    for sock in ["node.sock", "controller.sock"] {
        let mode = std::fs::metadata(p.dir.path().join(sock))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o007, 0, "{sock} is open to others ({mode:o})");
    }

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
    let mut req = v1::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    };
    req.secrets = env.secrets();
    p.c.controller.delete_volume(req).await.unwrap();
    let left: Vec<_> = files_containing(p.dir.path(), &secret)
        .into_iter()
        .filter(|(path, _)| path.extension().is_none_or(|e| e != "log"))
        .collect();
    assert!(
        left.is_empty(),
        "{mounter}: credentials left after unstage: {left:?}"
    );

    let mut lines = 0usize;
    for log in [&p.ctl.log, &p.node.log] {
        let text = std::fs::read_to_string(log).unwrap();
        lines += text.lines().count();
        assert!(
            !text
                .as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_slice()),
            "{mounter}: secret in {}",
            log.display()
        );
    }
    println!(
        "{mounter}: {lines} trace log lines, 0 secret hits, credentials 0600 under the state dir and removed"
    );
}

#[tokio::test]
async fn secrets_stay_out_of_logs_command_lines_and_leftover_files() {
    // The suite hands the gateway's keys to this test in its environment; the plugins must
    // learn them only from CSI secrets, so they start without them (and any hit below is the
    // plugins' own doing).
    let secret = std::env::var("STOWAGE_S3_SECRET_KEY").unwrap_or_default();
    scrub_env(&secret, "STOWAGE_S3_SECRET_KEY");
    // SAFETY: as above.
    unsafe { std::env::set_var("RUST_LOG", "trace") };
    one_life("s3fs").await;
    one_life("rclone").await;
}
