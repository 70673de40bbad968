//! The Docker volume plugin over its real socket, without a Docker daemon: the real
//! `stowage-docker` binary on the local backend, real bind mounts, bytes checked in the
//! backend's base directory. Docker's own behaviour is covered by `docker_engine`.
//! Needs root (mounts).

mod docker_common;

use std::path::Path;

use docker_common::{DockerPlugin, is_mounted, local_config};
use serde_json::{Value, json};

fn setup() -> (tempfile::TempDir, DockerPlugin, std::path::PathBuf) {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mount; run them as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let (cfg, base) = local_config(dir.path()).unwrap();
    let sock = dir.path().join("plugin.sock");
    let p = DockerPlugin::start(dir.path(), &cfg, &sock).unwrap();
    (dir, p, base)
}

fn create(p: &DockerPlugin, name: &str, opts: Value) {
    p.ok("VolumeDriver.Create", json!({"Name": name, "Opts": opts}));
}

fn mount(p: &DockerPlugin, name: &str, id: &str) -> String {
    let v = p.ok("VolumeDriver.Mount", json!({"Name": name, "ID": id}));
    v["Mountpoint"].as_str().unwrap().to_string()
}

fn unmount(p: &DockerPlugin, name: &str, id: &str) {
    p.ok("VolumeDriver.Unmount", json!({"Name": name, "ID": id}));
}

fn names(p: &DockerPlugin) -> Vec<String> {
    let v = p.ok("VolumeDriver.List", json!({}));
    v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect()
}

fn write(mountpoint: &str, file: &str, data: &str) {
    std::fs::write(Path::new(mountpoint).join(file), data).unwrap();
}

#[test]
fn activate_and_scope() {
    let (_d, p, _base) = setup();
    let v = p.ok("Plugin.Activate", Value::Null);
    assert_eq!(v["Implements"], json!(["VolumeDriver"]));
    // Local volumes live on one node: Swarm must not treat them as shared.
    let v = p.ok("VolumeDriver.Capabilities", Value::Null);
    assert_eq!(v["Capabilities"]["Scope"], "local");
}

#[test]
fn reclaim_delete_retain_recycle() {
    let (_d, p, base) = setup();

    // delete (the default): the data goes with the name.
    create(&p, "del", json!({"size": "16Mi"}));
    let mp = mount(&p, "del", "c1");
    write(&mp, "f", "gone soon");
    assert_eq!(
        std::fs::read_to_string(base.join("del/f")).unwrap(),
        "gone soon"
    );
    unmount(&p, "del", "c1");
    p.ok("VolumeDriver.Remove", json!({"Name": "del"}));
    assert!(!base.join("del").exists());
    assert!(!names(&p).contains(&"del".to_string()));

    // retain: the data stays, the name is forgotten; creating the name again finds the data.
    create(&p, "keep", json!({"reclaim": "retain"}));
    let mp = mount(&p, "keep", "c1");
    write(&mp, "f", "kept");
    unmount(&p, "keep", "c1");
    p.ok("VolumeDriver.Remove", json!({"Name": "keep"}));
    assert_eq!(
        std::fs::read_to_string(base.join("keep/f")).unwrap(),
        "kept"
    );
    assert!(!names(&p).contains(&"keep".to_string()));
    let e = p.err("VolumeDriver.Get", json!({"Name": "keep"}));
    assert!(e.contains("no such volume: keep"), "{e}");
    create(&p, "keep", json!({"reclaim": "retain"}));
    let mp = mount(&p, "keep", "c2");
    assert_eq!(
        std::fs::read_to_string(Path::new(&mp).join("f")).unwrap(),
        "kept"
    );
    unmount(&p, "keep", "c2");

    // recycle: scrubbed, hidden from Docker, handed back empty to the next Create of the name.
    create(&p, "rec", json!({"reclaim": "recycle", "size": "8Mi"}));
    let mp = mount(&p, "rec", "c1");
    write(&mp, "secret", "old tenant");
    std::fs::create_dir(Path::new(&mp).join("sub")).unwrap();
    unmount(&p, "rec", "c1");
    p.ok("VolumeDriver.Remove", json!({"Name": "rec"}));
    assert!(base.join("rec").is_dir(), "recycled volume kept");
    assert_eq!(
        std::fs::read_dir(base.join("rec")).unwrap().count(),
        0,
        "and scrubbed"
    );
    assert!(!names(&p).contains(&"rec".to_string()));
    p.err("VolumeDriver.Mount", json!({"Name": "rec", "ID": "x"}));
    std::fs::write(base.join("rec/marker"), "same volume").unwrap();
    create(&p, "rec", json!({"reclaim": "recycle", "size": "8Mi"}));
    assert!(names(&p).contains(&"rec".to_string()));
    let mp = mount(&p, "rec", "c2");
    assert_eq!(
        std::fs::read_to_string(Path::new(&mp).join("marker")).unwrap(),
        "same volume",
        "the recycled volume itself is reused"
    );
    unmount(&p, "rec", "c2");
    // Different options: the scrubbed volume is replaced by a new one.
    p.ok("VolumeDriver.Remove", json!({"Name": "rec"}));
    create(&p, "rec", json!({"reclaim": "delete", "size": "4Mi"}));
    let v = p.ok("VolumeDriver.Get", json!({"Name": "rec"}));
    assert_eq!(v["Volume"]["Status"]["capacityBytes"], 4 << 20);
    assert_eq!(v["Volume"]["Status"]["reclaim"], "delete");
    assert!(!base.join("rec/marker").exists());
    p.ok("VolumeDriver.Remove", json!({"Name": "rec"}));
    assert!(!base.join("rec").exists());
}

