//! The CSI GroupController service: volume group snapshots, for backends with snapshots.

use std::sync::Arc;

use stowage_backends::ControllerBackend;
use stowage_backends::group::{self, GroupSnapshot};
use stowage_csi::convert::{self, require};
use stowage_csi::v1;
use tonic::{Request, Response, Status};
use tracing::Span;

pub struct GroupControllerService {
    backend: Arc<dyn ControllerBackend>,
}

impl GroupControllerService {
    pub fn new(backend: Arc<dyn ControllerBackend>) -> Self {
        GroupControllerService { backend }
    }
}

fn to_wire(g: &GroupSnapshot) -> v1::VolumeGroupSnapshot {
    let since = g
        .created
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v1::VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g.snapshots.iter().map(convert::snapshot_to_wire).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }),
        ready_to_use: g.ready,
    }
}

#[tonic::async_trait]
impl v1::group_controller_server::GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<v1::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<v1::GroupControllerGetCapabilitiesResponse>, Status> {
        use v1::group_controller_service_capability::{Rpc, Type, rpc};
        Ok(Response::new(v1::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![v1::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<v1::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<v1::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("snapshot_id", r.name.as_str());
        require("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        let g = group::create(
            self.backend.as_ref(),
            &r.name,
            &r.source_volume_ids,
            &convert::to_btree(&r.parameters),
            &convert::secrets(&r.secrets),
        )
        .await?;
        tracing::info!(group_snapshot_id = %g.id, members = g.snapshots.len(), "group snapshot ready");
        Ok(Response::new(v1::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_wire(&g)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<v1::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<v1::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("snapshot_id", r.group_snapshot_id.as_str());
        require("group_snapshot_id", &r.group_snapshot_id)?;
        match group::delete(
            self.backend.as_ref(),
            &r.group_snapshot_id,
            &convert::secrets(&r.secrets),
        )
        .await
        {
            Ok(()) | Err(stowage_backends::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Response::new(v1::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<v1::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<v1::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("snapshot_id", r.group_snapshot_id.as_str());
        require("group_snapshot_id", &r.group_snapshot_id)?;
        let g = group::get(self.backend.as_ref(), &r.group_snapshot_id).await?;
        Ok(Response::new(v1::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_wire(&g)),
        }))
    }
}
