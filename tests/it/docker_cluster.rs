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
#[path = "s3_common.rs"]
mod s3_common;

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

    fn volume(&self, base: &str) -> String {
        format!("{base}-{}", self.label.rsplit('-').next().unwrap_or("x"))
    }

    /// The cluster volumes Swarm knows, by name.
    fn cluster_volumes(&self) -> Vec<String> {
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
    fn inspect(&self, vol: &str) -> Option<Value> {
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
            // The image is local to the engine: nothing to resolve in a registry.
            "--no-resolve-image",
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

/// How a test looks at the backend itself.
struct Backend<'a> {
    /// `docker volume create` arguments beyond the driver and name.
    create: Vec<String>,
    /// The volume's `log` file as stored on the backend (None: not there).
    read_log: &'a dyn Fn(&str) -> Option<String>,
    /// Whether the volume with this CSI ID still exists on the backend.
    exists: &'a dyn Fn(&str) -> bool,
}

/// The whole cluster-volume life through Swarm: create, listed with its CSI info, a service
/// task writes, the restarted task reads back, drained and removed (gone from the backend).
fn exercise(p: &CsiPlugin, base: &str, b: Backend) {
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

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

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
    // The local backend's volume ID is <instance>/<name>: a directory in the data mount.
    let dir_of = |id: &str| data.path().join(id.rsplit('/').next().unwrap_or(id));
    exercise(
        &p,
        "lv",
        Backend {
            create: args(&[
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
            ]),
            read_log: &|id| read(&dir_of(id).join("log")),
            exists: &|id| dir_of(id).is_dir(),
        },
    );

    // A capability the backend cannot serve (raw block images live on one node: no multi-node
    // writers). Swarm's CreateVolume is asynchronous, so the volume stays "pending creation",
    // nothing is made on the backend, and the plugin's log (in dockerd's) names the field.
    let vol = p.volume("bad");
    d_ok(
        &p,
        &[
            "volume",
            "create",
            "--driver",
            &p.name,
            "--type",
            "block",
            "--scope",
            "multi",
            "--sharing",
            "all",
            "--required-bytes",
            "8MiB",
            &vol,
        ],
    );
    let log = dockerd_log();
    wait_for(
        "the plugin's refusal in the engine log",
        90,
        String::new,
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines()
            .any(|l| l.contains(&format!("volume_id=\\\"{vol}\\\"")) && l.contains("code=InvalidArgument")
                && l.contains("invalid volume_capabilities: raw block volumes are image files on one node"))
            .then_some(())
        },
    );
    let v = p.inspect(&vol).unwrap();
    assert_eq!(
        v["ClusterVolume"]["Info"]["VolumeID"]
            .as_str()
            .unwrap_or(""),
        "",
        "{v}"
    );
    let listed = p.docker.ok(&["volume", "ls", "--cluster"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&vol) && l.ends_with("pending creation")),
        "{listed}"
    );
    assert!(!dir_of(&vol).exists(), "nothing made on the backend");
}

fn d_ok(p: &CsiPlugin, a: &[&str]) -> String {
    p.docker.ok(a)
}

/// dockerd's log (plugins log through it): tests/infra/docker.sh keeps it beside the socket.
fn dockerd_log() -> std::path::PathBuf {
    let host = std::env::var("STOWAGE_DOCKER_HOST").unwrap();
    let sock = Path::new(host.trim_start_matches("unix://"));
    sock.with_file_name("dockerd.log")
}

#[test]
fn s3_cluster_volume_with_swarm_secrets() {
    let Some(docker) = cluster_docker() else {
        return;
    };
    let Some(s3) = s3_common::s3_env() else {
        return;
    };
    // Credentials are Swarm secrets named on the volume (`--secret key=secret`): Swarm hands
    // them to CreateVolume, NodeStage, NodePublish and DeleteVolume as CSI secrets. Nothing
    // secret is in the plugin's settings or the volume's options.
    let p = CsiPlugin::install(
        &docker,
        &format!(
            "backend: s3\nnodeStateDir: /var/lib/stowage/s3\ninstances:\n  rgw:\n    endpoint: {}\n    pathStyle: true\n    timeoutSecs: 10\n",
            s3.endpoint
        ),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for (key, value) in [
        ("accessKeyID", &s3.access_key),
        ("secretAccessKey", &s3.secret_key),
    ] {
        let f = dir.path().join(key);
        std::fs::write(&f, value).unwrap();
        let name = p.volume(&format!("s3-{}", key.to_lowercase()));
        // A volume names its secrets by ID (the engine does not resolve names there).
        let id = p
            .docker
            .ok(&["secret", "create", &name, f.to_str().unwrap()]);
        names.push((key, id));
    }
    let _secrets = Secrets {
        docker: p.docker.clone(),
        names: names.iter().map(|(_, n)| n.clone()).collect(),
    };
    let client = s3.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The S3 volume ID is <instance>/<bucket>[/prefix]: the bucket holds the volume's files.
    let bucket_of = |id: &str| id.split('/').nth(1).unwrap_or_default().to_string();
    let mut create = args(&[
        "--type",
        "mount",
        "--scope",
        "multi",
        "--sharing",
        "all",
        "--required-bytes",
        "8MiB",
    ]);
    for (key, name) in &names {
        create.extend(["--secret".to_string(), format!("{key}={name}")]);
    }
    exercise(
        &p,
        "s3v",
        Backend {
            create,
            read_log: &|id| {
                rt.block_on(async {
                    let b = bucket_of(id);
                    if !s3_common::keys(&client, &b, "")
                        .await
                        .iter()
                        .any(|k| k == "log")
                    {
                        return None;
                    }
                    Some(
                        String::from_utf8_lossy(&s3_common::get(&client, &b, "log").await)
                            .into_owned(),
                    )
                })
            },
            exists: &|id| rt.block_on(s3_common::bucket_exists(&client, &bucket_of(id))),
        },
    );
    let log = std::fs::read_to_string(dockerd_log()).unwrap_or_default();
    assert!(
        !log.contains(&s3.secret_key),
        "the secret key reached the engine log"
    );
}

/// Swarm secrets removed when the test ends.
struct Secrets {
    docker: Docker,
    names: Vec<String>,
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.docker.run(&["secret", "rm", n]);
        }
    }
}
