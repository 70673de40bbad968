//! The CSI endpoint for Swarm cluster volumes (Docker ≥ 23, managed plugin with interface
//! types `docker.csicontroller/1.0` and `docker.csinode/1.0`).
//!
//! Docker connects to one socket for both roles, whereas Kubernetes deployments run
//! `stowage-controller` and `stowage-node` apart. This serves the very same services on one
//! socket: the controller plugin's routes (Identity, Controller, GroupController where
//! snapshots exist, Stowage's Recycle) plus the node plugin's Node service. Nothing here is
//! new CSI logic.

use std::sync::Arc;
use std::time::Duration;

use stowage_backends::{ControllerBackend, NodeBackend, NodeInfo};
use stowage_csi::v1::node_server::NodeServer;
use tonic::service::Routes;

pub fn routes(
    controller: Arc<dyn ControllerBackend>,
    node: Arc<dyn NodeBackend>,
    node_id: String,
    max_volumes: i64,
    paths: stowage_node::paths::PathPolicy,
) -> Routes {
    // Volumes of a backend with node topology (local) exist on this node only: the controller
    // says so in CreateVolume, so Swarm places their tasks here and honours requisite
    // topologies.
    let topology = node.topology(&node_id);
    stowage_controller::routes_on_node(controller, topology).add_service(NodeServer::new(
        stowage_node::node::NodeService::new(node, node_id, max_volumes, paths),
    ))
}

/// Registers this node with the backend (ControllerPublish refuses nodes it has never heard
/// of), retrying in the background until it succeeds: a storage server that is down at start
/// must not keep the plugin from starting.
pub fn register_in_background(controller: Arc<dyn ControllerBackend>, node: NodeInfo) {
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        loop {
            match controller.register_node(&node).await {
                Ok(()) => {
                    tracing::info!(node_id = %node.node_id, "node registered with the backend");
                    return;
                }
                Err(e) => {
                    tracing::warn!(node_id = %node.node_id, error = %e, retry_in_s = wait.as_secs(), "node registration failed");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    });
}
