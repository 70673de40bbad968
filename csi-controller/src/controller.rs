//! The CSI Controller service: validates requests (status codes from the spec's error tables),
//! translates them, and hands them to the backend.

use std::collections::BTreeMap;
use std::sync::Arc;

use stowage_backends::types::{CreateVolume, SnapshotFilter};
use stowage_backends::{ControllerBackend, Error};
use stowage_csi::convert::{self, require};
use stowage_csi::redact::Redact;
use stowage_csi::v1;
use stowage_csi::v1::controller_service_capability::rpc::Type as Rpc;
use tonic::{Request, Response, Status};
use tracing::Span;

/// Longest volume or snapshot name accepted (the CSI spec's recommended bound, which
/// csi-sanity's maximum-length test uses).
pub const MAX_NAME_LEN: usize = 128;

pub struct ControllerService {
    backend: Arc<dyn ControllerBackend>,
    /// Non-empty: every volume lives on the one node with this topology (see
    /// `crate::routes_on_node`).
    node_topology: BTreeMap<String, String>,
}

impl ControllerService {
    pub fn new(backend: Arc<dyn ControllerBackend>) -> Self {
        ControllerService {
            backend,
            node_topology: BTreeMap::new(),
        }
    }

    /// Volumes live on the node with `topology` (empty: reachable from every node).
    pub fn on_node(mut self, topology: BTreeMap<String, String>) -> Self {
        self.node_topology = topology;
        self
    }

    /// A volume can only be made where the node is: refuses requisite topologies that all
    /// exclude it (a topology includes the node when each of its segments is the node's).
    fn check_requisite(&self, req: Option<&v1::TopologyRequirement>) -> Result<(), Status> {
        let Some(req) = req else {
            return Ok(());
        };
        if self.node_topology.is_empty() || req.requisite.is_empty() {
            return Ok(());
        }
        let includes = |t: &v1::Topology| {
            t.segments
                .iter()
                .all(|(k, v)| self.node_topology.get(k) == Some(v))
        };
        if req.requisite.iter().any(includes) {
            return Ok(());
        }
        let node = self
            .node_topology
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let wanted = req
            .requisite
            .iter()
            .map(|t| {
                t.segments
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect::<Vec<_>>()
            .join(" | ");
        Err(Status::resource_exhausted(format!(
            "accessibility_requirements: volumes of this plugin live on its node ({node}); no requisite topology ({wanted}) includes it"
        )))
    }

    fn rpcs(&self) -> Vec<Rpc> {
        let f = self.backend.features();
        let mut out = vec![Rpc::CreateDeleteVolume, Rpc::ListVolumes, Rpc::GetVolume];
        if f.capacity {
            out.push(Rpc::GetCapacity);
        }
        if f.snapshots {
            out.extend([Rpc::CreateDeleteSnapshot, Rpc::ListSnapshots]);
        }
        if f.clone {
            out.push(Rpc::CloneVolume);
        }
        if f.expand {
            out.push(Rpc::ExpandVolume);
        }
        if f.publish {
            out.extend([Rpc::PublishUnpublishVolume, Rpc::PublishReadonly]);
        }
        if f.single_node_multi_writer {
            out.push(Rpc::SingleNodeMultiWriter);
        }
        if f.modify {
            out.push(Rpc::ModifyVolume);
        }
        if f.snapshots {
            out.push(Rpc::GetSnapshot);
        }
        out
    }

    fn require_feature(&self, on: bool, what: &str) -> Result<(), Status> {
        if on {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "{} does not support {what}",
                self.backend.driver_name()
            )))
        }
    }
}

fn name_field(field: &'static str, name: &str) -> Result<(), Status> {
    require(field, name)?;
    if name.len() > MAX_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_NAME_LEN} bytes"
        )));
    }
    if name.contains('\0') {
        return Err(Status::invalid_argument(format!("{field} contains NUL")));
    }
    Ok(())
}

fn max_entries(n: i32) -> Result<usize, Status> {
    usize::try_from(n).map_err(|_| Status::invalid_argument("max_entries must not be negative"))
}

