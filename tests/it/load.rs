//! Issue 14, Load: 50 volumes published concurrently on one node while another backend of the
//! same processes is stalled. One stowage-controller and one stowage-node serve two backends
//! from one `backends:` file: local (healthy) and NFS against the suite's nfs-ganesha, which is
//! stopped with SIGSTOP (it keeps its sockets and accepts nothing: a hung server, not a dead
//! one). While NFS CreateVolume/DeleteVolume calls hang on it, 50 local volumes go through
//! CreateVolume (the same controller process) and NodeStage + NodePublish (the node process),
//! all at once; the same 50 ran once before with the server healthy.
//!
//! Asserts: every call to the stalled backend ends with UNAVAILABLE or DEADLINE_EXCEEDED
//! within a bound, every healthy call succeeds with its bytes on the backend, and NFS works
//! again once the server is resumed. Prints the healthy latency distributions side by side
//! (figures, never asserted). The node's kernel NFS mount is impossible on these hosts, so the
//! stalled calls are controller calls; the node part is the local backend's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_csi::endpoint::Endpoint;
use stowage_csi::v1;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_tests::{Plugin, controller_clients, is_root, nfs, node_client, wire};
use tonic::Code;
use tonic::transport::Channel;

const VOLUMES: usize = 50;
/// Concurrent calls sent to the stalled backend.
const STALLED_CALLS: usize = 10;
/// The NFS instance's per-call timeout (`timeoutSecs`).
const NFS_TIMEOUT_SECS: u64 = 3;

/// SIGSTOPs a process and SIGCONTs it on drop, so a failing test never leaves the suite's
/// server frozen.
struct Stopped(rustix::process::Pid);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        let pid = rustix::process::Pid::from_raw(pid).expect("a positive pid");
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

fn sock(dir: &Path, role: &str, driver: &str) -> Endpoint {
    Endpoint::Unix(dir.join(role).join(format!("{driver}.sock")))
}

/// p50 / p95 / max in milliseconds.
fn dist(v: &[Duration]) -> String {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return "-".into();
    }
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    format!("{:.0} / {:.0} / {:.0}", at(0.5), at(0.95), ms[ms.len() - 1])
}

struct Round {
    create: Vec<Duration>,
    publish: Vec<Duration>,
}

