//! Tree walks inside a volume that a pod may be changing while they run: copies (snapshots,
//! clones, restores) and usage accounting of [`super::local::LocalFs`].
//!
//! Walking by path strings is racy: between listing `a/sub` as a directory and opening
//! `a/sub/x`, the pod can swap `sub` for a symlink to `/etc`, and the walk (run as root by the
//! controller) then copies the node's files into a snapshot the pod can restore, which is what
//! `cp -a` (used here before) and a path-joining walk both do. So every step is made relative
//! to an open directory descriptor: the start is opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` from the base, every entry with `O_NOFOLLOW` from its
//! parent's descriptor, and what is copied is what the opened descriptor is (`fstat`), not what
//! an earlier `stat` of the name said. A name swapped meanwhile is skipped (its replacement is
//! the pod's to keep making; the copy is of a live tree anyway, like `cp` of one).
//!
//! Copies keep files sparse (`SEEK_DATA`/`SEEK_HOLE`), use reflinks where the filesystem has
//! them (`FICLONE`, else `copy_file_range`), and keep modes, owners (best effort), times,
//! symlinks and hard links within the tree. Devices, FIFOs and sockets are not copied.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// Bytes per copy_file_range / read-write step.
const CHUNK: usize = 8 << 20;

fn err(what: &str, p: &dyn std::fmt::Display, e: Errno) -> Error {
    Error::io(format!("{what} {p}"), std::io::Error::from(e))
}

/// Opens directory `rel` (None: the base itself) below the directory `base`, refusing any
/// symlink on the way.
fn open_dir_beneath(base: &OwnedFd, rel: Option<&RelPath>) -> Result<OwnedFd> {
    let p = rel.map_or(".", RelPath::as_str);
    rfs::openat2(
        base,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| err("opening", &p, e))
}

fn open_base(base: &Path) -> Result<OwnedFd> {
    rfs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("opening", &base.display(), e))
}

/// Entry names of an open directory, without `.` and `..`.
fn names(dir: &OwnedFd) -> Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let mut rd = rfs::Dir::read_from(dir).map_err(|e| err("reading", &"directory", e))?;
    while let Some(ent) = rd.read() {
        let ent = ent.map_err(|e| err("reading", &"directory", e))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(std::ffi::OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(out)
}

/// An entry of `dir` opened without following a symlink, with what it is. None when it is
/// gone, or is something this walk does not open (a symlink, device, FIFO or socket: those
/// are read with `statat`/`readlinkat` by the caller).
fn open_entry(dir: &OwnedFd, name: &std::ffi::OsStr) -> Result<Option<(OwnedFd, rfs::Stat)>> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
    };
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::Directory && ft != FileType::RegularFile {
        return Ok(None);
    }
    let extra = if ft == FileType::Directory {
        OFlags::DIRECTORY
    } else {
        OFlags::empty()
    };
    // NOFOLLOW + (for files) NONBLOCK: a name swapped for a symlink fails (ELOOP), one swapped
    // for a FIFO does not block the walk; the descriptor's own fstat says what was opened.
    match rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | extra,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let st = rfs::fstat(&fd).map_err(|e| err("reading", &name.to_string_lossy(), e))?;
            if FileType::from_raw_mode(st.st_mode) != ft {
                return Ok(None);
            }
            Ok(Some((fd, st)))
        }
        Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR | Errno::NXIO) => Ok(None),
        Err(e) => Err(err("opening", &name.to_string_lossy(), e)),
    }
}

/// Apparent size in bytes of every regular file below `rel` (directories and links count 0),
/// for usage reports.
pub fn tree_size(base: &Path, rel: &RelPath) -> Result<u64> {
    let root = open_dir_beneath(&open_base(base)?, Some(rel))?;
    let mut total = 0u64;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for name in names(&dir)? {
            match rfs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    if let Some((fd, _)) = open_entry(&dir, &name)? {
                        stack.push(fd);
                    }
                }
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                    total = total.saturating_add(st.st_size as u64);
                }
                Ok(_) | Err(Errno::NOENT) => {}
                Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
            }
        }
    }
    Ok(total)
}

/// One directory still to copy: its source (opened), the destination's parent and its name.
struct Pending {
    src: OwnedFd,
    st: rfs::Stat,
    dst_parent: Arc<OwnedFd>,
    name: std::ffi::OsString,
}

