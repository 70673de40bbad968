//! Loop devices of volume images: which devices an image backs, attaching, detaching.
//!
//! A device is matched to its image by the backing file's device and inode numbers
//! (`LOOP_GET_STATUS64`, what `losetup -j` does), not by the path sysfs shows. That path is the
//! one the attaching process saw, in its own mount namespace: once that namespace is gone (the
//! node's container restarted by an upgrade, or a node run under `unshare -m`), sysfs shows it
//! relative to the mount it came through (`/pvc-x/fs.img` for `<base>/pvc-x/fs.img`), and a
//! path comparison no longer finds the device. Then the unstage after the restart left the
//! device attached, a NodeStage attached a second one (two ext4 instances on one file), and
//! DeleteVolume's in-use check let the image be deleted under it.
//!
//! Where the device nodes cannot be opened (the controller's unprivileged container has no
//! `/dev/loop*`), the path is compared instead, a path cut at a mount root included.

use std::path::{Path, PathBuf};

use crate::command::{self, SHORT_TIMEOUT};
use crate::error::{Error, Result};
use crate::mount;

/// The first loop device backed by `file` that something uses (a mount of its filesystem, or a
/// bind of the device node when `block`), else the first one attached, else None.
pub(super) async fn device_for(file: &Path, block: bool) -> Result<Option<PathBuf>> {
    let devs = devices_for(file).await?;
    for dev in &devs {
        if in_use(dev, block).await? {
            return Ok(Some(dev.clone()));
        }
    }
    Ok(devs.into_iter().next())
}

/// Every loop device backed by `file`, in number order. Normally one; more when a killed
/// node's helper attached a device after the restarted node's own (found by
/// tests/it/chaos.rs), or when a node from before a restart attached it.
pub(super) async fn devices_for(file: &Path) -> Result<Vec<PathBuf>> {
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || devices_for_blocking(&file))
        .await
        .map_err(|e| Error::Internal(format!("loop device lookup: {e}")))?
}

fn devices_for_blocking(file: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let md =
        std::fs::metadata(file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
    let want_id = (libc::major(md.dev()), libc::minor(md.dev()), md.ino());
    let want_path = std::fs::canonicalize(file)
        .map_err(|e| Error::io(format!("resolving {}", file.display()), e))?;
    let rd = std::fs::read_dir("/sys/block").map_err(|e| Error::io("reading /sys/block", e))?;
    let mut found = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(num) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // No backing_file: not attached.
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        // Only devices whose file has the image's name in a directory of the volume's name (sysfs
        // keeps those two however it cuts the path) are asked: LOOP_GET_STATUS64 stats the
        // backing file, which hangs on a hung FUSE daemon's file (an rbd-fuse image).
        if !tail_matches(Path::new(backing.trim_end()), &want_path) {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        let matches = match backing_id(&dev) {
            Identity::Known(id) => id == want_id,
            Identity::Detached => false,
            Identity::Unreadable => path_matches(Path::new(backing.trim_end()), &want_path),
        };
        if matches {
            found.push((num, dev));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, d)| d).collect())
}

enum Identity {
    /// (major, minor, inode) of the backing file.
    Known((u32, u32, u64)),
    /// The device has no backing file (any more).
    Detached,
    /// The device node cannot be opened here (no `/dev/loop*` in this container).
    Unreadable,
}

/// `struct loop_info64` of `<linux/loop.h>` (not in the libc crate).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

fn backing_id(dev: &Path) -> Identity {
    use std::os::fd::AsRawFd;
    // Read-only open of the device node: no I/O. A concurrent `losetup -d` of a device open
    // here is deferred by the kernel until this closes, not refused.
    let Ok(f) = std::fs::File::open(dev) else {
        return Identity::Unreadable;
    };
    // SAFETY: LoopInfo64 is plain data the kernel fills in; all-zero is a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64 through the pointer, which
    // points to one, and reads nothing else; the descriptor is open for the call's length.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    if rc != 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Identity::Detached,
            _ => Identity::Unreadable,
        };
    }
    // The kernel encodes lo_device with new_encode_dev (12-bit major, 20-bit minor).
    let d = info.lo_device;
    let major = ((d & 0xfff00) >> 8) as u32;
    let minor = ((d & 0xff) | ((d >> 12) & 0xfff00)) as u32;
    Identity::Known((major, minor, info.lo_inode))
}

/// Whether the last two components (the volume's directory, the image's name) of `backing`
/// and `want` are the same.
fn tail_matches(backing: &Path, want: &Path) -> bool {
    fn tail(
        p: &Path,
    ) -> (
        Option<std::path::Component<'_>>,
        Option<std::path::Component<'_>>,
    ) {
        let mut c = p.components().rev();
        (c.next(), c.next())
    }
    let (b, w) = (tail(backing), tail(want));
    b.0.is_some() && b.1.is_some() && b == w
}

/// Whether sysfs's `backing` path names `want` (canonical): the same path, or, when the mount
/// namespace of the process that attached the device is gone, `want`'s tail from a mount root
/// on (at least two components, so a bare `/fs.img` matches no image).
fn path_matches(backing: &Path, want: &Path) -> bool {
    if backing == want {
        return true;
    }
    let tail: Vec<_> = backing.components().skip(1).collect();
    let whole: Vec<_> = want.components().collect();
    tail.len() >= 2 && backing.is_absolute() && whole.ends_with(&tail)
}

