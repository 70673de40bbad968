//! The one error type every backend returns, and its mapping onto gRPC status codes.
//!
//! Variants are named for what the caller should do about them, which is also what the CSI
//! spec's per-RPC error tables key on (csi-sanity checks them).

use std::fmt;

/// Result alias used across the backends crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; `field` names the offending field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{what} not found: {id}")]
    NotFound { what: &'static str, id: String },
    /// Same name, incompatible request (CSI: ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// Capacity outside what the backend can give (CSI: OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// The volume or node is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume is in flight.
    #[error("an operation on {0} is already in progress")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The backend server could not be reached or timed out; retrying later may work.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.to_string(),
        }
    }
    pub fn not_found(what: &'static str, id: impl fmt::Display) -> Self {
        Error::NotFound {
            what,
            id: id.to_string(),
        }
    }
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
    /// Wraps an I/O error with the path it happened on, classifying the kinds that mean
    /// "the server is not answering" as Unavailable so callers retry.
    pub fn io_at(path: impl fmt::Display, source: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match source.kind() {
            TimedOut | ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected
            | BrokenPipe | HostUnreachable | NetworkUnreachable => {
                Error::Unavailable(format!("{path}: {source}"))
            }
            // EFBIG: the size asked for is beyond what the filesystem can hold, which CSI
            // callers must see as OUT_OF_RANGE, not as an internal fault.
            FileTooLarge => Error::OutOfRange(format!("{path}: {source}")),
            _ => Error::Io {
                context: path.to_string(),
                source,
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unsupported(_) => Code::InvalidArgument,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                Code::ResourceExhausted
            }
            Error::Io { .. } | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
