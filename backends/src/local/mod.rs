//! `local.stowage.io`: the embedded default. Volumes are directories under a base directory on
//! the node itself (like hostPath, but with the whole CSI lifecycle), or sparse image files
//! attached as loop devices for raw block volumes. Needs no server; controller and node must
//! see the same base directory (same machine, or a shared mount). Directory volumes' sizes are
//! enforced by project quotas or per-volume filesystem images ([`capacity`]).

pub mod capacity;
pub mod config;
pub mod controller;
mod loopdev;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::command::{self, SHORT_TIMEOUT};
use crate::dirstore::{BLOCK_IMAGE, DirBackend, DirOptions, Instance};
use crate::error::{Error, Result};
use crate::fs::local::LocalFs;
use crate::mount::{self, Probe};
use crate::node::{NodeBackend, NodeFeatures, StageRequest};
use crate::volume_id::VolumeId;
use capacity::FS_IMAGE;
pub use config::LocalInstance;

pub const DRIVER: &str = "local.stowage.io";
/// Topology key: local volumes live on one node.
pub const TOPOLOGY_KEY: &str = "topology.stowage.io/node";

pub use controller::LocalController;

pub async fn controller(instances: &BTreeMap<String, LocalInstance>) -> Result<LocalController> {
    let mut out = Vec::new();
    let mut caps = BTreeMap::new();
    for (name, cfg) in instances {
        let setting = capacity::Setting::parse(cfg.capacity.as_deref())
            .map_err(|e| Error::invalid("config", format!("instance {name}: {e}")))?;
        tokio::fs::create_dir_all(&cfg.base_dir)
            .await
            .map_err(|e| Error::io(format!("creating baseDir {}", cfg.base_dir.display()), e))?;
        let enforcement = capacity::choose(&cfg.base_dir, setting)
            .await
            .map_err(|e| Error::invalid("config", format!("instance {name}: {e}")))?;
        if enforcement == capacity::Enforcement::Off && setting == capacity::Setting::Auto {
            tracing::warn!(
                instance = %name,
                base_dir = %cfg.base_dir.display(),
                "volume sizes are recorded, not enforced: the base directory's filesystem has no project quotas (mount XFS or ext4 with prjquota), and capacity: image is not set"
            );
        } else {
            tracing::info!(instance = %name, capacity = enforcement.describe(), "volume size enforcement");
        }
        caps.insert(
            name.clone(),
            controller::InstanceCapacity {
                base: cfg.base_dir.clone(),
                enforcement,
            },
        );
        let settings = cfg.dir_settings();
        out.push(Instance {
            name: name.clone(),
            fs: LocalFs::new(&cfg.base_dir),
            options: DirOptions {
                attrs: settings.attrs()?,
                block: cfg.block,
                max_volume_bytes: settings.max_volume_bytes,
            },
            context: Arc::new(|_| BTreeMap::new()),
        });
    }
    Ok(LocalController::new(DirBackend::new(DRIVER, out)?, caps))
}

/// Node side: bind mounts for directories, loop devices for block images.
pub struct LocalNode {
    bases: BTreeMap<String, PathBuf>,
}

impl LocalNode {
    pub fn new(instances: &BTreeMap<String, LocalInstance>) -> Self {
        LocalNode {
            bases: instances
                .iter()
                .map(|(k, v)| (k.clone(), v.base_dir.clone()))
                .collect(),
        }
    }

    fn volume_dir(&self, volume_id: &str) -> Result<PathBuf> {
        let id = VolumeId::parse("volume_id", volume_id)?;
        let base = self
            .bases
            .get(&id.instance)
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        Ok(base.join(id.path.as_str()))
    }
}

/// Whether `staged` (the bind-mounted device file of a staging path) is a block device other
/// than `ours` (this volume's loop devices, if attached) that still has a backing file. A file
/// that is no block device (not mounted, left by a crash) is nobody's and may be cleaned up.
async fn staged_elsewhere(staged: &Path, ours: &[PathBuf]) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(md) = tokio::fs::metadata(staged).await else {
        return false;
    };
    if !md.file_type().is_block_device() {
        return false;
    }
    // A loop device with no backing file any more (detached under its bind) is nobody's.
    let rdev = md.rdev();
    let (major, minor) = (
        ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
        (rdev & 0xff) | ((rdev >> 12) & !0xff),
    );
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"));
    if tokio::fs::metadata(&sys).await.is_err() {
        return false;
    }
    // Another volume's if it is none of this volume's loop devices (or the volume has none).
    for dev in ours {
        match tokio::fs::metadata(dev).await {
            Ok(d) if d.rdev() != md.rdev() => {}
            _ => return false,
        }
    }
    true
}

/// Stages an image-enforced volume: the image on a loop device, its ext4 grown to the image's
/// size if the controller grew the file since (a restore into a bigger volume, an expansion
/// the node could not apply online), then mounted at the staging path.
async fn stage_image(img: &Path, req: &StageRequest) -> Result<()> {
    if mount::mounted_at(&req.staging_path).await?.is_some() {
        match mount::probe(&req.staging_path).await {
            Probe::Alive => return Ok(()),
            _ => mount::unmount(&req.staging_path).await?,
        }
    }
    let dev = loopdev::attach(img, &req.volume_id, false).await?;
    let res = async {
        if capacity::grow_offline(img, &dev).await? {
            tracing::info!(volume_id = %req.volume_id, "filesystem grown to the image's size");
        }
        mount::mount(
            mount::path_str(&dev)?,
            &req.staging_path,
            "ext4",
            req.capability.mount_flags(),
            command::MOUNT_TIMEOUT,
        )
        .await
    }
    .await;
    if res.is_err() {
        let _ = mount::unmount(&req.staging_path).await;
        // Only if nothing else mounts it (it may be the device another mount already used).
        let _ = loopdev::detach_unused(img, &req.volume_id, false).await;
    }
    res
}

