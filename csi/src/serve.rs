//! Running a gRPC server on an [`Endpoint`] the way CSI plugins are
//! expected to: unix socket hygiene, graceful shutdown on SIGTERM/SIGINT,
//! and one tracing span per request.
//!
//! The per-request span is named `grpc` and carries `method` (the full gRPC
//! path, e.g. `/csi.v1.Node/NodePublishVolume`), `driver` (set with
//! [`Listener::with_driver`] when one process serves several drivers) plus empty `volume_id`,
//! `snapshot_id` and `node_id` fields. Handlers run inside that span, so a
//! service can fill them in with
//! `tracing::Span::current().record("volume_id", req.volume_id.as_str())`
//! and every event the handler emits carries the id. (tracing only lets a
//! span record fields declared when it was created; that is why they are
//! declared here, empty.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use stowage_backends::metrics;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::http;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::endpoint::Endpoint;

/// Mode of a freshly bound unix socket: the plugin's user and group (the
/// CO's sidecars run in the same pod or as root) may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;

/// How long to wait when probing whether an existing socket has a live
/// listener behind it.
const LIVENESS_PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot inspect existing {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; refusing to delete it")]
    NotASocket { path: PathBuf },
    #[error("another process is already serving on {path}")]
    SocketInUse { path: PathBuf },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: Endpoint,
        source: io::Error,
    },
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Permissions {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("gRPC server on {endpoint} failed: {source}")]
    Transport {
        endpoint: Endpoint,
        source: tonic::transport::Error,
    },
}

/// Binds `endpoint`, serves `routes` until `shutdown` resolves, drains
/// in-flight requests, and (for unix sockets) removes the socket.
pub async fn serve(
    endpoint: &Endpoint,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = Listener::bind(endpoint).await?;
    listener.serve(routes, shutdown).await
}

/// A bound, not yet serving, endpoint. Binding separately from serving lets
/// a caller learn the port of `tcp://host:0`, or know the socket exists
/// before it starts a client.
#[derive(Debug)]
pub struct Listener {
    endpoint: Endpoint,
    kind: ListenerKind,
    driver: Option<&'static str>,
}

#[derive(Debug)]
enum ListenerKind {
    Unix {
        listener: UnixListener,
        guard: SocketGuard,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Unix: create the parent directory, clear a stale socket (only a
    /// socket nobody is listening on), bind, chmod [`SOCKET_MODE`].
    /// TCP: bind (the host may be a name; the first address that binds wins).
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, ServeError> {
        let kind = match endpoint {
            Endpoint::Unix(path) => {
                let (listener, guard) = bind_unix_socket(path).await?;
                ListenerKind::Unix { listener, guard }
            }
            Endpoint::Tcp { host, port } => {
                let listener =
                    TcpListener::bind((host.as_str(), *port))
                        .await
                        .map_err(|source| ServeError::Bind {
                            endpoint: endpoint.clone(),
                            source,
                        })?;
                ListenerKind::Tcp(listener)
            }
        };
        Ok(Listener {
            endpoint: endpoint.clone(),
            kind,
            driver: None,
        })
    }

    /// Names the driver in every request's span (`driver` field), so the logs of a process
    /// serving several drivers say which one a request was for.
    pub fn with_driver(mut self, driver: &'static str) -> Self {
        self.driver = Some(driver);
        self
    }

    /// The endpoint actually bound: for `tcp://host:0` this carries the
    /// port the kernel picked, so it can be handed to [`crate::client::connect`].
    pub fn local_endpoint(&self) -> Endpoint {
        match &self.kind {
            ListenerKind::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => Endpoint::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                },
                Err(_) => self.endpoint.clone(),
            },
            ListenerKind::Unix { .. } => self.endpoint.clone(),
        }
    }

    /// The bound TCP address, `None` for unix sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            ListenerKind::Tcp(listener) => listener.local_addr().ok(),
            ListenerKind::Unix { .. } => None,
        }
    }

    /// Serves `routes` until `shutdown` resolves, then drains in-flight
    /// requests. A unix socket is removed when this returns, whether the
    /// server stopped cleanly or failed.
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let mut server = Server::builder().layer(RequestLogLayer {
            driver: self.driver,
        });
        let router = server.add_routes(routes);
        let endpoint = self.endpoint;
        tracing::info!(%endpoint, "serving gRPC");
        // Learn when shutdown began, so that draining can be bounded: a client that never
        // answers GOAWAY must not keep the plugin alive past its termination grace period.
        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = began_tx.send(());
        };
        let result = match self.kind {
            ListenerKind::Unix { listener, guard } => {
                let result = bounded_drain(
                    router
                        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown),
                    began_rx,
                )
                .await;
                // Explicit so the socket disappears only after the server
                // stopped accepting, never before.
                drop(guard);
                result
            }
            ListenerKind::Tcp(listener) => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                bounded_drain(
                    router.serve_with_incoming_shutdown(incoming, shutdown),
                    began_rx,
                )
                .await
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(%endpoint, "gRPC server stopped");
                Ok(())
            }
            Err(source) => Err(ServeError::Transport { endpoint, source }),
        }
    }
}

