//! glusterd stopped while volumes are created, expanded and deleted: a clear UNAVAILABLE naming
//! glusterd, no half volume (no directory, no metadata, no volume without its limit), and
//! everything works once glusterd is back. A separate test binary: it stops the machine's one
//! glusterd, so it must not run beside the other GlusterFS tests (cargo runs test binaries one
//! after another). The bricks keep running while glusterd is down, so the management mount and
//! node mounts keep working: only quota commands fail.
//!
//! The volume-per-PV mode test lives here too: it creates gluster volumes and enables quota on
//! them (which restarts the shared quotad), so it must not run beside the quota tests either.
//! Within this binary the two take [`SERIAL`] so they do not overlap.

#[path = "gluster_common.rs"]
mod common;

use common::*;
use stowage_csi::v1;
use stowage_tests::wire;
use tonic::Code;

const MIB: i64 = 1 << 20;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct RestartOnDrop<'a>(&'a Gluster);
impl Drop for RestartOnDrop<'_> {
    fn drop(&mut self) {
        // Whatever happened in the test, leave glusterd running for whoever comes next (a
        // frozen one is thawed first).
        if let Some(pid) = std::fs::read_to_string(self.0.state.join("glusterd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
        }
        let _ = self.0.infra("start");
    }
}

#[tokio::test]
async fn glusterd_down_gives_clear_errors_and_no_half_volumes() {
    let Some(g) = gluster() else { return };
    let _serial = SERIAL.lock().await;
    let mut e = env(&g, "outage", "    cliTimeoutSecs: 20\n").await;
    // One volume before the outage, to expand and delete during it.
    let before =
        e.c.controller
            .create_volume(wire::create("pvc-before", 4 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let bpath = format!("/{}/{}", e.base, dir_of(&before));

    let _restart = RestartOnDrop(&g);
    let out = g.infra("stop-glusterd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = std::time::Instant::now();
    let st =
        e.c.controller
            .create_volume(wire::create("pvc-during", 4 * MIB))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("glusterd"), "{st:?}");
    assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
    // No half volume: no directory where volumes live, nothing left in the build area.
    assert!(!g.on_brick(&e.base, "pvc-during").exists());
    let tmp = g.brick.join(&e.base).join(".stowage/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "left in {}",
        tmp.display()
    );

    let st =
        e.c.controller
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: before.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: 8 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    let st =
        e.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: before.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(
        g.on_brick(&e.base, &dir_of(&before)).is_dir(),
        "delete must not half-happen"
    );
    // Reads that need no glusterd still work.
    let listed =
        e.c.controller
            .list_volumes(v1::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].volume.as_ref().unwrap().capacity_bytes, 4 * MIB);

    // Now truly mid-create: glusterd frozen (SIGSTOP) so the create is caught waiting on its
    // quota command, then killed while that command is in flight.
    let out = g.infra("start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = std::fs::read_to_string(g.state.join("glusterd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gpid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(gpid, rustix::process::Signal::STOP).unwrap();
    let mut c2 = e.c.controller.clone();
    let create =
        tokio::spawn(async move { c2.create_volume(wire::create("pvc-mid", 4 * MIB)).await });
    let mut caught = false;
    for _ in 0..200 {
        caught = cli_running(&["limit-usage", &e.base]);
        if caught {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(caught, "the create never reached its quota command");
    rustix::process::kill_process(gpid, rustix::process::Signal::KILL).unwrap();
    let t = std::time::Instant::now();
    let st = create.await.unwrap().unwrap_err();
    eprintln!(
        "create answered {:?} after glusterd was killed: {st:?}",
        t.elapsed()
    );
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("glusterd"), "{st:?}");
    assert!(!g.on_brick(&e.base, "pvc-mid").exists());
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    let out = g.infra("start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The failed create left nothing that a list or a retry would trip over.
    assert_eq!(
        e.c.controller
            .list_volumes(v1::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        1
    );
    assert_eq!(g.quota_settled(&bpath, Some(4 << 20)), Some(4 << 20));
    let during =
        e.c.controller
            .create_volume(wire::create("pvc-during", 4 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(
        g.quota_settled(&format!("/{}/{}", e.base, dir_of(&during)), Some(4 << 20)),
        Some(4 << 20)
    );
    e.c.controller
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: before.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 8 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(g.quota_settled(&bpath, Some(8 << 20)), Some(8 << 20));
    for v in [&before, &during] {
        e.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!g.on_brick(&e.base, &dir_of(v)).exists());
    }
    assert_eq!(g.quota_settled(&bpath, None), None);
}

#[tokio::test]
async fn controller_starts_and_answers_while_gluster_is_unreachable() {
    // A server name that resolves nowhere: no mount, no glusterd. Probe still works (the
    // controller does not crash-loop) and calls that need gluster say UNAVAILABLE.
    let Some(g) = gluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gluster.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: glusterfs\ninstances:\n  main:\n    servers: [127.0.0.9]\n    volume: nosuchvol\n    glusterd:\n      socket: {}/nosock\n    stateDir: {}\n    cliTimeoutSecs: 5\n",
            dir.path().display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let _ = &g;
    let mut ctl = stowage_tests::Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = stowage_tests::controller_clients(ctl.ready().await.unwrap());
    let st = c
        .controller
        .create_volume(wire::create("pvc-x", 4 * MIB))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("nosuchvol"), "{st:?}");
}

#[tokio::test]
async fn volume_per_pv_mode_creates_enforces_expands_and_removes_bricks() {
    let Some(g) = gluster() else { return };
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let bricks = dir.path().join("bricks");
    std::fs::create_dir_all(&bricks).unwrap();
    let prefix = unique("t").replace('-', "");
    let prefix = format!("{}-", &prefix[..9]);
    let cfg = dir.path().join("gluster.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: glusterfs\ninstances:\n  main:\n    mode: volume\n    servers: [{h}]\n    bricks: [{{host: {h}, dir: {b}}}]\n    volumePrefix: {prefix}\n    glusterd:\n      socket: {s}\n    stateDir: {st}\n",
            h = g.host,
            b = bricks.display(),
            s = g.sock.display(),
            st = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut ctl = stowage_tests::Plugin::controller(dir.path(), &cfg).unwrap();
    let mut node = stowage_tests::Plugin::node(dir.path(), &cfg, "node-1").unwrap();
    let mut c = stowage_tests::controller_clients(ctl.ready().await.unwrap());
    let mut n = stowage_tests::node_client(node.ready().await.unwrap());
    let mut vol = None;
    for _ in 0..2 {
        vol = c
            .controller
            .create_volume(wire::create("pvc-own", 8 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume;
    }
    let vol = vol.unwrap();
    let gvol = dir_of(&vol);
    assert_eq!(gvol, format!("{prefix}pvc-own"));
    assert_eq!(vol.volume_context["volume"], gvol);
    let other = Gluster {
        volume: gvol.clone(),
        host: g.host.clone(),
        sock: g.sock.clone(),
        brick: bricks.join(&gvol),
        state: g.state.clone(),
    };
    assert_eq!(other.quota_settled("/", Some(8 << 20)), Some(8 << 20));
    let listed = c
        .controller
        .list_volumes(v1::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);

    let staging = dir.path().join("staging");
    let target = dir.path().join("target");
    n.node_stage_volume(stage_req(&vol, &staging))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&vol, &staging, &target))
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"own volume").unwrap();
    assert_eq!(std::fs::read(other.brick.join("f")).unwrap(), b"own volume");
    let err = write_zeros(&target.join("big"), 16 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    std::fs::remove_file(target.join("big")).unwrap();
    c.controller
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(other.quota_settled("/", Some(32 << 20)), Some(32 << 20));
    write_zeros(&target.join("big"), 16 << 20).unwrap();

    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    for _ in 0..2 {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Gone from glusterd, and the brick directory with it.
    let out = std::process::Command::new("gluster")
        .arg("--mode=script")
        .arg(format!("--glusterd-sock={}", g.sock.display()))
        .args(["volume", "info", &gvol, "--xml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not exist"));
    assert!(!bricks.join(&gvol).exists(), "brick directory left behind");
    let mps: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.starts_with(&*dir.path().to_string_lossy()))
        .collect();
    for m in mps.iter().rev() {
        let _ = std::process::Command::new("umount")
            .args(["-l", m])
            .status();
    }
}

/// A gluster CLI process of ours is running with all of `words` in its command line.
fn cli_running(words: &[&str]) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            return false;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        cmd.starts_with("gluster ") && words.iter().all(|w| cmd.contains(w))
    })
}
