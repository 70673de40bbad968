//! Enforcing the size of local directory volumes.
//!
//! Two ways, chosen per instance at start and logged:
//! - **project quotas** (XFS, or ext4 with the `project` feature), when the filesystem holding
//!   `baseDir` is mounted with project quotas on: each volume directory gets its own project
//!   (inherited by everything created in it) with a hard block limit of the volume's size.
//!   Files stay plain files in the directory, statvfs on the volume reports the limit and the
//!   usage (XFS and ext4 both do for project-inherit directories), and expansion is a new
//!   limit. Needs `xfs_quota` and root.
//! - **a filesystem image per volume**: `<dir>/fs.img`, a sparse file holding an ext4
//!   filesystem of the volume's size, attached to a loop device and mounted by the node instead
//!   of the bind mount. Writes past the size fail with ENOSPC, statvfs is the image's own
//!   filesystem, expansion grows the file (controller) and the filesystem (node, online).
//!   The volume's files then live inside the image, not in the directory, which is why `auto`
//!   does not pick it by itself: tools (and tests) that read volumes through `baseDir` would
//!   see only `fs.img`. Set `capacity: image` to use it.
//!
//! `auto` therefore means: project quotas where the base filesystem has them, else the size is
//! recorded only (as before), with a log line saying so and how to change it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command::{self, SHORT_TIMEOUT};
use crate::error::{Error, Result};
use crate::mount::{self, mountinfo};

/// The filesystem image of an image-enforced volume, inside the volume directory.
pub const FS_IMAGE: &str = "fs.img";

/// mkfs and resize2fs on a sparse image are quick, but a busy disk can slow them a lot.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

/// The configured choice (`capacity:` in an instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Setting {
    #[default]
    Auto,
    Quota,
    Image,
    Off,
}

impl Setting {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s.unwrap_or("auto") {
            "auto" => Ok(Setting::Auto),
            "quota" => Ok(Setting::Quota),
            "image" => Ok(Setting::Image),
            "off" => Ok(Setting::Off),
            other => Err(Error::invalid(
                "capacity",
                format!("{other:?}: expected auto, quota, image or off"),
            )),
        }
    }
}

/// What an instance does, decided at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Project quotas on the filesystem mounted at `mount_point`.
    Quota { mount_point: PathBuf, ext4: bool },
    /// An ext4 image per volume on a loop device.
    Image,
    /// Recorded only.
    Off,
}

impl Enforcement {
    pub fn describe(&self) -> &'static str {
        match self {
            Enforcement::Quota { ext4: false, .. } => "XFS project quotas",
            Enforcement::Quota { ext4: true, .. } => "ext4 project quotas",
            Enforcement::Image => "a filesystem image per volume on a loop device",
            Enforcement::Off => "not enforced (recorded only)",
        }
    }
}

/// The mount holding `path` (the longest mount point it is under) and whether project quotas
/// are enforced on it.
async fn quota_mount(path: &Path) -> Result<Option<(PathBuf, bool)>> {
    let mounts = mountinfo::read().await?;
    // Later entries shadow earlier ones at the same mount point, so the last longest wins.
    let Some(m) = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
    else {
        return Ok(None);
    };
    let has = |o: &str| m.super_options.iter().chain(&m.options).any(|x| x == o);
    let on = match m.fs_type.as_str() {
        // pqnoenforce accounts without enforcing: no use here.
        "xfs" => has("prjquota") || has("pquota") || has("pqenforce"),
        "ext4" => has("prjquota"),
        _ => false,
    };
    Ok(on.then(|| (m.mount_point.clone(), m.fs_type == "ext4")))
}

/// Decides how `base` (already created) enforces sizes.
pub async fn choose(base: &Path, setting: Setting) -> Result<Enforcement> {
    let canon = tokio::fs::canonicalize(base)
        .await
        .map_err(|e| Error::io(format!("resolving {}", base.display()), e))?;
    let quota = match setting {
        Setting::Auto | Setting::Quota => quota_mount(&canon).await?,
        _ => None,
    };
    let tool = if quota.is_some() {
        command::run("xfs_quota", &["-V"], SHORT_TIMEOUT)
            .await
            .is_ok()
    } else {
        false
    };
    match (setting, quota) {
        (Setting::Off, _) => Ok(Enforcement::Off),
        (Setting::Image, _) => Ok(Enforcement::Image),
        (Setting::Auto | Setting::Quota, Some((mount_point, ext4))) if tool => {
            // xfs_quota's -c argument is its own command language split on blanks: a path
            // with blanks would be split, so such a base cannot use it.
            if !quota_safe(&canon) {
                return Err(Error::invalid(
                    "baseDir",
                    format!(
                        "{}: project quotas need a path of letters, digits and -_./ only",
                        canon.display()
                    ),
                ));
            }
            Ok(Enforcement::Quota { mount_point, ext4 })
        }
        (Setting::Quota, q) => Err(Error::invalid(
            "capacity",
            format!(
                "quota: {} {}",
                canon.display(),
                if q.is_none() {
                    "is not on an XFS or ext4 filesystem mounted with project quotas (prjquota)"
                } else {
                    "is on a project-quota filesystem but xfs_quota is not installed"
                }
            ),
        )),
        (Setting::Auto, _) => Ok(Enforcement::Off),
    }
}

