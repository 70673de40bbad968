//! `docker volume update --availability pause|drain|active` on a cluster volume a service
//! uses. Swarm's scheduler places tasks only on active volumes (swarmkit
//! manager/scheduler/volumes.go, checkVolume), and its volume enforcer rejects the tasks of a
//! drained one (manager/orchestrator/volumeenforcer): pause keeps the running task and leaves
//! new ones pending; drain stops the tasks; active runs the service again. Unpublishing
//! (NodeUnpublish, ControllerUnpublish) reaches the plugin once the tasks are deleted.

use std::time::Instant;

use crate::harness::*;

#[test]
fn availability_pause_drain_active_on_a_used_volume() {
    let Some(docker) = cluster_docker() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let p = CsiPlugin::install(&docker, LOCAL_CONFIG, Some(data.path()));
    let d = &p.docker;
    let vol = p.volume("av");
    p.create_mount(&vol, "multi", "all", "8MiB", &[]);
    let v = p.wait_created(&vol);
    let id = volume_id(&v);
    let path = id.rsplit('/').next().unwrap().to_string();
    let log_file = data.path().join(&path).join("log");
    let node = node_name(d);

    // Swarm restarts the service's tasks itself (restart condition any, no delay).
    let svc = format!("s{}", p.volume("avw"));
    p.service_with(
        &svc,
        &vol,
        TASK,
        &["--restart-condition", "any", "--restart-delay", "1s"],
    );
    wait_for(
        "the first task's write",
        120,
        || p.diag(&vol),
        || (read(&log_file)? == "task saw 0\n").then_some(()),
    );
    let first = p.running(&svc);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        publish_record(data.path(), &path),
        Some(vec![node.clone()]),
        "ControllerPublish recorded the node on the backend"
    );

    // pause: the running task stays, a new one (the service scaled to 2) is not placed.
    d.ok(&["volume", "update", "--availability", "pause", &vol]);
    let v = p.inspect(&vol).unwrap();
    assert_eq!(v["ClusterVolume"]["Spec"]["Availability"], "pause", "{v}");
    d.ok(&["service", "scale", "--detach", &format!("{svc}=2")]);
    let pending = wait_for(
        "the second replica to stay pending on the paused volume",
        60,
        || p.tasks(&svc),
        || {
            let t = p.tasks(&svc);
            t.lines()
                .find(|l| l.starts_with("Running|Pending"))
                .map(str::to_string)
        },
    );
    eprintln!("availability: paused volume, new task: {pending}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        p.running(&svc),
        first,
        "pause keeps the running task, no second one"
    );
    assert_eq!(read(&log_file).as_deref(), Some("task saw 0\n"));

    // drain: Swarm's volume enforcer rejects the task and its container stops.
    let t0 = Instant::now();
    d.ok(&["volume", "update", "--availability", "drain", &vol]);
    wait_for(
        "the drained volume's task to stop",
        90,
        || format!("{}\n{}", p.tasks(&svc), p.diag(&vol)),
        || p.running(&svc).is_empty().then_some(()),
    );
    eprintln!(
        "availability: drained, task stopped in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let tasks = p.tasks(&svc);
    assert!(
        tasks.contains("attached to volume which is being drained"),
        "{tasks}"
    );
    // Swarm 28.5.2 keeps the volume published to the node while the drained service still
    // exists (its scheduler frees volumes of deleted tasks; a rejected task stays in the
    // service's history): printed, not asserted. Unpublishing is checked below, once the
    // service is gone.
    std::thread::sleep(std::time::Duration::from_secs(5));
    eprintln!(
        "availability: drained volume, service still there: published={}, backend record {:?}",
        p.published(&vol),
        publish_record(data.path(), &path)
    );

    // active: both replicas run again, and each reads the bytes the first task wrote.
    let t0 = Instant::now();
    d.ok(&["volume", "update", "--availability", "active", &vol]);
    let lines = wait_for(
        "both replicas to run again and write",
        120,
        || format!("{}\n{:?}", p.tasks(&svc), read(&log_file)),
        || {
            let l: Vec<String> = read(&log_file)?.lines().map(str::to_string).collect();
            (l.len() >= 3 && p.running(&svc).len() == 2).then_some(l)
        },
    );
    eprintln!(
        "availability: active again, both replicas running in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(lines[0], "task saw 0");
    for l in &lines[1..] {
        let n: usize = l.trim_start_matches("task saw ").parse().unwrap();
        assert!(
            n >= 1,
            "a task after active read the first write back: {lines:?}"
        );
    }

    // The service removed: Swarm unpublishes the volume on the node (NodeUnpublish) and in
    // the controller (ControllerUnpublish clears the backend's record).
    let t0 = Instant::now();
    p.remove_service(&svc);
    wait_for(
        "the volume to be unpublished once its service is gone",
        90,
        || p.diag(&vol),
        || (!p.published(&vol)).then_some(()),
    );
    wait_for(
        "ControllerUnpublish to clear the backend's publish record",
        60,
        || format!("{:?}", publish_record(data.path(), &path)),
        || (publish_record(data.path(), &path)? == Vec::<String>::new()).then_some(()),
    );
    eprintln!(
        "availability: service removed to unpublished in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(dockerd_log()).unwrap_or_default();
    let logged = |what: &str| log.lines().any(|l| l.contains(what) && l.contains(&id));
    assert!(
        logged("Node/NodeUnpublishVolume") && logged("volume unpublished"),
        "the plugin logged NodeUnpublishVolume for {id}"
    );
    // Swarm 28.5.2 never sends NodeUnstageVolume after a successful NodeUnpublish (swarmkit
    // v2.0.0 agent/csi/plugin/plugin.go, NodeUnstageVolume returns early for a volume it
    // knows is unpublished): printed, not asserted; see README.
    eprintln!(
        "availability: NodeUnstageVolume reached the plugin: {}",
        logged("Node/NodeUnstageVolume")
    );
    p.remove_volume(&vol);
    assert!(!data.path().join(&path).exists());
}