#[test]
fn containers_share_one_mount_until_the_last_unmount() {
    let (_d, p, base) = setup();
    create(&p, "shared", json!({}));
    let a = mount(&p, "shared", "container-a");
    let b = mount(&p, "shared", "container-b");
    assert_eq!(a, b);
    assert!(is_mounted(Path::new(&a)));
    write(&a, "from-a", "1");
    assert_eq!(
        std::fs::read_to_string(Path::new(&b).join("from-a")).unwrap(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(base.join("shared/from-a")).unwrap(),
        "1"
    );
    let v = p.ok("VolumeDriver.Get", json!({"Name": "shared"}));
    assert_eq!(v["Volume"]["Mountpoint"], a.as_str());
    assert_eq!(v["Volume"]["Status"]["mounts"], 2);
    // Docker repeats Mount with the same ID after its own restart: no extra reference.
    mount(&p, "shared", "container-a");
    let e = p.err("VolumeDriver.Remove", json!({"Name": "shared"}));
    assert!(e.contains("in use by 2 container(s)"), "{e}");

    unmount(&p, "shared", "container-a");
    assert!(is_mounted(Path::new(&a)), "b still uses it");
    let v = p.ok("VolumeDriver.Path", json!({"Name": "shared"}));
    assert_eq!(v["Mountpoint"], a.as_str());
    unmount(&p, "shared", "container-b");
    assert!(!is_mounted(Path::new(&a)), "last unmount unmounts");
    let v = p.ok("VolumeDriver.Path", json!({"Name": "shared"}));
    assert_eq!(v["Mountpoint"], "");
    // Unmount repeated (Docker retries after errors): harmless.
    unmount(&p, "shared", "container-b");
    let staging_mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(p.state.to_str().unwrap()))
        .count();
    assert_eq!(staging_mounts, 0, "staging unmounted too");
    p.ok("VolumeDriver.Remove", json!({"Name": "shared"}));
    assert!(!base.join("shared").exists());
}

#[test]
fn state_and_mounts_survive_plugin_restarts() {
    let (_d, mut p, base) = setup();
    create(&p, "durable", json!({"size": "32Mi", "reclaim": "retain"}));
    create(&p, "idle", json!({}));
    let mp = mount(&p, "durable", "c1");
    mount(&p, "durable", "c2");

    // Graceful restart.
    p.restart().unwrap();
    assert!(is_mounted(Path::new(&mp)), "a restart leaves mounts alone");
    let mut n = names(&p);
    n.sort();
    assert_eq!(n, vec!["durable", "idle"]);
    let v = p.ok("VolumeDriver.Get", json!({"Name": "durable"}));
    assert_eq!(v["Volume"]["Mountpoint"], mp.as_str());
    assert_eq!(v["Volume"]["Status"]["mounts"], 2);
    assert_eq!(v["Volume"]["Status"]["reclaim"], "retain");
    assert_eq!(v["Volume"]["Status"]["capacityBytes"], 32 << 20);
    write(&mp, "after-restart", "still here");

    // A crash (SIGKILL): the stale socket is taken over, references are still known.
    p.crash();
    assert!(p.socket.exists(), "a killed plugin leaves its socket");
    p.start_again().unwrap();
    unmount(&p, "durable", "c1");
    assert!(is_mounted(Path::new(&mp)), "c2 still holds it");
    unmount(&p, "durable", "c2");
    assert!(!is_mounted(Path::new(&mp)));
    assert_eq!(
        std::fs::read_to_string(base.join("durable/after-restart")).unwrap(),
        "still here"
    );

    // Mounted, then the mount disappears while the plugin is down (a host reboot): the
    // references are dropped at start, so Remove is not blocked forever.
    mount(&p, "idle", "c9");
    p.crash();
    let idle_mp = p.mounts.join("idle");
    let st = std::process::Command::new("umount")
        .arg(&idle_mp)
        .status()
        .unwrap();
    assert!(st.success());
    let staging = p.state.join("staging/idle");
    let _ = std::process::Command::new("umount").arg(&staging).status();
    p.start_again().unwrap();
    let v = p.ok("VolumeDriver.Get", json!({"Name": "idle"}));
    assert_eq!(v["Volume"]["Status"]["mounts"], 0);
    p.ok("VolumeDriver.Remove", json!({"Name": "idle"}));
    assert!(!base.join("idle").exists());
}

