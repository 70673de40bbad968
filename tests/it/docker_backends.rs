//! The Docker volume plugin on every network backend that mounts on this machine, under a real
//! dockerd: GlusterFS (FUSE), S3 on Ceph RGW (s3fs), Ceph RBD (rbd-fuse + loop + ext4). Each
//! goes through `docker volume create/inspect/ls`, a container writes, the next one reads it
//! back through a fresh mount, the bytes are checked on the storage server itself, and
//! `docker volume rm` removes the volume there.
//!
//! Needs the daemon (STOWAGE_DOCKER_HOST) and the backend's server (the same variables as the
//! backend's own tests). STOWAGE_REQUIRE_DOCKER / _GLUSTER / _S3 / _RBD make a missing one a
//! failure (tests/suites/70-docker.sh sets them for what it starts).

mod docker_common;
#[path = "gluster_common.rs"]
mod gluster_common;
#[path = "rbd_common.rs"]
mod rbd_common;
#[path = "s3_common.rs"]
mod s3_common;

use std::path::{Path, PathBuf};

use docker_common::{Docker, DockerPlugin, is_mounted};
use serde_json::Value;

/// Reads file `f` of the volume with this ID on the server; None when the volume is not there.
type ServerRead = Box<dyn Fn(&str) -> Option<Vec<u8>>>;

/// What a backend test supplies: its config, its secrets, and a look at the server.
struct Backend {
    config: PathBuf,
    secrets: Option<PathBuf>,
    read_on_server: ServerRead,
    /// Extra `-o` options for `docker volume create`.
    opts: Vec<String>,
    /// Appended to `-v vol:/data` (`:nocopy` where the server cannot hold the mode and owner
    /// Docker copies onto an empty volume from the image's directory).
    mount_suffix: &'static str,
    /// A secret value in `secrets` to scan for, and the directories (beside the test's own)
    /// where the plugin or its mount helpers may keep files.
    scan: Option<(String, Vec<PathBuf>)>,
}

fn write_secrets(dir: &Path, kv: &[(&str, &str)]) -> PathBuf {
    let p = dir.join("secrets.yaml");
    let text: String = kv.iter().map(|(k, v)| format!("{k}: \"{v}\"\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// Create, inspect, ls, write in one container, read in the next, bytes on the server, rm.
fn exercise(docker: &Docker, dir: &Path, b: Backend, driver_name: &str) {
    let mut args: Vec<String> = Vec::new();
    if let Some(s) = &b.secrets {
        args.extend(["--secrets-file".into(), s.to_string_lossy().into_owned()]);
    }
    let plugin = if b.scan.is_some() {
        DockerPlugin::start_for_docker_traced(dir, &b.config, &args).unwrap()
    } else {
        DockerPlugin::start_for_docker_with(dir, &b.config, &args).unwrap()
    };
    let label = docker_common::unique("t");
    let vol = format!("v{}", docker_common::unique("d").replace('-', ""));
    let cleanup = Cleanup {
        docker: docker.clone(),
        label: label.clone(),
        driver: plugin.name.clone(),
    };
    let d = docker;
    let mut create = vec![
        "volume".to_string(),
        "create".into(),
        "-d".into(),
        plugin.name.clone(),
        "-o".into(),
        "size=64Mi".into(),
    ];
    for o in &b.opts {
        create.extend(["-o".into(), o.clone()]);
    }
    create.push(vol.clone());
    d.ok(&create.iter().map(String::as_str).collect::<Vec<_>>());

    let v: Value = serde_json::from_str(&d.ok(&["volume", "inspect", &vol])).unwrap();
    let v = &v[0];
    assert_eq!(v["Driver"], plugin.name.as_str());
    assert_eq!(
        v["Scope"], "global",
        "a network volume is the same on every node"
    );
    assert_eq!(v["Status"]["backend"], driver_name);
    assert!(
        v["Status"]["capacityBytes"].as_u64().unwrap() >= 64 << 20,
        "{v}"
    );
    let volume_id = v["Status"]["volumeId"].as_str().unwrap().to_string();
    let listed = d.ok(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("driver={}", plugin.name),
    ]);
    assert!(listed.lines().any(|l| l == vol), "{listed}");

    let marker = format!("written through docker to {driver_name}");
    let run = |script: &str| {
        d.ok(&[
            "run",
            "--rm",
            "--label",
            &format!("stowage-test={label}"),
            "-v",
            &format!("{vol}:/data{}", b.mount_suffix),
            &d.image,
            "sh",
            "-c",
            script,
        ])
    };
    run(&format!("echo '{marker}' > /data/f && sync"));
    let mp = plugin.mounts.join(&vol);
    assert!(!is_mounted(&mp), "unmounted after the container");
    let on_server = (b.read_on_server)(&volume_id).expect("the volume exists on the server");
    let on_server = String::from_utf8_lossy(&on_server);
    assert!(
        on_server.contains(&marker),
        "the server holds the container's bytes: {on_server:?}"
    );
    assert_eq!(
        run("cat /data/f"),
        marker,
        "read back by the next container"
    );

    if let Some((secret, dirs)) = &b.scan {
        scan_for_secret(d, dir, &plugin, &vol, &label, b.mount_suffix, secret, dirs);
    }

    d.ok(&["volume", "rm", &vol]);
    assert!(
        (b.read_on_server)(&volume_id).is_none(),
        "docker volume rm deleted {volume_id} on the server"
    );
    // Staging and published mounts are gone (a backend's own long-lived mounts, such as the
    // GlusterFS controller's management mount, are not the volume's).
    let staging = plugin.state.join("staging");
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains(staging.to_str().unwrap()) || l.contains(plugin.mounts.to_str().unwrap())
        })
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    drop(cleanup);
}

