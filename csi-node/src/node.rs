//! The CSI Node service: request validation, per-volume serialization, access-mode rules that
//! need the node's view (single-writer), then the backend's stage/publish.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::paths::PathPolicy;
use stowage_backends::locks::KeyLocks;
use stowage_backends::metrics;
use stowage_backends::mount;
use stowage_backends::types::AccessMode;
use stowage_backends::{NodeBackend, PublishRequest, StageRequest};
use stowage_csi::convert::{self, require};
use stowage_csi::redact::Redact;
use stowage_csi::v1;
use stowage_csi::v1::node_service_capability::rpc::Type as Rpc;
use tonic::{Request, Response, Status};
use tracing::Span;

pub struct NodeService {
    backend: Arc<dyn NodeBackend>,
    node_id: String,
    max_volumes: i64,
    paths: PathPolicy,
    locks: KeyLocks,
    /// Target paths published since start, for `stowage_node_volumes_published`: a set, so a
    /// repeated (idempotent) publish counts once. Locked only to update it, never across a call.
    published: Mutex<HashSet<PathBuf>>,
}

impl NodeService {
    pub fn new(
        backend: Arc<dyn NodeBackend>,
        node_id: String,
        max_volumes: i64,
        paths: PathPolicy,
    ) -> Self {
        // Exposed as 0 from the start, so a dashboard shows a node with nothing published.
        metrics::get()
            .published
            .get_or_create(&metrics::DriverLabels {
                driver: backend.driver_name(),
            })
            .set(0);
        NodeService {
            backend,
            node_id,
            max_volumes,
            paths,
            locks: KeyLocks::default(),
            published: Mutex::new(HashSet::new()),
        }
    }

    /// Adds or removes a publication and sets the gauge to the new count.
    fn track_published(&self, target: &Path, published: bool) {
        let count = {
            let mut set = self.published.lock().unwrap_or_else(|p| p.into_inner());
            if published {
                set.insert(target.to_path_buf());
            } else {
                set.remove(target);
            }
            set.len()
        };
        metrics::get()
            .published
            .get_or_create(&metrics::DriverLabels {
                driver: self.backend.driver_name(),
            })
            .set(count as i64);
    }

    /// A path the call will mount on, create or remove: well-formed and inside the node's
    /// volume directory.
    fn owned_path(&self, field: &'static str, p: &str) -> Result<PathBuf, Status> {
        let path = path_field(field, p)?;
        self.paths.confine(field, &path)?;
        Ok(path)
    }

    /// A path that must name a mounted volume: outside the node's volume directory it names
    /// none (NOT_FOUND, which is what the spec lists for a path with no volume).
    fn volume_path(&self, field: &'static str, p: &str) -> Result<PathBuf, Status> {
        let path = existing_path_field(field, p)?;
        if !self.paths.contains(&path) {
            return Err(Status::not_found(format!(
                "{field} {p:?} is not a volume path on this node (outside {})",
                self.paths.root().display()
            )));
        }
        self.paths.confine(field, &path)?;
        Ok(path)
    }
}

/// A path field: required, absolute, no `..`, no NUL.
fn path_field(field: &'static str, p: &str) -> Result<PathBuf, Status> {
    require(field, p)?;
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} must be an absolute path"
        )));
    }
    if p.contains('\0')
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Status::invalid_argument(format!(
            "{field} must not contain '..' or NUL"
        )));
    }
    Ok(path.to_path_buf())
}

/// A path that must name an existing volume mount: a relative path cannot, so it is NOT_FOUND
/// (what csi-sanity expects), while `..` and NUL stay INVALID_ARGUMENT.
fn existing_path_field(field: &'static str, p: &str) -> Result<PathBuf, Status> {
    require(field, p)?;
    if !Path::new(p).is_absolute() && !p.contains('\0') && !p.split('/').any(|c| c == "..") {
        return Err(Status::not_found(format!(
            "{field} {p:?} is not a volume path on this node"
        )));
    }
    path_field(field, p)
}

/// The volume ID must be one Stowage could have made; anything else names no volume here.
fn volume_id_field(id: &str) -> Result<(), Status> {
    require("volume_id", id)?;
    stowage_backends::volume_id::VolumeId::parse("volume_id", id)
        .map(|_| ())
        .map_err(Status::from)
}

/// Where else the staged source is bind-mounted, other than `target`.
async fn published_elsewhere(source: &Path, target: &Path) -> Result<Vec<PathBuf>, Status> {
    let all = mount::mountinfo::read().await?;
    let Some(src) = all.iter().rev().find(|m| m.mount_point == source) else {
        return Ok(Vec::new());
    };
    Ok(all
        .iter()
        .filter(|m| {
            m.dev == src.dev
                && m.root == src.root
                && m.mount_point != source
                && m.mount_point != target
        })
        .map(|m| m.mount_point.clone())
        .collect())
}