fn quota_safe(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    })
}

/// The project of a volume directory: a hash of its path under the base, in a range well
/// away from the small IDs admins hand out by hand (collisions are possible but need about
/// 2^15 volumes on one filesystem to become likely).
pub fn project_id(instance: &str, dir: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{instance}/{dir}").as_bytes());
    let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    0x1000_0000 | (n & 0x6fff_ffff)
}

async fn xfs_quota(mount_point: &Path, ext4: bool, cmd: &str) -> Result<()> {
    let mut args: Vec<String> = vec!["-x".into()];
    if ext4 {
        // ext4 is a "foreign" filesystem to xfs_quota.
        args.push("-f".into());
    }
    args.extend([
        "-c".into(),
        cmd.into(),
        mount::path_str(mount_point)?.into(),
    ]);
    command::run("xfs_quota", &args, SHORT_TIMEOUT)
        .await
        .map(|_| ())
}

/// Puts `dir` (and everything already in it, for clones) in its project and limits the
/// project to `bytes`. Idempotent.
pub async fn set_quota(
    mount_point: &Path,
    ext4: bool,
    dir: &Path,
    id: u32,
    bytes: u64,
) -> Result<()> {
    let d = mount::path_str(dir)?;
    if !quota_safe(dir) {
        return Err(Error::Internal(format!(
            "{d}: not a path xfs_quota can be given"
        )));
    }
    xfs_quota(mount_point, ext4, &format!("project -s -p {d} {id}")).await?;
    limit(mount_point, ext4, id, bytes).await
}

/// Sets the project's hard block limit; 0 removes it.
pub async fn limit(mount_point: &Path, ext4: bool, id: u32, bytes: u64) -> Result<()> {
    // xfs_quota takes sizes with a unit; whole KiB, rounded up, so the limit is never below
    // the volume's size.
    let kib = bytes.div_ceil(1024);
    xfs_quota(mount_point, ext4, &format!("limit -p bhard={kib}k {id}")).await
}

/// Makes an empty ext4 image of `bytes` at `img` (crash safe: built beside it, renamed into
/// place). Its root directory gets `mode` and `owner`: those the volume directory was given
/// (dirMode, dirUid, dirGid), which would otherwise be hidden under the mount.
pub async fn make_image(img: &Path, bytes: u64, mode: u32, owner: (u32, u32)) -> Result<()> {
    let tmp = img.with_extension("img.tmp");
    let f = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.set_len(bytes)
        .await
        .map_err(|e| Error::io(format!("sizing {}", tmp.display()), e))?;
    drop(f);
    // -m 0: no blocks reserved for root, the volume's user gets the whole size;
    // nodiscard: discarding a sparse file's blocks is wasted time.
    let ext = format!("nodiscard,root_owner={}:{}", owner.0, owner.1);
    let t = mount::path_str(&tmp)?;
    let res = async {
        command::run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-E", &ext, "--", t],
            MKFS_TIMEOUT,
        )
        .await?;
        // mkfs has no option for the root's mode; debugfs edits the unmounted image.
        let sif = format!("set_inode_field / mode 0{:o}", 0o40000 | (mode & 0o7777));
        command::run("debugfs", &["-w", "-R", &sif, t], SHORT_TIMEOUT).await
    }
    .await;
    if let Err(e) = res {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, img)
        .await
        .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))
}

/// Grows an image file to `bytes` (never shrinks it); the node grows the filesystem.
pub async fn grow_image(img: &Path, bytes: u64) -> Result<bool> {
    let len = tokio::fs::metadata(img)
        .await
        .map_err(|e| Error::io(format!("reading {}", img.display()), e))?
        .len();
    if len >= bytes {
        return Ok(false);
    }
    let f = tokio::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .await
        .map_err(|e| Error::io(format!("opening {}", img.display()), e))?;
    f.set_len(bytes)
        .await
        .map_err(|e| Error::io(format!("growing {}", img.display()), e))?;
    Ok(true)
}

