//! Stowage for Docker.
//!
//! * `stowage-docker serve`: a legacy (or managed) Docker volume plugin on a unix socket,
//!   `/run/docker/plugins/<name>.sock` by default, for `docker volume create -d <name>`,
//!   `docker run -v` and Swarm services with `volume-driver=<name>`. Volume state is persisted
//!   under the state directory; see [`driver`].
//! * `stowage-docker csi`: the CSI Identity, Controller and Node services on one socket, the
//!   shape Docker ≥ 23 expects for Swarm cluster volumes; see [`csi`].
//!
//! Both drive the backends through the same traits as the Kubernetes plugins.

pub mod api;
pub mod csi;
pub mod driver;
pub mod error;
pub mod options;
pub mod state;

use std::future::{Future, IntoFuture};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

pub use driver::{Driver, Scope, Settings};

/// Longest wait for open connections once shutdown began.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "another process is already serving on {path}; stop it, or give this plugin another \
         name (--socket)"
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("serving on {path}: {source}")]
    Serve { path: PathBuf, source: io::Error },
}

/// Serves the plugin API on `socket` until `shutdown` resolves; the socket is removed when
/// this returns (a socket left behind would make Docker wait 30 s on it for every
/// `docker volume ls`, retrying a plugin that is gone).
pub async fn serve(
    socket: &Path,
    driver: Arc<Driver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (listener, guard) = bind(socket).await?;
    tracing::info!(socket = %socket.display(), "serving the Docker volume plugin API");
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = began_tx.send(());
    };
    let serving = axum::serve(listener, api::router(driver)).with_graceful_shutdown(shutdown);
    let res = tokio::select! {
        r = serving.into_future() => r,
        () = async {
            match began_rx.await {
                Ok(()) => tokio::time::sleep(DRAIN_TIMEOUT).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::warn!("connections still open after {}s; stopping anyway", DRAIN_TIMEOUT.as_secs());
            Ok(())
        }
    };
    drop(guard);
    res.map_err(|source| ServeError::Serve {
        path: socket.to_owned(),
        source,
    })
}

async fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), ServeError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| ServeError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    remove_stale(path).await?;
    let sock_err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    let guard = SocketGuard::new(path).map_err(sock_err)?;
    // Docker runs as root; nobody else has business on this socket.
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .await
        .map_err(sock_err)?;
    Ok((listener, guard))
}

/// A plugin killed with SIGKILL leaves its socket behind; remove it, but only when it is a
/// socket nobody answers on.
async fn remove_stale(path: &Path) -> Result<(), ServeError> {
    let md = match tokio::fs::symlink_metadata(path).await {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !md.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
        Ok(Err(_)) => {}
        Ok(Ok(_)) | Err(_) => {
            return Err(ServeError::SocketInUse {
                path: path.to_owned(),
            });
        }
    }
    tracing::info!(socket = %path.display(), "removing stale socket");
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServeError::Socket {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the socket on drop unless the path now holds another file (a newer instance).
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketGuard {
    fn new(path: &Path) -> io::Result<Self> {
        let md = std::fs::symlink_metadata(path)?;
        Ok(SocketGuard {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
        })
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
        }
    }
}
