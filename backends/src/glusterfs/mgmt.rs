//! The controller's management mount: the gluster volume FUSE-mounted once per instance, under
//! `<stateDir>/mgmt/<instance>`, so that the shared directory-per-volume controller
//! ([`crate::dirstore`]) creates, copies and empties PV directories with plain file calls.
//!
//! Why a mount rather than libgfapi: no maintained Rust binding exists (gfapi-sys needs
//! bindgen and is stale), and the mount is the same client code nodes use. Privileges: root
//! (or CAP_SYS_ADMIN) and /dev/fuse to mount; root inside the volume to chown new directories.
//!
//! The mount is made on first use (a controller whose gluster servers are down still starts)
//! and healed: when a call fails and the mount no longer answers (its FUSE process died:
//! ENOTCONN), it is lazily unmounted, mounted again, and the call is retried once. The mount
//! outlives the controller process; a restarted controller reuses it when it answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use crate::command::MOUNT_TIMEOUT;
use crate::error::{Error, Result};
use crate::fs::local::LocalFs;
use crate::fs::{DirAttrs, DirEntry, FileStat, Fs, FsStats};
use crate::mount::{self, Probe};
use crate::relpath::RelPath;

pub struct MgmtMount {
    /// `server:/volume`
    pub source: String,
    pub mountpoint: PathBuf,
    pub options: Vec<String>,
    /// Directory inside the volume holding the PVs ("" = root).
    pub base: String,
    healthy: AtomicBool,
    guard: tokio::sync::Mutex<()>,
}

impl MgmtMount {
    pub fn new(source: String, mountpoint: PathBuf, options: Vec<String>, base: String) -> Self {
        MgmtMount {
            source,
            mountpoint,
            options,
            base,
            healthy: AtomicBool::new(false),
            guard: tokio::sync::Mutex::new(()),
        }
    }

    /// The directory [`LocalFs`] works in.
    pub fn base_path(&self) -> PathBuf {
        if self.base.is_empty() {
            self.mountpoint.clone()
        } else {
            self.mountpoint.join(&self.base)
        }
    }

    /// Mounts (or remounts a dead mount) unless a previous call found it healthy.
    pub async fn ensure(&self) -> Result<()> {
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.guard.lock().await;
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        mount::ensure_dir(&self.mountpoint).await?;
        let mut ok = false;
        if let Some(m) = mount::mounted_at(&self.mountpoint).await? {
            match mount::probe(&self.mountpoint).await {
                Probe::Alive if m.source == self.source => ok = true,
                Probe::Alive => {
                    return Err(Error::FailedPrecondition(format!(
                        "management mount point {} holds {}, not {}",
                        self.mountpoint.display(),
                        m.source,
                        self.source
                    )));
                }
                Probe::Dead(why) => {
                    tracing::warn!(mount = %self.mountpoint.display(), %why, "management mount is dead; remounting");
                    mount::unmount(&self.mountpoint).await?;
                }
                Probe::Missing => mount::unmount(&self.mountpoint).await?,
            }
        }
        if !ok {
            let started = std::time::Instant::now();
            let res = mount::mount(
                &self.source,
                &self.mountpoint,
                "glusterfs",
                &self.options,
                MOUNT_TIMEOUT,
            )
            .await;
            if let Err(e) = res {
                // Another process with the same state dir (the node plugin registering itself
                // on this machine) may have mounted it first: then it is ours to use as well.
                let theirs = mount::mounted_at(&self.mountpoint).await?;
                let usable = theirs.is_some_and(|m| m.source == self.source)
                    && mount::probe(&self.mountpoint).await == Probe::Alive;
                if !usable {
                    return Err(match e {
                        Error::Internal(m) => Error::Unavailable(format!(
                            "mounting gluster volume {} for management: {m}",
                            self.source
                        )),
                        other => other,
                    });
                }
            }
            if mount::mounted_at(&self.mountpoint).await?.is_none() {
                return Err(Error::Unavailable(format!(
                    "mounting gluster volume {} for management: mount.glusterfs reported \
                     success but nothing is mounted at {} (server or volume unreachable?)",
                    self.source,
                    self.mountpoint.display()
                )));
            }
            tracing::info!(source = %self.source, mount = %self.mountpoint.display(), elapsed_ms = started.elapsed().as_millis() as u64, "management mount ready");
        }
        let base = self.base_path();
        tokio::fs::create_dir_all(&base)
            .await
            .map_err(|e| Error::io_at(base.display(), e))?;
        self.healthy.store(true, Ordering::Release);
        Ok(())
    }

