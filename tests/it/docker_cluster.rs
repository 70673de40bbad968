//! Swarm cluster volumes (Docker >= 23) through Stowage's CSI plugin package, under a real
//! current engine (Docker 28.5.2 built by tests/infra/moby.sh, started by tests/infra/docker.sh
//! as a single-node Swarm manager). The package is what users install: `docker plugin create`
//! from docker-plugin/packaging/build.sh --kind csi, its root filesystem the Stowage image's
//! packages (images/build.sh --rootfs-only), so it carries every backend's mount tools.
//!
//! What is checked, the way a Swarm user drives it: `docker volume create --type ... --scope
//! ... --sharing ...` leaves "pending creation" once Swarm's CreateVolume reached the plugin;
//! `docker volume ls --cluster` and `inspect` show it with its CSI info; a service with
//! `--mount type=cluster` runs a task that writes (bytes checked on the backend); the task
//! restarted reads them back; the volume drained and removed is deleted on the backend.
//!
//! Runs when STOWAGE_DOCKER_CLUSTER=1 (tests/suites/72-docker-current.sh sets it after `docker
//! swarm init` on the current engine); skipped otherwise, since Docker 20.10 has no cluster
//! volumes.

mod docker_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use docker_common::Docker;
use serde_json::Value;

fn cluster_docker() -> Option<Docker> {
    if std::env::var("STOWAGE_DOCKER_CLUSTER").ok().as_deref() != Some("1") {
        eprintln!("skipped: STOWAGE_DOCKER_CLUSTER is not 1 (needs Docker >= 23 in Swarm mode)");
        return None;
    }
    let d = Docker::from_env().expect("STOWAGE_DOCKER_CLUSTER=1 needs STOWAGE_DOCKER_HOST");
    assert!(
        d.swarm_active(),
        "STOWAGE_DOCKER_CLUSTER=1 but the engine is no Swarm manager"
    );
    Some(d)
}

/// Polls `f` until it returns Some, at most `secs` seconds; `what` names it in the failure,
/// `diag` adds what the engine knows at that moment.
fn wait_for<T>(
    what: &str,
    secs: u64,
    diag: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}: {}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The CSI plugin package, created in Docker and enabled; disabled and removed (with its
/// services and volumes) when dropped, whatever the test did.
struct CsiPlugin {
    docker: Docker,
    name: String,
    label: String,
    _dir: tempfile::TempDir,
}

impl CsiPlugin {
    /// Builds the package around the stowage-docker binary of this build and `config` (as the
    /// plugin sees it), plus `binds` of host directories (the `data` mount's source).
    fn install(docker: &Docker, config: &str, data: Option<&Path>) -> CsiPlugin {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("plugin");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("config.yaml"), config).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let rootfs = std::env::var("STOWAGE_PLUGIN_ROOTFS").expect(
            "STOWAGE_PLUGIN_ROOTFS: the image's package rootfs (images/build.sh --rootfs-only)",
        );
        let out = Command::new(root.join("docker-plugin/packaging/build.sh"))
            .args(["--kind", "csi", "--rootfs", &rootfs, "--out"])
            .arg(&pkg)
            .arg("--binary")
            .arg(docker_common::bin("stowage-docker").unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = format!("{}:latest", docker_common::unique("stowage-csi"));
        let p = CsiPlugin {
            docker: docker.clone(),
            name: name.clone(),
            label: docker_common::unique("t"),
            _dir: dir,
        };
        let d = &p.docker;
        d.ok(&["plugin", "create", &name, pkg.to_str().unwrap()]);
        let mut set = vec![
            "plugin".to_string(),
            "set".into(),
            name.clone(),
            format!("config.source={}", etc.display()),
        ];
        if let Some(data) = data {
            set.push(format!("data.source={}", data.display()));
        }
        set.push(format!("NODE_ID={}", node_name(d)));
        d.ok(&set.iter().map(String::as_str).collect::<Vec<_>>());
        d.ok(&["plugin", "enable", &name]);
        p
    }

    fn volume(&self, base: &str) -> String {
        format!("{base}-{}", self.label.rsplit('-').next().unwrap_or("x"))
    }

    fn inspect(&self, vol: &str) -> Option<Value> {
        let out = self.docker.run(&["volume", "inspect", vol]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v[0].clone())
    }

    /// The engine's view, for failure messages: the volume, the plugin's recent log lines.
    fn diag(&self, vol: &str) -> String {
        let v = self
            .inspect(vol)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "no volume".into());
        format!("volume {vol}: {v}")
    }

    /// Waits until Swarm's CreateVolume reached the plugin: the volume's CSI info has an ID.
    fn wait_created(&self, vol: &str) -> Value {
        wait_for(
            &format!("{vol} to leave pending creation"),
            90,
            || self.diag(vol),
            || {
                let v = self.inspect(vol)?;
                let id = v["ClusterVolume"]["Info"]["VolumeID"]
                    .as_str()
                    .unwrap_or("");
                (!id.is_empty()).then_some(v)
            },
        )
    }

    /// A one-replica service with the cluster volume at /data, running `script`.
    fn service(&self, svc: &str, vol: &str, script: &str) {
        let d = &self.docker;
        d.ok(&[
            "service",
            "create",
            "--detach",
            "--name",
            svc,
            "--label",
            &format!("stowage-test={}", self.label),
            "--restart-condition",
            "none",
            "--mount",
            &format!("type=cluster,src={vol},dst=/data"),
            &d.image,
            "sh",
            "-c",
            script,
        ]);
    }

    fn remove_service(&self, svc: &str) {
        let _ = self.docker.run(&["service", "rm", svc]);
        // The task's container goes before Swarm unpublishes the volume.
        wait_for(
            &format!("the containers of {svc} to go"),
            60,
            String::new,
            || {
                let ids = self.docker.ok(&[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=com.docker.swarm.service.name={svc}"),
                ]);
                ids.is_empty().then_some(())
            },
        );
    }

    /// `docker volume rm` of a cluster volume: drain it first (Swarm deletes only volumes no
    /// task uses), then wait for the engine to forget it (DeleteVolume answered).
    fn remove_volume(&self, vol: &str) {
        let d = &self.docker;
        let _ = d.run(&["volume", "update", "--availability", "drain", vol]);
        wait_for(
            &format!("{vol} to be removed"),
            90,
            || self.diag(vol),
            || {
                let _ = d.run(&["volume", "rm", vol]);
                self.inspect(vol).is_none().then_some(())
            },
        );
    }
}

