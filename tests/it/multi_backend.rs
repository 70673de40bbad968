//! One stowage-controller and one stowage-node serving two backends at once (local and NFS
//! against the suite's nfs-ganesha), from one `backends:` configuration: one socket per
//! driver, each answering for its own backend, bytes checked on each backend; one kubelet
//! registration socket per driver and one /healthz for both; start-up refused for a
//! configuration with two entries of one kind and for a shared endpoint without `{driver}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_csi::endpoint::Endpoint;
use stowage_csi::pluginregistration as reg;
use stowage_csi::v1;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Nfs, Plugin, bin, controller_clients, is_root, nfs, node_client, wire};
use tonic::Code;

const LOCAL: &str = "local.stowage.io";
const NFS: &str = "nfs.stowage.io";

/// A `backends:` file: local under `dir/local`, NFS in `base` of the export (or, without a
/// server, an address nobody answers on: enough for what does not reach the server).
fn config(dir: &Path, n: Option<&Nfs>, base: &str) -> PathBuf {
    let nfs = match n {
        Some(n) => format!(
            "{{ server: {}, export: {}, baseDir: {base}, nfsPort: {}, mountPort: {}, timeoutSecs: 5 }}",
            n.server, n.export, n.port, n.mount_port
        ),
        None => "{ server: 127.0.0.1, export: /export, nfsPort: 1, mountPort: 1 }".into(),
    };
    let cfg = dir.join("multi.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backends:\n  - backend: local\n    instances:\n      default: {{ baseDir: {} }}\n  - backend: nfs\n    instances:\n      main: {nfs}\n",
            dir.join("local").display()
        ),
    )
    .unwrap();
    cfg
}

fn sock(dir: &Path, role: &str, driver: &str) -> Endpoint {
    Endpoint::Unix(dir.join(role).join(format!("{driver}.sock")))
}

fn controller(dir: &Path, cfg: &Path) -> Plugin {
    let endpoint = format!("unix://{}/ctl/{{driver}}.sock", dir.display());
    Plugin::spawn(
        "stowage-controller",
        dir,
        &endpoint,
        &["--config", &cfg.to_string_lossy()],
    )
    .unwrap()
}

/// The node, with `dir` as its kubelet root and `extra` flags.
fn node(dir: &Path, cfg: &Path, extra: &[&str]) -> Plugin {
    let endpoint = format!("unix://{}/node/{{driver}}.sock", dir.display());
    let root = dir.to_string_lossy();
    let mut args = vec![
        "--config",
        cfg.to_str().unwrap(),
        "--node-id",
        "node-1",
        "--kubelet-root",
        &root,
    ];
    args.extend_from_slice(extra);
    Plugin::spawn("stowage-node", dir, &endpoint, &args).unwrap()
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("multi-{}-{:x}", std::process::id(), t % 0xffff_ffff)
}

