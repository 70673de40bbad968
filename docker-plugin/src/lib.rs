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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use driver::{Driver, Scope, Settings};

/// Longest wait for open connections once shutdown began.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "another process is already serving on {path}; stop it, or give this plugin another \
         name (--socket)"
    )]
    SocketInUse { path: PathBuf },
    #[error(transparent)]
    Socket(stowage_csi::serve::ServeError),
    #[error("serving on {path}: {source}")]
    Serve { path: PathBuf, source: io::Error },
}

impl From<stowage_csi::serve::ServeError> for ServeError {
    fn from(e: stowage_csi::serve::ServeError) -> Self {
        match e {
            stowage_csi::serve::ServeError::SocketInUse { path } => {
                ServeError::SocketInUse { path }
            }
            other => ServeError::Socket(other),
        }
    }
}

/// Serves the plugin API on `socket` until `shutdown` resolves; the socket is removed when
/// this returns (a socket left behind would make Docker wait 30 s on it for every
/// `docker volume ls`, retrying a plugin that is gone).
pub async fn serve(
    socket: &Path,
    driver: Arc<Driver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (listener, guard) = stowage_csi::serve::bind_unix_socket(socket).await?;
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
