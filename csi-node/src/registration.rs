//! Registration with the kubelet, built in (what the node-driver-registrar sidecar does for
//! other drivers).
//!
//! The kubelet's plugin watcher scans `<kubelet root>/plugins_registry/` for sockets. For each
//! one it calls `GetInfo`, learns the driver name and the CSI socket to dial, registers the
//! driver (which also writes the CSINode entry from NodeGetInfo) and reports the outcome with
//! `NotifyRegistrationStatus`. So registration is one small gRPC server on its own socket.
//!
//! Two situations must end with the driver registered again without anyone's help:
//! * stowage-node restarts: the socket of the previous run is stale (nobody listens), and
//!   binding replaces it; the kubelet sees a new socket and registers again.
//! * the socket disappears while we run (someone cleaned the directory; a kubelet reinstall):
//!   a watchdog notices within [`WATCH_INTERVAL`] and binds a fresh one.
//!
//! A kubelet restart needs nothing from us: it re-scans the directory and calls again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stowage_csi::pluginregistration as reg;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// How often the watchdog checks that our socket is still the one at the path.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// CSI versions announced to the kubelet. The kubelet wants a version it knows ("1.0.0"
/// stands for CSI v1, every minor of which is wire-compatible).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// Where registration stands, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Socket served; the kubelet has not reported yet (or has not found it).
    Waiting,
    /// The kubelet said the driver is registered.
    Registered,
    /// The kubelet tried and refused, with its reason.
    Refused(String),
    /// We could not serve the socket at all.
    Broken(String),
}

/// Shared registration state: written by the server, read by health checks.
#[derive(Debug, Clone)]
pub struct Tracker(Arc<Mutex<State>>);

impl Default for Tracker {
    fn default() -> Self {
        Tracker(Arc::new(Mutex::new(State::Waiting)))
    }
}

impl Tracker {
    pub fn get(&self) -> State {
        match self.0.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, state: State) {
        match self.0.lock() {
            Ok(mut s) => *s = state,
            Err(p) => *p.into_inner() = state,
        }
    }
}

/// The registration socket of one driver.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The driver name (what GetInfo announces).
    pub driver: String,
    /// The CSI socket path as the kubelet sees it (in a DaemonSet, a host path that differs
    /// from the path inside the plugin's container).
    pub csi_endpoint: String,
    /// Where to serve, normally `<kubelet root>/plugins_registry/<driver>-reg.sock`.
    pub socket: PathBuf,
}

impl Registration {
    /// The socket path the node-driver-registrar convention gives a driver.
    pub fn socket_for(kubelet_root: &Path, driver: &str) -> PathBuf {
        kubelet_root
            .join("plugins_registry")
            .join(format!("{driver}-reg.sock"))
    }

    /// Serves until `shutdown` turns true: binds (retrying with backoff when the directory is
    /// not there yet or the path is busy), replaces the socket when it vanishes, and records
    /// the kubelet's verdict in `tracker`.
    pub async fn run(self, tracker: Tracker, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        while !*shutdown.borrow() {
            let (listener, guard) = match stowage_csi::serve::bind_unix_socket(&self.socket).await {
                Ok(bound) => bound,
                Err(e) => {
                    tracing::warn!(socket = %self.socket.display(), error = %e, retry_in_s = backoff.as_secs(), "cannot serve the kubelet registration socket");
                    tracker.set(State::Broken(e.to_string()));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let identity = std::fs::symlink_metadata(&self.socket)
                .map(|m| (m.dev(), m.ino()))
                .ok();
            tracker.set(State::Waiting);
            tracing::info!(socket = %self.socket.display(), driver = %self.driver, csi_endpoint = %self.csi_endpoint, "serving kubelet plugin registration");
            let service = reg::registration_server::RegistrationServer::new(Service {
                info: self.clone(),
                tracker: tracker.clone(),
            });
            let socket = self.socket.clone();
            let mut stop = shutdown.clone();
            let vanished = async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(WATCH_INTERVAL) => {}
                        _ = stop.changed() => return,
                    }
                    if *stop.borrow() {
                        return;
                    }
                    let now = std::fs::symlink_metadata(&socket)
                        .map(|m| (m.dev(), m.ino()))
                        .ok();
                    if now != identity {
                        tracing::warn!(socket = %socket.display(), "registration socket was removed or replaced; serving a new one");
                        return;
                    }
                }
            };
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    vanished,
                )
                .await;
            drop(guard);
            if let Err(e) = served {
                tracing::warn!(error = %e, "registration server failed; restarting it");
                tracker.set(State::Broken(e.to_string()));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

struct Service {
    info: Registration,
    tracker: Tracker,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Service {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        tracing::debug!(driver = %self.info.driver, "kubelet asked for plugin info");
        Ok(Response::new(reg::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.info.driver.clone(),
            endpoint: self.info.csi_endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let r = req.into_inner();
        if r.plugin_registered {
            tracing::info!(driver = %self.info.driver, "registered with the kubelet");
            self.tracker.set(State::Registered);
        } else {
            tracing::error!(driver = %self.info.driver, error = %r.error, "the kubelet refused the driver");
            self.tracker.set(State::Refused(r.error));
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reg::registration_client::RegistrationClient;

    async fn client(path: &Path) -> RegistrationClient<tonic::transport::Channel> {
        let ep = stowage_csi::Endpoint::Unix(path.to_path_buf());
        let ch = stowage_csi::client::connect_with_retry(&ep, Duration::from_secs(10))
            .await
            .unwrap();
        RegistrationClient::new(ch)
    }

    #[tokio::test]
    async fn answers_like_the_kubelet_expects_and_tracks_the_verdict() {
        let d = tempfile::tempdir().unwrap();
        let socket = Registration::socket_for(d.path(), "local.stowage.io");
        assert!(socket.ends_with("plugins_registry/local.stowage.io-reg.sock"));
        let r = Registration {
            driver: "local.stowage.io".into(),
            csi_endpoint: "/var/lib/kubelet/plugins/local.stowage.io/csi.sock".into(),
            socket: socket.clone(),
        };
        let tracker = Tracker::default();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(r.run(tracker.clone(), rx));
        let mut c = client(&socket).await;
        let info = c.get_info(reg::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "local.stowage.io");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/local.stowage.io/csi.sock"
        );
        assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
        assert_eq!(tracker.get(), State::Waiting);
        c.notify_registration_status(reg::RegistrationStatus {
            plugin_registered: false,
            error: "version mismatch".into(),
        })
        .await
        .unwrap();
        assert_eq!(tracker.get(), State::Refused("version mismatch".into()));
        c.notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
        assert_eq!(tracker.get(), State::Registered);
        // Graceful shutdown waits for open connections, as the kubelet's are short-lived.
        drop(c);
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        assert!(!socket.exists(), "socket removed on shutdown");
    }

    #[tokio::test]
    async fn a_removed_socket_is_served_again() {
        let d = tempfile::tempdir().unwrap();
        let socket = Registration::socket_for(d.path(), "x.stowage.io");
        let r = Registration {
            driver: "x.stowage.io".into(),
            csi_endpoint: "/csi.sock".into(),
            socket: socket.clone(),
        };
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(r.run(Tracker::default(), rx));
        client(&socket).await;
        std::fs::remove_file(&socket).unwrap();
        let deadline = std::time::Instant::now() + WATCH_INTERVAL * 4;
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "socket not re-created"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let info = client(&socket)
            .await
            .get_info(reg::InfoRequest {})
            .await
            .unwrap();
        assert_eq!(info.into_inner().name, "x.stowage.io");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
    }
}
