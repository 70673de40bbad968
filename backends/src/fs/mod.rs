//! A small filesystem interface over the directory tree a backend keeps its volumes in.
//!
//! The directory-per-volume backends (local, NFS, and later GlusterFS through its management
//! mount) share one controller implementation, [`crate::dirstore`], written against this trait.
//! `local` implements it with the host VFS; `nfs` with an NFSv3 client in user space, so the
//! controller never mounts anything.
//!
//! Every path is a [`RelPath`] below the implementation's base; implementations never follow
//! symlinks found inside a volume.

mod beneath;
pub mod lazy;
pub mod local;
pub mod nfs;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// What kind of node a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Sockets, fifos, devices: skipped by copies, removed by deletes.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
}

/// Capacity of the filesystem holding the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// Ownership and permissions to give a new directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirAttrs {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for DirAttrs {
    fn default() -> Self {
        DirAttrs {
            mode: 0o777,
            uid: None,
            gid: None,
        }
    }
}

/// Ownership and size limit of new volume directories, common to the directory backends
/// (serde's `flatten` cannot be combined with `deny_unknown_fields`, so each backend's
/// instance type repeats the fields and hands them over through this).
#[derive(Debug, Clone, Default)]
pub struct DirSettings {
    pub dir_mode: Option<String>,
    pub dir_uid: Option<u32>,
    pub dir_gid: Option<u32>,
    pub max_volume_bytes: u64,
}

impl DirSettings {
    pub fn attrs(&self) -> Result<DirAttrs> {
        let mode = match &self.dir_mode {
            None => 0o777,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    Error::invalid(
                        "dirMode",
                        format!("{m:?} is not an octal mode such as \"0775\""),
                    )
                })?,
        };
        Ok(DirAttrs {
            mode,
            uid: self.dir_uid,
            gid: self.dir_gid,
        })
    }
}

/// `dir_settings()` for an instance type that has the `dirMode`/`dirUid`/`dirGid`/
/// `maxVolumeBytes` fields.
macro_rules! dir_settings {
    ($t:ty) => {
        impl $t {
            pub fn dir_settings(&self) -> $crate::fs::DirSettings {
                $crate::fs::DirSettings {
                    dir_mode: self.dir_mode.clone(),
                    dir_uid: self.dir_uid,
                    dir_gid: self.dir_gid,
                    max_volume_bytes: self.max_volume_bytes,
                }
            }
        }
    };
}
pub(crate) use dir_settings;

/// Chunk size for streamed copies; NFS servers commonly cap READ/WRITE at 1 MiB.
pub const COPY_CHUNK: u32 = 1 << 20;