async fn plugin_name(ch: tonic::transport::Channel) -> String {
    IdentityClient::new(ch)
        .get_plugin_info(v1::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name
}

fn stage_req(vol: &v1::Volume, staging: &Path) -> v1::NodeStageVolumeRequest {
    v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

fn publish_req(vol: &v1::Volume, staging: &Path, target: &Path) -> v1::NodePublishVolumeRequest {
    v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

/// NodeUnpublish, then NodeUnstage.
async fn take_down(
    node: &mut v1::node_client::NodeClient<tonic::transport::Channel>,
    vol: &v1::Volume,
    staging: &Path,
    target: &Path,
) {
    node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(!target.exists(), "{} left behind", target.display());
}

fn kernel_has_nfs() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|f| {
            f.lines()
                .any(|l| l.split_whitespace().last() == Some("nfs"))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn one_controller_and_one_node_serve_local_and_nfs() {
    let Some(n) = nfs() else { return };
    assert!(is_root(), "this test mounts; run it as root");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = unique();
    let cfg = config(d, Some(&n), &base);
    let mut ctl = controller(d, &cfg);
    let mut nd = node(d, &cfg, &["--kubelet-registration=false"]);

    // One socket per driver in each role, each naming its own driver.
    let mut ctl_ch = Vec::new();
    let mut node_ch = Vec::new();
    for driver in [LOCAL, NFS] {
        let c = ctl.ready_at(&sock(d, "ctl", driver)).await.unwrap();
        let m = nd.ready_at(&sock(d, "node", driver)).await.unwrap();
        assert_eq!(plugin_name(c.clone()).await, driver);
        assert_eq!(plugin_name(m.clone()).await, driver);
        ctl_ch.push(c);
        node_ch.push(m);
    }
    let mut local = controller_clients(ctl_ch[0].clone());
    let mut nfsc = controller_clients(ctl_ch[1].clone());
    let mut local_node = node_client(node_ch[0].clone());
    let mut nfs_node = node_client(node_ch[1].clone());

    // The same name on both drivers: two volumes, each on its own backend.
    let name = "pvc-multi";
    let lv = local
        .controller
        .create_volume(wire::create(name, 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let nv = nfsc
        .controller
        .create_volume(wire::create(name, 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(lv.volume_id, format!("default/{name}"));
    assert_eq!(nv.volume_id, format!("main/{name}"));
    let local_dir = d.join("local").join(name);
    let nfs_dir = n.export_dir.join(&base).join(name);
    assert!(
        local_dir.is_dir(),
        "no local volume at {}",
        local_dir.display()
    );
    assert!(nfs_dir.is_dir(), "no NFS volume at {}", nfs_dir.display());
    assert!(nv.volume_context["share"].ends_with(&format!("/{base}/{name}")));

    // Each node socket answers for its backend: local has node topology, NFS has none.
    let li = local_node
        .node_get_info(v1::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let ni = nfs_node
        .node_get_info(v1::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (li.node_id.as_str(), ni.node_id.as_str()),
        ("node-1", "node-1")
    );
    assert_eq!(
        li.accessible_topology.unwrap().segments["topology.stowage.io/node"],
        "node-1"
    );
    assert!(ni.accessible_topology.is_none_or(|t| t.segments.is_empty()));

    // Local: stage, publish, write through the pod's path, bytes in the base directory.
    let local_staging = d.join("staging/local");
    let local_target = d.join("pods/local/mount");
    std::fs::create_dir_all(&local_staging).unwrap();
    local_node
        .node_stage_volume(stage_req(&lv, &local_staging))
        .await
        .unwrap();
    local_node
        .node_publish_volume(publish_req(&lv, &local_staging, &local_target))
        .await
        .unwrap();
    std::fs::write(local_target.join("data"), b"local bytes").unwrap();
    assert_eq!(
        std::fs::read(local_dir.join("data")).unwrap(),
        b"local bytes"
    );
    assert!(!nfs_dir.join("data").exists(), "local write landed on NFS");

    // NFS: a block capability is refused by the NFS backend (the local one takes it).
    let mut block = stage_req(&nv, &d.join("staging/nfs-block"));
    block.volume_capability = Some(wire::block_cap(Mode::SingleNodeWriter));
    let st = nfs_node.node_stage_volume(block).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message()
            .contains("NFS volumes cannot be used as raw block"),
        "{st:?}"
    );

    // NFS: stage mounts the volume's share. A pod's bytes on the server come back through the
    // mount and back the other way, where the kernel has an NFS client (the node VM suite);
    // on a host without one, the answer is mount.nfs's failure on exactly that share.
    std::fs::write(nfs_dir.join("from-server"), b"nfs bytes").unwrap();
    let staging = d.join("staging/nfs");
    let target = d.join("pods/nfs/mount");
    std::fs::create_dir_all(&staging).unwrap();
    let source = format!("{}:{}", n.server, nv.volume_context["share"]);
    match nfs_node.node_stage_volume(stage_req(&nv, &staging)).await {
        Ok(_) => {
            nfs_node
                .node_publish_volume(publish_req(&nv, &staging, &target))
                .await
                .unwrap();
            assert_eq!(
                std::fs::read(target.join("from-server")).unwrap(),
                b"nfs bytes"
            );
            std::fs::write(target.join("from-pod"), b"pod bytes").unwrap();
            assert_eq!(
                std::fs::read(nfs_dir.join("from-pod")).unwrap(),
                b"pod bytes"
            );
            take_down(&mut nfs_node, &nv, &staging, &target).await;
        }
        Err(st) => {
            assert!(
                !kernel_has_nfs(),
                "stage failed with a kernel NFS client: {st:?}"
            );
            assert!(
                st.message().contains(&format!("mounting {source}")),
                "{st:?}"
            );
        }
    }

    take_down(&mut local_node, &lv, &local_staging, &local_target).await;
    for (c, v) in [(&mut local, &lv), (&mut nfsc, &nv)] {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!local_dir.exists());
    assert!(!nfs_dir.exists());

    // Every request span names its driver.
    let log = ctl.log_text();
    for driver in [LOCAL, NFS] {
        assert!(
            log.lines()
                .any(|l| l.contains("volume ready") && l.contains(&format!("driver=\"{driver}\""))),
            "no CreateVolume line naming {driver}:\n{log}"
        );
    }

    // SIGTERM stops both drivers of each process and removes all four sockets.
    drop((local, nfsc, local_node, nfs_node, ctl_ch, node_ch));
    assert!(ctl.terminate().await, "controller did not stop");
    assert!(nd.terminate().await, "node did not stop");
    for role in ["ctl", "node"] {
        for driver in [LOCAL, NFS] {
            let Endpoint::Unix(p) = sock(d, role, driver) else {
                unreachable!()
            };
            assert!(!p.exists(), "{} left behind", p.display());
        }
    }
    let _ = std::fs::remove_dir_all(n.export_dir.join(&base));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /healthz`: the status code and the body, or None while nothing listens.
fn healthz(port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(conn, "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_registration_socket_per_driver_and_one_healthz_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, nfs().as_ref(), &unique());
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let mut nd = node(
        d,
        &cfg,
        &[
            "--health-address",
            &health,
            "--kubelet-registration-path",
            "/var/lib/kubelet/plugins/{driver}/csi.sock",
        ],
    );
    for driver in [LOCAL, NFS] {
        nd.ready_at(&sock(d, "node", driver)).await.unwrap();
    }
    let mut clients = Vec::new();
    for driver in [LOCAL, NFS] {
        let path = d.join(format!("plugins_registry/{driver}-reg.sock"));
        let ch = stowage_csi::client::connect_with_retry(
            &Endpoint::Unix(path.clone()),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut c = reg::registration_client::RegistrationClient::new(ch);
        let info = c.get_info(reg::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, driver);
        assert_eq!(
            info.endpoint,
            format!("/var/lib/kubelet/plugins/{driver}/csi.sock")
        );
        clients.push(c);
    }
    let regs: Vec<_> = std::fs::read_dir(d.join("plugins_registry"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(regs.len(), 2, "{regs:?}");

    // Unhealthy until the kubelet registered both; the reason names the driver still missing.
    let (code, body) = wait_for("/healthz answering", || healthz(port)).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("not registered with the kubelet yet"),
        "{body}"
    );
    clients[0]
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let (code, body) = healthz(port).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("{NFS}: not registered")), "{body}");
    clients[1]
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let (code, body) = healthz(port).unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    drop(clients);
    assert!(nd.terminate().await, "node did not stop");
    for driver in [LOCAL, NFS] {
        assert!(
            !d.join(format!("plugins_registry/{driver}-reg.sock"))
                .exists()
        );
        assert!(!d.join(format!("node/{driver}.sock")).exists());
    }
}

/// Runs `binary` to completion (bounded) and returns its exit status and output.
fn run(binary: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(bin(binary).unwrap())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{binary} {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

#[test]
fn configuration_errors_stop_the_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two = config(d, None, "x");
    let cfg = two.to_string_lossy().into_owned();
    let shared = format!("unix://{}/csi.sock", d.display());
    let per_driver = format!("unix://{}/{{driver}}.sock", d.display());

    // Several backends on one --endpoint without {driver}: both roles refuse, naming the flag.
    let common = ["--config", cfg.as_str(), "--endpoint", shared.as_str()];
    let node_args = [&common[..], &["--node-id", "n"]].concat();
    for (binary, args) in [
        ("stowage-controller", &common[..]),
        ("stowage-node", &node_args),
    ] {
        let (status, out) = run(binary, args);
        assert!(!status.success(), "{binary}: {out}");
        assert!(
            out.contains(&format!("--endpoint \"{shared}\" must contain {{driver}}")),
            "{binary}: {out}"
        );
        assert!(out.contains("local.stowage.io, nfs.stowage.io"), "{out}");
    }
    let (status, out) = run(
        "stowage-node",
        &[
            "--config",
            &cfg,
            "--endpoint",
            &per_driver,
            "--node-id",
            "n",
            "--kubelet-root",
            &d.to_string_lossy(),
            "--kubelet-registration-path",
            "/var/lib/kubelet/plugins/stowage/csi.sock",
        ],
    );
    assert!(!status.success(), "{out}");
    assert!(out.contains("--kubelet-registration-path"), "{out}");
    assert!(!d.join("local.stowage.io.sock").exists());

    // Two entries of one kind.
    let dup = d.join("dup.yaml");
    std::fs::write(
        &dup,
        std::fs::read_to_string(&two).unwrap()
            + "  - backend: local\n    instances:\n      other: { baseDir: /tmp/other }\n",
    )
    .unwrap();
    let (status, out) = run(
        "stowage-controller",
        &[
            "--config",
            &dup.to_string_lossy(),
            "--endpoint",
            &per_driver,
        ],
    );
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("backends[2].backend: local is already configured by backends[0]"),
        "{out}"
    );
    // Nothing was served.
    assert!(!d.join("local.stowage.io.sock").exists());
}
