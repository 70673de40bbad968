//! The request-log layer: each call gets a `grpc` span naming the method,
//! handlers can record `volume_id` into it, and a server whose client keeps
//! its connection open (as kubelet and the sidecars do) still shuts down.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stowage_csi::serve::Listener;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::identity_server::{Identity, IdentityServer};
use stowage_csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use stowage_csi::{Endpoint, client};
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

struct Recording;

#[tonic::async_trait]
impl Identity for Recording {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        // What the controller and node services do with the request's id.
        tracing::Span::current().record("volume_id", "vol-from-handler");
        tracing::info!("inside handler");
        Ok(Response::new(GetPluginInfoResponse {
            name: "log.stowage.io".into(),
            vendor_version: "0".into(),
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
        Err(Status::not_found("nothing here"))
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn spans_carry_method_and_volume_id_and_shutdown_drains() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // current_thread runtime: the server task runs on this thread too.
    let _default = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::Unix(dir.path().join("csi.sock"));
    let listener = Listener::bind(&endpoint)
        .await
        .unwrap()
        .with_driver("x.stowage.io");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        listener.serve(Routes::new(IdentityServer::new(Recording)), async {
            let _ = stopped.await;
        }),
    );

    let channel = client::connect(&endpoint).await.unwrap();
    let mut identity = IdentityClient::new(channel);
    identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    let status = identity.probe(ProbeRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // `identity` keeps its HTTP/2 connection open across the shutdown.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("shutdown hung on an idle client connection")
        .unwrap()
        .unwrap();
    drop(identity);

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let handler_line = logs
        .lines()
        .find(|l| l.contains("inside handler"))
        .unwrap_or_else(|| panic!("no handler event in:\n{logs}"));
    assert!(
        handler_line.contains("method=/csi.v1.Identity/GetPluginInfo"),
        "{handler_line}"
    );
    assert!(
        handler_line.contains("volume_id=\"vol-from-handler\""),
        "{handler_line}"
    );
    assert!(
        handler_line.contains("driver=x.stowage.io"),
        "{handler_line}"
    );
    let rejected = logs
        .lines()
        .find(|l| l.contains("request rejected"))
        .unwrap_or_else(|| panic!("no rejection line in:\n{logs}"));
    assert!(rejected.contains("/csi.v1.Identity/Probe"), "{rejected}");
    assert!(rejected.contains("NotFound"), "{rejected}");
    assert!(rejected.contains("nothing here"), "{rejected}");
}
