//! `nfs.stowage.io`: a volume is a subdirectory of an NFS export.
//!
//! The controller speaks NFSv3 from user space ([`crate::fs::nfs::NfsFs`]): no mounts and no
//! privileges in the controller. Nodes mount the kernel way (`mount -t nfs`), NFSv3 or v4.x,
//! with the StorageClass mountOptions. NFS cannot enforce capacity: it is recorded.

pub mod config;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::command::mount_timeout;
use crate::dirstore::{DirBackend, DirOptions, Instance};
use crate::error::{Error, Result};
use crate::fs::lazy::Lazy;
use crate::fs::nfs::{NfsFs, NfsOptions};
use crate::mount::{self, Probe};
use crate::node::{NodeBackend, NodeFeatures, StageRequest};
pub use config::NfsInstance;

pub const DRIVER: &str = "nfs.stowage.io";

/// Volume context keys: everything a node needs to mount, so nodes need no configuration.
pub const CTX_SERVER: &str = "server";
pub const CTX_SHARE: &str = "share";
pub const CTX_MOUNT_OPTIONS: &str = "mountOptions";

pub type NfsController = DirBackend<Lazy<NfsFs>>;

fn join_share(export: &str, base: &str, path: &str) -> String {
    let mut s = export.trim_end_matches('/').to_string();
    for part in [base.trim_matches('/'), path] {
        if !part.is_empty() {
            s.push('/');
            s.push_str(part);
        }
    }
    if s.is_empty() { "/".into() } else { s }
}

pub async fn controller(instances: &BTreeMap<String, NfsInstance>) -> Result<NfsController> {
    let mut out = Vec::new();
    for (name, cfg) in instances {
        let opts = NfsOptions {
            server: cfg.server.clone(),
            export: cfg.export.clone(),
            base_dir: cfg.base_dir.clone(),
            port: cfg.nfs_port,
            mount_port: cfg.mount_port,
            uid: cfg.uid,
            gid: cfg.gid,
            privileged_port: cfg.privileged_port,
            pool_size: 4,
            timeout: Duration::from_secs(cfg.timeout_secs.max(1)),
        };
        // Connect on first use: a server that is down when the controller starts must not
        // keep the controller from starting (it answers UNAVAILABLE until the server is back).
        let fs = Lazy::new(move || NfsFs::connect(opts.clone()));
        let settings = cfg.dir_settings();
        let (server, export, base) = (cfg.server.clone(), cfg.export.clone(), cfg.base_dir.clone());
        let mount_options = cfg.mount_options.join(",");
        let mut port_opts = Vec::new();
        if let Some(p) = cfg.nfs_port {
            port_opts.push(format!("port={p}"));
        }
        if let Some(p) = cfg.mount_port {
            port_opts.push(format!("mountport={p}"));
        }
        out.push(Instance {
            name: name.clone(),
            fs,
            options: DirOptions {
                attrs: settings.attrs()?,
                block: false,
                max_volume_bytes: settings.max_volume_bytes,
            },
            context: Arc::new(move |path| {
                let mut ctx = BTreeMap::from([
                    (CTX_SERVER.to_string(), server.clone()),
                    (
                        CTX_SHARE.to_string(),
                        join_share(&export, &base, path.as_str()),
                    ),
                ]);
                if !mount_options.is_empty() {
                    ctx.insert(CTX_MOUNT_OPTIONS.to_string(), mount_options.clone());
                }
                ctx
            }),
        });
    }
    DirBackend::new(DRIVER, out)
}

/// Node side: `mount -t nfs server:share staging`, then bind publishes.
#[derive(Debug, Default)]
pub struct NfsNode;

/// Mount options: the capability's (StorageClass mountOptions) win over the instance default.
fn mount_options(req: &StageRequest) -> Vec<String> {
    let flags = req.capability.mount_flags();
    let mut opts: Vec<String> = if !flags.is_empty() {
        flags
            .iter()
            .flat_map(|f| f.split(','))
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect()
    } else {
        req.context
            .get(CTX_MOUNT_OPTIONS)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    // mount.nfs otherwise retries in the background for two minutes; we answer now and let the
    // CO retry, so one unreachable server cannot hold a node call hostage.
    if !opts.iter().any(|o| o.starts_with("retry=")) {
        opts.push("retry=0".into());
    }
    opts
}

fn check_option(o: &str) -> Result<()> {
    if o.is_empty() || o.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Error::invalid(
            "volume_capability.mount.mount_flags",
            format!("{o:?} is not a mount option"),
        ));
    }
    Ok(())
}

#[async_trait]
impl NodeBackend for NfsNode {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> NodeFeatures {
        // Expansion only changes the recorded size (NFS cannot enforce it) and the node has
        // nothing to grow; answering NodeExpandVolume lets COs finish a resize the usual way.
        NodeFeatures {
            expand: true,
            single_node_multi_writer: true,
            volume_mount_group: false,
        }
    }

    async fn stage(&self, req: &StageRequest) -> Result<()> {
        if req.capability.is_block() {
            return Err(Error::invalid(
                "volume_capability",
                "NFS volumes cannot be used as raw block devices",
            ));
        }
        let server = req
            .context
            .get(CTX_SERVER)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::invalid(
                    "volume_context",
                    "server is missing (volumes of nfs.stowage.io carry server and share)",
                )
            })?;
        let share = req
            .context
            .get(CTX_SHARE)
            .filter(|s| s.starts_with('/'))
            .ok_or_else(|| {
                Error::invalid("volume_context", "share is missing or not an absolute path")
            })?;
        if server.starts_with('-')
            || server.contains([' ', ',', '\0'])
            || share.contains(['\0', '\n'])
        {
            return Err(Error::invalid(
                "volume_context",
                "server or share contains characters no NFS path can",
            ));
        }
        let opts = mount_options(req);
        for o in &opts {
            check_option(o)?;
        }
        mount::ensure_dir(&req.staging_path).await?;
        if mount::mounted_at(&req.staging_path).await?.is_some() {
            match mount::probe(&req.staging_path).await {
                Probe::Alive => return Ok(()),
                Probe::Dead(why) => {
                    tracing::warn!(volume = %req.volume_id, %why, "staged NFS mount is dead; remounting");
                    mount::unmount(&req.staging_path).await?;
                }
                Probe::Missing => {}
            }
        }
        // IPv6 literals need brackets in the mount source.
        let host = if server.contains(':') && !server.starts_with('[') {
            format!("[{server}]")
        } else {
            server.clone()
        };
        let source = format!("{host}:{share}");
        mount::mount(&source, &req.staging_path, "nfs", &opts, mount_timeout())
            .await
            .map_err(|e| match e {
                Error::Internal(msg) => Error::Internal(format!("mounting {source}: {msg}")),
                other => other,
            })
    }

    async fn unstage(&self, _volume_id: &str, staging_path: &Path) -> Result<()> {
        mount::unmount(staging_path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_join_cleanly() {
        assert_eq!(
            join_share("/export", "stowage", "pvc-1"),
            "/export/stowage/pvc-1"
        );
        assert_eq!(join_share("/export/", "", "a/b"), "/export/a/b");
        assert_eq!(join_share("/", "", "v"), "/v");
    }
}