/// Grows the mounted ext4 filesystem on `dev` to the device's size (online resize). The
/// kernel allows that only with CAP_SYS_RESOURCE; without it the error says so, and the next
/// stage grows the filesystem offline (`grow_offline`).
pub async fn resize_online(dev: &Path) -> Result<()> {
    match command::run("resize2fs", &[mount::path_str(dev)?], MKFS_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("Permission denied") => {
            Err(Error::FailedPrecondition(format!(
                "growing the filesystem online was refused ({e}): the node plugin needs CAP_SYS_RESOURCE; it grows at the next stage instead"
            )))
        }
        Err(e) => Err(e),
    }
}

/// The size of the ext4 filesystem in an image, from its superblock (at byte 1024):
/// s_blocks_count_lo (0x04), s_log_block_size (0x18), s_feature_incompat (0x60, bit 0x80 =
/// 64bit) and s_blocks_count_hi (0x150).
pub async fn ext4_size(img: &Path) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(img)
        .await
        .map_err(|e| Error::io(format!("opening {}", img.display()), e))?;
    let mut sb = vec![0u8; 1024];
    f.seek(std::io::SeekFrom::Start(1024))
        .await
        .map_err(|e| Error::io(format!("reading {}", img.display()), e))?;
    f.read_exact(&mut sb)
        .await
        .map_err(|e| Error::io(format!("reading {}", img.display()), e))?;
    ext4_size_of(&sb).ok_or_else(|| {
        Error::FailedPrecondition(format!("{} holds no ext4 filesystem", img.display()))
    })
}

fn ext4_size_of(sb: &[u8]) -> Option<u64> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(sb.get(o..o + 4)?.try_into().ok()?)) };
    let magic = u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?);
    if magic != 0xEF53 {
        return None;
    }
    let mut blocks = u64::from(u32_at(0x04)?);
    if u32_at(0x60)? & 0x80 != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    let log = u32_at(0x18)?;
    (log <= 6).then(|| blocks << (10 + log))
}

/// Grows the unmounted filesystem on `dev` when the image grew past it (a ControllerExpand
/// whose online resize could not run, or a restore into a bigger volume): a forced check
/// first, which resize2fs requires offline.
pub async fn grow_offline(img: &Path, dev: &Path) -> Result<bool> {
    let file = tokio::fs::metadata(img)
        .await
        .map_err(|e| Error::io(format!("reading {}", img.display()), e))?
        .len();
    // Less than a block group short is what mkfs left over: nothing to grow.
    if ext4_size(img).await? + (1 << 20) > file {
        return Ok(false);
    }
    let d = mount::path_str(dev)?;
    // e2fsck -p exits 1 when it fixed something: still fine to resize.
    let out = command::run_status("e2fsck", &["-f", "-p", d], MKFS_TIMEOUT).await?;
    if out.status > 1 {
        return Err(Error::Internal(format!(
            "e2fsck {d} exited with {}: {}",
            out.status,
            out.stderr.trim()
        )));
    }
    command::run("resize2fs", &[d], MKFS_TIMEOUT).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_sizes() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&16384u32.to_le_bytes());
        assert_eq!(ext4_size_of(&sb), Some(16 << 20));
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(ext4_size_of(&sb), Some(64 << 20));
        sb[0x60] = 0x80;
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(ext4_size_of(&sb), Some(((1u64 << 32) + 16384) << 12));
        sb[0x38] = 0;
        assert_eq!(ext4_size_of(&sb), None);
    }

    #[test]
    fn settings_parse() {
        assert_eq!(Setting::parse(None).unwrap(), Setting::Auto);
        assert_eq!(Setting::parse(Some("image")).unwrap(), Setting::Image);
        assert!(Setting::parse(Some("zfs")).is_err());
    }

    #[test]
    fn project_ids_are_stable_and_out_of_the_way() {
        let a = project_id("default", "pvc-1");
        assert_eq!(a, project_id("default", "pvc-1"));
        assert_ne!(a, project_id("default", "pvc-2"));
        assert_ne!(a, project_id("other", "pvc-1"));
        assert!((0x1000_0000..0x8000_0000).contains(&a), "{a:#x}");
        assert!(quota_safe(Path::new("/srv/stowage/pvc-1")));
        assert!(!quota_safe(Path::new("/srv/with space/x")));
    }

    #[tokio::test]
    async fn base_on_a_filesystem_without_quotas_is_off_or_refused() {
        let d = tempfile::tempdir().unwrap();
        if quota_mount(d.path()).await.unwrap().is_some() {
            return; // a machine whose temp dir has project quotas on
        }
        assert_eq!(
            choose(d.path(), Setting::Auto).await.unwrap(),
            Enforcement::Off
        );
        assert_eq!(
            choose(d.path(), Setting::Image).await.unwrap(),
            Enforcement::Image
        );
        assert!(choose(d.path(), Setting::Quota).await.is_err());
    }
}
