//! `stowage-docker csi`: the one socket a Swarm cluster-volume plugin (Docker ≥ 23) serves,
//! carrying Identity, Controller, Stowage and Node together. Docker 20.10 on these machines
//! has no cluster volumes, so the endpoint is checked the way Docker would use it: every
//! service over the same connection, a volume created, staged, published, written (bytes
//! checked on the backend), torn down and deleted. Local backend, real mounts; needs root.

use std::process::{Command, Stdio};

use stowage_csi::endpoint::Endpoint;
use stowage_csi::stowage_v1;
use stowage_csi::v1;
use stowage_csi::v1::plugin_capability::service::Type as ServiceType;
use stowage_tests::{Plugin, bin, controller_clients, is_root, local_config, node_client, wire};

#[tokio::test]
async fn one_socket_serves_controller_and_node() {
    assert!(is_root(), "this test mounts; run it as root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = local_config(dir.path(), &base).unwrap();
    let sock = dir.path().join("csi.sock");
    let log = dir.path().join("stowage-docker-csi.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("stowage-docker").unwrap())
        .args(["csi", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--config")
        .arg(&cfg)
        .args(["--node-id", "swarm-node-1"])
        // Swarm's paths lie under the plugin's /data; here under the test directory.
        .arg("--volume-root")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut plugin = Plugin {
        child,
        endpoint: Endpoint::Unix(sock.clone()),
        log,
    };
    let ch = plugin.ready().await.unwrap();
    let mut c = controller_clients(ch.clone());
    let mut n = node_client(ch);

    let info = c
        .identity
        .get_plugin_info(v1::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "local.stowage.io");
    let caps = c
        .identity
        .get_plugin_capabilities(v1::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let has_controller = caps.capabilities.iter().any(|cap| {
        matches!(&cap.r#type, Some(v1::plugin_capability::Type::Service(s))
            if s.r#type == ServiceType::ControllerService as i32)
    });
    assert!(has_controller, "Swarm needs CONTROLLER_SERVICE: {caps:?}");
    let node = n
        .node_get_info(v1::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, "swarm-node-1");

    let vol = c
        .controller
        .create_volume(wire::create("swarm-vol", 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.capacity_bytes, 16 << 20);
    let staging = dir.path().join("staging");
    let target = dir.path().join("published");
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::write(target.join("task-output"), "from a swarm task").unwrap();
    assert_eq!(
        std::fs::read_to_string(base.join("swarm-vol/task-output")).unwrap(),
        "from a swarm task"
    );
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(dir.path().to_str().unwrap()))
        .count();
    assert_eq!(mounted, 0);

    // Stowage's Recycle rides on the same socket.
    c.stowage
        .recycle_volume(stowage_v1::RecycleVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!base.join("swarm-vol/task-output").exists());
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!base.join("swarm-vol").exists());
    assert!(plugin.terminate().await, "graceful stop on SIGTERM");
    assert!(!sock.exists(), "socket removed on exit");
}
