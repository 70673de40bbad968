//! The local controller: the shared directory-per-volume controller (`dirstore`) plus size
//! enforcement (`capacity`), applied after each call that makes, grows, scrubs or removes a
//! volume directory. `dirstore` stays unaware of it, so NFS and GlusterFS are unchanged.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::capacity::{self, Enforcement, FS_IMAGE};
use crate::controller::{ControllerBackend, ControllerFeatures, Expanded};
use crate::dirstore::{BLOCK_IMAGE, DirBackend};
use crate::error::{Error, Result};
use crate::fs::local::LocalFs;
use crate::locks::KeyLocks;
use crate::types::{
    Capability, CapacityRange, CreateVolume, NodeInfo, Page, Secrets, Snapshot, SnapshotFilter,
    Volume,
};
use crate::volume_id::VolumeId;

pub struct InstanceCapacity {
    pub base: PathBuf,
    pub enforcement: Enforcement,
}

pub struct LocalController {
    inner: DirBackend<LocalFs>,
    instances: BTreeMap<String, InstanceCapacity>,
    locks: KeyLocks,
}

impl LocalController {
    pub fn new(inner: DirBackend<LocalFs>, instances: BTreeMap<String, InstanceCapacity>) -> Self {
        LocalController {
            inner,
            instances,
            locks: KeyLocks::default(),
        }
    }

    /// The instance settings and directory of a volume; None for IDs not of ours.
    fn locate(&self, volume_id: &str) -> Option<(&InstanceCapacity, VolumeId, PathBuf)> {
        let id = VolumeId::parse("volume_id", volume_id).ok()?;
        let inst = self.instances.get(&id.instance)?;
        let dir = inst.base.join(id.path.as_str());
        Some((inst, id, dir))
    }

    /// FAILED_PRECONDITION (the spec's "volume in use") while a loop device is still backed by
    /// the volume's image, i.e. the volume is staged on this node. Deleting it anyway would
    /// leave that loop device pointing at a deleted file for as long as the node lives, and the
    /// pod using it writing into nothing.
    async fn refuse_if_attached(&self, volume_id: &str) -> Result<()> {
        let Some((_, _, dir)) = self.locate(volume_id) else {
            return Ok(());
        };
        for name in [BLOCK_IMAGE, FS_IMAGE] {
            let img = dir.join(name);
            if !exists(&img).await {
                continue;
            }
            if let Some(dev) = super::loopdev::device_for(&img, name == BLOCK_IMAGE).await? {
                return Err(Error::FailedPrecondition(format!(
                    "volume_id: volume {volume_id} is in use: its image is attached to {} \
                     (staged on this node); unstage it before deleting",
                    dev.display()
                )));
            }
        }
        Ok(())
    }

    /// Makes a volume directory hold at most `bytes`. Block volumes (their image is their
    /// size) and directories that already hold data without an image (volumes from before
    /// enforcement was on, clones of them) are left as they are, with a log line.
    async fn enforce(&self, volume_id: &str, bytes: u64) -> Result<bool> {
        let Some((inst, id, dir)) = self.locate(volume_id) else {
            return Ok(false);
        };
        if exists(&dir.join(BLOCK_IMAGE)).await {
            return Ok(false);
        }
        let _g = self.locks.lock(&format!("cap:{volume_id}")).await;
        match &inst.enforcement {
            Enforcement::Off => Ok(false),
            Enforcement::Quota { mount_point, ext4 } => {
                let pid = capacity::project_id(&id.instance, id.path.as_str());
                capacity::set_quota(mount_point, *ext4, &dir, pid, bytes).await?;
                Ok(false)
            }
            Enforcement::Image => {
                let img = dir.join(FS_IMAGE);
                if exists(&img).await {
                    // A repeat, a restore or clone of an image volume into a bigger one.
                    return capacity::grow_image(&img, bytes).await;
                }
                if !is_empty_dir(&dir, &img).await? {
                    tracing::warn!(
                        volume_id,
                        "volume directory already holds data without a filesystem image: its size is not enforced"
                    );
                    return Ok(false);
                }
                let md = tokio::fs::metadata(&dir)
                    .await
                    .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
                capacity::make_image(&img, bytes, md.mode(), (md.uid(), md.gid())).await?;
                tracing::info!(volume_id, bytes, "filesystem image made");
                Ok(false)
            }
        }
    }
}