/// 50 local volumes at once: CreateVolume, then NodeStage + NodePublish (what a kubelet does
/// before a pod starts) and a write through the mount; then, untimed, the way back.
async fn local_round(
    c: &ControllerClient<Channel>,
    n: &NodeClient<Channel>,
    root: &Path,
    base: &Path,
    tag: &str,
) -> Round {
    let tasks = (0..VOLUMES).map(|i| {
        let (mut c, mut n) = (c.clone(), n.clone());
        let name = format!("load-{tag}-{i}");
        let staging = root.join("staging").join(&name);
        let target = root.join("pods").join(&name).join("mount");
        async move {
            let t = Instant::now();
            let vol = c
                .create_volume(wire::create(&name, 16 << 20))
                .await
                .unwrap_or_else(|s| panic!("local CreateVolume {name}: {s:?}"))
                .into_inner()
                .volume
                .unwrap();
            let create = t.elapsed();
            let t = Instant::now();
            n.node_stage_volume(v1::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(wire::rwo()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("local NodeStageVolume {name}: {s:?}"));
            n.node_publish_volume(v1::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(wire::rwo()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("local NodePublishVolume {name}: {s:?}"));
            let publish = t.elapsed();
            (name, vol.volume_id, staging, target, create, publish)
        }
    });
    let done = futures::future::join_all(tasks).await;
    let mut round = Round {
        create: Vec::new(),
        publish: Vec::new(),
    };
    for (name, _, _, target, create, publish) in &done {
        std::fs::write(target.join("data"), name.as_bytes()).unwrap();
        assert_eq!(
            std::fs::read(base.join(name).join("data")).unwrap(),
            name.as_bytes()
        );
        round.create.push(*create);
        round.publish.push(*publish);
    }
    let undo = done.into_iter().map(|(_, id, staging, target, _, _)| {
        let (mut c, mut n) = (c.clone(), n.clone());
        async move {
            n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.to_string_lossy().into(),
            })
            .await
            .unwrap();
            n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .unwrap();
            c.delete_volume(v1::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    futures::future::join_all(undo).await;
    round
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_publishes_are_not_delayed_by_a_stalled_backend() {
    let Some(server) = nfs() else { return };
    assert!(is_root(), "this test mounts; run it as root");
    let Some(state) = std::env::var_os("STOWAGE_NFS_STATE") else {
        assert!(
            std::env::var("STOWAGE_REQUIRE_NFS").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_NFS=1 but STOWAGE_NFS_STATE (ganesha's state dir) is not set"
        );
        eprintln!("STOWAGE_NFS_STATE not set: cannot stall ganesha, load test not run");
        return;
    };
    let ganesha_pid: i32 = std::fs::read_to_string(PathBuf::from(state).join("ganesha.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let base = root.join("local");
    let nfs_base = format!("load-{}", std::process::id());
    let cfg = root.join("multi.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backends:\n  - backend: local\n    instances:\n      default: {{ baseDir: {}, capacity: \"off\" }}\n  - backend: nfs\n    instances:\n      main: {{ server: {}, export: {}, baseDir: {nfs_base}, nfsPort: {}, mountPort: {}, timeoutSecs: {NFS_TIMEOUT_SECS} }}\n",
            base.display(),
            server.server,
            server.export,
            server.port,
            server.mount_port
        ),
    )
    .unwrap();
    let mut ctl = Plugin::spawn(
        "stowage-controller",
        &root,
        &format!("unix://{}/ctl/{{driver}}.sock", root.display()),
        &["--config", &cfg.to_string_lossy()],
    )
    .unwrap();
    let mut node = Plugin::spawn(
        "stowage-node",
        &root,
        &format!("unix://{}/node/{{driver}}.sock", root.display()),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "--node-id",
            "load-node",
            "--kubelet-root",
            &root.to_string_lossy(),
            "--kubelet-registration",
            "false",
        ],
    )
    .unwrap();
    let local_c = controller_clients(
        ctl.ready_at(&sock(&root, "ctl", "local.stowage.io"))
            .await
            .unwrap(),
    )
    .controller;
    let nfs_c = controller_clients(
        ctl.ready_at(&sock(&root, "ctl", "nfs.stowage.io"))
            .await
            .unwrap(),
    )
    .controller;
    let local_n = node_client(
        node.ready_at(&sock(&root, "node", "local.stowage.io"))
            .await
            .unwrap(),
    );
    // A healthy NFS volume first: its later DeleteVolume is one of the stalled calls, and the
    // connection pool is warm (the stall hits live connections, not a connect).
    let pre = nfs_c
        .clone()
        .create_volume(wire::create("load-nfs-pre", 1 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();

    let baseline = local_round(&local_c, &local_n, &root, &base, "base").await;

    let stopped = Stopped::new(ganesha_pid);
    let stalled_started = Instant::now();
    let stalled = (0..STALLED_CALLS).map(|i| {
        let mut c = nfs_c.clone();
        let pre = pre.volume_id.clone();
        async move {
            let t = Instant::now();
            let call = async {
                if i == 0 {
                    c.delete_volume(v1::DeleteVolumeRequest {
                        volume_id: pre,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                } else {
                    c.create_volume(wire::create(&format!("load-nfs-{i}"), 1 << 20))
                        .await
                        .map(drop)
                }
            };
            // The harness's own bound, far above what the plugin should need.
            let res = tokio::time::timeout(Duration::from_secs(120), call)
                .await
                .unwrap_or_else(|_| Err(tonic::Status::unknown("no answer within 120 s")));
            (res, t.elapsed())
        }
    });
    let stalled = tokio::spawn(futures::future::join_all(stalled));
    // Let the NFS calls reach the frozen server before the healthy round starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = local_round(&local_c, &local_n, &root, &base, "stalled").await;
    let during_took = stalled_started.elapsed();
    let stalled = stalled.await.unwrap();
    drop(stopped);

    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let mut stalled_times = Vec::new();
    for (res, took) in &stalled {
        let code = match res {
            Ok(()) => "OK".to_string(),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "a call to the stalled server answered {:?}: {}",
                    s.code(),
                    s.message()
                );
                format!("{:?}", s.code())
            }
        };
        *codes.entry(code).or_default() += 1;
        stalled_times.push(*took);
        // Bounded: the pool's calls time out after timeoutSecs; queued ones after a few more.
        assert!(
            *took < Duration::from_secs(10 * NFS_TIMEOUT_SECS),
            "a stalled call took {took:?}"
        );
    }
    assert_eq!(
        codes.get("OK"),
        None,
        "calls to a frozen server succeeded: {codes:?}"
    );

    // The server is back: the same calls succeed (a CO's retry).
    let mut c = nfs_c.clone();
    let t = Instant::now();
    loop {
        match c.create_volume(wire::create("load-nfs-1", 1 << 20)).await {
            Ok(_) => break,
            Err(s) if t.elapsed() < Duration::from_secs(60) => {
                eprintln!("NFS retry after the stall: {:?} {}", s.code(), s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => panic!("NFS did not recover within 60 s: {s:?}"),
        }
    }
    let recovered = t.elapsed();
    for id in ["main/load-nfs-1", &pre.volume_id] {
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    println!(
        "load: {VOLUMES} local volumes at once, one controller + one node serving local and NFS; \
         latency p50 / p95 / max in ms\n\
         \x20 healthy NFS:            local CreateVolume {:>16}   local NodeStage+NodePublish {:>16}\n\
         \x20 NFS stalled (SIGSTOP):  local CreateVolume {:>16}   local NodeStage+NodePublish {:>16}   (round {:.1} s)\n\
         \x20 stalled NFS calls ({STALLED_CALLS}, timeoutSecs {NFS_TIMEOUT_SECS}): {codes:?}, took {}; first NFS call after SIGCONT answered after {:.1} s",
        dist(&baseline.create),
        dist(&baseline.publish),
        dist(&during.create),
        dist(&during.publish),
        during_took.as_secs_f64(),
        dist(&stalled_times),
        recovered.as_secs_f64(),
    );
    let left: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".stowage")
        .collect();
    assert!(left.is_empty(), "local volumes left: {left:?}");
    drop(node);
    drop(ctl);
}