    /// After a failed call: is the mount gone or dead? If so it is marked for remounting.
    pub async fn lost(&self) -> bool {
        let lost = match mount::probe(&self.mountpoint).await {
            Probe::Alive => mount::mounted_at(&self.mountpoint)
                .await
                .map_or(true, |m| m.is_none()),
            _ => true,
        };
        if lost {
            self.healthy.store(false, Ordering::Release);
        }
        lost
    }
}

/// [`Fs`] over the management mount, healing it when its FUSE process died.
pub struct MgmtFs {
    pub mount: std::sync::Arc<MgmtMount>,
    inner: LocalFs,
}

impl MgmtFs {
    pub fn new(mount: std::sync::Arc<MgmtMount>) -> Self {
        let inner = LocalFs::new(mount.base_path());
        MgmtFs { mount, inner }
    }

    /// Host path of a volume directory (tests and the bench look at it).
    pub fn host_path(&self, p: &RelPath) -> PathBuf {
        self.inner.host_path(p)
    }
}

/// Runs a call on the inner fs after making sure the mount is there; when the call fails
/// because the mount died, remounts and runs it once more.
macro_rules! healing {
    ($self:ident, $call:expr) => {{
        $self.mount.ensure().await?;
        match $call {
            Err(e) => {
                if $self.mount.lost().await {
                    tracing::warn!(error = %e, "management mount lost during a call; remounting and retrying");
                    $self.mount.ensure().await?;
                    $call
                } else {
                    Err(e)
                }
            }
            ok => ok,
        }
    }};
}

#[async_trait]
impl Fs for MgmtFs {
    async fn stat(&self, path: &RelPath) -> Result<Option<FileStat>> {
        healing!(self, self.inner.stat(path).await)
    }
    async fn mkdir(&self, path: &RelPath, attrs: DirAttrs) -> Result<bool> {
        healing!(self, self.inner.mkdir(path, attrs).await)
    }
    async fn set_attrs(&self, path: &RelPath, attrs: DirAttrs) -> Result<()> {
        healing!(self, self.inner.set_attrs(path, attrs).await)
    }
    async fn read_dir(&self, path: &RelPath) -> Result<Vec<DirEntry>> {
        healing!(self, self.inner.read_dir(path).await)
    }
    async fn create_file(&self, path: &RelPath, mode: u32) -> Result<()> {
        healing!(self, self.inner.create_file(path, mode).await)
    }
    async fn read_at(&self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>> {
        healing!(self, self.inner.read_at(path, offset, len).await)
    }
    async fn write_at(&self, path: &RelPath, offset: u64, data: &[u8]) -> Result<()> {
        healing!(self, self.inner.write_at(path, offset, data).await)
    }
    async fn set_len(&self, path: &RelPath, len: u64) -> Result<()> {
        healing!(self, self.inner.set_len(path, len).await)
    }
    async fn symlink(&self, target: &str, path: &RelPath) -> Result<()> {
        healing!(self, self.inner.symlink(target, path).await)
    }
    async fn read_link(&self, path: &RelPath) -> Result<String> {
        healing!(self, self.inner.read_link(path).await)
    }
    async fn rename(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        healing!(self, self.inner.rename(from, to).await)
    }
    async fn remove_file(&self, path: &RelPath) -> Result<bool> {
        healing!(self, self.inner.remove_file(path).await)
    }
    async fn remove_dir(&self, path: &RelPath) -> Result<bool> {
        healing!(self, self.inner.remove_dir(path).await)
    }
    async fn fs_stats(&self) -> Result<FsStats> {
        healing!(self, self.inner.fs_stats().await)
    }
    async fn read_file(&self, path: &RelPath) -> Result<Option<Vec<u8>>> {
        healing!(self, self.inner.read_file(path).await)
    }
    async fn write_file_atomic(&self, path: &RelPath, data: &[u8]) -> Result<()> {
        healing!(self, self.inner.write_file_atomic(path, data).await)
    }
    async fn remove_all(&self, path: &RelPath) -> Result<bool> {
        healing!(self, self.inner.remove_all(path).await)
    }
    async fn clear_dir(&self, path: &RelPath) -> Result<()> {
        healing!(self, self.inner.clear_dir(path).await)
    }
    async fn copy_tree(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        healing!(self, self.inner.copy_tree(from, to).await)
    }
    async fn tree_size(&self, path: &RelPath) -> Result<u64> {
        healing!(self, self.inner.tree_size(path).await)
    }
}
