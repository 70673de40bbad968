//! Node side: a FUSE mount (`mount -t glusterfs server:/volume/dir`) at the staging path,
//! bind mounts for publish, stats from the mount.
//!
//! Mount healing. The FUSE client (`glusterfs`) daemonizes: it lives outside the plugin
//! process, so a plugin restart does not take mounts down. When that client dies anyway
//! (OOM kill, crash), every path on the mount answers ENOTCONN ("Transport endpoint is not
//! connected"), the most common complaint against FUSE-based drivers. The next NodeStage,
//! NodePublish or NodeGetVolumeStats of the volume notices, lazily unmounts the dead mount,
//! mounts again with the options it was staged with, and re-binds every published target of
//! it. What was staged with which options is recorded at stage time in
//! `<stateDir>/node/<hash of volume id>.json` (no secrets are involved).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::GlusterInstance;
use crate::command::MOUNT_TIMEOUT;
use crate::error::{Error, Result};
use crate::locks::KeyLocks;
use crate::mount::{self, Probe};
use crate::node::{NodeBackend, NodeFeatures, PublishRequest, StageRequest};
use crate::types::VolumeStats;
use crate::volume_id::VolumeId;

/// Volume context keys: all a node needs to mount, so nodes need no configuration.
pub const CTX_SERVER: &str = "server";
pub const CTX_BACKUP_SERVERS: &str = "backupServers";
pub const CTX_VOLUME: &str = "volume";
pub const CTX_PATH: &str = "path";
pub const CTX_MOUNT_OPTIONS: &str = "mountOptions";

const FLAGS_FIELD: &str = "volume_capability.mount.mount_flags";

pub struct GlusterNode {
    /// Per configured instance, its state dir; others use the default.
    state_dirs: BTreeMap<String, PathBuf>,
    default_state: PathBuf,
    locks: KeyLocks,
}

/// What a stage mounted, so that a dead mount can be remade exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct StageRecord {
    volume_id: String,
    source: String,
    options: Vec<String>,
    staging_path: PathBuf,
}

pub fn check_option(o: &str) -> Result<()> {
    if o.is_empty() || o.starts_with('-') || o.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Error::invalid(
            FLAGS_FIELD,
            format!("{o:?} is not a mount option"),
        ));
    }
    Ok(())
}

fn split_options(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(String::from)
        .collect()
}

impl GlusterNode {
    pub fn new(instances: &BTreeMap<String, GlusterInstance>) -> Self {
        GlusterNode {
            state_dirs: instances
                .iter()
                .map(|(k, v)| (k.clone(), v.state_dir.clone()))
                .collect(),
            default_state: instances
                .values()
                .next()
                .map(|i| i.state_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/run/stowage/glusterfs")),
            locks: KeyLocks::default(),
        }
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        let dir = VolumeId::parse("volume_id", volume_id)
            .ok()
            .and_then(|id| self.state_dirs.get(&id.instance).cloned())
            .unwrap_or_else(|| self.default_state.clone());
        let mut h = hex::encode(Sha256::digest(volume_id.as_bytes()));
        h.truncate(32);
        dir.join("node").join(format!("{h}.json"))
    }

    async fn save_record(&self, rec: &StageRecord) -> Result<()> {
        let p = self.record_path(&rec.volume_id);
        if let Some(d) = p.parent() {
            mount::ensure_dir(d).await?;
        }
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Internal(e.to_string()))?;
        let tmp = p.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        tokio::fs::rename(&tmp, &p)
            .await
            .map_err(|e| Error::io(format!("writing {}", p.display()), e))
    }