/// DeleteVolume/DeleteSnapshot: an ID that is not one of ours names nothing, which is success.
fn gone_is_ok(r: Result<(), Error>) -> Result<(), Status> {
    match r {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[tonic::async_trait]
impl v1::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.name.as_str());
        tracing::debug!(request = %r.redacted(), "CreateVolume");
        name_field("name", &r.name)?;
        let capabilities = convert::capabilities("volume_capabilities", &r.volume_capabilities)?;
        let capacity = convert::capacity_range(r.capacity_range.as_ref())?;
        let source = convert::content_source(r.volume_content_source.as_ref())?;
        if let Err(e) = self.check_requisite(r.accessibility_requirements.as_ref()) {
            tracing::warn!(error = %e.message(), "CreateVolume refused");
            return Err(e);
        }
        let topology = r
            .accessibility_requirements
            .as_ref()
            .map(|t| {
                t.preferred
                    .iter()
                    .chain(t.requisite.iter())
                    .map(|s| convert::to_btree(&s.segments))
                    .collect()
            })
            .unwrap_or_default();
        let create = CreateVolume {
            name: r.name.clone(),
            capacity,
            capabilities,
            parameters: convert::to_btree(&r.parameters),
            mutable_parameters: convert::to_btree(&r.mutable_parameters),
            secrets: convert::secrets(&r.secrets),
            source,
            topology,
        };
        let started = std::time::Instant::now();
        let mut vol = self.backend.create_volume(&create).await.map_err(|e| {
            tracing::warn!(error = %e, "CreateVolume failed");
            Status::from(e)
        })?;
        if vol.topology.is_empty() && !self.node_topology.is_empty() {
            vol.topology = vec![self.node_topology.clone()];
        }
        tracing::info!(volume_id = %vol.id, elapsed_ms = started.elapsed().as_millis() as u64, "volume ready");
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some(convert::volume_to_wire(&vol)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        gone_is_ok(
            self.backend
                .delete_volume(&r.volume_id, &convert::secrets(&r.secrets))
                .await,
        )?;
        tracing::info!("volume deleted");
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<v1::ControllerPublishVolumeRequest>,
    ) -> Result<Response<v1::ControllerPublishVolumeResponse>, Status> {
        self.require_feature(self.backend.features().publish, "ControllerPublishVolume")?;
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        require("node_id", &r.node_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let cap = convert::capability("volume_capability", cap)?;
        let ctx = self
            .backend
            .controller_publish(&r.volume_id, &r.node_id, &cap, r.readonly)
            .await?;
        Ok(Response::new(v1::ControllerPublishVolumeResponse {
            publish_context: ctx.into_iter().collect(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<v1::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<v1::ControllerUnpublishVolumeResponse>, Status> {
        self.require_feature(self.backend.features().publish, "ControllerUnpublishVolume")?;
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        self.backend
            .controller_unpublish(&r.volume_id, &r.node_id)
            .await?;
        Ok(Response::new(v1::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<v1::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<v1::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let caps = convert::capabilities("volume_capabilities", &r.volume_capabilities)?;
        let vol = self.backend.get_volume(&r.volume_id).await?;
        let resp = match self.backend.check_capabilities(&caps) {
            Ok(()) => v1::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(v1::validate_volume_capabilities_response::Confirmed {
                    volume_context: vol.context.into_iter().collect(),
                    volume_capabilities: r.volume_capabilities.clone(),
                    parameters: r.parameters.clone(),
                    mutable_parameters: r.mutable_parameters.clone(),
                }),
                message: String::new(),
            },
            Err(e) => v1::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(
        &self,
        req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let page = self
            .backend
            .list_volumes(
                Some(r.starting_token.as_str()).filter(|s| !s.is_empty()),
                max,
            )
            .await?;
        Ok(Response::new(v1::ListVolumesResponse {
            entries: page
                .items
                .iter()
                .map(|v| v1::list_volumes_response::Entry {
                    volume: Some(convert::volume_to_wire(v)),
                    status: None,
                })
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<v1::GetCapacityRequest>,
    ) -> Result<Response<v1::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        for (i, c) in r.volume_capabilities.iter().enumerate() {
            let cap = convert::capability("volume_capabilities", c)?;
            if self
                .backend
                .check_capabilities(std::slice::from_ref(&cap))
                .is_err()
            {
                // Capacity for a kind of volume we cannot make is zero (spec).
                tracing::debug!(index = i, "GetCapacity for an unsupported capability");
                return Ok(Response::new(v1::GetCapacityResponse::default()));
            }
        }
        let bytes = self
            .backend
            .capacity(&convert::to_btree(&r.parameters))
            .await?;
        Ok(Response::new(v1::GetCapacityResponse {
            available_capacity: i64::try_from(bytes).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<v1::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<v1::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = self
            .rpcs()
            .into_iter()
            .map(|t| v1::ControllerServiceCapability {
                r#type: Some(v1::controller_service_capability::Type::Rpc(
                    v1::controller_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(v1::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::CreateSnapshotResponse>, Status> {
        self.require_feature(self.backend.features().snapshots, "snapshots")?;
        let r = req.into_inner();
        Span::current().record("volume_id", r.source_volume_id.as_str());
        Span::current().record("snapshot_id", r.name.as_str());
        name_field("name", &r.name)?;
        require("source_volume_id", &r.source_volume_id)?;
        let snap = self
            .backend
            .create_snapshot(
                &r.name,
                &r.source_volume_id,
                &convert::to_btree(&r.parameters),
                &convert::secrets(&r.secrets),
            )
            .await?;
        tracing::info!(snapshot_id = %snap.id, "snapshot ready");
        Ok(Response::new(v1::CreateSnapshotResponse {
            snapshot: Some(convert::snapshot_to_wire(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        self.require_feature(self.backend.features().snapshots, "snapshots")?;
        let r = req.into_inner();
        Span::current().record("snapshot_id", r.snapshot_id.as_str());
        require("snapshot_id", &r.snapshot_id)?;
        gone_is_ok(
            self.backend
                .delete_snapshot(&r.snapshot_id, &convert::secrets(&r.secrets))
                .await,
        )?;
        Ok(Response::new(v1::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        self.require_feature(self.backend.features().snapshots, "snapshots")?;
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let filter = SnapshotFilter {
            snapshot_id: Some(r.snapshot_id.clone()).filter(|s| !s.is_empty()),
            source_volume_id: Some(r.source_volume_id.clone()).filter(|s| !s.is_empty()),
        };
        let page = self
            .backend
            .list_snapshots(
                &filter,
                Some(r.starting_token.as_str()).filter(|s| !s.is_empty()),
                max,
            )
            .await?;
        Ok(Response::new(v1::ListSnapshotsResponse {
            entries: page
                .items
                .iter()
                .map(|s| v1::list_snapshots_response::Entry {
                    snapshot: Some(convert::snapshot_to_wire(s)),
                })
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::GetSnapshotResponse>, Status> {
        self.require_feature(self.backend.features().snapshots, "snapshots")?;
        let r = req.into_inner();
        Span::current().record("snapshot_id", r.snapshot_id.as_str());
        require("snapshot_id", &r.snapshot_id)?;
        let filter = SnapshotFilter {
            snapshot_id: Some(r.snapshot_id.clone()),
            source_volume_id: None,
        };
        let missing = || Status::not_found(format!("snapshot {} not found", r.snapshot_id));
        let page = match self.backend.list_snapshots(&filter, None, 1).await {
            Err(Error::NotFound { .. }) => return Err(missing()),
            other => other?,
        };
        let snap = page.items.first().ok_or_else(missing)?;
        Ok(Response::new(v1::GetSnapshotResponse {
            snapshot: Some(convert::snapshot_to_wire(snap)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<v1::ControllerExpandVolumeRequest>,
    ) -> Result<Response<v1::ControllerExpandVolumeResponse>, Status> {
        self.require_feature(self.backend.features().expand, "volume expansion")?;
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let range = convert::capacity_range(Some(range))?;
        if let Some(c) = &r.volume_capability {
            convert::capability("volume_capability", c)?;
        }
        let e = self
            .backend
            .expand_volume(&r.volume_id, range, &convert::secrets(&r.secrets))
            .await?;
        tracing::info!(capacity_bytes = e.capacity_bytes, "volume expanded");
        Ok(Response::new(v1::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(e.capacity_bytes).unwrap_or(i64::MAX),
            node_expansion_required: e.node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<v1::ControllerGetVolumeRequest>,
    ) -> Result<Response<v1::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let vol = self.backend.get_volume(&r.volume_id).await?;
        Ok(Response::new(v1::ControllerGetVolumeResponse {
            volume: Some(convert::volume_to_wire(&vol)),
            status: Some(v1::controller_get_volume_response::VolumeStatus {
                published_node_ids: self.backend.published_nodes(&r.volume_id).await?,
                volume_condition: Some(v1::VolumeCondition {
                    abnormal: false,
                    message: "volume exists".into(),
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        req: Request<v1::ControllerModifyVolumeRequest>,
    ) -> Result<Response<v1::ControllerModifyVolumeResponse>, Status> {
        self.require_feature(self.backend.features().modify, "ControllerModifyVolume")?;
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let mutable = convert::to_btree(&r.mutable_parameters);
        self.backend.check_mutable_parameters(&mutable)?;
        self.backend
            .modify_volume(&r.volume_id, &mutable, &convert::secrets(&r.secrets))
            .await?;
        tracing::info!(parameters = ?mutable.keys().collect::<Vec<_>>(), "volume modified");
        Ok(Response::new(v1::ControllerModifyVolumeResponse {}))
    }
}
