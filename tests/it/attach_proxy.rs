//! Forwards everything to the controller but holds the answer to ControllerPublishVolume
//! once the controller has given it: the volume is published on the backend and the
//! provisioner has not heard of it, the moment a crash hurts most.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

pub struct PublishProxy {
    pub socket: PathBuf,
    held: watch::Receiver<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl PublishProxy {
    pub async fn start(socket: &Path, upstream: Channel) -> anyhow::Result<PublishProxy> {
        let listener = UnixListener::bind(socket)?;
        let (tx, rx) = watch::channel(0u32);
        let tx = Arc::new(tx);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let mut ch = upstream.clone();
                        let tx = tx.clone();
                        async move {
                            let hold =
                                req.uri().path() == "/csi.v1.Controller/ControllerPublishVolume";
                            let req = req.map(tonic::body::Body::new);
                            let resp = ch.ready().await?.call(req).await?;
                            if hold {
                                tx.send_modify(|n| *n += 1);
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, tonic::transport::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(PublishProxy {
            socket: socket.to_owned(),
            held: rx,
            task,
        })
    }

    pub async fn wait_held(&mut self) -> anyhow::Result<()> {
        self.held.wait_for(|n| *n > 0).await?;
        Ok(())
    }
}

impl Drop for PublishProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}
