//! Node-side mount machinery shared by every backend: mount(8)/umount(8) with argv and
//! timeouts, idempotency checks against /proc/self/mountinfo, the bind mounts of publish, and
//! volume stats.
//!
//! mount(8) rather than mount(2) because it runs the helpers remote filesystems need
//! (mount.nfs, mount.glusterfs, FUSE helpers) and applies `-o ro` to bind mounts correctly.

pub mod mountinfo;
pub mod options;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command::{self, mount_timeout};
use crate::error::{Error, Result};
use crate::types::PublishRequest;
use crate::types::{Usage, VolumeStats};

pub use mountinfo::MountEntry;

/// Name of the device-node file a block stage puts in the staging directory; publish binds it.
pub const STAGED_DEVICE: &str = "device";

/// The mount at exactly `path`, if any.
pub async fn mounted_at(path: &Path) -> Result<Option<MountEntry>> {
    mountinfo::find(path).await
}

/// `mount -t fstype -o options source target`, bounded by `timeout`.
pub async fn mount(
    source: &str,
    target: &Path,
    fs_type: &str,
    options: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    if !fs_type.is_empty() {
        args.extend(["-t".into(), fs_type.into()]);
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.join(",")]);
    }
    // `--` so that a source beginning with '-' can never be read as an option.
    args.extend(["--".into(), source.into(), path_str(target)?.into()]);
    let bind = options.iter().any(|o| o == "bind" || o == "rbind");
    crate::metrics::timed(fs_family(fs_type, bind), "mount", async {
        command::run("mount", &args, timeout).await.map(|_| ())
    })
    .await
}

/// The `backend` label of a mount or unmount: a small fixed set, whatever the filesystem type
/// string (it may come from a StorageClass), so labels cannot multiply.
fn fs_family(fs_type: &str, bind: bool) -> &'static str {
    if bind {
        return "bind";
    }
    match fs_type {
        "nfs" | "nfs4" => "nfs",
        "glusterfs" | "fuse.glusterfs" => "glusterfs",
        "ext4" | "ext3" | "ext2" | "xfs" | "btrfs" => "block",
        t if t.starts_with("fuse") => "fuse",
        _ => "other",
    }
}

/// Bind-mounts `source` onto `target`, read-only when asked, with extra flags.
pub async fn bind(source: &Path, target: &Path, readonly: bool, flags: &[String]) -> Result<()> {
    let mut opts = vec!["bind".to_string()];
    if readonly {
        opts.push("ro".into());
    }
    opts.extend(flags.iter().filter(|f| !f.is_empty()).cloned());
    mount(path_str(source)?, target, "", &opts, mount_timeout()).await
}

/// Unmounts `target` if it is a mount point. A dead FUSE or NFS mount (ENOTCONN, ESTALE) is
/// detached lazily, since a normal unmount of it can hang or fail forever.
pub async fn unmount(target: &Path) -> Result<()> {
    loop {
        let Some(entry) = mounted_at(target).await? else {
            return Ok(());
        };
        let dead = matches!(probe(target).await, Probe::Dead(_));
        let args: Vec<&str> = if dead {
            vec!["-l", path_str(target)?]
        } else {
            vec![path_str(target)?]
        };
        let started = std::time::Instant::now();
        let out = command::run_status("umount", &args, mount_timeout()).await;
        let ok = matches!(&out, Ok(o) if o.status == 0);
        // A bind mount shows its source's filesystem in mountinfo, so unmounts of binds count
        // under that filesystem's family.
        crate::metrics::get().record_backend(
            fs_family(&entry.fs_type, false),
            "unmount",
            ok,
            started.elapsed(),
        );
        let out = out?;
        if out.status != 0 && mounted_at(target).await?.is_some() {
            return Err(Error::Internal(format!(
                "umount {} failed: {}",
                target.display(),
                out.stderr.trim()
            )));
        }
        // Loop: stacked mounts at the same point (a repeated bind) are removed one by one.
    }
}

/// What a stat of a mount point says about its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Missing,
    Alive,
    /// The path exists in the mount table but its filesystem does not answer.
    Dead(String),
}

/// Stats `path` off the async threads, bounded: a hung NFS server can block stat forever.
pub async fn probe(path: &Path) -> Probe {
    let p = path.to_path_buf();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || std::fs::metadata(p)),
    )
    .await;
    match res {
        Err(_) => Probe::Dead("stat timed out after 10s".into()),
        Ok(Err(e)) => Probe::Dead(e.to_string()),
        Ok(Ok(Ok(_))) => Probe::Alive,
        Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::NotFound => Probe::Missing,
        Ok(Ok(Err(e))) => Probe::Dead(e.to_string()),
    }
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::invalid("path", format!("{} is not UTF-8", p.display())))
}

/// Creates the directory (and parents) a mount goes on.
pub async fn ensure_dir(p: &Path) -> Result<()> {
    tokio::fs::create_dir_all(p)
        .await
        .map_err(|e| Error::io(format!("creating {}", p.display()), e))
}

