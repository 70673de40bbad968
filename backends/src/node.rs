//! The node-side backend trait: attach and mount a volume on this machine.
//!
//! A backend implements staging (making the volume reachable at the staging path: a network
//! mount, a FUSE mount, a bind of a local directory, a block device) and may override the
//! rest; publish/unpublish default to the bind mounts every backend needs, and stats default
//! to statvfs on the published path.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;

use crate::error::Result;
use crate::mount;
use crate::types::VolumeStats;
// In types.rs so that `mount` (which publishes) does not depend on this module.
pub use crate::types::{PublishRequest, StageRequest};

#[derive(Debug, Clone, Copy, Default)]
pub struct NodeFeatures {
    pub expand: bool,
    pub single_node_multi_writer: bool,
    pub volume_mount_group: bool,
}

#[async_trait]
pub trait NodeBackend: Send + Sync + 'static {
    fn driver_name(&self) -> &'static str;

    fn features(&self) -> NodeFeatures;

    /// Topology segments this node offers (NodeGetInfo).
    fn topology(&self, node_id: &str) -> BTreeMap<String, String> {
        let _ = node_id;
        BTreeMap::new()
    }

    /// Makes the volume available at `staging_path`. Must be idempotent: called again with
    /// the same arguments after success it returns Ok without mounting twice.
    async fn stage(&self, req: &StageRequest) -> Result<()>;

    /// Undoes `stage`; Ok when nothing is staged.
    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()>;

    /// Bind-mounts the staged volume at the target path (file for block, dir otherwise).
    async fn publish(&self, req: &PublishRequest) -> Result<()> {
        mount::publish_bind(req).await
    }

    async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let _ = volume_id;
        mount::unpublish(target_path).await
    }

    /// Usage and health of a published or staged path.
    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let _ = volume_id;
        mount::path_stats(path).await
    }

    /// Grows whatever the node holds (filesystem, loop device) to `capacity_bytes`; returns
    /// the new size.
    async fn expand(&self, volume_id: &str, path: &Path, capacity_bytes: u64) -> Result<u64> {
        let _ = (volume_id, path);
        Ok(capacity_bytes)
    }
}

/// The node side of a backend this binary was built without (see `build_node`): every call
/// fails with FAILED_PRECONDITION naming the missing cargo feature. Config::validate refuses
/// such a configuration first, so only a Config made in code gets here.
pub struct NotBuilt {
    pub driver: &'static str,
    pub why: String,
}

#[async_trait]
impl NodeBackend for NotBuilt {
    fn driver_name(&self) -> &'static str {
        self.driver
    }

    fn features(&self) -> NodeFeatures {
        NodeFeatures::default()
    }

    async fn stage(&self, _: &StageRequest) -> Result<()> {
        Err(crate::Error::FailedPrecondition(self.why.clone()))
    }

    async fn unstage(&self, _: &str, _: &Path) -> Result<()> {
        Err(crate::Error::FailedPrecondition(self.why.clone()))
    }
}
