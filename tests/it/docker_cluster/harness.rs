//! The harness of the cluster-volume tests: the CSI plugin package installed in the engine,
//! the engine's view of cluster volumes, bounded waits.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::docker_common::{self, Docker};

pub fn cluster_docker() -> Option<Docker> {
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
pub fn wait_for<T>(
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
pub struct CsiPlugin {
    pub docker: Docker,
    pub name: String,
    pub label: String,
    pub _dir: tempfile::TempDir,
}

impl CsiPlugin {
    /// Builds the package around the stowage-docker binary of this build and `config` (as the
    /// plugin sees it), plus `binds` of host directories (the `data` mount's source).
    pub fn install(docker: &Docker, config: &str, data: Option<&Path>) -> CsiPlugin {
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
        // Docker refuses a second plugin whose root filesystem layer is byte-identical to an
        // installed one's ("content sha256:... already exists"); a file naming the plugin
        // keeps each test's package its own.
        std::fs::write(pkg.join("rootfs/etc/stowage-plugin-name"), &name).unwrap();
        let p = CsiPlugin {
            docker: docker.clone(),
            name: name.clone(),
            label: docker_common::unique("t"),
            _dir: dir,
        };
        let d = &p.docker;
        {
            // Two `docker plugin create` at once send ~300 MB each through one engine: one at
            // a time keeps either from timing out under load.
            static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            d.ok(&["plugin", "create", &name, pkg.to_str().unwrap()]);
        }
        let mut set = vec![
            "plugin".to_string(),
            "set".into(),
            name.clone(),
            format!("config.source={}", etc.display()),
        ];
        // The data mount is a bind mount, so its source must exist even for backends that
        // never use it.
        let data = data
            .map(Path::to_path_buf)
            .unwrap_or_else(|| p._dir.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        set.push(format!("data.source={}", data.display()));
        set.push(format!("NODE_ID={}", node_name(d)));
        d.ok(&set.iter().map(String::as_str).collect::<Vec<_>>());
        d.ok(&["plugin", "enable", &name]);
        p
    }

    /// `docker volume create --driver <this plugin> --type mount --scope <scope> --sharing
    /// <sharing> --required-bytes <bytes> <more...> <vol>`.
    pub fn create_mount(&self, vol: &str, scope: &str, sharing: &str, bytes: &str, more: &[&str]) {
        let mut a = vec![
            "volume",
            "create",
            "--driver",
            &self.name,
            "--type",
            "mount",
            "--scope",
            scope,
            "--sharing",
            sharing,
            "--required-bytes",
            bytes,
        ];
        a.extend_from_slice(more);
        a.push(vol);
        self.docker.ok(&a);
    }

    pub fn volume(&self, base: &str) -> String {
        format!("{base}-{}", self.label.rsplit('-').next().unwrap_or("x"))
    }

    /// The cluster volumes Swarm knows, by name.
    pub fn cluster_volumes(&self) -> Vec<String> {
        let out = self.docker.run(&["volume", "ls", "--cluster"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }

    /// `docker volume inspect` of a cluster volume, None when Swarm does not know it. (Asked
    /// only for a listed name: for an unknown one the engine asks every volume driver it has
    /// seen, and waits out each legacy plugin whose socket is gone — the earlier tests'.)
    pub fn inspect(&self, vol: &str) -> Option<Value> {
        if !self.cluster_volumes().iter().any(|v| v == vol) {
            return None;
        }
        let out = self.docker.run(&["volume", "inspect", vol]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v[0].clone())
    }

    /// The engine's view, for failure messages: the volume, the plugin's recent log lines.
    pub fn diag(&self, vol: &str) -> String {
        let v = self
            .inspect(vol)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "no volume".into());
        format!("volume {vol}: {v}")
    }

    /// Waits until Swarm's CreateVolume reached the plugin: the volume's CSI info has an ID.
    pub fn wait_created(&self, vol: &str) -> Value {
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

    /// A one-replica service with the cluster volume at /data, running `script`, never
    /// restarted by Swarm.
    pub fn service(&self, svc: &str, vol: &str, script: &str) {
        self.service_with(svc, vol, script, &["--restart-condition", "none"]);
    }

    /// A service with the cluster volume at /data, running `script`, with more `flags` for
    /// `docker service create`.
    pub fn service_with(&self, svc: &str, vol: &str, script: &str, flags: &[&str]) {
        let label = format!("stowage-test={}", self.label);
        let mount = format!("type=cluster,src={vol},dst=/data");
        let mut a = vec![
            "service", "create", "--detach", "--name", svc, "--label", &label,
        ];
        a.extend_from_slice(flags);
        // The image is local to the engine: nothing to resolve in a registry.
        a.extend_from_slice(&["--no-resolve-image", "--mount", &mount, &self.docker.image]);
        a.extend_from_slice(&["sh", "-c", script]);
        self.docker.ok(&a);
    }

    /// The states and errors of a service's tasks (`docker service ps`), one line each.
    pub fn tasks(&self, svc: &str) -> String {
        let out = self.docker.run(&[
            "service",
            "ps",
            "--no-trunc",
            "--format",
            "{{.DesiredState}}|{{.CurrentState}}|{{.Error}}",
            svc,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The containers of service `svc` that run.
    pub fn running(&self, svc: &str) -> Vec<String> {
        self.docker
            .ok(&[
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.swarm.service.name={svc}"),
            ])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether Swarm reports the volume published to some node.
    pub fn published(&self, vol: &str) -> bool {
        self.inspect(vol)
            .and_then(|v| {
                v["ClusterVolume"]["PublishStatus"]
                    .as_array()
                    .map(|a| a.iter().any(|s| s["State"] == "published"))
            })
            .unwrap_or(false)
    }

    pub fn remove_service(&self, svc: &str) {
        let _ = self.docker.run(&["service", "rm", svc]);
        self.wait_containers_gone(svc);
    }

    /// Waits until no container of service `svc` is left (running or not).
    pub fn wait_containers_gone(&self, svc: &str) {
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
    pub fn remove_volume(&self, vol: &str) {
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
        for v in &self.cluster_volumes() {
            let Some(info) = self.inspect(v) else {
                continue;
            };
            if info["Driver"].as_str() == Some(self.name.as_str()) {
                let _ = d.run(&["volume", "update", "--availability", "drain", v.as_str()]);
                let _ = d.run(&["volume", "rm", "-f", v.as_str()]);
            }
        }
        let _ = d.run(&["plugin", "disable", "-f", &self.name]);
        let _ = d.run(&["plugin", "rm", "-f", &self.name]);
    }
}

/// The local backend as the package sees it: its baseDir is the `data` mount.
pub const LOCAL_CONFIG: &str =
    "backend: local\ninstances:\n  default:\n    baseDir: /var/lib/stowage/local\n";

/// The CSI volume ID of a created volume (`docker volume inspect` output).
pub fn volume_id(v: &Value) -> String {
    v["ClusterVolume"]["Info"]["VolumeID"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The Swarm node's hostname, which Stowage reports as its node ID.
pub fn node_name(d: &Docker) -> String {
    d.ok(&["info", "--format", "{{.Name}}"])
}

pub fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// One task writes a line, the restarted task reads it and writes another: the bytes live on
/// the backend, and a new task on the same volume sees them.
pub const TASK: &str =
    "n=$(cat /data/log 2>/dev/null | wc -l); echo \"task saw $n\" >> /data/log; sync; sleep 600";

/// How a test looks at the backend itself.
pub struct Backend<'a> {
    /// `docker volume create` arguments beyond the driver and name.
    pub create: Vec<String>,
    /// The volume's `log` file as stored on the backend (None: not there).
    pub read_log: &'a dyn Fn(&str) -> Option<String>,
    /// Whether the volume with this CSI ID still exists on the backend.
    pub exists: &'a dyn Fn(&str) -> bool,
}

/// The whole cluster-volume life through Swarm: create, listed with its CSI info, a service
/// task writes, the restarted task reads back, drained and removed (gone from the backend).
pub fn exercise(p: &CsiPlugin, base: &str, b: Backend) {
    let d = &p.docker;
    let vol = p.volume(base);
    let mut args = vec![
        "volume".to_string(),
        "create".into(),
        "--driver".into(),
        p.name.clone(),
    ];
    args.extend(b.create.iter().cloned());
    args.push(vol.clone());
    let t0 = Instant::now();
    d.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let v = p.wait_created(&vol);
    eprintln!(
        "{base}: created by Swarm in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
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
    let id = info["VolumeID"].as_str().unwrap().to_string();
    assert!((b.exists)(&id), "CreateVolume made {id} on the backend");

    let svc = format!("s{}", p.volume(&format!("{base}w")));
    let t0 = Instant::now();
    p.service(&svc, &vol, TASK);
    wait_for(
        "the first task's write",
        120,
        || p.diag(&vol),
        || ((b.read_log)(&id)? == "task saw 0\n").then_some(()),
    );
    eprintln!(
        "{base}: service created to first write on the backend in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let v = p.inspect(&vol).unwrap();
    let published = v["ClusterVolume"]["PublishStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(published.iter().any(|s| s["State"] == "published"), "{v}");
    // The task restarted: a new container on the same volume reads what the first wrote.
    let t0 = Instant::now();
    d.ok(&["service", "update", "--detach", "--force", &svc]);
    wait_for(
        "the restarted task's read-back",
        120,
        || p.diag(&vol),
        || ((b.read_log)(&id)? == "task saw 0\ntask saw 1\n").then_some(()),
    );
    eprintln!(
        "{base}: task restarted and read back in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    p.remove_service(&svc);
    p.remove_volume(&vol);
    assert!(
        !(b.exists)(&id),
        "DeleteVolume removed {id} from the backend"
    );
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub fn d_ok(p: &CsiPlugin, a: &[&str]) -> String {
    p.docker.ok(a)
}

/// dockerd's log (plugins log through it): tests/infra/docker.sh keeps it beside the socket.
pub fn dockerd_log() -> std::path::PathBuf {
    let host = std::env::var("STOWAGE_DOCKER_HOST").unwrap();
    let sock = Path::new(host.trim_start_matches("unix://"));
    sock.with_file_name("dockerd.log")
}

/// Swarm secrets removed when the test ends.
pub struct Secrets {
    pub docker: Docker,
    pub names: Vec<String>,
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.docker.run(&["secret", "rm", n]);
        }
    }
}

/// The nodes a directory-store volume (local, GlusterFS) is ControllerPublished to, from the
/// backend's own records under `<base>/.stowage/volumes/`: None when no record has `path`.
pub fn publish_record(base: &Path, path: &str) -> Option<Vec<String>> {
    let rd = std::fs::read_dir(base.join(".stowage/volumes")).ok()?;
    rd.flatten().find_map(|e| {
        let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
        (v["path"].as_str() == Some(path)).then(|| {
            v["published"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        })
    })
}
