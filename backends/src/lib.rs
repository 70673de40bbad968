//! Stowage's storage backends behind two traits: [`ControllerBackend`] (create, delete,
//! expand, snapshot, clone, list, capacity, recycle: no mounts) and [`NodeBackend`] (stage,
//! publish, unpublish, unstage, stats, expand on the machine that runs the workload).
//!
//! Backends: [`local`] (directories and loop-attached images on the node; the embedded default)
//! and [`nfs`] (subdirectories of an NFS export, reached from user space by the controller and
//! mounted by the kernel on nodes). Both are directory-per-volume backends and share their
//! controller, [`dirstore`], written against the small [`fs::Fs`] interface.
//!
//! The CSI services, the provisioner's Recycle RPC and the Docker plugin all drive backends
//! through these traits, so no backend is implemented twice.

pub mod command;
pub mod config;
pub mod controller;
pub mod dirstore;
pub mod error;
pub mod fs;
pub mod glusterfs;
pub mod group;
pub mod local;
pub mod locks;
pub mod metrics;
pub mod mount;
pub mod nfs;
pub mod node;
pub mod params;
pub mod rbd;
pub mod relpath;
pub mod s3;
pub mod types;
pub mod volume_id;

use std::sync::Arc;

pub use config::{Config, ConfigFile};
pub use controller::{ControllerBackend, ControllerFeatures, Expanded};
pub use error::{Error, Result};
pub use node::{NodeBackend, NodeFeatures, PublishRequest, StageRequest};
pub use types::*;

/// Why a configured backend cannot run in this binary (its cargo feature was off at build).
/// Config::validate refuses such a configuration already; this covers a Config made in code.
#[allow(dead_code)]
fn not_built(config: &Config) -> String {
    format!(
        "backend {}: this build of Stowage has no {} support (built without cargo feature {:?})",
        config.kind(),
        config.kind(),
        config.kind()
    )
}

/// The controller side of the backend a configuration names.
pub async fn build_controller(config: &Config) -> Result<Arc<dyn ControllerBackend>> {
    Ok(match config {
        Config::Local(c) => Arc::new(local::controller(&c.instances).await?),
        Config::Nfs(c) => Arc::new(nfs::controller(&c.instances).await?),
        #[cfg(feature = "s3")]
        Config::S3(c) => Arc::new(s3::controller(c)?),
        Config::Glusterfs(c) => glusterfs::controller(c).await?,
        #[cfg(feature = "rbd")]
        Config::Rbd(c) => Arc::new(rbd::RbdController::new(&c.instances)?),
        #[allow(unreachable_patterns)]
        other => return Err(Error::FailedPrecondition(not_built(other))),
    })
}

/// The node side of the backend a configuration names.
pub fn build_node(config: &Config) -> Arc<dyn NodeBackend> {
    match config {
        Config::Local(c) => Arc::new(local::LocalNode::new(&c.instances)),
        Config::Nfs(_) => Arc::new(nfs::NfsNode),
        #[cfg(feature = "s3")]
        Config::S3(c) => Arc::new(s3::S3Node::new(c)),
        Config::Glusterfs(c) => Arc::new(glusterfs::GlusterNode::new(&c.instances)),
        #[cfg(feature = "rbd")]
        Config::Rbd(c) => Arc::new(rbd::RbdNode::new(&c.instances)),
        #[allow(unreachable_patterns)]
        other => Arc::new(node::NotBuilt {
            driver: other.driver_name(),
            why: not_built(other),
        }),
    }
}