/// Creates an empty file to bind a device node onto.
pub async fn ensure_file(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent() {
        ensure_dir(parent).await?;
    }
    match tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            Err(Error::FailedPrecondition(format!(
                "{} is a directory; a block volume needs a file",
                p.display()
            )))
        }
        Err(e) => Err(Error::io(format!("creating {}", p.display()), e)),
    }
}

/// The source a block stage left in the staging directory.
pub fn staged_device(staging: &Path) -> PathBuf {
    staging.join(STAGED_DEVICE)
}

/// Default publish: bind the staged directory (or staged device node) onto the target.
pub async fn publish_bind(req: &PublishRequest) -> Result<()> {
    let block = req.capability.is_block();
    let source = if block {
        staged_device(&req.staging_path)
    } else {
        req.staging_path.clone()
    };
    if mounted_at(&source).await?.is_none() {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is not staged at {}",
            req.volume_id,
            req.staging_path.display()
        )));
    }
    if let Some(existing) = mounted_at(&req.target_path).await? {
        // Same volume with the same read-only flag: the call is a repeat.
        if existing.is_read_only() == req.readonly {
            if let Probe::Dead(why) = probe(&req.target_path).await {
                tracing::warn!(target = %req.target_path.display(), %why, "published mount is dead; remounting");
                unmount(&req.target_path).await?;
            } else {
                return Ok(());
            }
        } else {
            return Err(Error::AlreadyExists(format!(
                "{} is already published with a different read-only setting",
                req.target_path.display()
            )));
        }
    }
    if block {
        ensure_file(&req.target_path).await?;
    } else {
        ensure_dir(&req.target_path).await?;
    }
    bind(
        &source,
        &req.target_path,
        req.readonly,
        req.capability.mount_flags(),
    )
    .await
}

/// Default unpublish: unmount, then remove the mount point (a file for block volumes).
pub async fn unpublish(target: &Path) -> Result<()> {
    unmount(target).await?;
    remove_mount_point(target).await
}

/// Removes a mount point Stowage made: an empty directory (filesystem volumes) or an empty
/// regular file (the bind target of a block volume). Anything else at that path (a directory
/// with contents, a file with data, a symlink, a device) was not made by Stowage or still holds
/// data: it is left untouched and the call fails with FailedPrecondition naming the path, so a
/// wrong or hostile path can never make the node plugin delete what it does not own.
pub async fn remove_mount_point(p: &Path) -> Result<()> {
    let md = match tokio::fs::symlink_metadata(p).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspecting {}", p.display()), e)),
        Ok(md) => md,
    };
    let refuse = |what: &str| {
        Err(Error::FailedPrecondition(format!(
            "{} is {what}, not a mount point Stowage made; left untouched",
            p.display()
        )))
    };
    let gone_ok = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else if e.kind() == std::io::ErrorKind::DirectoryNotEmpty {
            Err(Error::FailedPrecondition(format!(
                "{} is a directory that is not empty and not a mount; left untouched",
                p.display()
            )))
        } else {
            Err(Error::io(format!("removing {}", p.display()), e))
        }
    };
    let ft = md.file_type();
    if ft.is_dir() {
        // rmdir(2) only ever removes an empty directory: the check and the removal are one.
        tokio::fs::remove_dir(p).await.or_else(gone_ok)
    } else if ft.is_symlink() {
        refuse("a symbolic link")
    } else if !ft.is_file() {
        refuse("a special file")
    } else if md.len() > 0 {
        refuse("a file holding data")
    } else {
        tokio::fs::remove_file(p).await.or_else(gone_ok)
    }
}

/// NodeGetVolumeStats on a path: statvfs for filesystems, device size for block volumes; an
/// abnormal condition when the mount is gone or dead.
pub async fn path_stats(path: &Path) -> Result<VolumeStats> {
    match probe(path).await {
        Probe::Missing => return Err(Error::not_found("volume path", path.display())),
        Probe::Dead(why) => {
            return Ok(VolumeStats {
                abnormal: Some(format!(
                    "volume at {} does not answer: {why}",
                    path.display()
                )),
                ..Default::default()
            });
        }
        Probe::Alive => {}
    }
    let md = tokio::fs::metadata(path)
        .await
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    use std::os::unix::fs::FileTypeExt;
    if md.file_type().is_block_device() {
        let size = block_device_size(path).await?;
        return Ok(VolumeStats {
            usage: Usage {
                total_bytes: size,
                ..Default::default()
            },
            is_block: true,
            abnormal: None,
        });
    }
    let abnormal = match mounted_at(path).await? {
        Some(_) => None,
        None => Some(format!("{} is no longer a mount point", path.display())),
    };
    let p = path.to_path_buf();
    let st = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&p))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bfree.saturating_mul(st.f_frsize);
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    Ok(VolumeStats {
        usage: Usage {
            total_bytes: total,
            available_bytes: avail,
            used_bytes: total.saturating_sub(free),
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
            used_inodes: st.f_files.saturating_sub(st.f_ffree),
        },
        abnormal,
        is_block: false,
    })
}

/// Size of a block device: seeking to the end works for any device node without ioctls.
pub async fn block_device_size(path: &Path) -> Result<u64> {
    use tokio::io::AsyncSeekExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    f.seek(std::io::SeekFrom::End(0))
        .await
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))
}
