//! The Identity service, the same for controller and node plugins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use crate::v1;
use crate::v1::plugin_capability::{Service, VolumeExpansion, service, volume_expansion};

/// What GetPluginInfo reports as vendor_version: set once by the binary at start (its
/// `--version` line, with the git commit; see the stowage-version crate), else the crate
/// version. Kept out of this library so a new commit does not rebuild it.
static VENDOR_VERSION: OnceLock<String> = OnceLock::new();

pub fn set_vendor_version(v: &str) {
    let _ = VENDOR_VERSION.set(v.to_owned());
}

pub fn vendor_version() -> String {
    VENDOR_VERSION
        .get()
        .cloned()
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

#[derive(Clone)]
pub struct IdentityService {
    driver: String,
    /// Advertise CONTROLLER_SERVICE. Both plugins of a driver say so: the capability describes
    /// the driver, and COs and csi-sanity ask whichever endpoint they hold.
    controller: bool,
    expansion_online: bool,
    topology: bool,
    group_controller: bool,
    ready: Arc<AtomicBool>,
}

impl IdentityService {
    pub fn new(driver: impl Into<String>, controller: bool) -> Self {
        IdentityService {
            driver: driver.into(),
            controller,
            expansion_online: true,
            topology: false,
            group_controller: false,
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Advertise GROUP_CONTROLLER_SERVICE (volume group snapshots).
    pub fn with_group_controller(mut self, on: bool) -> Self {
        self.group_controller = on;
        self
    }

    pub fn with_topology(mut self, on: bool) -> Self {
        self.topology = on;
        self
    }

    /// Probe answers ready=false until this flag is set (backends still connecting).
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }
}

#[tonic::async_trait]
impl v1::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<v1::GetPluginInfoRequest>,
    ) -> Result<Response<v1::GetPluginInfoResponse>, Status> {
        Ok(Response::new(v1::GetPluginInfoResponse {
            name: self.driver.clone(),
            vendor_version: vendor_version(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<v1::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<v1::GetPluginCapabilitiesResponse>, Status> {
        let mut caps = Vec::new();
        let svc = |t: service::Type| v1::PluginCapability {
            r#type: Some(v1::plugin_capability::Type::Service(Service {
                r#type: t as i32,
            })),
        };
        if self.controller {
            caps.push(svc(service::Type::ControllerService));
        }
        if self.group_controller {
            caps.push(svc(service::Type::GroupControllerService));
        }
        if self.topology {
            caps.push(svc(service::Type::VolumeAccessibilityConstraints));
        }
        if self.expansion_online {
            caps.push(v1::PluginCapability {
                r#type: Some(v1::plugin_capability::Type::VolumeExpansion(
                    VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            });
        }
        Ok(Response::new(v1::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(
        &self,
        _: Request<v1::ProbeRequest>,
    ) -> Result<Response<v1::ProbeResponse>, Status> {
        Ok(Response::new(v1::ProbeResponse {
            ready: Some(self.ready.load(Ordering::Relaxed)),
        }))
    }
}
