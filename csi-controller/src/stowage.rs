//! `stowage.v1.Stowage`: Stowage's own RPCs beside CSI on the controller socket. RecycleVolume
//! is how the provisioner gives a Released PV with reclaim policy Recycle back to the pool.

use std::sync::Arc;

use stowage_backends::ControllerBackend;
use stowage_csi::convert::{self, require};
use stowage_csi::stowage_v1;
use tonic::{Request, Response, Status};
use tracing::Span;

pub struct StowageService {
    backend: Arc<dyn ControllerBackend>,
}

impl StowageService {
    pub fn new(backend: Arc<dyn ControllerBackend>) -> Self {
        StowageService { backend }
    }
}

#[tonic::async_trait]
impl stowage_v1::stowage_server::Stowage for StowageService {
    async fn recycle_volume(
        &self,
        req: Request<stowage_v1::RecycleVolumeRequest>,
    ) -> Result<Response<stowage_v1::RecycleVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let started = std::time::Instant::now();
        self.backend
            .recycle_volume(&r.volume_id, &convert::secrets(&r.secrets))
            .await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "volume recycled"
        );
        Ok(Response::new(stowage_v1::RecycleVolumeResponse {}))
    }

    async fn get_volume_details(
        &self,
        req: Request<stowage_v1::GetVolumeDetailsRequest>,
    ) -> Result<Response<stowage_v1::GetVolumeDetailsResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let v = self.backend.get_volume(&r.volume_id).await?;
        Ok(Response::new(stowage_v1::GetVolumeDetailsResponse {
            volume_id: v.id,
            capacity_bytes: i64::try_from(v.capacity_bytes).unwrap_or(i64::MAX),
            parameters: v.context.into_iter().collect(),
            name: String::new(),
            used_bytes: 0,
        }))
    }
}
