//! The Stowage CSI controller plugin: Identity, Controller and Stowage's own `stowage.v1`
//! service (Recycle) over one socket, for one backend. It never mounts anything; it talks to
//! storage through the backend's API client.

pub mod controller;
pub mod group;
pub mod stowage;

use std::collections::BTreeMap;
use std::sync::Arc;

use stowage_backends::ControllerBackend;
use stowage_csi::identity::IdentityService;
use stowage_csi::stowage_v1::stowage_server::StowageServer;
use stowage_csi::v1::controller_server::ControllerServer;
use stowage_csi::v1::group_controller_server::GroupControllerServer;
use stowage_csi::v1::identity_server::IdentityServer;
use tonic::service::Routes;

/// All services of the controller plugin, ready to serve.
pub fn routes(backend: Arc<dyn ControllerBackend>) -> Routes {
    routes_on_node(backend, BTreeMap::new())
}

/// The same, for a controller that runs beside the node plugin of the node whose topology is
/// `node_topology` and whose volumes live on that node only (the local backend in Swarm's
/// one-socket CSI plugin): CreateVolume then honours requisite topologies and reports the
/// node as the volume's accessible topology, so the CO places its tasks there. Empty: volumes
/// are reachable from every node (network backends), as with [`routes`].
pub fn routes_on_node(
    backend: Arc<dyn ControllerBackend>,
    node_topology: BTreeMap<String, String>,
) -> Routes {
    // Group snapshots are built on single-volume snapshots: offered wherever those are.
    let groups = backend.features().snapshots;
    let identity = IdentityService::new(backend.driver_name(), true).with_group_controller(groups);
    let mut routes = Routes::new(IdentityServer::new(identity)).add_service(ControllerServer::new(
        controller::ControllerService::new(backend.clone()).on_node(node_topology),
    ));
    if groups {
        routes = routes.add_service(GroupControllerServer::new(
            group::GroupControllerService::new(backend.clone()),
        ));
    }
    routes.add_service(StowageServer::new(stowage::StowageService::new(backend)))
}