/// R6 for the Docker plugin: while a container has the volume mounted, the secret is in no
/// command line or environment of the plugin or its mount helpers, and in no file but 0600
/// ones; after the container is gone no file holds it; the plugin's trace log never does.
#[allow(clippy::too_many_arguments)]
fn scan_for_secret(
    d: &Docker,
    dir: &Path,
    plugin: &DockerPlugin,
    vol: &str,
    label: &str,
    mount_suffix: &str,
    secret: &str,
    dirs: &[PathBuf],
) {
    use stowage_tests::secrets::{contains, files_containing, pids_with, processes_exposing};
    let needle = secret.as_bytes();
    assert!(
        needle.len() >= 8,
        "a secret this short would match by chance"
    );
    let id = d
        .ok(&[
            "run",
            "-d",
            "--label",
            &format!("stowage-test={label}"),
            "-v",
            &format!("{vol}:/data{mount_suffix}"),
            &d.image,
            "sleep",
            "120",
        ])
        .trim()
        .to_string();
    let mp = plugin.mounts.join(vol);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !is_mounted(&mp) {
        assert!(
            std::time::Instant::now() < deadline,
            "{vol} not mounted for the container"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The plugin and every helper it started name this test's directory on their command line.
    let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut pids = pids_with(&[&tag]);
    pids.extend(plugin.pid());
    assert!(pids.len() >= 2, "the plugin and its mount helper: {pids:?}");
    let exposed = processes_exposing(&pids, needle);
    assert!(exposed.is_empty(), "secret visible in {exposed:?}");
    // The test's own secrets file is the operator's input, not the plugin's doing.
    let own = dir.join("secrets.yaml");
    let holders = |dirs: &[PathBuf]| -> Vec<(PathBuf, u32)> {
        std::iter::once(dir.to_path_buf())
            .chain(dirs.iter().cloned())
            .flat_map(|x| files_containing(&x, needle))
            .filter(|(p, _)| *p != own && *p != plugin.log)
            .collect()
    };
    for (p, mode) in holders(dirs) {
        assert_eq!(
            mode & 0o077,
            0,
            "{} holds the secret and is {mode:o}",
            p.display()
        );
    }
    d.ok(&["rm", "-f", &id]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while is_mounted(&mp) {
        assert!(
            std::time::Instant::now() < deadline,
            "{vol} still mounted after the container"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = holders(dirs);
    assert!(
        left.is_empty(),
        "files holding the secret after unmount: {left:?}"
    );
    let log = std::fs::read(&plugin.log).unwrap();
    assert!(
        !contains(&log, needle),
        "secret in {}",
        plugin.log.display()
    );
    println!(
        "{vol}: {} trace log lines, 0 secret hits in logs, {} command lines and environments, no file left",
        log.split(|b| *b == b'\n').count(),
        pids.len()
    );
}

/// Removes what a failed test left in Docker before its plugin goes.
struct Cleanup {
    docker: Docker,
    label: String,
    driver: String,
}

impl Drop for Cleanup {
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
        let vols = d.run(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("driver={}", self.driver),
        ]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let _ = d.run(&["volume", "rm", "-f", v]);
        }
    }
}

fn last_component(id: &str) -> String {
    id.rsplit('/').next().unwrap_or_default().to_string()
}

#[test]
fn glusterfs_volume_through_docker() {
    let Some(docker) = Docker::from_env() else {
        return;
    };
    let Some(g) = gluster_common::gluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = gluster_common::unique("docker");
    let config = g.config(dir.path(), &base, "");
    let brick = g.brick.join(&base);
    exercise(
        &docker,
        dir.path(),
        Backend {
            config,
            secrets: None,
            scan: None,
            read_on_server: Box::new(move |id| {
                let d = brick.join(last_component(id));
                if !d.exists() {
                    return None;
                }
                Some(std::fs::read(d.join("f")).unwrap_or_default())
            }),
            opts: Vec::new(),
            mount_suffix: "",
        },
        "glusterfs.stowage.io",
    );
    // Gluster mounts of the test's state dir (the controller's management mount) go first;
    // its FUSE client may still write its log for a moment after the unmount.
    unmount_under(dir.path());
    for _ in 0..50 {
        let _ = std::fs::remove_dir_all(dir.path());
        if !dir.path().exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn s3_volume_through_docker() {
    let Some(docker) = Docker::from_env() else {
        return;
    };
    let Some(s3) = s3_common::s3_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s3.yaml");
    std::fs::write(
        &config,
        format!(
            "backend: s3\nnodeStateDir: {}\ninstances:\n  rgw:\n    endpoint: {}\n    pathStyle: true\n    timeoutSecs: 10\n",
            dir.path().join("node-state").display(),
            s3.endpoint
        ),
    )
    .unwrap();
    let secrets = write_secrets(
        dir.path(),
        &[
            ("accessKeyID", &s3.access_key),
            ("secretAccessKey", &s3.secret_key),
        ],
    );
    let secret_key = s3.secret_key.clone();
    let client = s3.client();
    let rt = std::sync::Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    exercise(
        &docker,
        dir.path(),
        Backend {
            config,
            secrets: Some(secrets),
            read_on_server: Box::new(move |id| {
                let bucket = id.split('/').nth(1).unwrap_or_default().to_string();
                rt.block_on(async {
                    if !s3_common::bucket_exists(&client, &bucket).await {
                        return None;
                    }
                    let keys = s3_common::keys(&client, &bucket, "").await;
                    if !keys.iter().any(|k| k == "f") {
                        return Some(Vec::new());
                    }
                    Some(s3_common::get(&client, &bucket, "f").await)
                })
            }),
            opts: Vec::new(),
            // An S3 bucket's root is no object: chmod on it fails (EIO), so Docker's copy of
            // the image directory's mode onto a new volume must be turned off.
            mount_suffix: ":nocopy",
            scan: Some((secret_key, Vec::new())),
        },
        "s3.stowage.io",
    );
    unmount_under(dir.path());
}

#[test]
fn rbd_volume_through_docker() {
    let Some(docker) = Docker::from_env() else {
        return;
    };
    let Some(env) = rbd_common::cluster() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("docker-rbd-")
        .tempdir_in(&env["CEPH_MNT_ROOT"])
        .unwrap();
    let config = rbd_common::config(&env, dir.path(), "docker", "");
    let run_dir = Path::new(&env["CEPH_MNT_ROOT"]).join(format!(
        "run-{}-docker",
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    let secrets = write_secrets(
        dir.path(),
        &[("userID", "admin"), ("userKey", &env["CEPH_ADMIN_KEY"])],
    );
    let conf = env["CEPH_CONF"].clone();
    exercise(
        &docker,
        dir.path(),
        Backend {
            config,
            secrets: Some(secrets),
            read_on_server: Box::new(move |id| {
                // The image's raw bytes straight from the cluster: the ext4 inside holds the
                // small file in one of its blocks.
                let image = last_component(id);
                let out = std::process::Command::new("rbd")
                    .args(["-c", &conf, "-p", "rbd", "export", &image, "-"])
                    .output()
                    .unwrap();
                out.status.success().then_some(out.stdout)
            }),
            opts: vec!["fsType=ext4".into()],
            mount_suffix: "",
            // rbd_common::config puts the run directory (rbd-fuse's keyring) beside the test's.
            scan: Some((env["CEPH_ADMIN_KEY"].clone(), vec![run_dir])),
        },
        "rbd.stowage.io",
    );
}

fn unmount_under(dir: &Path) {
    let root = dir.to_string_lossy().into_owned();
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mps: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&root))
        .map(String::from)
        .collect();
    mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mps {
        // A plain unmount first, so that a FUSE client exits before the directory goes; lazy
        // only when something still holds it.
        let ok = std::process::Command::new("umount")
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .args(["-l", &m])
                .status();
        }
    }
}