#[tonic::async_trait]
impl v1::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<v1::NodeStageVolumeRequest>,
    ) -> Result<Response<v1::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        tracing::debug!(request = %r.redacted(), "NodeStageVolume");
        require("volume_id", &r.volume_id)?;
        let staging_path = self.owned_path("staging_target_path", &r.staging_target_path)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let capability = convert::capability("volume_capability", cap)?;
        volume_id_field(&r.volume_id)?;
        let _g = self.locks.lock(&r.volume_id).await;
        let started = std::time::Instant::now();
        self.backend
            .stage(&StageRequest {
                volume_id: r.volume_id.clone(),
                staging_path,
                capability,
                context: convert::to_btree(&r.volume_context),
                publish_context: convert::to_btree(&r.publish_context),
                secrets: convert::secrets(&r.secrets),
            })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "NodeStageVolume failed");
                Status::from(e)
            })?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "volume staged"
        );
        Ok(Response::new(v1::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<v1::NodeUnstageVolumeRequest>,
    ) -> Result<Response<v1::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let staging_path = self.owned_path("staging_target_path", &r.staging_target_path)?;
        let _g = self.locks.lock(&r.volume_id).await;
        self.backend.unstage(&r.volume_id, &staging_path).await?;
        tracing::info!("volume unstaged");
        Ok(Response::new(v1::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<v1::NodePublishVolumeRequest>,
    ) -> Result<Response<v1::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        tracing::debug!(request = %r.redacted(), "NodePublishVolume");
        require("volume_id", &r.volume_id)?;
        let target_path = self.owned_path("target_path", &r.target_path)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let capability = convert::capability("volume_capability", cap)?;
        let staging_path = self.owned_path("staging_target_path", &r.staging_target_path)?;
        volume_id_field(&r.volume_id)?;
        let _g = self.locks.lock(&r.volume_id).await;
        if capability.access_mode == AccessMode::SingleNodeSingleWriter {
            let source = if capability.is_block() {
                mount::staged_device(&staging_path)
            } else {
                staging_path.clone()
            };
            let others = published_elsewhere(&source, &target_path).await?;
            if !others.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {} is ReadWriteOncePod and already published at {}",
                    r.volume_id,
                    others[0].display()
                )));
            }
        }
        let readonly = r.readonly || capability.access_mode.is_read_only();
        self.backend
            .publish(&PublishRequest {
                volume_id: r.volume_id.clone(),
                staging_path,
                target_path: target_path.clone(),
                capability,
                readonly,
                context: convert::to_btree(&r.volume_context),
            })
            .await?;
        self.track_published(&target_path, true);
        tracing::info!(target = %r.target_path, readonly, "volume published");
        Ok(Response::new(v1::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<v1::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<v1::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let target_path = self.owned_path("target_path", &r.target_path)?;
        let _g = self.locks.lock(&r.volume_id).await;
        self.backend.unpublish(&r.volume_id, &target_path).await?;
        self.track_published(&target_path, false);
        tracing::info!(target = %r.target_path, "volume unpublished");
        Ok(Response::new(v1::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<v1::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<v1::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let path = self.volume_path("volume_path", &r.volume_path)?;
        volume_id_field(&r.volume_id)?;
        let stats = self.backend.stats(&r.volume_id, &path).await?;
        use v1::volume_usage::Unit;
        let u = stats.usage;
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut usage = vec![v1::VolumeUsage {
            available: i(u.available_bytes),
            total: i(u.total_bytes),
            used: i(u.used_bytes),
            unit: Unit::Bytes as i32,
        }];
        if !stats.is_block && u.total_inodes > 0 {
            usage.push(v1::VolumeUsage {
                available: i(u.free_inodes),
                total: i(u.total_inodes),
                used: i(u.used_inodes),
                unit: Unit::Inodes as i32,
            });
        }
        if stats.abnormal.is_some() {
            tracing::warn!(
                condition = stats.abnormal.as_deref().unwrap_or(""),
                "volume abnormal"
            );
        }
        Ok(Response::new(v1::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(v1::VolumeCondition {
                abnormal: stats.abnormal.is_some(),
                message: stats
                    .abnormal
                    .unwrap_or_else(|| "volume is mounted and answering".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<v1::NodeExpandVolumeRequest>,
    ) -> Result<Response<v1::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        Span::current().record("volume_id", r.volume_id.as_str());
        require("volume_id", &r.volume_id)?;
        let path = self.volume_path("volume_path", &r.volume_path)?;
        volume_id_field(&r.volume_id)?;
        if matches!(mount::probe(&path).await, mount::Probe::Missing) {
            return Err(Status::not_found(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        let range = convert::capacity_range(r.capacity_range.as_ref())?;
        if let Some(c) = &r.volume_capability {
            convert::capability("volume_capability", c)?;
        }
        let _g = self.locks.lock(&r.volume_id).await;
        let bytes = self
            .backend
            .expand(&r.volume_id, &path, range.required)
            .await?;
        Ok(Response::new(v1::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<v1::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<v1::NodeGetCapabilitiesResponse>, Status> {
        let f = self.backend.features();
        let mut rpcs = vec![
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::VolumeCondition,
        ];
        if f.expand {
            rpcs.push(Rpc::ExpandVolume);
        }
        if f.single_node_multi_writer {
            rpcs.push(Rpc::SingleNodeMultiWriter);
        }
        if f.volume_mount_group {
            rpcs.push(Rpc::VolumeMountGroup);
        }
        let capabilities = rpcs
            .into_iter()
            .map(|t| v1::NodeServiceCapability {
                r#type: Some(v1::node_service_capability::Type::Rpc(
                    v1::node_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(v1::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<v1::NodeGetInfoRequest>,
    ) -> Result<Response<v1::NodeGetInfoResponse>, Status> {
        let topo = self.backend.topology(&self.node_id);
        Ok(Response::new(v1::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: if topo.is_empty() {
                None
            } else {
                Some(v1::Topology {
                    segments: topo.into_iter().collect(),
                })
            },
        }))
    }
}
