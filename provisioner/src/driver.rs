//! The CSI driver as the provisioner sees it: `stowage-controller`'s socket, with the
//! Identity and Controller calls external-provisioner makes plus Stowage's RecycleVolume.
//!
//! The channel connects lazily and reconnects by itself, so a controller restart (or a socket
//! that appears late) costs failed calls that are retried, never a provisioner restart.

use std::collections::BTreeMap;
use std::time::Duration;

use stowage_csi::endpoint::Endpoint;
use stowage_csi::stowage_v1;
use stowage_csi::stowage_v1::stowage_client::StowageClient;
use stowage_csi::v1;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::controller_service_capability::rpc::Type as Rpc;
use stowage_csi::v1::identity_client::IdentityClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::plan::DriverCaps;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("CSI endpoint: {0}")]
    Endpoint(#[from] stowage_csi::ClientError),
    #[error("{call} timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("{call}: rpc error: code = {code:?} desc = {message}", code = .status.code(), message = .status.message())]
    Rpc { call: &'static str, status: Status },
    #[error("the driver at {0} did not answer GetPluginInfo with a name")]
    NoName(Endpoint),
}

impl DriverError {
    /// Worth retrying later (the driver or its backend may come back), as opposed to a
    /// refusal of this exact request.
    pub fn is_transient(&self) -> bool {
        match self {
            DriverError::Rpc { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::ResourceExhausted
                    | Code::Internal
                    | Code::Unknown
                    | Code::Cancelled
            ),
            DriverError::Timeout { .. } | DriverError::Endpoint(_) => true,
            DriverError::NoName(_) => false,
        }
    }

    pub fn code(&self) -> Option<Code> {
        match self {
            DriverError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A connected driver: its name and capabilities (asked once at start) and the channel.
#[derive(Clone)]
pub struct Driver {
    channel: Channel,
    pub name: String,
    pub caps: DriverCaps,
    timeout: Duration,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("name", &self.name)
            .field("caps", &self.caps)
            .finish()
    }
}

fn req<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

impl Driver {
    /// Connects and asks the driver who it is; retries for up to `wait` while the plugin is
    /// still starting (external-provisioner waits for its driver the same way).
    pub async fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        wait: Duration,
    ) -> Result<Self, DriverError> {
        let channel = stowage_csi::client::tonic_endpoint(endpoint)?
            .timeout(timeout)
            .connect_lazy();
        let deadline = tokio::time::Instant::now() + wait;
        let mut driver = Driver {
            channel,
            name: String::new(),
            caps: DriverCaps::default(),
            timeout,
        };
        loop {
            match driver.discover().await {
                Ok(()) => break,
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, %endpoint, "waiting for the CSI driver");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        if driver.name.is_empty() {
            return Err(DriverError::NoName(endpoint.clone()));
        }
        Ok(driver)
    }

    async fn call<F, T>(&self, call: &'static str, fut: F) -> Result<T, DriverError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // The gRPC deadline travels with the request; this bounds the wait on our side too
        // (connecting to a socket that never answers).
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), fut).await {
            Err(_) => Err(DriverError::Timeout {
                call,
                after: self.timeout,
            }),
            Ok(Err(status)) => Err(DriverError::Rpc { call, status }),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    async fn discover(&mut self) -> Result<(), DriverError> {
        let mut id = IdentityClient::new(self.channel.clone());
        let info = self
            .call(
                "GetPluginInfo",
                id.get_plugin_info(req(v1::GetPluginInfoRequest {}, self.timeout)),
            )
            .await?;
        let plugin = self
            .call(
                "GetPluginCapabilities",
                id.get_plugin_capabilities(req(v1::GetPluginCapabilitiesRequest {}, self.timeout)),
            )
            .await?;
        let topology = plugin.capabilities.iter().any(|c| {
            matches!(
                &c.r#type,
                Some(v1::plugin_capability::Type::Service(s))
                    if s.r#type == v1::plugin_capability::service::Type::VolumeAccessibilityConstraints as i32
            )
        });
        let mut ctl = ControllerClient::new(self.channel.clone());
        let rpcs: Vec<i32> = self
            .call(
                "ControllerGetCapabilities",
                ctl.controller_get_capabilities(req(
                    v1::ControllerGetCapabilitiesRequest {},
                    self.timeout,
                )),
            )
            .await?
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(v1::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        self.name = info.name;
        self.caps = DriverCaps {
            single_node_multi_writer: rpcs.contains(&(Rpc::SingleNodeMultiWriter as i32)),
            topology,
            clone: rpcs.contains(&(Rpc::CloneVolume as i32)),
            publish_unpublish: rpcs.contains(&(Rpc::PublishUnpublishVolume as i32)),
            publish_readonly: rpcs.contains(&(Rpc::PublishReadonly as i32)),
            expand: rpcs.contains(&(Rpc::ExpandVolume as i32)),
            snapshot: rpcs.contains(&(Rpc::CreateDeleteSnapshot as i32)),
            list_snapshots: rpcs.contains(&(Rpc::ListSnapshots as i32)),
        };
        Ok(())
    }

    pub async fn create_volume(
        &self,
        request: v1::CreateVolumeRequest,
    ) -> Result<v1::Volume, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let resp = self
            .call(
                "CreateVolume",
                ctl.create_volume(req(request, self.timeout)),
            )
            .await?;
        resp.volume.ok_or_else(|| DriverError::Rpc {
            call: "CreateVolume",
            status: Status::internal("the driver returned no volume"),
        })
    }

    pub async fn delete_volume(
        &self,
        volume_id: &str,
        secrets: BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        self.call(
            "DeleteVolume",
            ctl.delete_volume(req(
                v1::DeleteVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    secrets: secrets.into_iter().collect(),
                },
                self.timeout,
            )),
        )
        .await
        .map(|_| ())
    }

    pub async fn recycle_volume(
        &self,
        volume_id: &str,
        secrets: BTreeMap<String, String>,
        context: BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let mut st = StowageClient::new(self.channel.clone());
        self.call(
            "RecycleVolume",
            st.recycle_volume(req(
                stowage_v1::RecycleVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    secrets: secrets.into_iter().collect(),
                    volume_context: context.into_iter().collect(),
                },
                self.timeout,
            )),
        )
        .await
        .map(|_| ())
    }

    /// Makes the volume usable on a node; returns the publish context (VolumeAttachment's
    /// attachmentMetadata).
    pub async fn controller_publish(
        &self,
        request: v1::ControllerPublishVolumeRequest,
    ) -> Result<BTreeMap<String, String>, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let r = self
            .call(
                "ControllerPublishVolume",
                ctl.controller_publish_volume(req(request, self.timeout)),
            )
            .await?;
        Ok(r.publish_context.into_iter().collect())
    }

    pub async fn controller_unpublish(
        &self,
        request: v1::ControllerUnpublishVolumeRequest,
    ) -> Result<(), DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        self.call(
            "ControllerUnpublishVolume",
            ctl.controller_unpublish_volume(req(request, self.timeout)),
        )
        .await
        .map(|_| ())
    }

    /// Grows the volume; returns the new size and whether the node must grow the filesystem.
    pub async fn controller_expand(
        &self,
        request: v1::ControllerExpandVolumeRequest,
    ) -> Result<(u64, bool), DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let r = self
            .call(
                "ControllerExpandVolume",
                ctl.controller_expand_volume(req(request, self.timeout)),
            )
            .await?;
        Ok((
            u64::try_from(r.capacity_bytes).unwrap_or(0),
            r.node_expansion_required,
        ))
    }

    /// Every volume the driver lists, all pages.
    pub async fn list_volumes(&self) -> Result<Vec<v1::Volume>, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .call(
                    "ListVolumes",
                    ctl.list_volumes(req(
                        v1::ListVolumesRequest {
                            max_entries: 500,
                            starting_token: token.clone(),
                        },
                        self.timeout,
                    )),
                )
                .await?;
            out.extend(page.entries.into_iter().filter_map(|e| e.volume));
            if page.next_token.is_empty() {
                return Ok(out);
            }
            token = page.next_token;
        }
    }

    /// Whether the driver confirms it can serve `volume_id` with these capabilities; the
    /// refusal message otherwise.
    pub async fn validate(
        &self,
        volume_id: &str,
        context: BTreeMap<String, String>,
        capabilities: Vec<v1::VolumeCapability>,
    ) -> Result<Result<(), String>, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let r = self
            .call(
                "ValidateVolumeCapabilities",
                ctl.validate_volume_capabilities(req(
                    v1::ValidateVolumeCapabilitiesRequest {
                        volume_id: volume_id.to_owned(),
                        volume_context: context.into_iter().collect(),
                        volume_capabilities: capabilities,
                        ..Default::default()
                    },
                    self.timeout,
                )),
            )
            .await?;
        Ok(match r.confirmed {
            Some(_) => Ok(()),
            None if r.message.is_empty() => Err("not confirmed".into()),
            None => Err(r.message),
        })
    }

    /// Takes a snapshot (idempotent by name: the same name answers with the same snapshot).
    pub async fn create_snapshot(
        &self,
        request: v1::CreateSnapshotRequest,
    ) -> Result<v1::Snapshot, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let r = self
            .call(
                "CreateSnapshot",
                ctl.create_snapshot(req(request, self.timeout)),
            )
            .await?;
        r.snapshot.ok_or_else(|| DriverError::Rpc {
            call: "CreateSnapshot",
            status: Status::internal("the driver returned no snapshot"),
        })
    }

    pub async fn delete_snapshot(
        &self,
        snapshot_id: &str,
        secrets: BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        self.call(
            "DeleteSnapshot",
            ctl.delete_snapshot(req(
                v1::DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.to_owned(),
                    secrets: secrets.into_iter().collect(),
                },
                self.timeout,
            )),
        )
        .await
        .map(|_| ())
    }

    /// One snapshot by ID (ListSnapshots with snapshot_id); None when the driver has no such
    /// snapshot.
    pub async fn get_snapshot(
        &self,
        snapshot_id: &str,
    ) -> Result<Option<v1::Snapshot>, DriverError> {
        let mut ctl = ControllerClient::new(self.channel.clone());
        let r = self
            .call(
                "ListSnapshots",
                ctl.list_snapshots(req(
                    v1::ListSnapshotsRequest {
                        snapshot_id: snapshot_id.to_owned(),
                        ..Default::default()
                    },
                    self.timeout,
                )),
            )
            .await?;
        Ok(r.entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .find(|s| s.snapshot_id == snapshot_id))
    }
}