/// Serves several bound endpoints (one per driver, in a process serving several drivers)
/// until `shutdown` resolves, then drains them all. If one server stops or fails, the others
/// are stopped too: a process that serves only some of its drivers would look alive while
/// the rest are gone. Returns the first failure.
pub async fn serve_all(
    servers: Vec<(Listener, Routes)>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut running = tokio::task::JoinSet::new();
    for (listener, routes) in servers {
        let mut stop = stop_rx.clone();
        running.spawn(listener.serve(routes, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut first_error = None;
    loop {
        tokio::select! {
            () = &mut shutdown, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            done = running.join_next() => {
                let Some(done) = done else { break };
                let result = match done {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Nothing aborts these tasks.
                    Err(_) => Ok(()),
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "a gRPC server failed; stopping the others");
                    first_error.get_or_insert(e);
                }
                if !stopping {
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Longest wait for in-flight requests once shutdown began.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded_drain<F>(
    serving: F,
    began: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    tokio::pin!(serving);
    let deadline = async {
        match began.await {
            Ok(()) => tokio::time::sleep(DRAIN_TIMEOUT).await,
            // The server stopped on its own; `serving` finishes first.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = &mut serving => r,
        () = deadline => {
            tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "connections still open after the drain timeout; stopping anyway");
            Ok(())
        }
    }
}

/// Binds a unix socket the way every Stowage server does (the CSI plugins here, the Docker
/// plugin too): parent directory created, a stale socket cleared (only a socket nobody is
/// listening on), mode [`SOCKET_MODE`]; the guard removes the socket when dropped.
pub async fn bind_unix_socket(path: &Path) -> Result<(UnixListener, SocketGuard), ServeError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| ServeError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    remove_stale_socket(path).await?;

    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        endpoint: Endpoint::Unix(path.to_owned()),
        source,
    })?;
    // Remove the socket again if anything below fails.
    let guard = SocketGuard::new(path).map_err(|source| ServeError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    // chmod after bind leaves a short window with umask-derived permissions;
    // changing the umask instead would affect every thread of the process.
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .await
        .map_err(|source| ServeError::Permissions {
            path: path.to_owned(),
            mode: SOCKET_MODE,
            source,
        })?;
    Ok((listener, guard))
}

/// A plugin killed with SIGKILL leaves its socket behind and the next bind
/// fails with EADDRINUSE, so an old socket is removed, but only when it
/// really is a socket and nothing answers on it: deleting a regular file
/// or a running instance's socket would be a worse failure than not starting.
async fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Inspect {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(LIVENESS_PROBE, UnixStream::connect(path)).await {
        Ok(Err(_)) => {}
        // A timeout means something holds the socket but is not accepting:
        // treat as alive rather than steal it.
        Ok(Ok(_)) | Err(_) => {
            return Err(ServeError::SocketInUse {
                path: path.to_owned(),
            });
        }
    }
    tracing::info!(path = %path.display(), "removing stale socket");
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServeError::RemoveStale {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the socket it was created for on drop, unless the path now
/// holds a different file (a newer instance already rebound it).
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketGuard {
    fn new(path: &Path) -> io::Result<Self> {
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(SocketGuard {
            path: path.to_owned(),
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false);
        if !ours {
            return;
        }
        if let Err(err) = std::fs::remove_file(&self.path)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %err, "cannot remove socket");
        }
    }
}

/// Resolves on the first SIGTERM (what Kubernetes sends) or SIGINT.
///
/// Handlers are installed when the future is first polled, so poll it early
/// (passing it to [`serve`] does). If a handler cannot be installed the
/// error is logged and only the other signal is awaited.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};

    async fn wait(kind: SignalKind, name: &'static str) -> &'static str {
        match signal(kind) {
            Ok(mut stream) => {
                stream.recv().await;
                name
            }
            Err(err) => {
                tracing::error!(%err, "cannot install {name} handler");
                std::future::pending().await
            }
        }
    }

    let name = tokio::select! {
        name = wait(SignalKind::terminate(), "SIGTERM") => name,
        name = wait(SignalKind::interrupt(), "SIGINT") => name,
    };
    tracing::info!(
        signal = name,
        "shutdown requested; draining in-flight requests"
    );
}

/// Tower layer giving every gRPC request a `grpc` span (see the module
/// docs) and one log line when the response is ready: `debug` for OK,
/// `info` for errors the caller caused, `warn` for errors the plugin did. It also counts and
/// times the call (`stowage_csi_operations_total`, `stowage_csi_operation_duration_seconds`,
/// see `stowage_backends::metrics`), so the controller and the node get the same metrics.
///
/// [`serve`] installs it; it is public for code that builds its own
/// `tonic::transport::Server`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLogLayer {
    /// Recorded as the span's `driver` field when set.
    pub driver: Option<&'static str>,
}

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLog {
            inner,
            driver: self.driver,
        }
    }
}

/// The service produced by [`RequestLogLayer`].
#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
    driver: Option<&'static str>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RequestLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let span = tracing::info_span!(
            "grpc",
            driver = tracing::field::Empty,
            method = %request.uri().path(),
            volume_id = tracing::field::Empty,
            snapshot_id = tracing::field::Empty,
            node_id = tracing::field::Empty,
        );
        if let Some(driver) = self.driver {
            span.record("driver", driver);
        }
        let started = Instant::now();
        let method = metrics::method_label(request.uri().path());
        let driver = self.driver.unwrap_or("");
        // Entered while calling too: tonic may do work synchronously in call().
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let result = future.await;
                let elapsed = started.elapsed();
                let elapsed_ms = elapsed.as_millis() as u64;
                let code = match &result {
                    // An error status is in the headers ("trailers-only"
                    // response); success leaves grpc-status for the trailers,
                    // which this layer does not wait for (every CSI call is unary, so a
                    // response without an error status in its headers is an OK).
                    Ok(response) => match tonic::Status::from_header_map(response.headers()) {
                        Some(status) if status.code() != tonic::Code::Ok => {
                            log_error_status(&status, elapsed_ms);
                            status.code()
                        }
                        _ => {
                            tracing::debug!(elapsed_ms, "OK");
                            tonic::Code::Ok
                        }
                    },
                    Err(err) => {
                        tracing::warn!(elapsed_ms, %err, "request failed in transport");
                        tonic::Code::Unknown
                    }
                };
                metrics::get().record_csi(driver, method, metrics::code_label(code), elapsed);
                result
            }
            .instrument(span),
        )
    }
}

