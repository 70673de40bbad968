//! The kube client of the CLI: `--kubeconfig`, else $KUBECONFIG / ~/.kube/config, else the
//! in-cluster ServiceAccount (the same order kubectl uses).

use std::path::Path;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration found ({0}); pass --kubeconfig or set KUBECONFIG")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let cfg = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|source| ClientError::Read {
                path: p.display().to_string(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Read {
                    path: p.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    Client::try_from(cfg).map_err(ClientError::Build)
}
