//! Stowage's Docker volume plugin under a real dockerd (Debian's docker.io, started by
//! tests/infra/docker.sh, reached through STOWAGE_DOCKER_HOST), driven with the docker CLI the
//! way users drive it: `docker volume create/inspect/ls/rm`, `docker run -v`, Swarm services.
//! Bytes are checked in the backend's base directory, mounts in the mount table.
//!
//! Skipped without a daemon; STOWAGE_REQUIRE_DOCKER=1 (the docker suite) makes that a failure.
//! The Swarm test runs when STOWAGE_DOCKER_SWARM=1 (the suite runs everything a second time
//! after `docker swarm init`).

mod docker_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use docker_common::{Docker, DockerPlugin, is_mounted, local_config};
use serde_json::Value;

/// A plugin registered with dockerd under a unique name, plus cleanup of whatever a test left
/// in Docker (containers, services, volumes) before the plugin goes away.
struct Session {
    docker: Docker,
    label: String,
    base: PathBuf,
    plugin: DockerPlugin,
    _dir: tempfile::TempDir,
}

impl Session {
    fn start() -> Option<Session> {
        let docker = Docker::from_env()?;
        assert!(rustix::process::geteuid().is_root(), "needs root");
        let dir = tempfile::tempdir().unwrap();
        let (cfg, base) = local_config(dir.path()).unwrap();
        let plugin = DockerPlugin::start_for_docker(dir.path(), &cfg).unwrap();
        Some(Session {
            docker,
            label: docker_common::unique("t"),
            base,
            plugin,
            _dir: dir,
        })
    }

    fn driver(&self) -> &str {
        &self.plugin.name
    }

    /// A volume name unique to this session: the suite runs every test twice against one
    /// dockerd, and Docker's volume names are daemon-wide.
    fn vol(&self, base: &str) -> String {
        format!("{base}-{}", self.label)
    }

    /// `docker run --rm` with the test's label, the volume at /data, a shell command.
    fn run(&self, volume: &str, script: &str) -> String {
        self.docker.ok(&[
            "run",
            "--rm",
            "--label",
            &format!("stowage-test={}", self.label),
            "--volume-driver",
            self.driver(),
            "-v",
            &format!("{volume}:/data"),
            &self.docker.image,
            "sh",
            "-c",
            script,
        ])
    }

    /// A long-running container holding the volume; returns its ID.
    fn run_detached(&self, volume: &str, script: &str) -> String {
        self.docker.ok(&[
            "run",
            "-d",
            "--label",
            &format!("stowage-test={}", self.label),
            "--volume-driver",
            self.driver(),
            "-v",
            &format!("{volume}:/data"),
            &self.docker.image,
            "sh",
            "-c",
            script,
        ])
    }

