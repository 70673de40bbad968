//! End to end over a real unix socket: serve a trivial Identity service,
//! call it through `client::connect`, shut down, and check the socket
//! lifecycle (stale socket replaced on start, socket removed on exit).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use stowage_csi::serve::{Listener, SOCKET_MODE};
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::identity_server::{Identity, IdentityServer};
use stowage_csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use stowage_csi::{Endpoint, client, serve};
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

const NAME: &str = "test.stowage.io";

struct TestIdentity;

#[tonic::async_trait]
impl Identity for TestIdentity {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: NAME.into(),
            vendor_version: "0.0.0-test".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse::default()))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Err(Status::failed_precondition("not ready in this test"))
    }
}

fn routes() -> Routes {
    Routes::new(IdentityServer::new(TestIdentity))
}

/// Serves on `endpoint` in a task; returns the shutdown trigger and handle.
fn spawn_server(
    endpoint: Endpoint,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), stowage_csi::ServeError>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        serve(&endpoint, routes(), async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, handle)
}

async fn call_get_plugin_info(endpoint: &Endpoint) -> GetPluginInfoResponse {
    let channel = client::connect_with_retry(endpoint, Duration::from_secs(10))
        .await
        .expect("connect");
    IdentityClient::new(channel)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner()
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

#[tokio::test]
async fn serve_call_shutdown_removes_socket() {
    let dir = tempfile::tempdir().unwrap();
    // A not-yet-existing subdirectory: serve must create it.
    let path = dir.path().join("plugins/stowage/csi.sock");
    let endpoint = Endpoint::parse(&format!("unix://{}", path.display())).unwrap();

    let (stop, handle) = spawn_server(endpoint.clone());

    let info = call_get_plugin_info(&endpoint).await;
    assert_eq!(info.name, NAME);
    assert!(is_socket(&path));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, SOCKET_MODE);

    // Error statuses travel intact through the logging layer.
    let channel = client::connect(&endpoint).await.unwrap();
    let status = IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server did not stop")
        .unwrap()
        .expect("serve returned an error");
    assert!(!path.exists(), "socket left behind after shutdown");
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");

    // What a SIGKILLed plugin leaves behind: a socket file nobody listens on.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(is_socket(&path));

    let endpoint = Endpoint::Unix(path.clone());
    let (stop, handle) = spawn_server(endpoint.clone());
    assert_eq!(call_get_plugin_info(&endpoint).await.name, NAME);

    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn regular_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    std::fs::write(&path, "not a socket").unwrap();

    let err = serve(&Endpoint::Unix(path.clone()), routes(), async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[tokio::test]
async fn unix_colon_single_slash_form_connects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    let endpoint = Endpoint::parse(&format!("unix:{}", path.display())).unwrap();

    let listener = Listener::bind(&endpoint).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(listener.serve(routes(), async {
        let _ = stopped.await;
    }));
    // Bound before spawning, so a single connect attempt must succeed.
    let channel = client::connect(&endpoint).await.unwrap();
    let info = IdentityClient::new(channel)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, NAME);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn tcp_endpoint_serves() {
    let listener = Listener::bind(&Endpoint::parse("tcp://127.0.0.1:0").unwrap())
        .await
        .unwrap();
    let endpoint = listener.local_endpoint();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(listener.serve(routes(), async {
        let _ = stopped.await;
    }));
    assert_eq!(call_get_plugin_info(&endpoint).await.name, NAME);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}
