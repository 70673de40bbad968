//! GlusterFS cluster volumes through the CSI plugin package (its root filesystem has the
//! GlusterFS FUSE client and CLI): the whole life against the real glusterd (bytes read on the
//! brick), topology requirements (GlusterFS volumes are reachable from every node: the plugin
//! reports no topology for them), and volume groups (`--group`, a service mounting
//! `group:<name>` gets one of the group's volumes).

use std::path::{Path, PathBuf};

use crate::gluster_common::{self, Gluster};
use crate::harness::*;

/// The plugin for one gluster base directory. glusterd takes management commands only on its
/// unix socket: the plugin's `data` mount brings the socket's directory in.
fn install(g: &Gluster, base: &str) -> CsiPlugin {
    let docker = cluster_docker().expect("checked by the caller");
    let sock_dir = g.sock.parent().unwrap_or(Path::new("/"));
    let sock_name = g.sock.file_name().unwrap().to_string_lossy();
    CsiPlugin::install(
        &docker,
        &format!(
            "backend: glusterfs\ninstances:\n  main:\n    servers: [{}]\n    volume: {}\n    baseDir: {base}\n    glusterd:\n      socket: /var/lib/stowage/local/{sock_name}\n    stateDir: /var/lib/stowage/gluster-state\n    mountOptions: [log-level=WARNING]\n",
            g.host, g.volume
        ),
        Some(sock_dir),
    )
}

/// The volume's directory on the brick, from its CSI volume ID (`<instance>/<dir>`).
fn on_brick(g: &Gluster, base: &str, id: &str) -> PathBuf {
    g.on_brick(base, id.rsplit('/').next().unwrap_or(id))
}

#[test]
fn glusterfs_cluster_volume_serves_a_swarm_service() {
    if cluster_docker().is_none() {
        return;
    }
    let Some(g) = gluster_common::gluster() else {
        return;
    };
    let base = gluster_common::unique("swarm");
    let p = install(&g, &base);
    exercise(
        &p,
        "gv",
        Backend {
            create: args(&[
                "--type",
                "mount",
                "--scope",
                "multi",
                "--sharing",
                "all",
                "--required-bytes",
                "8MiB",
                // GlusterFS volumes are reachable from every node: a preferred topology is
                // accepted and changes nothing (the volume reports no topology).
                "--topology-preferred",
                "topology.stowage.io/node=elsewhere",
            ]),
            read_log: &|id| read(&on_brick(&g, &base, id).join("log")),
            exists: &|id| on_brick(&g, &base, id).is_dir(),
        },
    );
}

#[test]
fn glusterfs_volume_group_serves_a_service() {
    if cluster_docker().is_none() {
        return;
    }
    let Some(g) = gluster_common::gluster() else {
        return;
    };
    let base = gluster_common::unique("swarmg");
    let p = install(&g, &base);
    let d = &p.docker;
    let group = p.volume("grp");
    let vols = [p.volume("g1"), p.volume("g2")];
    for v in &vols {
        p.create_mount(v, "single", "onewriter", "8MiB", &["--group", &group]);
    }
    let ids: Vec<String> = vols
        .iter()
        .map(|v| {
            let info = p.wait_created(v);
            assert_eq!(
                info["ClusterVolume"]["Spec"]["Group"],
                group.as_str(),
                "{info}"
            );
            info["ClusterVolume"]["Info"]["VolumeID"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // `volume ls --cluster` has a GROUP column.
    let listed = d.ok(&["volume", "ls", "--cluster"]);
    for v in &vols {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(v.as_str()) && l.contains(&group)),
            "{listed}"
        );
    }

    // A service mounting the group gets one of its volumes (Swarm picks a free one).
    let svc = format!("s{}", p.volume("gw"));
    p.service(&svc, &format!("group:{group}"), TASK);
    let used = wait_for(
        "the task's write on one volume of the group",
        120,
        || format!("{}\n{}", p.tasks(&svc), p.diag(&vols[0])),
        || {
            ids.iter().position(|id| {
                read(&on_brick(&g, &base, id).join("log")).as_deref() == Some("task saw 0\n")
            })
        },
    );
    assert!(p.published(&vols[used]), "{}", p.diag(&vols[used]));
    assert!(!p.published(&vols[1 - used]), "{}", p.diag(&vols[1 - used]));
    assert!(
        !on_brick(&g, &base, &ids[1 - used]).join("log").exists(),
        "the other volume of the group stays unused"
    );
    eprintln!("group: the service got {} of {:?}", vols[used], vols);

    p.remove_service(&svc);
    for (v, id) in vols.iter().zip(&ids) {
        p.remove_volume(v);
        assert!(
            !on_brick(&g, &base, id).exists(),
            "DeleteVolume removed {id}"
        );
    }
}