    fn inspect(&self, volume: &str) -> Value {
        let out = self.docker.ok(&["volume", "inspect", volume]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    fn volumes(&self) -> Vec<String> {
        self.docker
            .ok(&[
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("driver={}", self.driver()),
            ])
            .lines()
            .map(String::from)
            .collect()
    }

    fn mountpoint(&self, volume: &str) -> PathBuf {
        self.plugin.mounts.join(volume)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let d = &self.docker;
        let ids = d.run(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=stowage-test={}", self.label),
        ]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = d.run(&["rm", "-f", id]);
        }
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
        let vols = d.run(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("driver={}", self.plugin.name),
        ]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let _ = d.run(&["volume", "rm", "-f", v]);
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Polls `f` until it returns Some, at most `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn create_inspect_ls_run_rm() {
    let Some(s) = Session::start() else { return };
    let d = &s.docker;
    let (web, implicit) = (s.vol("web"), s.vol("implicit"));
    d.ok(&[
        "volume",
        "create",
        "-d",
        s.driver(),
        "-o",
        "size=64Mi",
        "-o",
        "onDelete=delete",
        &web,
    ]);
    let v = s.inspect(&web);
    assert_eq!(v["Driver"], s.driver());
    assert_eq!(v["Scope"], "local");
    assert_eq!(v["Options"]["size"], "64Mi");
    assert_eq!(v["Status"]["volumeId"], format!("default/{web}"));
    assert_eq!(v["Status"]["capacityBytes"], 64 << 20);
    assert_eq!(v["Status"]["backend"], "local.stowage.io");
    assert!(s.volumes().contains(&web));
    assert!(s.base.join(&web).is_dir());

    // Written by one container, read by the next; the bytes are on the backend.
    s.run(&web, "echo written-by-first > /data/hello");
    assert_eq!(read(&s.base.join(&web).join("hello")), "written-by-first\n");
    assert_eq!(s.run(&web, "cat /data/hello"), "written-by-first");
    assert!(
        !is_mounted(&s.mountpoint(&web)),
        "unmounted once no container runs"
    );

    // Two containers at once share one mount; it goes when the last one stops.
    let a = s.run_detached(&web, "echo a > /data/a; sleep 300");
    let b = s.run_detached(&web, "echo b > /data/b; sleep 300");
    wait_for("both containers' files", 30, || {
        (s.base.join(&web).join("a").exists() && s.base.join(&web).join("b").exists()).then_some(())
    });
    assert!(is_mounted(&s.mountpoint(&web)));
    assert_eq!(s.inspect(&web)["Status"]["mounts"], 2);
    let e = d.fails(&["volume", "rm", &web]);
    assert!(e.contains("in use"), "{e}");
    d.ok(&["rm", "-f", &a]);
    assert!(is_mounted(&s.mountpoint(&web)), "b still runs");
    assert_eq!(d.ok(&["exec", &b, "cat", "/data/a"]), "a");
    d.ok(&["rm", "-f", &b]);
    wait_for("the last unmount", 30, || {
        (!is_mounted(&s.mountpoint(&web))).then_some(())
    });

    // docker run -v creates a volume it does not know through the driver, with no options.
    s.run(&implicit, "echo x > /data/x");
    assert_eq!(read(&s.base.join(&implicit).join("x")), "x\n");
    assert_eq!(s.inspect(&implicit)["Status"]["reclaim"], "delete");

    d.ok(&["volume", "rm", &web, &implicit]);
    assert!(!s.volumes().iter().any(|v| *v == web || *v == implicit));
    assert!(
        !s.base.join(&web).exists(),
        "reclaim=delete removed the data"
    );
    assert!(!s.base.join(&implicit).exists());
}

#[test]
fn reclaim_retain_and_recycle_through_docker() {
    let Some(s) = Session::start() else { return };
    let d = &s.docker;
    let (kept, pool) = (s.vol("kept"), s.vol("pool"));
    d.ok(&[
        "volume",
        "create",
        "-d",
        s.driver(),
        "-o",
        "reclaim=retain",
        &kept,
    ]);
    s.run(&kept, "echo precious > /data/p");
    d.ok(&["volume", "rm", &kept]);
    assert!(!s.volumes().contains(&kept));
    assert_eq!(
        read(&s.base.join(&kept).join("p")),
        "precious\n",
        "retain keeps the data"
    );
    d.ok(&[
        "volume",
        "create",
        "-d",
        s.driver(),
        "-o",
        "reclaim=retain",
        &kept,
    ]);
    assert_eq!(
        s.run(&kept, "cat /data/p"),
        "precious",
        "and the name finds it again"
    );

    d.ok(&[
        "volume",
        "create",
        "-d",
        s.driver(),
        "-o",
        "reclaim=recycle",
        &pool,
    ]);
    s.run(&pool, "echo old-tenant > /data/secret; mkdir /data/d");
    d.ok(&["volume", "rm", &pool]);
    assert!(!s.volumes().contains(&pool));
    assert!(s.base.join(&pool).is_dir(), "recycle keeps the volume");
    assert_eq!(
        std::fs::read_dir(s.base.join(&pool)).unwrap().count(),
        0,
        "scrubbed"
    );
    d.ok(&[
        "volume",
        "create",
        "-d",
        s.driver(),
        "-o",
        "reclaim=recycle",
        &pool,
    ]);
    assert_eq!(s.run(&pool, "ls -A /data | wc -l"), "0");
}

#[test]
fn bad_options_reach_the_user_as_our_error() {
    let Some(s) = Session::start() else { return };
    let d = &s.docker;
    for (opt, want) in [
        (
            "size=lots",
            "invalid option size: \"lots\" is not a size such as 10Gi",
        ),
        ("reclaim=shred", "expected delete, retain or recycle"),
        ("colour=blue", "unknown parameter \"colour\""),
        ("fstype=xfs", "did you mean fsType?"),
    ] {
        let e = d.fails(&[
            "volume",
            "create",
            "-d",
            s.driver(),
            "-o",
            opt,
            &s.vol("bad"),
        ]);
        assert!(
            e.contains(want),
            "-o {opt}: docker said {e:?}, not {want:?}"
        );
    }
    assert!(s.volumes().is_empty());
    let e = d.fails(&["volume", "create", "-d", s.driver(), "..bad"]);
    assert!(
        e.contains("invalid volume name") || e.contains("..bad"),
        "{e}"
    );
}

#[test]
fn plugin_restart_while_a_container_holds_the_volume() {
    let Some(mut s) = Session::start() else {
        return;
    };
    let d = s.docker.clone();
    let db = s.vol("db");
    d.ok(&["volume", "create", "-d", s.driver(), &db]);
    let c = s.run_detached(&db, "echo before > /data/before; sleep 600");
    wait_for("the container's first write", 30, || {
        s.base.join(&db).join("before").exists().then_some(())
    });
    let mp = s.mountpoint(&db);
    assert!(is_mounted(&mp));

    s.plugin.restart().unwrap();
    assert!(is_mounted(&mp), "the mount outlives the plugin process");
    // The container keeps working through the restart.
    d.ok(&["exec", &c, "sh", "-c", "echo after > /data/after"]);
    assert_eq!(read(&s.base.join(&db).join("after")), "after\n");
    // Docker reaches the new process under the same name.
    assert_eq!(s.inspect(&db)["Status"]["mounts"], 1);
    assert!(s.volumes().contains(&db));

    // And the container's stop unmounts cleanly through the restarted plugin.
    d.ok(&["rm", "-f", &c]);
    wait_for("the unmount after the restart", 30, || {
        (!is_mounted(&mp)).then_some(())
    });
    let leftovers = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(s.plugin.state.to_str().unwrap()))
        .count();
    assert_eq!(leftovers, 0, "staging mount gone too");
    d.ok(&["volume", "rm", &db]);
    assert!(!s.base.join(&db).exists());
}

#[test]
fn swarm_service_replica_writes_to_a_volume() {
    let Some(s) = Session::start() else { return };
    let d = &s.docker;
    if std::env::var("STOWAGE_DOCKER_SWARM").as_deref() != Ok("1") {
        eprintln!(
            "skipped: swarm mode runs when STOWAGE_DOCKER_SWARM=1 (the docker suite's second pass)"
        );
        return;
    }
    assert!(
        d.swarm_active(),
        "STOWAGE_DOCKER_SWARM=1 but this dockerd is not in a swarm"
    );
    let svc = docker_common::unique("svc");
    let svcdata = s.vol("svcdata");
    d.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &svc,
        "--label",
        &format!("stowage-test={}", s.label),
        "--restart-condition",
        "none",
        "--mount",
        &format!(
            "type=volume,source={svcdata},target=/data,volume-driver={},volume-opt=size=16Mi,volume-opt=reclaim=delete",
            s.driver()
        ),
        &s.docker.image,
        "sh",
        "-c",
        "echo from-swarm-task > /data/out; sleep 2",
    ]);
    wait_for("the replica's write on the backend", 90, || {
        std::fs::read_to_string(s.base.join(&svcdata).join("out")).ok()
    });
    assert_eq!(
        read(&s.base.join(&svcdata).join("out")),
        "from-swarm-task\n"
    );
    let v = s.inspect(&svcdata);
    assert_eq!(
        v["Options"]["size"], "16Mi",
        "the service's volume-opt reached the driver"
    );
    assert_eq!(v["Status"]["capacityBytes"], 16 << 20);
    wait_for("the task to complete", 90, || {
        let st = d.ok(&["service", "ps", &svc, "--format", "{{.CurrentState}}"]);
        st.starts_with("Complete").then_some(())
    });
    wait_for("the task's unmount", 30, || {
        (!is_mounted(&s.mountpoint(&svcdata))).then_some(())
    });
    d.ok(&["service", "rm", &svc]);
    // The task container goes asynchronously; the volume can be removed once it has.
    wait_for("volume removal after the service", 60, || {
        d.run(&["volume", "rm", &svcdata])
            .status
            .success()
            .then_some(())
    });
    assert!(!s.base.join(&svcdata).exists());
}

/// A managed plugin removed (forced) when the test ends, whatever happened.
struct ManagedPlugin {
    docker: Docker,
    name: String,
    label: String,
}

impl Drop for ManagedPlugin {
    fn drop(&mut self) {
        let ids = self.docker.run(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=stowage-test={}", self.label),
        ]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker.run(&["rm", "-f", id]);
        }
        let vols = self.docker.run(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("driver={}", self.name),
        ]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let _ = self.docker.run(&["volume", "rm", "-f", v]);
        }
        let _ = self.docker.run(&["plugin", "rm", "-f", &self.name]);
    }
}

#[test]
fn managed_plugin_from_the_packaging() {
    let Some(docker) = Docker::from_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("plugin");
    let (etc, state, data) = (
        dir.path().join("etc"),
        dir.path().join("state"),
        dir.path().join("data"),
    );
    for d in [&etc, &state, &data] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The config as the plugin sees it: the data mount is its /var/lib/stowage/local.
    std::fs::write(
        etc.join("config.yaml"),
        "backend: local\ninstances:\n  default:\n    baseDir: /var/lib/stowage/local\n",
    )
    .unwrap();
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-plugin/packaging/build.sh");
    let out = std::process::Command::new(&build)
        .arg("--out")
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

    let name = format!("{}:latest", docker_common::unique("stowage-m"));
    let label = docker_common::unique("t");
    let plugin = ManagedPlugin {
        docker: docker.clone(),
        name: name.clone(),
        label: label.clone(),
    };
    let d = &plugin.docker;
    let labelled = format!("stowage-test={label}");
    let mvol = format!("mvol-{label}");
    d.ok(&["plugin", "create", &name, pkg.to_str().unwrap()]);
    d.ok(&[
        "plugin",
        "set",
        &name,
        &format!("config.source={}", etc.display()),
        &format!("state.source={}", state.display()),
        &format!("data.source={}", data.display()),
    ]);
    d.ok(&["plugin", "enable", &name]);

    d.ok(&["volume", "create", "-d", &name, "-o", "size=8Mi", &mvol]);
    let v: Value = serde_json::from_str(&d.ok(&["volume", "inspect", &mvol])).unwrap();
    assert_eq!(v[0]["Status"]["capacityBytes"], 8 << 20);
    let c = d.ok(&[
        "run",
        "-d",
        "--label",
        &labelled,
        "-v",
        &format!("{mvol}:/data"),
        &docker.image,
        "sh",
        "-c",
        "echo managed > /data/f; sleep 300",
    ]);
    wait_for("the managed plugin volume's write", 30, || {
        data.join(&mvol).join("f").exists().then_some(())
    });
    assert_eq!(read(&data.join(&mvol).join("f")), "managed\n");
    // The mount made inside the plugin (at its mount dir, under propagatedMount) reached the
    // host through the propagated mount, where dockerd binds it into containers from.
    let v: Value = serde_json::from_str(&d.ok(&["volume", "inspect", &mvol])).unwrap();
    assert_eq!(
        v[0]["Mountpoint"],
        format!("/mnt/stowage/{mvol}"),
        "Get reports the plugin's own path"
    );
    let id = d.ok(&["plugin", "inspect", "-f", "{{.Id}}", &name]);
    let root = d.ok(&["info", "-f", "{{.DockerRootDir}}"]);
    let host_mp = Path::new(&root)
        .join("plugins")
        .join(&id)
        .join("propagated-mount")
        .join(&mvol);
    assert!(
        is_mounted(&host_mp),
        "{} is not a mount on the host",
        host_mp.display()
    );
    assert_eq!(read(&host_mp.join("f")), "managed\n");
    d.ok(&["rm", "-f", &c]);
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "--label",
            &labelled,
            "-v",
            &format!("{mvol}:/data"),
            &docker.image,
            "cat",
            "/data/f"
        ]),
        "managed"
    );
    // Its records live in the state mount on the host, so they outlive the plugin's rootfs.
    assert!(state.join("volumes").join(format!("{mvol}.json")).exists());
    d.ok(&["volume", "rm", &mvol]);
    assert!(!data.join(&mvol).exists());
    d.ok(&["plugin", "disable", &name]);
}

#[test]
fn csi_plugin_package_serves_csi_under_docker() {
    // Docker 20.10 has no cluster volumes, but it runs managed plugins of any interface type:
    // the package must start under Docker's plugin runtime and serve CSI where Docker ≥ 23
    // would look for it (/run/docker/plugins/<plugin id>/<interface.socket>).
    let Some(docker) = Docker::from_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("plugin");
    let (etc, data) = (dir.path().join("etc"), dir.path().join("data"));
    for d in [&etc, &data] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        etc.join("config.yaml"),
        "backend: local\ninstances:\n  default:\n    baseDir: /var/lib/stowage/local\n",
    )
    .unwrap();
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-plugin/packaging/build.sh");
    let out = std::process::Command::new(&build)
        .args(["--kind", "csi", "--out"])
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
    let plugin = ManagedPlugin {
        docker: docker.clone(),
        name: name.clone(),
        label: docker_common::unique("t"),
    };
    let d = &plugin.docker;
    d.ok(&["plugin", "create", &name, pkg.to_str().unwrap()]);
    d.ok(&[
        "plugin",
        "set",
        &name,
        &format!("config.source={}", etc.display()),
        &format!("data.source={}", data.display()),
        "NODE_ID=swarm-node-7",
    ]);
    d.ok(&["plugin", "enable", &name]);
    let id = d.ok(&["plugin", "inspect", "-f", "{{.Id}}", &name]);
    let sock = Path::new(docker_common::DOCKER_PLUGIN_DIR)
        .join(&id)
        .join("stowage-csi.sock");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use stowage_csi::v1;
        let ep = stowage_csi::endpoint::Endpoint::Unix(sock.clone());
        let ch = stowage_csi::client::connect_with_retry(&ep, Duration::from_secs(30))
            .await
            .unwrap();
        let mut id_client = v1::identity_client::IdentityClient::new(ch.clone());
        let info = id_client
            .get_plugin_info(v1::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "local.stowage.io");
        let mut node = v1::node_client::NodeClient::new(ch.clone());
        let n = node
            .node_get_info(v1::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            n.node_id, "swarm-node-7",
            "NODE_ID set with docker plugin set"
        );
        let mut ctl = v1::controller_client::ControllerClient::new(ch);
        let vol = ctl
            .create_volume(stowage_tests::wire::create("cluster-vol", 8 << 20))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(
            data.join("cluster-vol").is_dir(),
            "created on the host through the plugin"
        );
        ctl.delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(!data.join("cluster-vol").exists());
    });
    d.ok(&["plugin", "disable", &name]);
}
