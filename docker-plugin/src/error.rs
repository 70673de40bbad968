//! Errors of the Docker volume plugin. Docker shows the message to the user as it is
//! (`Error response from daemon: ... VolumeDriver.Create: <message>`), so every message says
//! which volume, which option or which step, and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid option {key}: {reason}")]
    InvalidOption { key: String, reason: String },
    /// The backend refused a `-o` option it received as a StorageClass parameter.
    #[error(
        "invalid option: {reason} (the driver itself takes size, fsType, mountOptions, reclaim, \
         accessMode, volumeId; other options go to the {backend} backend as StorageClass parameters)"
    )]
    BackendOption {
        reason: String,
        backend: &'static str,
    },
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("volume {name} is in use by {count} container(s); stop them before removing it")]
    InUse { name: String, count: usize },
    #[error(
        "volume {name} is ReadWriteOncePod and already mounted by another container; \
         stop that one first or create the volume with accessMode=ReadWriteOnce"
    )]
    SingleWriter { name: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{action} volume {name}: {source}")]
    Backend {
        action: &'static str,
        name: String,
        #[source]
        source: stowage_backends::Error,
    },
    #[error("saving the state of volume {name} in {path}: {source}")]
    State {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed {endpoint} request: {reason}")]
    BadRequest {
        endpoint: &'static str,
        reason: String,
    },
}

impl DriverError {
    /// How loud a failure is logged: lookups of names that are not ours are routine (Docker
    /// asks every driver), mistakes in a request are the caller's, the rest is ours to look at.
    pub fn level(&self) -> tracing::Level {
        match self {
            DriverError::NotFound(_) => tracing::Level::DEBUG,
            DriverError::Backend { .. } | DriverError::State { .. } => tracing::Level::WARN,
            _ => tracing::Level::INFO,
        }
    }

    pub fn backend(
        action: &'static str,
        name: &str,
    ) -> impl FnOnce(stowage_backends::Error) -> DriverError {
        let name = name.to_owned();
        move |source| DriverError::Backend {
            action,
            name,
            source,
        }
    }
}