#[async_trait]
impl NodeBackend for LocalNode {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> NodeFeatures {
        NodeFeatures {
            expand: true,
            single_node_multi_writer: true,
            volume_mount_group: false,
        }
    }

    fn topology(&self, node_id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), node_id.to_string())])
    }

    async fn stage(&self, req: &StageRequest) -> Result<()> {
        let dir = self.volume_dir(&req.volume_id)?;
        if tokio::fs::metadata(&dir).await.is_err() {
            return Err(Error::not_found("volume", &req.volume_id));
        }
        mount::ensure_dir(&req.staging_path).await?;
        if req.capability.is_block() {
            let img = dir.join(BLOCK_IMAGE);
            if tokio::fs::metadata(&img).await.is_err() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is not a block volume",
                    req.volume_id
                )));
            }
            let target = mount::staged_device(&req.staging_path);
            if mount::mounted_at(&target).await?.is_some() {
                return Ok(());
            }
            let dev = loopdev::attach(&img, &req.volume_id, true).await?;
            mount::ensure_file(&target).await?;
            return mount::bind(&dev, &target, false, &[]).await;
        }
        if tokio::fs::metadata(dir.join(BLOCK_IMAGE)).await.is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is a raw block volume; it cannot be staged as a filesystem",
                req.volume_id
            )));
        }
        let fs_img = dir.join(FS_IMAGE);
        if tokio::fs::metadata(&fs_img).await.is_ok() {
            return stage_image(&fs_img, req).await;
        }
        if mount::mounted_at(&req.staging_path).await?.is_some() {
            match mount::probe(&req.staging_path).await {
                Probe::Alive => return Ok(()),
                _ => mount::unmount(&req.staging_path).await?,
            }
        }
        mount::bind(&dir, &req.staging_path, false, req.capability.mount_flags()).await
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let device = mount::staged_device(staging_path);
        let block_img = self.volume_dir(volume_id)?.join(BLOCK_IMAGE);
        let is_block = tokio::fs::metadata(&block_img).await.is_ok();
        if tokio::fs::symlink_metadata(&device).await.is_ok() {
            let ours = if is_block {
                loopdev::devices_for(&block_img).await?
            } else {
                Vec::new()
            };
            if staged_elsewhere(&device, &ours).await {
                // The device staged here is another volume's loop device: this volume is not
                // staged at this path, so there is nothing of its own to undo. Tearing the
                // other one down would orphan its loop device.
                tracing::info!(volume_id, staging = %staging_path.display(), "another volume's device is staged here; left alone");
                return Ok(());
            }
            mount::unmount(&device).await?;
            mount::remove_mount_point(&device).await?;
        }
        if is_block {
            // Also the retry after a node killed between removing the staged device file and
            // detaching (found by tests/it/chaos.rs): the volume's loop device is attached but
            // bound nowhere. Left attached, it would stay for the node's life and DeleteVolume
            // would refuse the volume as in use for ever. One still bound at another staging
            // path is left alone.
            loopdev::detach_unused(&block_img, volume_id, true).await?;
        }
        let img = self.volume_dir(volume_id)?.join(FS_IMAGE);
        mount::unmount(staging_path).await?;
        if tokio::fs::metadata(&img).await.is_ok() {
            // After the unmount: the loop device of a mounted filesystem would stay busy.
            loopdev::detach_unused(&img, volume_id, false).await?;
        }
        Ok(())
    }

    async fn expand(&self, volume_id: &str, _path: &Path, capacity_bytes: u64) -> Result<u64> {
        let fs_img = self.volume_dir(volume_id)?.join(FS_IMAGE);
        if tokio::fs::metadata(&fs_img).await.is_ok() {
            let Some(dev) = loopdev::device_for(&fs_img, false).await? else {
                // Not staged here: the next stage grows the filesystem.
                return Ok(capacity_bytes);
            };
            command::run("losetup", &["-c", mount::path_str(&dev)?], SHORT_TIMEOUT).await?;
            capacity::resize_online(&dev).await?;
            return mount::block_device_size(&dev).await;
        }
        let img = self.volume_dir(volume_id)?.join(BLOCK_IMAGE);
        if tokio::fs::metadata(&img).await.is_err() {
            // A directory volume has no filesystem of its own to grow.
            return Ok(capacity_bytes);
        }
        let Some(dev) = loopdev::device_for(&img, true).await? else {
            return Ok(capacity_bytes);
        };
        // The controller already grew the file; make the loop device see the new size.
        command::run("losetup", &["-c", mount::path_str(&dev)?], SHORT_TIMEOUT).await?;
        mount::block_device_size(&dev).await
    }
}

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode")
            .field("bases", &self.bases)
            .finish()
    }
}
