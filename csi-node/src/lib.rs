//! The Stowage CSI node plugin: Identity and Node for one backend. Stages volumes (network
//! mounts, FUSE, bind mounts, loop or mapped block devices) and publishes them into pods.

pub mod node;

use std::sync::Arc;

use stowage_backends::NodeBackend;
use stowage_csi::identity::IdentityService;
use stowage_csi::v1::identity_server::IdentityServer;
use stowage_csi::v1::node_server::NodeServer;
use tonic::service::Routes;

pub fn routes(
    backend: Arc<dyn NodeBackend>,
    node_id: String,
    max_volumes: i64,
    group_snapshots: bool,
) -> Routes {
    let identity =
        IdentityService::new(backend.driver_name(), true).with_group_controller(group_snapshots);
    Routes::new(IdentityServer::new(identity)).add_service(NodeServer::new(node::NodeService::new(
        backend,
        node_id,
        max_volumes,
    )))
}
