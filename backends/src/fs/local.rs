//! [`Fs`] on the host's own filesystem, rooted at a base directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{DirAttrs, DirEntry, FileKind, FileStat, Fs, FsStats};
use crate::error::{Error, Result};
use crate::relpath::RelPath;

#[derive(Debug, Clone)]
pub struct LocalFs {
    base: PathBuf,
}

impl LocalFs {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        LocalFs { base: base.into() }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Host path of `p`; safe because `RelPath` cannot climb out of the base.
    pub fn host_path(&self, p: &RelPath) -> PathBuf {
        self.base.join(p.as_str())
    }
}

fn kind_of(ft: std::fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn not_found_ok<T>(r: std::io::Result<T>, path: &Path) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io_at(path.display(), e)),
    }
}

#[async_trait]
impl Fs for LocalFs {
    async fn stat(&self, path: &RelPath) -> Result<Option<FileStat>> {
        let p = self.host_path(path);
        let md = not_found_ok(tokio::fs::symlink_metadata(&p).await, &p)?;
        Ok(md.map(|m| FileStat {
            kind: kind_of(m.file_type()),
            size: m.len(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }))
    }

    async fn mkdir(&self, path: &RelPath, attrs: DirAttrs) -> Result<bool> {
        let p = self.host_path(path);
        match tokio::fs::create_dir(&p).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return match self.stat(path).await? {
                    Some(st) if st.kind == FileKind::Dir => Ok(false),
                    _ => Err(Error::FailedPrecondition(format!(
                        "{path} exists and is not a directory"
                    ))),
                };
            }
            Err(e) => return Err(Error::io_at(p.display(), e)),
        }
        self.set_attrs(path, attrs).await?;
        Ok(true)
    }

    async fn set_attrs(&self, path: &RelPath, attrs: DirAttrs) -> Result<()> {
        let p = self.host_path(path);
        tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(attrs.mode))
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        if attrs.uid.is_some() || attrs.gid.is_some() {
            let p2 = p.clone();
            tokio::task::spawn_blocking(move || {
                std::os::unix::fs::lchown(&p2, attrs.uid, attrs.gid)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::io_at(p.display(), e))?;
        }
        Ok(())
    }

    async fn read_dir(&self, path: &RelPath) -> Result<Vec<DirEntry>> {
        let p = self.host_path(path);
        let mut rd = tokio::fs::read_dir(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        let mut out = Vec::new();
        while let Some(e) = rd
            .next_entry()
            .await
            .map_err(|e| Error::io_at(p.display(), e))?
        {
            let ft = e
                .file_type()
                .await
                .map_err(|e| Error::io_at(p.display(), e))?;
            // Names that are not UTF-8 cannot be represented as RelPath; keep them by lossy
            // name only for listing, which makes copies/deletes of them fail loudly.
            out.push(DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind: kind_of(ft),
            });
        }
        Ok(out)
    }

    async fn create_file(&self, path: &RelPath, mode: u32) -> Result<()> {
        let p = self.host_path(path);
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        Ok(())
    }

    async fn read_at(&self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>> {
        let p = self.host_path(path);
        let mut f = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        let mut buf = Vec::with_capacity(len as usize);
        (&mut f)
            .take(len as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        Ok(buf)
    }

    async fn write_at(&self, path: &RelPath, offset: u64, data: &[u8]) -> Result<()> {
        let p = self.host_path(path);
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.write_all(data)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.sync_data()
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        Ok(())
    }

    async fn set_len(&self, path: &RelPath, len: u64) -> Result<()> {
        let p = self.host_path(path);
        // off_t is signed: a length past i64::MAX is no size any file can have.
        if i64::try_from(len).is_err() {
            return Err(Error::OutOfRange(format!(
                "{}: {len} bytes is more than any file can hold",
                p.display()
            )));
        }
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        f.set_len(len)
            .await
            .map_err(|e| Error::io_at(p.display(), e))
    }

    async fn symlink(&self, target: &str, path: &RelPath) -> Result<()> {
        let p = self.host_path(path);
        tokio::fs::symlink(target, &p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))
    }

    async fn read_link(&self, path: &RelPath) -> Result<String> {
        let p = self.host_path(path);
        let t = tokio::fs::read_link(&p)
            .await
            .map_err(|e| Error::io_at(p.display(), e))?;
        Ok(t.to_string_lossy().into_owned())
    }

    async fn rename(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        let (f, t) = (self.host_path(from), self.host_path(to));
        tokio::fs::rename(&f, &t)
            .await
            .map_err(|e| Error::io_at(format!("{} -> {}", f.display(), t.display()), e))
    }

    async fn remove_file(&self, path: &RelPath) -> Result<bool> {
        let p = self.host_path(path);
        Ok(not_found_ok(tokio::fs::remove_file(&p).await, &p)?.is_some())
    }

    async fn remove_dir(&self, path: &RelPath) -> Result<bool> {
        let p = self.host_path(path);
        Ok(not_found_ok(tokio::fs::remove_dir(&p).await, &p)?.is_some())
    }

    async fn fs_stats(&self) -> Result<FsStats> {
        let base = self.base.clone();
        let st = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&base))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::io_at(self.base.display(), e.into()))?;
        Ok(FsStats {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
        })
    }

    // Walked by descriptors, never by joined paths, so a pod swapping a directory for a
    // symlink during the walk cannot make it copy the node's files ([`super::beneath`]);
    // sparse files stay sparse and reflinks are used where the filesystem has them.
    async fn copy_tree(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        let (base, from, to) = (self.base.clone(), from.clone(), to.clone());
        tokio::task::spawn_blocking(move || super::beneath::copy_tree(&base, &from, &to))
            .await
            .map_err(|e| Error::Internal(format!("copy: {e}")))?
    }

    // As copy_tree: by descriptors, so a swapped-in link cannot make it count outside files.
    async fn tree_size(&self, path: &RelPath) -> Result<u64> {
        let (base, path) = (self.base.clone(), path.clone());
        tokio::task::spawn_blocking(move || super::beneath::tree_size(&base, &path))
            .await
            .map_err(|e| Error::Internal(format!("usage: {e}")))?
    }

    // The host has a faster and sparse-aware recursive delete.
    async fn remove_all(&self, path: &RelPath) -> Result<bool> {
        let p = self.host_path(path);
        match self.stat(path).await? {
            None => Ok(false),
            Some(st) if st.kind == FileKind::Dir => {
                Ok(not_found_ok(tokio::fs::remove_dir_all(&p).await, &p)?.is_some())
            }
            Some(_) => self.remove_file(path).await,
        }
    }
}
