//! The Stowage CSI node plugin: Identity and Node for one backend. Stages volumes (network
//! mounts, FUSE, bind mounts, loop or mapped block devices) and publishes them into pods.
//!
//! Besides CSI it does what sidecars do for other drivers: it registers itself with the
//! kubelet ([`registration`]) and answers the DaemonSet's liveness probe ([`health`]). Every
//! path a node call touches must lie under the kubelet directory ([`paths`]).

pub mod health;
pub mod node;
pub mod paths;
pub mod registration;

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
    paths: paths::PathPolicy,
) -> Routes {
    let identity =
        IdentityService::new(backend.driver_name(), true).with_group_controller(group_snapshots);
    Routes::new(IdentityServer::new(identity)).add_service(NodeServer::new(node::NodeService::new(
        backend,
        node_id,
        max_volumes,
        paths,
    )))
}
