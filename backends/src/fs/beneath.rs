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
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
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

/// An entry of `dir` opened without following a symlink, with what it is: a directory or a
/// regular file. None when it is gone or is anything else (symlinks, devices, FIFOs and
/// sockets are read with `statat`/`readlinkat` by the caller, never opened).
fn open_entry(dir: &OwnedFd, name: &std::ffi::OsStr) -> Result<Option<(OwnedFd, rfs::Stat)>> {
    use std::os::fd::AsRawFd;
    // O_PATH first: it opens nothing (a device node swapped in meanwhile would otherwise have
    // its driver's open run, as root); what the name is comes from the descriptor itself.
    let path = match rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(p) => p,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(err("opening", &name.to_string_lossy(), e)),
    };
    let st = rfs::fstat(&path).map_err(|e| err("reading", &name.to_string_lossy(), e))?;
    let flags = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FileType::RegularFile => OFlags::RDONLY | OFlags::CLOEXEC,
        _ => return Ok(None),
    };
    // Reopened through that descriptor: the same inode, whatever the name points at by now.
    let reopen = format!("/proc/self/fd/{}", path.as_raw_fd());
    match rfs::open(reopen.as_str(), flags, Mode::empty()) {
        Ok(fd) => Ok(Some((fd, st))),
        // No /proc here: by name, refusing a link, and only if it is still the same inode.
        Err(Errno::NOENT) => match rfs::openat(
            dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let now =
                    rfs::fstat(&fd).map_err(|e| err("reading", &name.to_string_lossy(), e))?;
                Ok((now.st_dev == st.st_dev && now.st_ino == st.st_ino).then_some((fd, st)))
            }
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR | Errno::NXIO) => Ok(None),
            Err(e) => Err(err("opening", &name.to_string_lossy(), e)),
        },
        Err(e) => Err(err("opening", &name.to_string_lossy(), e)),
    }
}

/// Apparent size in bytes of every regular file below `rel` (directories and links count 0),
/// for usage reports. Like [`copy_tree`], a directory is opened only when its turn comes.
pub fn tree_size(base: &Path, rel: &RelPath) -> Result<u64> {
    let root = Arc::new(open_dir_beneath(&open_base(base)?, Some(rel))?);
    let mut total = 0u64;
    let mut stack: Vec<(Arc<OwnedFd>, Option<OsString>)> = vec![(root, None)];
    while let Some((parent, name)) = stack.pop() {
        let dir = match name {
            None => parent,
            Some(name) => match open_entry(&parent, &name)? {
                Some((fd, st)) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    Arc::new(fd)
                }
                _ => continue,
            },
        };
        for name in names(&dir)? {
            match rfs::statat(&*dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    stack.push((dir.clone(), Some(name)));
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

/// Where a directory still to copy comes from: the root (opened already), or an entry of a
/// directory being copied, opened only when its turn comes. Descriptors stay open only for
/// the directories on the way down to the one being copied (their pending entries hold
/// them), so a wide or deep tree does not run out of descriptors.
enum Source {
    Root(OwnedFd, rfs::Stat),
    Entry(Arc<OwnedFd>, OsString),
}

/// One directory still to copy and where its copy goes.
struct Pending {
    src: Source,
    dst_parent: Arc<OwnedFd>,
    dst_name: OsString,
    /// The copy's path below the base (for its attributes, set at the end).
    dst_rel: PathBuf,
}

/// Copies the tree at `from` to a new tree at `to` (whose parent must exist and which must
/// not), both below `base`. The destination is the driver's own fresh tree (a temporary
/// directory no pod sees); only the source is walked by descriptors.
pub fn copy_tree(base: &Path, from: &RelPath, to: &RelPath) -> Result<()> {
    let base_fd = open_base(base)?;
    let src_root = open_dir_beneath(&base_fd, Some(from))?;
    let st_root = rfs::fstat(&src_root).map_err(|e| err("reading", &from, e))?;
    let dst_parent = Arc::new(open_dir_beneath(&base_fd, to.parent().as_ref())?);
    let mut copier = Copier::default();
    let mut stack = vec![Pending {
        src: Source::Root(src_root, st_root),
        dst_parent,
        dst_name: to.file_name().into(),
        dst_rel: PathBuf::from(to.as_str()),
    }];
    // Directory modes and times are set once their contents are in (a read-only directory
    // would refuse its own files; adding files changes its mtime).
    let mut finish: Vec<(PathBuf, rfs::Stat)> = Vec::new();
    while let Some(p) = stack.pop() {
        let (src, st) = match p.src {
            Source::Root(fd, st) => (fd, st),
            Source::Entry(parent, name) => match open_entry(&parent, &name)? {
                Some((fd, st)) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    (fd, st)
                }
                // Gone or swapped for something else since it was listed.
                _ => continue,
            },
        };
        let src = Arc::new(src);
        let dst = Arc::new(make_dir(&p.dst_parent, &p.dst_name)?);
        for name in names(&src)? {
            let est = match rfs::statat(&*src, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
            };
            match FileType::from_raw_mode(est.st_mode) {
                FileType::Directory => stack.push(Pending {
                    src: Source::Entry(src.clone(), name.clone()),
                    dst_parent: dst.clone(),
                    dst_rel: p.dst_rel.join(&name),
                    dst_name: name,
                }),
                FileType::RegularFile => {
                    if let Some((fd, fst)) = open_entry(&src, &name)?
                        && FileType::from_raw_mode(fst.st_mode) == FileType::RegularFile
                    {
                        copier.file(&base_fd, &fd, &fst, &dst, &p.dst_rel, &name)?;
                    }
                }
                FileType::Symlink => {
                    let target = match rfs::readlinkat(&*src, &name, Vec::new()) {
                        Ok(t) => t,
                        Err(Errno::NOENT | Errno::INVAL) => continue,
                        Err(e) => return Err(err("reading", &name.to_string_lossy(), e)),
                    };
                    rfs::symlinkat(target.as_c_str(), &*dst, &name)
                        .map_err(|e| err("making", &name.to_string_lossy(), e))?;
                    let _ = rfs::chownat(
                        &*dst,
                        &name,
                        Some(rfs::Uid::from_raw(est.st_uid)),
                        Some(rfs::Gid::from_raw(est.st_gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    );
                }
                _ => {}
            }
        }
        finish.push((p.dst_rel, st));
    }
    for (rel, st) in finish.iter().rev() {
        match rfs::openat(
            &base_fd,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => set_attrs(&fd, st)?,
            // Deeper than PATH_MAX: the copy is whole, only this directory keeps mode 0700.
            Err(Errno::NAMETOOLONG) => {
                tracing::warn!(path = %rel.display(), "copy: directory too deep to set its mode and times");
            }
            Err(e) => return Err(err("opening", &rel.display(), e)),
        }
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
    /// Files with more than one link already copied, by (device, inode): their copy's path
    /// below the base, so the next link becomes a hard link of the copy.
    linked: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    fn file(
        &mut self,
        base: &OwnedFd,
        src: &OwnedFd,
        st: &rfs::Stat,
        dst_dir: &OwnedFd,
        dst_dir_rel: &Path,
        name: &std::ffi::OsStr,
    ) -> Result<()> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1
            && let Some(first) = self.linked.get(&key)
        {
            return rfs::linkat(base, first, dst_dir, name, AtFlags::empty())
                .map_err(|e| err("linking", &name.to_string_lossy(), e));
        }
        let dst = rfs::openat(
            dst_dir,
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
            self.linked.insert(key, dst_dir_rel.join(name));
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
