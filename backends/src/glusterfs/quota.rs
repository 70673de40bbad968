//! Capacity enforcement: a gluster directory quota (`limit-usage`) on every PV directory, set
//! before the directory becomes visible as a volume, raised on expansion, removed on delete.
//! Writes past it fail with EDQUOT and `df` on a node's mount shows the limit as the size.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::cli::{Cli, op_error};
use crate::dirstore::DirHooks;
use crate::error::Result;
use crate::relpath::RelPath;

pub struct Quota {
    pub cli: Arc<Cli>,
    pub volume: String,
    /// Directory inside the volume that the instance's relative paths start from.
    pub base: String,
    /// Enable quota and strict enforcement on the volume before the first limit.
    pub manage: bool,
    setup: OnceCell<()>,
}

/// Volume options that make quota enforcement strict. With the defaults (soft-timeout 60s,
/// hard-timeout 5s) gluster accounts usage lazily and 40 MiB went into a 10 MiB limit in a
/// trial; with 0 writes fail with EDQUOT close to the limit. deem-statfs makes `df` on a
/// directory mount report the limit as the filesystem size.
pub const STRICT_OPTIONS: &[(&str, &str)] = &[
    ("features.soft-timeout", "0"),
    ("features.hard-timeout", "0"),
    ("features.quota-deem-statfs", "on"),
];

impl Quota {
    pub fn new(cli: Arc<Cli>, volume: String, base: String, manage: bool) -> Self {
        Quota {
            cli,
            volume,
            base,
            manage,
            setup: OnceCell::new(),
        }
    }

    /// The path gluster's quota commands take: absolute inside the volume.
    pub fn gluster_path(&self, p: &RelPath) -> String {
        if self.base.is_empty() {
            format!("/{p}")
        } else {
            format!("/{}/{p}", self.base)
        }
    }

    /// Quota on and strict, once per process (retried until it succeeds).
    async fn setup(&self) -> Result<()> {
        if !self.manage {
            return Ok(());
        }
        self.setup
            .get_or_try_init(|| async {
                let v = self.volume.as_str();
                let args = ["volume", "quota", v, "enable"];
                let r = self.cli.volume_call(v, &args).await?;
                if r.op_ret != 0 && !r.op_errstr.contains("already enabled") {
                    return Err(op_error(&args, &r));
                }
                for (k, val) in STRICT_OPTIONS {
                    let args = ["volume", "set", v, k, val];
                    let r = self.cli.volume_call(v, &args).await?;
                    if r.op_ret != 0 {
                        return Err(op_error(&args, &r));
                    }
                }
                tracing::info!(volume = v, "quota enabled and strict on the gluster volume");
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl DirHooks for Quota {
    async fn set_capacity(&self, path: &RelPath, capacity_bytes: u64) -> Result<()> {
        self.setup().await?;
        let gpath = self.gluster_path(path);
        let bytes = capacity_bytes.to_string();
        let v = self.volume.as_str();
        let args = [
            "volume",
            "quota",
            v,
            "limit-usage",
            gpath.as_str(),
            bytes.as_str(),
        ];
        let r = self.cli.volume_call(v, &args).await?;
        if r.op_ret != 0 {
            return Err(op_error(&args, &r));
        }
        tracing::debug!(path = %gpath, capacity_bytes, "quota limit set");
        Ok(())
    }

    async fn release(&self, path: &RelPath) -> Result<()> {
        let gpath = self.gluster_path(path);
        let v = self.volume.as_str();
        let args = ["volume", "quota", v, "remove", gpath.as_str()];
        let r = self.cli.volume_call(v, &args).await?;
        // No limit there (never set, or removed by an earlier attempt): nothing to do.
        let gone = [
            "No data available",
            "No such file",
            "No quota configured",
            "not set",
            "Quota is disabled",
        ];
        if r.op_ret != 0 && !gone.iter().any(|g| r.op_errstr.contains(g)) {
            return Err(op_error(&args, &r));
        }
        Ok(())
    }
}