#[test]
fn bad_requests_get_errors_that_name_the_problem() {
    let (_d, p, base) = setup();
    let cases: &[(Value, &str)] = &[
        (
            json!({"Name": "v", "Opts": {"size": "lots"}}),
            "invalid option size",
        ),
        (json!({"Name": "v", "Opts": {"size": "0"}}), "size above 0"),
        (
            json!({"Name": "v", "Opts": {"reclaim": "keep"}}),
            "expected delete, retain or recycle",
        ),
        (
            json!({"Name": "v", "Opts": {"accessMode": "RWX"}}),
            "ReadWriteMany",
        ),
        (
            json!({"Name": "v", "Opts": {"fstype": "xfs"}}),
            "did you mean fsType",
        ),
        (
            json!({"Name": "v", "Opts": {"colour": "blue"}}),
            "unknown parameter \"colour\"",
        ),
        (
            json!({"Name": "v", "Opts": {"onDelete": "shred"}}),
            "onDelete",
        ),
        (
            json!({"Name": "v", "Opts": {"instance": "nope"}}),
            "\"nope\" is not configured",
        ),
        (
            json!({"Name": "v", "Opts": {"volumeId": "default/missing"}}),
            "not a volume of the local.stowage.io backend",
        ),
        (
            json!({"Name": "v", "Opts": {"volumeId": "default/x", "size": "1Gi"}}),
            "cannot be combined with volumeId",
        ),
        (json!({"Name": "../etc", "Opts": {}}), "invalid volume name"),
        (json!({"Name": "", "Opts": {}}), "invalid volume name"),
        (
            json!({"Name": ".hidden", "Opts": {}}),
            "invalid volume name",
        ),
    ];
    for (body, want) in cases {
        let e = p.err("VolumeDriver.Create", body.clone());
        assert!(e.contains(want), "{body}: {e:?} does not say {want:?}");
    }
    // The unknown backend parameter error also tells which options the driver itself takes.
    let e = p.err(
        "VolumeDriver.Create",
        json!({"Name": "v", "Opts": {"colour": "blue"}}),
    );
    assert!(e.contains("size, fsType, mountOptions, reclaim"), "{e}");
    assert!(names(&p).is_empty(), "nothing was created");
    assert_eq!(
        std::fs::read_dir(&base)
            .map(|d| d
                .filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count())
            .unwrap_or(0),
        0,
        "no volume directory was made"
    );

    let e = p.err("VolumeDriver.Mount", json!({"Name": "ghost", "ID": "c"}));
    assert_eq!(e, "no such volume: ghost");
    create(&p, "v", json!({"size": "1Mi"}));
    let e = p.err("VolumeDriver.Mount", json!({"Name": "v"}));
    assert!(e.contains("ID"), "{e}");
    let e = p.err(
        "VolumeDriver.Create",
        json!({"Name": "v", "Opts": {"size": "2Mi"}}),
    );
    assert!(e.contains("already exists with options size=1Mi"), "{e}");
    // Same options, or none (docker run -v creating implicitly): the same volume.
    create(&p, "v", json!({"size": "1Mi"}));
    create(&p, "v", json!({}));
    p.ok("VolumeDriver.Create", json!({"Name": "v"}));
    // Removing what is not there is success: Docker may then forget it.
    p.ok("VolumeDriver.Remove", json!({"Name": "never-existed"}));
    let (status, v) =
        docker_common::call(&p.socket, "VolumeDriver.Create", &json!("not an object")).unwrap();
    assert_eq!(status, 400);
    assert!(
        v["Err"]
            .as_str()
            .unwrap()
            .contains("malformed VolumeDriver.Create request")
    );
    let (status, v) = docker_common::call(&p.socket, "VolumeDriver.Snapshot", &json!({})).unwrap();
    assert_eq!(status, 404);
    assert!(
        v["Err"]
            .as_str()
            .unwrap()
            .contains("not part of the volume plugin API")
    );
}