/// Whether something uses loop device `dev`: a mount of its filesystem, or (`block`) a bind of
/// the device node (a staged or published raw block volume).
pub(super) async fn in_use(dev: &Path, block: bool) -> Result<bool> {
    if block {
        bound_anywhere(dev).await
    } else {
        mounted_anywhere(dev).await
    }
}

/// Whether the filesystem on loop device `dev` is mounted anywhere on this node (mountinfo
/// names the device by `major:minor`).
async fn mounted_anywhere(dev: &Path) -> Result<bool> {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return Ok(false);
    };
    let Ok(num) = tokio::fs::read_to_string(format!("/sys/block/{name}/dev")).await else {
        // The device went away meanwhile: nothing is mounted from it.
        return Ok(false);
    };
    let num = num.trim();
    Ok(mount::mountinfo::read().await?.iter().any(|m| m.dev == num))
}

/// Whether a loop device node is bind-mounted anywhere: such a bind shows in mountinfo with
/// the device node as its root (`/loop3`).
async fn bound_anywhere(dev: &Path) -> Result<bool> {
    let Some(name) = dev.file_name() else {
        return Ok(false);
    };
    Ok(mount::mountinfo::read()
        .await?
        .iter()
        .any(|m| m.root.file_name() == Some(name) && m.root.parent() == Some(Path::new("/"))))
}

/// Detaches every loop device backed by `img` that nothing uses any more, so that an unstage
/// leaves none behind, however many a crashed node's helpers attached.
pub(super) async fn detach_unused(img: &Path, volume_id: &str, block: bool) -> Result<()> {
    for dev in devices_for(img).await? {
        if in_use(&dev, block).await? {
            continue;
        }
        tracing::info!(volume_id, device = %dev.display(), "detaching the volume's loop device");
        detach(img, &dev).await?;
    }
    Ok(())
}

/// Detaches `dev` from `img`. A detach that fails because the device is no longer attached to
/// the image (an earlier, interrupted call's `losetup -d` finished meanwhile) is done.
pub(super) async fn detach(img: &Path, dev: &Path) -> Result<()> {
    match command::run_tied("losetup", &["-d", mount::path_str(dev)?], SHORT_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(e) => match devices_for(img).await {
            Ok(now) if now.iter().any(|d| d == dev) => Err(e),
            _ => Ok(()),
        },
    }
}

/// The loop device to stage `file` through: the one already in use if there is one (mounting
/// the image through a second device would make a second, independent filesystem instance on
/// the same file and lose writes), else one already attached, else a new one. Spare devices
/// nothing uses are detached.
pub(super) async fn attach(file: &Path, volume_id: &str, block: bool) -> Result<PathBuf> {
    let devs = devices_for(file).await?;
    let mut chosen = None;
    for dev in &devs {
        if in_use(dev, block).await? {
            chosen = Some(dev.clone());
            break;
        }
    }
    if let Some(chosen) = chosen.or_else(|| devs.first().cloned()) {
        for dev in devs.iter().filter(|d| **d != chosen) {
            if !in_use(dev, block).await? {
                tracing::info!(volume_id, device = %dev.display(), "detaching a spare loop device of the volume");
                detach(file, dev).await?;
            }
        }
        return Ok(chosen);
    }
    // Tied to this process: a node killed while losetup runs must not leave it running, to
    // attach a device after the restarted node's retry attached (or an unstage detached) its
    // own (found by tests/it/chaos.rs; `detach_unused` cleans up after older helpers).
    let out = command::run_tied(
        "losetup",
        &["--find", "--show", "--", mount::path_str(file)?],
        SHORT_TIMEOUT,
    )
    .await?;
    Ok(PathBuf::from(out.stdout.trim()))
}

#[cfg(test)]
mod tests {
    use super::path_matches;
    use std::path::Path;

    #[test]
    fn only_devices_of_the_same_volume_and_image_name_are_asked() {
        let want = Path::new("/var/lib/stowage/local/pvc-1/fs.img");
        for (backing, expect) in [
            ("/var/lib/stowage/local/pvc-1/fs.img", true),
            ("/pvc-1/fs.img", true),
            ("/elsewhere/pvc-1/fs.img", true),
            ("/pvc-1/disk.img", false),
            ("/pvc-2/fs.img", false),
            ("/run/stowage/rbd/ab12/mnt/csi-vol-x", false),
            ("/fs.img", false),
        ] {
            assert_eq!(
                super::tail_matches(Path::new(backing), want),
                expect,
                "{backing}"
            );
        }
    }

    #[test]
    fn paths_match_whole_or_from_a_mount_root() {
        let want = Path::new("/var/lib/stowage/local/pvc-1/fs.img");
        for (backing, expect) in [
            ("/var/lib/stowage/local/pvc-1/fs.img", true),
            // Attached in a mount namespace now gone, through a bind of the base directory.
            ("/pvc-1/fs.img", true),
            ("/local/pvc-1/fs.img", true),
            ("/pvc-2/fs.img", false),
            ("/fs.img", false),
            ("/other/pvc-1/fs.img", false),
            ("pvc-1/fs.img", false),
            ("/var/lib/stowage/local/pvc-1/fs.img.old", false),
        ] {
            assert_eq!(path_matches(Path::new(backing), want), expect, "{backing}");
        }
    }
}