async fn exists(p: &Path) -> bool {
    tokio::fs::symlink_metadata(p).await.is_ok()
}

/// Empty apart from a half-made image of an attempt cut short.
async fn is_empty_dir(dir: &Path, img: &Path) -> Result<bool> {
    let tmp = img.with_extension("img.tmp");
    let mut rd = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    while let Some(e) = rd
        .next_entry()
        .await
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
    {
        if e.path() != tmp {
            return Ok(false);
        }
    }
    Ok(true)
}

#[async_trait]
impl ControllerBackend for LocalController {
    fn driver_name(&self) -> &'static str {
        self.inner.driver_name()
    }

    fn features(&self) -> ControllerFeatures {
        self.inner.features()
    }

    fn check_capabilities(&self, caps: &[Capability]) -> Result<()> {
        self.inner.check_capabilities(caps)
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        let vol = self.inner.create_volume(req).await?;
        self.enforce(&vol.id, vol.capacity_bytes).await?;
        Ok(vol)
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        self.refuse_if_attached(volume_id).await?;
        self.inner.delete_volume(volume_id, secrets).await?;
        if let Some((inst, id, dir)) = self.locate(volume_id)
            && let Enforcement::Quota { mount_point, ext4 } = &inst.enforcement
            && !exists(&dir).await
        {
            // The limit outlives the directory: drop it, or a later volume hashing to the same
            // project would inherit it. Best effort: the volume itself is gone either way.
            let pid = capacity::project_id(&id.instance, id.path.as_str());
            if let Err(e) = capacity::limit(mount_point, *ext4, pid, 0).await {
                tracing::warn!(volume_id, error = %e, "could not clear the project quota");
            }
        }
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Volume> {
        self.inner.get_volume(volume_id).await
    }

    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>> {
        self.inner.list_volumes(start, max).await
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64> {
        self.inner.capacity(parameters).await
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let mut e = self.inner.expand_volume(volume_id, range, secrets).await?;
        if let Some((inst, _, dir)) = self.locate(volume_id) {
            let image = inst.enforcement == Enforcement::Image && exists(&dir.join(FS_IMAGE)).await;
            self.enforce(volume_id, e.capacity_bytes).await?;
            // The filesystem inside the image grows on the node (resize2fs, online).
            e.node_expansion_required |= image;
        }
        Ok(e)
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        self.inner
            .create_snapshot(name, source_volume_id, parameters, secrets)
            .await
    }

    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        self.inner.delete_snapshot(snapshot_id, secrets).await
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        self.inner.list_snapshots(filter, start, max).await
    }

    fn check_mutable_parameters(&self, mutable: &BTreeMap<String, String>) -> Result<()> {
        self.inner.check_mutable_parameters(mutable)
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        self.inner.modify_volume(volume_id, mutable, secrets).await
    }

    async fn recycle_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        self.inner.recycle_volume(volume_id, secrets).await?;
        // Scrubbing emptied the directory, image included: an image volume gets a fresh one.
        let v = self.inner.get_volume(volume_id).await?;
        self.enforce(volume_id, v.capacity_bytes).await?;
        Ok(())
    }

    async fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
    ) -> Result<BTreeMap<String, String>> {
        self.inner
            .controller_publish(volume_id, node_id, capability, readonly)
            .await
    }

    async fn controller_unpublish(&self, volume_id: &str, node_id: &str) -> Result<()> {
        self.inner.controller_unpublish(volume_id, node_id).await
    }

    async fn published_nodes(&self, volume_id: &str) -> Result<Vec<String>> {
        self.inner.published_nodes(volume_id).await
    }

    async fn register_node(&self, node: &NodeInfo) -> Result<()> {
        self.inner.register_node(node).await
    }
}

impl std::fmt::Debug for LocalController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalController")
            .field(
                "capacity",
                &self
                    .instances
                    .iter()
                    .map(|(k, v)| (k, v.enforcement.describe()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}