#[test]
fn concurrent_duplicates_make_one_volume_and_one_mount() {
    let (_d, p, base) = setup();
    let sock = p.socket.clone();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                docker_common::ok(
                    &sock,
                    "VolumeDriver.Create",
                    json!({"Name": "burst", "Opts": {"size": "8Mi"}}),
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(names(&p), vec!["burst"]);
    let mps: Vec<String> = (0..16)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                docker_common::ok(
                    &sock,
                    "VolumeDriver.Mount",
                    json!({"Name": "burst", "ID": format!("c{i}")}),
                )["Mountpoint"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(mps.iter().all(|m| *m == mps[0]));
    let mp = mps[0].clone();
    let stacked = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(mp.as_str()))
        .count();
    assert_eq!(stacked, 1, "one mount, not one per container");
    let v = p.ok("VolumeDriver.Get", json!({"Name": "burst"}));
    assert_eq!(v["Volume"]["Status"]["mounts"], 16);
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                docker_common::ok(
                    &sock,
                    "VolumeDriver.Unmount",
                    json!({"Name": "burst", "ID": format!("c{i}")}),
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(!is_mounted(Path::new(&mp)));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                docker_common::ok(&sock, "VolumeDriver.Remove", json!({"Name": "burst"}));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(names(&p).is_empty());
    assert!(!base.join("burst").exists());
}

#[test]
fn existing_volumes_are_adopted() {
    let (_d, p, base) = setup();
    // By name: a directory already on the backend (an admin's, or one a retained volume left).
    std::fs::create_dir_all(base.join("legacy")).unwrap();
    std::fs::write(base.join("legacy/data"), "from before").unwrap();
    create(&p, "legacy", json!({"reclaim": "retain"}));
    let mp = mount(&p, "legacy", "c1");
    assert_eq!(
        std::fs::read_to_string(Path::new(&mp).join("data")).unwrap(),
        "from before"
    );
    unmount(&p, "legacy", "c1");

    // By volume ID (static provisioning), under another name; retain is the default then.
    p.ok("VolumeDriver.Remove", json!({"Name": "legacy"}));
    create(&p, "alias", json!({"volumeId": "default/legacy"}));
    let v = p.ok("VolumeDriver.Get", json!({"Name": "alias"}));
    assert_eq!(v["Volume"]["Status"]["volumeId"], "default/legacy");
    assert_eq!(v["Volume"]["Status"]["adopted"], true);
    assert_eq!(v["Volume"]["Status"]["reclaim"], "retain");
    let mp = mount(&p, "alias", "c1");
    assert_eq!(
        std::fs::read_to_string(Path::new(&mp).join("data")).unwrap(),
        "from before"
    );
    // One backend volume, one name: a second would let its reclaim policy destroy this one.
    let e = p.err(
        "VolumeDriver.Create",
        json!({"Name": "alias2", "Opts": {"volumeId": "default/legacy"}}),
    );
    assert!(e.contains("already the Docker volume alias"), "{e}");
    unmount(&p, "alias", "c1");
    p.ok("VolumeDriver.Remove", json!({"Name": "alias"}));
    assert_eq!(
        std::fs::read_to_string(base.join("legacy/data")).unwrap(),
        "from before"
    );
}

#[test]
fn read_write_once_pod_admits_one_container() {
    let (_d, p, _base) = setup();
    create(&p, "solo", json!({"accessMode": "ReadWriteOncePod"}));
    mount(&p, "solo", "first");
    let e = p.err(
        "VolumeDriver.Mount",
        json!({"Name": "solo", "ID": "second"}),
    );
    assert!(e.contains("ReadWriteOncePod"), "{e}");
    mount(&p, "solo", "first");
    unmount(&p, "solo", "first");
    mount(&p, "solo", "second");
    unmount(&p, "solo", "second");

    // ReadOnlyMany publishes read-only.
    create(&p, "ro", json!({"accessMode": "ReadOnlyMany"}));
    let mp = mount(&p, "ro", "r1");
    let err = std::fs::write(Path::new(&mp).join("x"), "no").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    unmount(&p, "ro", "r1");
}
