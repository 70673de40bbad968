//! gRPC channels to a plugin, for tests and Stowage's own tools.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::endpoint::Endpoint;

/// Bounds a single connection attempt; a local socket answers at once, a
/// node plugin in a test VM within a second or two.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts in [`connect_with_retry`].
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket path {0:?} is not valid UTF-8, which gRPC URIs require")]
    NonUtf8Path(std::path::PathBuf),
    #[error("cannot build a gRPC URI for {endpoint}: {source}")]
    Uri {
        endpoint: Endpoint,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        source: tonic::transport::Error,
    },
}

/// The tonic endpoint for `endpoint`, for callers that want to set their
/// own timeouts or connect lazily.
pub fn tonic_endpoint(endpoint: &Endpoint) -> Result<TonicEndpoint, ClientError> {
    let uri = match endpoint {
        Endpoint::Unix(path) => {
            let path = path
                .to_str()
                .ok_or_else(|| ClientError::NonUtf8Path(path.clone()))?;
            // tonic 0.14 dials `unix://` URIs itself; no custom connector needed.
            format!("unix://{path}")
        }
        Endpoint::Tcp { host, port } if host.contains(':') => format!("http://[{host}]:{port}"),
        Endpoint::Tcp { host, port } => format!("http://{host}:{port}"),
    };
    TonicEndpoint::from_shared(uri)
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT))
        .map_err(|source| ClientError::Uri {
            endpoint: endpoint.clone(),
            source,
        })
}

/// Connects once; fails if nothing is listening yet.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, ClientError> {
    tonic_endpoint(endpoint)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        })
}

/// Keeps trying to connect for up to `within`, for a plugin that is still
/// starting (its socket may not exist yet). Returns the last error.
pub async fn connect_with_retry(
    endpoint: &Endpoint,
    within: Duration,
) -> Result<Channel, ClientError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match connect(endpoint).await {
            Ok(channel) => return Ok(channel),
            Err(err @ (ClientError::NonUtf8Path(_) | ClientError::Uri { .. })) => return Err(err),
            Err(err) => {
                if tokio::time::Instant::now() + RETRY_INTERVAL >= deadline {
                    return Err(err);
                }
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    }
}
