//! # stowage-csi
//!
//! The gRPC layer every Stowage binary shares.
//!
//! * [`v1`]: the Container Storage Interface (`csi.v1`, spec v1.12.0) as
//!   prost messages plus tonic clients and servers for the Identity,
//!   Controller, Node, GroupController and SnapshotMetadata services. It is
//!   generated from the project's own `proto/csi.proto`, written from the
//!   specification text and kept wire-compatible with it, because the
//!   published Rust crates trail the spec by years.
//! * [`stowage_v1`]: Stowage's own admin API (`RecycleVolume`,
//!   `GetVolumeDetails`), served next to CSI and called only by Stowage tools.
//! * [`pluginregistration`]: the kubelet's plugin-registration API, which
//!   `stowage-node` serves so no node-driver-registrar sidecar is needed.
//! * [`endpoint`], [`mod@serve`], [`client`]: parsing `--endpoint`/`CSI_ENDPOINT`,
//!   serving on a unix socket (or TCP, for a node plugin inside a test VM)
//!   with graceful shutdown and per-request tracing spans, and connecting to one.
//! * [`redact`]: log-safe `Debug` output for requests carrying `secrets`.
//! * [`validate`]: field checks that return the INVALID_ARGUMENT statuses the
//!   spec and csi-sanity expect.
//!
//! The crate holds no storage logic; the controller and node crates do.

pub mod client;
pub mod convert;
pub mod endpoint;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod redact;
pub mod runtime;
pub mod serve;
pub mod validate;

/// CSI v1 (`csi.v1`), generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// Stowage's admin API (`stowage.v1`), generated from `proto/stowage.proto`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod stowage_v1 {
    tonic::include_proto!("stowage.v1");
}

/// The kubelet plugin-registration API (`pluginregistration`, v1), generated from
/// `proto/pluginregistration.proto`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

pub use client::{ClientError, connect};
pub use endpoint::{Endpoint, EndpointError};
pub use redact::Redact;
pub use serve::{ServeError, serve, shutdown_signal};