impl Drop for CsiPlugin {
    fn drop(&mut self) {
        let d = &self.docker;
        let svcs = d.run(&[
            "service",
            "ls",
            "-q",
            "--filter",
            &format!("label=stowage-test={}", self.label),
        ]);
        for id in String::from_utf8_lossy(&svcs.stdout).split_whitespace() {
            let _ = d.run(&["service", "rm", id]);
        }
        let vols = d.run(&["volume", "ls", "-q", "--cluster"]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let Some(info) = self.inspect(v) else {
                continue;
            };
            if info["Driver"].as_str() == Some(self.name.as_str()) {
                let _ = d.run(&["volume", "update", "--availability", "drain", v]);
                let _ = d.run(&["volume", "rm", "-f", v]);
            }
        }
        let _ = d.run(&["plugin", "disable", "-f", &self.name]);
        let _ = d.run(&["plugin", "rm", "-f", &self.name]);
    }
}

/// The Swarm node's hostname, which Stowage reports as its node ID.
fn node_name(d: &Docker) -> String {
    d.ok(&["info", "--format", "{{.Name}}"])
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// One task writes a line, the restarted task reads it and writes another: the bytes live on
/// the backend, and a new task on the same volume sees them.
const TASK: &str =
    "n=$(cat /data/log 2>/dev/null | wc -l); echo \"task saw $n\" >> /data/log; sync; sleep 600";

#[test]
fn local_cluster_volume_serves_a_swarm_service() {
    let Some(docker) = cluster_docker() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let p = CsiPlugin::install(
        &docker,
        "backend: local\ninstances:\n  default:\n    baseDir: /var/lib/stowage/local\n",
        Some(data.path()),
    );
    let d = &p.docker;
    let vol = p.volume("lv");
    d.ok(&[
        "volume",
        "create",
        "--driver",
        &p.name,
        "--type",
        "mount",
        "--scope",
        "single",
        "--sharing",
        "onewriter",
        "--required-bytes",
        "8MiB",
        "--limit-bytes",
        "16MiB",
        &vol,
    ]);
    let v = p.wait_created(&vol);
    let info = &v["ClusterVolume"]["Info"];
    assert!(
        info["CapacityBytes"].as_i64().unwrap_or(0) >= 8 << 20,
        "{v}"
    );
    // (`volume ls --cluster` prints its own table; --format is not applied to it.)
    let listed = d.ok(&["volume", "ls", "--cluster"]);
    assert!(
        listed.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&vol.as_str())
                && f.contains(&p.name.as_str())
                && f.last() == Some(&"created")
        }),
        "{listed}"
    );
    let spec = &v["ClusterVolume"]["Spec"]["AccessMode"];
    assert_eq!(spec["Scope"], "single", "{v}");
    assert_eq!(spec["Sharing"], "onewriter", "{v}");
    let id = info["VolumeID"].as_str().unwrap();
    let dir = data.path().join(id.rsplit('/').next().unwrap());
    assert!(
        dir.is_dir(),
        "CreateVolume made {} on the host ({id})",
        dir.display()
    );

    let svc = format!("s{}", p.volume("w"));
    p.service(&svc, &vol, TASK);
    let log = dir.join("log");
    wait_for(
        "the first task's write",
        120,
        || p.diag(&vol),
        || (read(&log)? == "task saw 0\n").then_some(()),
    );
    // The task restarted: a new container on the same volume reads what the first wrote.
    d.ok(&["service", "update", "--detach", "--force", &svc]);
    wait_for(
        "the restarted task's read-back",
        120,
        || p.diag(&vol),
        || (read(&log)? == "task saw 0\ntask saw 1\n").then_some(()),
    );
    let v = p.inspect(&vol).unwrap();
    let published = v["ClusterVolume"]["PublishStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(published.iter().any(|s| s["State"] == "published"), "{v}");

    p.remove_service(&svc);
    p.remove_volume(&vol);
    assert!(!dir.exists(), "DeleteVolume removed {}", dir.display());
}