    async fn load_record(&self, volume_id: &str) -> Result<Option<StageRecord>> {
        let p = self.record_path(volume_id);
        match tokio::fs::read(&p).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Internal(format!("corrupt stage record {}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    /// Source and options from the volume context and the capability.
    fn mount_spec(
        context: &BTreeMap<String, String>,
        flags: &[String],
    ) -> Result<(String, Vec<String>)> {
        let get = |k: &str| context.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let server = get(CTX_SERVER).ok_or_else(|| {
            Error::invalid(
                "volume_context",
                "server is missing (volumes of glusterfs.stowage.io carry server, volume and path)",
            )
        })?;
        let volume =
            get(CTX_VOLUME).ok_or_else(|| Error::invalid("volume_context", "volume is missing"))?;
        let path = get(CTX_PATH).unwrap_or("/");
        if !super::config::valid_host(server) {
            return Err(Error::invalid(
                "volume_context",
                format!("server {server:?} is not a host name or IP address"),
            ));
        }
        if !super::config::valid_volume_name(volume) {
            return Err(Error::invalid(
                "volume_context",
                format!("volume {volume:?} is not a gluster volume name"),
            ));
        }
        if !path.starts_with('/')
            || path.split('/').any(|c| c == "..")
            || path.chars().any(|c| c.is_control() || c == ' ' || c == ',')
        {
            return Err(Error::invalid(
                "volume_context",
                format!("path {path:?} must be an absolute path inside the volume"),
            ));
        }
        let mut opts: Vec<String> = if !flags.is_empty() {
            flags.iter().flat_map(|f| split_options(f)).collect()
        } else {
            get(CTX_MOUNT_OPTIONS)
                .map(split_options)
                .unwrap_or_default()
        };
        for o in &opts {
            check_option(o)?;
        }
        if let Some(backups) = get(CTX_BACKUP_SERVERS) {
            let list: Vec<&str> = backups
                .split([',', ':'])
                .filter(|s| !s.is_empty())
                .collect();
            if list.iter().any(|h| !super::config::valid_host(h)) {
                return Err(Error::invalid(
                    "volume_context",
                    format!("backupServers {backups:?} is not a list of hosts"),
                ));
            }
            if !opts
                .iter()
                .any(|o| o.starts_with("backup-volfile-servers="))
            {
                opts.push(format!("backup-volfile-servers={}", list.join(":")));
            }
        }
        let path = path.trim_end_matches('/');
        Ok((format!("{server}:/{volume}{path}"), opts))
    }

    async fn mount_fuse(&self, rec: &StageRecord) -> Result<()> {
        let started = std::time::Instant::now();
        mount::mount(
            &rec.source,
            &rec.staging_path,
            "glusterfs",
            &rec.options,
            MOUNT_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            Error::Internal(msg) => Error::Internal(format!("mounting {}: {msg}", rec.source)),
            other => other,
        })?;
        // mount.glusterfs has exited 0 with nothing mounted (bad option, refused subdir).
        if mount::mounted_at(&rec.staging_path).await?.is_none() {
            return Err(Error::Internal(format!(
                "mounting {}: mount.glusterfs succeeded but nothing is mounted at {}",
                rec.source,
                rec.staging_path.display()
            )));
        }
        tracing::info!(volume = %rec.volume_id, source = %rec.source, elapsed_ms = started.elapsed().as_millis() as u64, "FUSE mount ready");
        Ok(())
    }

    /// Remounts a dead staging mount and re-binds every target that was bound to it. Ok when
    /// the staging mount answers (healed now or by someone else).
    async fn heal_staging(&self, rec: &StageRecord) -> Result<()> {
        let staging = &rec.staging_path;
        let entry = mount::mounted_at(staging).await?;
        let why = match (&entry, mount::probe(staging).await) {
            (Some(_), Probe::Alive) => return Ok(()),
            (_, Probe::Dead(why)) => why,
            (None, _) => "not mounted".to_string(),
            (Some(_), Probe::Missing) => "mount point missing".to_string(),
        };
        tracing::warn!(volume = %rec.volume_id, staging = %staging.display(), %why, "FUSE mount is dead; remounting");
        // Bind mounts of the dead mount share its device number.
        let mut dependents = Vec::new();
        if let Some(e) = &entry {
            for m in mount::mountinfo::read().await? {
                if m.dev == e.dev && m.mount_point != *staging {
                    dependents.push((m.mount_point.clone(), m.is_read_only()));
                }
            }
        }
        mount::unmount(staging).await?;
        mount::ensure_dir(staging).await?;
        self.mount_fuse(rec).await?;
        crate::metrics::get()
            .fuse_healed
            .get_or_create(&crate::metrics::FuseLabels {
                backend: "glusterfs",
            })
            .inc();
        for (target, ro) in dependents {
            mount::unmount(&target).await?;
            mount::bind(staging, &target, ro, &[]).await?;
            tracing::info!(volume = %rec.volume_id, target = %target.display(), "published mount re-bound");
        }
        Ok(())
    }

    /// Heals the mount behind `path` when it does not answer. Ok(false) when nothing needed it.
    async fn heal_path(&self, volume_id: &str, path: &Path) -> Result<bool> {
        let Probe::Dead(why) = mount::probe(path).await else {
            return Ok(false);
        };
        let Some(rec) = self.load_record(volume_id).await? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} at {} does not answer ({why}) and has no stage record to remount it from",
                path.display()
            )));
        };
        let _g = self.locks.lock(volume_id).await;
        if let Err(e) = self.heal_staging(&rec).await {
            // A client killed a moment ago can still be tearing down, and glusterd can be
            // slow to hand out the volfile under load: one more try before giving up.
            tracing::warn!(volume = volume_id, error = %e, "remount failed; trying once more");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            self.heal_staging(&rec).await?;
        }
        if path != rec.staging_path
            && let Probe::Dead(_) = mount::probe(path).await
        {
            let ro = mount::mounted_at(path)
                .await?
                .is_some_and(|m| m.is_read_only());
            mount::unmount(path).await?;
            mount::bind(&rec.staging_path, path, ro, &[]).await?;
        }
        Ok(true)
    }
}