#[async_trait]
pub trait Fs: Send + Sync + 'static {
    /// Stat without following a final symlink; `Ok(None)` when nothing is there.
    async fn stat(&self, path: &RelPath) -> Result<Option<FileStat>>;

    /// Creates a directory with `attrs` (mode applied exactly, ignoring umask).
    /// `Ok(false)` when a directory already exists there.
    async fn mkdir(&self, path: &RelPath, attrs: DirAttrs) -> Result<bool>;

    /// Sets mode and, when given, owner of an existing node.
    async fn set_attrs(&self, path: &RelPath, attrs: DirAttrs) -> Result<()>;

    /// Entries of a directory, without `.` and `..`, in no particular order.
    async fn read_dir(&self, path: &RelPath) -> Result<Vec<DirEntry>>;

    /// Creates (or truncates) a regular file with the given mode.
    async fn create_file(&self, path: &RelPath, mode: u32) -> Result<()>;

    /// Reads up to `len` bytes at `offset`; an empty result means end of file.
    async fn read_at(&self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>>;

    /// Writes all of `data` at `offset` (stable: on the server's disk when this returns).
    async fn write_at(&self, path: &RelPath, offset: u64, data: &[u8]) -> Result<()>;

    /// Sets a regular file's size (sparse growth).
    async fn set_len(&self, path: &RelPath, len: u64) -> Result<()>;

    async fn symlink(&self, target: &str, path: &RelPath) -> Result<()>;

    async fn read_link(&self, path: &RelPath) -> Result<String>;

    /// Renames atomically; fails if `to` is a non-empty directory.
    async fn rename(&self, from: &RelPath, to: &RelPath) -> Result<()>;

    /// Removes a file, symlink or other non-directory; `Ok(false)` when it was not there.
    async fn remove_file(&self, path: &RelPath) -> Result<bool>;

    /// Removes an empty directory; `Ok(false)` when it was not there.
    async fn remove_dir(&self, path: &RelPath) -> Result<bool>;

    /// Size and free space of the filesystem the base is on.
    async fn fs_stats(&self) -> Result<FsStats>;

    // ---- composite operations, with generic implementations over the primitives above ----

    /// Reads a whole (small) file; `Ok(None)` when it does not exist.
    async fn read_file(&self, path: &RelPath) -> Result<Option<Vec<u8>>> {
        if self.stat(path).await?.is_none() {
            return Ok(None);
        }
        let mut out = Vec::new();
        loop {
            let chunk = self.read_at(path, out.len() as u64, COPY_CHUNK).await?;
            if chunk.is_empty() {
                return Ok(Some(out));
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// Writes a whole file so that readers see either the old or the new content: a temporary
    /// sibling, then a rename over the target.
    async fn write_file_atomic(&self, path: &RelPath, data: &[u8]) -> Result<()> {
        let tmp_name = format!(
            ".{}.tmp-{}",
            path.file_name(),
            uuid::Uuid::new_v4().simple()
        );
        let tmp = match path.parent() {
            Some(p) => p.join(&tmp_name)?,
            None => RelPath::component("path", &tmp_name)?,
        };
        self.create_file(&tmp, 0o644).await?;
        let res = async {
            if !data.is_empty() {
                self.write_at(&tmp, 0, data).await?;
            }
            self.rename(&tmp, path).await
        }
        .await;
        if res.is_err() {
            let _ = self.remove_file(&tmp).await;
        }
        res
    }

    /// Removes a tree depth-first without following symlinks. Missing → `Ok(false)`.
    async fn remove_all(&self, path: &RelPath) -> Result<bool> {
        let Some(st) = self.stat(path).await? else {
            return Ok(false);
        };
        if st.kind != FileKind::Dir {
            return self.remove_file(path).await;
        }
        // Iterative walk: deep trees must not grow the async stack.
        let mut stack = vec![(path.clone(), false)];
        while let Some((dir, expanded)) = stack.pop() {
            if expanded {
                self.remove_dir(&dir).await?;
                continue;
            }
            stack.push((dir.clone(), true));
            for e in self.read_dir(&dir).await? {
                let child = dir.join(&e.name)?;
                if e.kind == FileKind::Dir {
                    stack.push((child, false));
                } else {
                    self.remove_file(&child).await?;
                }
            }
        }
        Ok(true)
    }

    /// Removes everything inside a directory, keeping the directory itself.
    async fn clear_dir(&self, path: &RelPath) -> Result<()> {
        for e in self.read_dir(path).await? {
            self.remove_all(&path.join(&e.name)?).await?;
        }
        Ok(())
    }

    /// Copies the tree at `from` to a new tree at `to` (which must not exist): regular files
    /// (sparse-unaware), directories and symlinks, with modes; owners when the fs allows.
    async fn copy_tree(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        let Some(root) = self.stat(from).await? else {
            return Err(Error::not_found("path", from));
        };
        let mut stack = vec![(from.clone(), to.clone(), root)];
        while let Some((src, dst, st)) = stack.pop() {
            let attrs = DirAttrs {
                mode: st.mode & 0o7777,
                uid: Some(st.uid),
                gid: Some(st.gid),
            };
            match st.kind {
                FileKind::Dir => {
                    self.mkdir(&dst, attrs).await?;
                    for e in self.read_dir(&src).await? {
                        let s = src.join(&e.name)?;
                        if let Some(cst) = self.stat(&s).await? {
                            stack.push((s, dst.join(&e.name)?, cst));
                        }
                    }
                }
                FileKind::File => {
                    self.create_file(&dst, attrs.mode).await?;
                    let mut off = 0u64;
                    loop {
                        let chunk = self.read_at(&src, off, COPY_CHUNK).await?;
                        if chunk.is_empty() {
                            break;
                        }
                        self.write_at(&dst, off, &chunk).await?;
                        off += chunk.len() as u64;
                    }
                    if off < st.size {
                        self.set_len(&dst, st.size).await?;
                    }
                    // Owner is best effort: an unprivileged controller cannot chown.
                    let _ = self.set_attrs(&dst, attrs).await;
                }
                FileKind::Symlink => {
                    let target = self.read_link(&src).await?;
                    self.symlink(&target, &dst).await?;
                }
                FileKind::Other => {}
            }
        }
        Ok(())
    }

    /// Bytes used by a tree (apparent sizes), for usage reports.
    async fn tree_size(&self, path: &RelPath) -> Result<u64> {
        let mut total = 0u64;
        let mut stack = vec![path.clone()];
        while let Some(dir) = stack.pop() {
            for e in self.read_dir(&dir).await? {
                let child = dir.join(&e.name)?;
                match e.kind {
                    FileKind::Dir => stack.push(child),
                    _ => total += self.stat(&child).await?.map_or(0, |s| s.size),
                }
            }
        }
        Ok(total)
    }
}