fn log_error_status(status: &tonic::Status, elapsed_ms: u64) {
    use tonic::Code;
    let code = status.code();
    let message = status.message();
    match code {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Cancelled
        | Code::Unauthenticated
        | Code::PermissionDenied => {
            tracing::info!(elapsed_ms, ?code, message, "request rejected")
        }
        _ => tracing::warn!(elapsed_ms, ?code, message, "request failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_to_delete_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = Listener::bind(&Endpoint::Unix(path.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn refuses_to_steal_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let err = Listener::bind(&Endpoint::Unix(path.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, ServeError::SocketInUse { .. }), "{err}");
        assert!(path.exists());
    }

    #[tokio::test]
    async fn creates_parent_dir_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/csi.sock");
        let listener = Listener::bind(&Endpoint::Unix(path.clone())).await.unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, SOCKET_MODE);
        drop(listener);
        assert!(
            !path.exists(),
            "dropping an unserved listener removes the socket"
        );
    }

    #[tokio::test]
    async fn guard_leaves_a_replaced_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let first = Listener::bind(&Endpoint::Unix(path.clone())).await.unwrap();
        // Simulate a newer instance taking over the path.
        std::fs::remove_file(&path).unwrap();
        let _second = UnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_real_port() {
        let listener = Listener::bind(&Endpoint::parse("tcp://127.0.0.1:0").unwrap())
            .await
            .unwrap();
        let Endpoint::Tcp { host, port } = listener.local_endpoint() else {
            panic!("tcp listener reported a unix endpoint");
        };
        assert_eq!(host, "127.0.0.1");
        assert_ne!(port, 0);
        assert_eq!(listener.local_addr().map(|a| a.port()), Some(port));
    }
}
