//! An [`Fs`] connected on first use and retried on every call until it connects: a controller
//! whose storage server is down at start still starts, answers Probe, and returns UNAVAILABLE
//! for calls that need the server instead of crash-looping.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{DirAttrs, DirEntry, FileStat, Fs, FsStats};
use crate::error::Result;
use crate::relpath::RelPath;

type Connect<F> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<F>> + Send>> + Send + Sync>;

pub struct Lazy<F: Fs> {
    cell: OnceCell<F>,
    connect: Connect<F>,
}

impl<F: Fs> Lazy<F> {
    pub fn new<C, Fut>(connect: C) -> Self
    where
        C: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<F>> + Send + 'static,
    {
        Lazy {
            cell: OnceCell::new(),
            connect: Arc::new(move || Box::pin(connect())),
        }
    }

    async fn get(&self) -> Result<&F> {
        self.cell.get_or_try_init(|| (self.connect)()).await
    }
}

#[async_trait]
impl<F: Fs> Fs for Lazy<F> {
    async fn stat(&self, path: &RelPath) -> Result<Option<FileStat>> {
        self.get().await?.stat(path).await
    }
    async fn mkdir(&self, path: &RelPath, attrs: DirAttrs) -> Result<bool> {
        self.get().await?.mkdir(path, attrs).await
    }
    async fn set_attrs(&self, path: &RelPath, attrs: DirAttrs) -> Result<()> {
        self.get().await?.set_attrs(path, attrs).await
    }
    async fn read_dir(&self, path: &RelPath) -> Result<Vec<DirEntry>> {
        self.get().await?.read_dir(path).await
    }
    async fn create_file(&self, path: &RelPath, mode: u32) -> Result<()> {
        self.get().await?.create_file(path, mode).await
    }
    async fn read_at(&self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.get().await?.read_at(path, offset, len).await
    }
    async fn write_at(&self, path: &RelPath, offset: u64, data: &[u8]) -> Result<()> {
        self.get().await?.write_at(path, offset, data).await
    }
    async fn set_len(&self, path: &RelPath, len: u64) -> Result<()> {
        self.get().await?.set_len(path, len).await
    }
    async fn symlink(&self, target: &str, path: &RelPath) -> Result<()> {
        self.get().await?.symlink(target, path).await
    }
    async fn read_link(&self, path: &RelPath) -> Result<String> {
        self.get().await?.read_link(path).await
    }
    async fn rename(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        self.get().await?.rename(from, to).await
    }
    async fn remove_file(&self, path: &RelPath) -> Result<bool> {
        self.get().await?.remove_file(path).await
    }
    async fn remove_dir(&self, path: &RelPath) -> Result<bool> {
        self.get().await?.remove_dir(path).await
    }
    async fn fs_stats(&self) -> Result<FsStats> {
        self.get().await?.fs_stats().await
    }
    // The composite operations go to the inner implementation, which may do them better.
    async fn read_file(&self, path: &RelPath) -> Result<Option<Vec<u8>>> {
        self.get().await?.read_file(path).await
    }
    async fn write_file_atomic(&self, path: &RelPath, data: &[u8]) -> Result<()> {
        self.get().await?.write_file_atomic(path, data).await
    }
    async fn remove_all(&self, path: &RelPath) -> Result<bool> {
        self.get().await?.remove_all(path).await
    }
    async fn clear_dir(&self, path: &RelPath) -> Result<()> {
        self.get().await?.clear_dir(path).await
    }
    async fn copy_tree(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        self.get().await?.copy_tree(from, to).await
    }
    async fn tree_size(&self, path: &RelPath) -> Result<u64> {
        self.get().await?.tree_size(path).await
    }
}