/// Copies the tree at `from` to a new tree at `to` (whose parent must exist and which must
/// not), both below `base`.
pub fn copy_tree(base: &Path, from: &RelPath, to: &RelPath) -> Result<()> {
    let base_fd = open_base(base)?;
    let src_root = open_dir_beneath(&base_fd, Some(from))?;
    let st_root = rfs::fstat(&src_root).map_err(|e| err("reading", &from, e))?;
    let dst_parent = Arc::new(open_dir_beneath(&base_fd, to.parent().as_ref())?);
    let mut copier = Copier::default();
    let mut stack = vec![Pending {
        src: src_root,
        st: st_root,
        dst_parent,
        name: to.file_name().into(),
    }];
    // Directory modes and times are set once their contents are in (a read-only directory
    // would refuse its own files; adding files changes its mtime).
    let mut finish: Vec<(Arc<OwnedFd>, rfs::Stat)> = Vec::new();
    while let Some(p) = stack.pop() {
        let dst = make_dir(&p.dst_parent, &p.name)?;
        let dst = Arc::new(dst);
        for name in names(&p.src)? {
            let st = match rfs::statat(&p.src, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    if let Some((src, st)) = open_entry(&p.src, &name)? {
                        stack.push(Pending {
                            src,
                            st,
                            dst_parent: dst.clone(),
                            name,
                        });
                    }
                }
                FileType::RegularFile => {
                    if let Some((src, st)) = open_entry(&p.src, &name)? {
                        copier.file(&src, &st, &dst, &name)?;
                    }
                }
                FileType::Symlink => {
                    let target = match rfs::readlinkat(&p.src, &name, Vec::new()) {
                        Ok(t) => t,
                        Err(Errno::NOENT | Errno::INVAL) => continue,
                        Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
                    };
                    rfs::symlinkat(target.as_c_str(), &*dst, &name)
                        .map_err(|e| err("making", &name.to_string_lossy(), e))?;
                    let _ = rfs::chownat(
                        &*dst,
                        &name,
                        Some(rfs::Uid::from_raw(st.st_uid)),
                        Some(rfs::Gid::from_raw(st.st_gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    );
                }
                _ => {}
            }
        }
        finish.push((dst, p.st));
    }
    for (fd, st) in finish.iter().rev() {
        set_attrs(fd, st)?;
    }
    Ok(())
}

fn make_dir(parent: &OwnedFd, name: &std::ffi::OsStr) -> Result<OwnedFd> {
    rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
        .map_err(|e| err("making", &name.to_string_lossy(), e))?;
    rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("opening", &name.to_string_lossy(), e))
}

/// Owner (best effort: an unprivileged controller cannot chown), mode, then times.
fn set_attrs(fd: &OwnedFd, st: &rfs::Stat) -> Result<()> {
    let _ = rfs::fchown(
        fd,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    );
    rfs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| err("setting the mode of", &"a copy", e))?;
    let times = rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rfs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    let _ = rfs::futimens(fd, &times);
    Ok(())
}

#[derive(Default)]
struct Copier {
    /// Files with more than one link already copied, by (device, inode): their copy's
    /// directory and name, so the next link becomes a hard link of the copy.
    linked: HashMap<(u64, u64), (Arc<OwnedFd>, std::ffi::OsString)>,
}

impl Copier {
    fn file(
        &mut self,
        src: &OwnedFd,
        st: &rfs::Stat,
        dst_dir: &Arc<OwnedFd>,
        name: &std::ffi::OsStr,
    ) -> Result<()> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1
            && let Some((dir, first)) = self.linked.get(&key)
        {
            return rfs::linkat(&**dir, first, &**dst_dir, name, AtFlags::empty())
                .map_err(|e| err("linking", &name.to_string_lossy(), e));
        }
        let dst = rfs::openat(
            &**dst_dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| err("making", &name.to_string_lossy(), e))?;
        let size = st.st_size as u64;
        if rfs::ioctl_ficlone(&dst, src).is_err() {
            copy_data(src, &dst, size).map_err(|e| err("copying", &name.to_string_lossy(), e))?;
        }
        set_attrs(&dst, st)?;
        if st.st_nlink > 1 {
            self.linked
                .insert(key, (dst_dir.clone(), name.to_os_string()));
        }
        Ok(())
    }
}

/// Copies the data runs of `src` (skipping holes) to the same offsets of `dst`, then sets
/// its length: a sparse file stays sparse.
fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> std::result::Result<(), Errno> {
    let mut off = 0u64;
    while off < size {
        let start = match rfs::seek(src, rfs::SeekFrom::Data(off)) {
            Ok(s) => s,
            // No data after `off` (the rest is a hole, or the file shrank meanwhile).
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: all of it is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => off,
            Err(e) => return Err(e),
        };
        let end = match rfs::seek(src, rfs::SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => size,
            Err(e) => return Err(e),
        };
        copy_range(src, dst, start, end)?;
        off = end.max(start + 1);
    }
    rfs::ftruncate(dst, size)
}

fn copy_range(
    src: &OwnedFd,
    dst: &OwnedFd,
    start: u64,
    end: u64,
) -> std::result::Result<(), Errno> {
    let (mut i, mut o) = (start, start);
    while i < end {
        let want = ((end - i) as usize).min(CHUNK);
        match rfs::copy_file_range(src, Some(&mut i), dst, Some(&mut o), want) {
            Ok(0) => return Ok(()), // shrank meanwhile
            Ok(_) => {}
            // Not offered by this filesystem (or between these two): read and write.
            Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                return copy_rw(src, dst, i, end);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_rw(src: &OwnedFd, dst: &OwnedFd, mut off: u64, end: u64) -> std::result::Result<(), Errno> {
    let mut buf = vec![0u8; CHUNK.min((end - off) as usize).max(1)];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = rustix::io::pread(src.as_fd(), &mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            done += rustix::io::pwrite(dst.as_fd(), &buf[done..n], off + done as u64)?;
        }
        off += n as u64;
    }
    Ok(())
}