#[async_trait]
impl NodeBackend for GlusterNode {
    fn driver_name(&self) -> &'static str {
        super::DRIVER
    }

    fn features(&self) -> NodeFeatures {
        NodeFeatures {
            // Nothing grows on the node (the quota is raised by the controller); NodeExpand
            // heals a dead mount and reports the size the mount now shows.
            expand: true,
            single_node_multi_writer: true,
            volume_mount_group: false,
        }
    }

    async fn stage(&self, req: &StageRequest) -> Result<()> {
        if req.capability.is_block() {
            return Err(Error::invalid(
                "volume_capability",
                "GlusterFS volumes are directories: raw block access is not supported",
            ));
        }
        let (source, options) = Self::mount_spec(&req.context, req.capability.mount_flags())?;
        let rec = StageRecord {
            volume_id: req.volume_id.clone(),
            source,
            options,
            staging_path: req.staging_path.clone(),
        };
        let _g = self.locks.lock(&req.volume_id).await;
        // Before anything touches the path: on a dead FUSE mount even mkdir -p fails.
        if let Some(m) = mount::mounted_at(&req.staging_path).await? {
            if m.source != rec.source {
                return Err(Error::AlreadyExists(format!(
                    "{} already holds {}, not {}",
                    req.staging_path.display(),
                    m.source,
                    rec.source
                )));
            }
            self.save_record(&rec).await?;
            return self.heal_staging(&rec).await;
        }
        mount::ensure_dir(&req.staging_path).await?;
        self.save_record(&rec).await?;
        self.mount_fuse(&rec).await
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let _g = self.locks.lock(volume_id).await;
        mount::unmount(staging_path).await?;
        let p = self.record_path(volume_id);
        // The record belongs to another staging path of the same volume: keep it.
        if let Some(rec) = self.load_record(volume_id).await.ok().flatten()
            && rec.staging_path != staging_path
        {
            return Ok(());
        }
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
        }
    }

    async fn publish(&self, req: &PublishRequest) -> Result<()> {
        if req.capability.is_block() {
            return Err(Error::invalid(
                "volume_capability",
                "GlusterFS volumes are directories: raw block access is not supported",
            ));
        }
        if mount::mounted_at(&req.staging_path).await?.is_some() {
            self.heal_path(&req.volume_id, &req.staging_path).await?;
        }
        mount::publish_bind(req).await
    }

    async fn expand(&self, volume_id: &str, path: &Path, capacity_bytes: u64) -> Result<u64> {
        self.heal_path(volume_id, path).await?;
        let shown = mount::path_stats(path).await?.usage.total_bytes;
        Ok(shown.max(capacity_bytes))
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        match self.heal_path(volume_id, path).await {
            Ok(true) => {
                tracing::info!(volume = volume_id, path = %path.display(), "dead FUSE mount healed")
            }
            Ok(false) => {}
            // Not healable now: report the volume as abnormal (below) rather than failing the
            // call, so the condition reaches the CO; the next call tries again.
            Err(e) => tracing::warn!(volume = volume_id, error = %e, "dead FUSE mount not healed"),
        }
        mount::path_stats(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builds_sources_and_options() {
        let c = ctx(&[
            (CTX_SERVER, "g1"),
            (CTX_VOLUME, "pvs"),
            (CTX_PATH, "/k8s/pvc-1"),
            (CTX_BACKUP_SERVERS, "g2,g3"),
            (CTX_MOUNT_OPTIONS, "log-level=WARNING"),
        ]);
        let (src, opts) = GlusterNode::mount_spec(&c, &[]).unwrap();
        assert_eq!(src, "g1:/pvs/k8s/pvc-1");
        assert_eq!(
            opts,
            vec!["log-level=WARNING", "backup-volfile-servers=g2:g3"]
        );
        // StorageClass mountOptions win over the instance default.
        let (_, opts) = GlusterNode::mount_spec(&c, &["ro,acl".to_string()]).unwrap();
        assert_eq!(opts, vec!["ro", "acl", "backup-volfile-servers=g2:g3"]);
    }

    #[test]
    fn refuses_bad_contexts() {
        for (c, flags) in [
            (ctx(&[(CTX_VOLUME, "v"), (CTX_PATH, "/a")]), vec![]),
            (ctx(&[(CTX_SERVER, "-oexec"), (CTX_VOLUME, "v")]), vec![]),
            (ctx(&[(CTX_SERVER, "g"), (CTX_VOLUME, "v w")]), vec![]),
            (
                ctx(&[
                    (CTX_SERVER, "g"),
                    (CTX_VOLUME, "v"),
                    (CTX_PATH, "/a/../../etc"),
                ]),
                vec![],
            ),
            (
                ctx(&[(CTX_SERVER, "g"), (CTX_VOLUME, "v"), (CTX_PATH, "rel")]),
                vec![],
            ),
            (
                ctx(&[(CTX_SERVER, "g"), (CTX_VOLUME, "v")]),
                vec!["a b".to_string()],
            ),
            (
                ctx(&[
                    (CTX_SERVER, "g"),
                    (CTX_VOLUME, "v"),
                    (CTX_BACKUP_SERVERS, "x y"),
                ]),
                vec![],
            ),
        ] {
            let err = GlusterNode::mount_spec(&c, &flags).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{c:?}: {err}");
        }
    }
}
