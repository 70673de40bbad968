//! The Ceph key never leaves the places it must be: with the controller and the node at
//! `trace` log level, a full RBD volume life (create, publish, stage through rbd-fuse, write,
//! snapshot, unstage, delete) leaves the key in no log line and in no command line or
//! environment of the plugins or of rbd-fuse; the keyring the node writes for rbd-fuse is 0600,
//! lives only under the node's run directory, and is gone after unstage.

#[path = "rbd_common.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use stowage_tests::secrets::{
    contains, files_containing, pids_with, processes_exposing, scrub_env,
};

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn ceph_keys_stay_out_of_logs_command_lines_and_leftover_files() {
    let Some(env) = cluster() else { return };
    let key = env["CEPH_ADMIN_KEY"].clone();
    assert!(key.len() >= 16, "a key this short would match by chance");
    // The suite hands the key to this test in its environment; the plugins must learn it only
    // from their keyring file and CSI secrets, so they start without it.
    scrub_env(&key, "");
    // SAFETY: before any plugin starts; this test binary runs no other test.
    unsafe { std::env::set_var("RUST_LOG", "trace") };

    let mut r = Rbd::start(1).await.unwrap();
    let run = Path::new(&env["CEPH_MNT_ROOT"]).join("run-node-0-node");
    let cap = fs_cap("ext4");
    let vol = r
        .create(create_req(&unique("pvc-key"), 64 * MIB, cap.clone()))
        .await
        .unwrap();
    r.publish(&vol.volume_id, "node-0", cap.clone())
        .await
        .unwrap();
    r.stage(0, &vol, "a", cap.clone()).await.unwrap();
    let target = r.node_publish(0, &vol, "a", cap.clone()).await.unwrap();
    std::fs::write(target.join("f"), b"x").unwrap();
    let snap = r
        .snapshot(&unique("snap-key"), &vol.volume_id)
        .await
        .unwrap();

    let run_s = run.to_string_lossy().into_owned();
    let mut pids = pids_with(&["rbd-fuse", &run_s]);
    assert!(!pids.is_empty(), "no rbd-fuse running for {run_s}");
    pids.extend([r.ctl.child.id(), r.nodes[0].0.child.id()]);
    let exposed = processes_exposing(&pids, key.as_bytes());
    assert!(exposed.is_empty(), "key visible in {exposed:?}");

    let mut holders = files_containing(r.dir.path(), key.as_bytes());
    holders.extend(files_containing(&run, key.as_bytes()));
    assert!(
        holders.iter().any(|(p, _)| p.starts_with(&run)),
        "no keyring under the node's run directory {run_s}: {holders:?}"
    );
    for (path, mode) in &holders {
        assert!(
            path.starts_with(&run),
            "key in {} outside the node's run directory",
            path.display()
        );
        assert_eq!(*mode & 0o077, 0, "{} is {mode:o}", path.display());
    }
    for sock in ["node-0/node.sock", "controller.sock"] {
        let mode = std::fs::metadata(r.path(sock))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o007, 0, "{sock} is open to others ({mode:o})");
    }

    r.node_unpublish(0, &vol.volume_id, "a").await.unwrap();
    r.unstage(0, &vol.volume_id, "a").await.unwrap();
    r.unpublish(&vol.volume_id, "node-0").await.unwrap();
    r.delete_snapshot(&snap.snapshot_id).await.unwrap();
    r.delete(&vol.volume_id).await.unwrap();
    let left = files_containing(&run, key.as_bytes());
    assert!(left.is_empty(), "keyrings left after unstage: {left:?}");

    let mut lines = 0usize;
    for log in [&r.ctl.log, &r.nodes[0].0.log] {
        let text = std::fs::read(log).unwrap();
        lines += text.split(|b| *b == b'\n').count();
        assert!(!contains(&text, key.as_bytes()), "key in {}", log.display());
    }
    println!(
        "rbd: {lines} trace log lines, 0 key hits in logs, command lines and environments; keyring 0600 under the run dir and removed"
    );
}
