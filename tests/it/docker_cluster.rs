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

#[path = "docker_cluster/availability.rs"]
mod availability;
#[path = "docker_cluster/gluster.rs"]
mod gluster;
#[path = "gluster_common.rs"]
mod gluster_common;
#[path = "docker_cluster/harness.rs"]
mod harness;
#[path = "docker_cluster/stack.rs"]
mod stack;

use harness::*;

#[test]
fn local_cluster_volume_serves_a_swarm_service() {
    let Some(docker) = cluster_docker() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let p = CsiPlugin::install(&docker, LOCAL_CONFIG, Some(data.path()));
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

    // Topology: local volumes live on the plugin's node (the topology its NodeGetInfo
    // reports, topology.stowage.io/node=<node>). A requisite naming the node is met and the
    // volume reports the node as its accessible topology (Swarm then places its tasks there);
    // a preferred one naming another node is only a wish; a requisite naming only another
    // node cannot be met: the volume stays pending, the reason in the plugin log.
    let node = node_name(&p.docker);
    let here = format!("topology.stowage.io/node={node}");
    let elsewhere = "topology.stowage.io/node=elsewhere";
    for (base, flag, topo) in [
        ("treq", "--topology-required", here.as_str()),
        ("tpref", "--topology-preferred", elsewhere),
        ("tbad", "--topology-required", elsewhere),
    ] {
        let vol = p.volume(base);
        p.create_mount(&vol, "single", "none", "8MiB", &[flag, topo]);
        if base == "tbad" {
            wait_for(
                "the plugin's topology refusal in the engine log",
                90,
                String::new,
                || {
                    let text = std::fs::read_to_string(&log).ok()?;
                    text.lines()
                    .any(|l| l.contains(&format!("volume_id=\\\"{vol}\\\""))
                        && l.contains("accessibility_requirements: volumes of this plugin live on its node"))
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
            assert!(!dir_of(&vol).exists(), "nothing made on the backend");
            continue;
        }
        let v = p.wait_created(&vol);
        let top = &v["ClusterVolume"]["Info"]["AccessibleTopology"];
        assert_eq!(
            top[0]["Segments"]["topology.stowage.io/node"],
            node.as_str(),
            "{v}"
        );
        p.remove_volume(&vol);
    }
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
