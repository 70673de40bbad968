//! The volume driver behind the Docker API: Docker volume names mapped onto backend volumes,
//! through the same [`ControllerBackend`] (create, delete, recycle) and [`NodeBackend`] (stage,
//! publish) the CSI plugins use, so no backend is implemented twice.
//!
//! Each volume is staged once per node at `<state-dir>/staging/<name>` and published once at
//! `<mount-dir>/<name>`, the mountpoint Docker binds into containers. Containers share that
//! mount; it is reference-counted by Docker's mount ID (one per container mount) and taken
//! down by the last Unmount. References are persisted, so a restarted plugin still knows which
//! containers hold a volume.
//!
//! Calls on one name are serialized (Docker and Swarm send duplicates concurrently); calls on
//! different names run in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use stowage_backends::locks::KeyLocks;
use stowage_backends::types::{AccessMode, CapacityRange, CreateVolume, Secrets};
use stowage_backends::{ControllerBackend, Error as BackendError, NodeBackend, NodeInfo, mount};
use stowage_backends::{PublishRequest, StageRequest};

use crate::error::DriverError;
use crate::options::{self, Reclaim, VolumeOptions};
use crate::state::{Record, Store};

type Result<T, E = DriverError> = std::result::Result<T, E>;

/// Longest volume name accepted: CSI names are bounded at 128 bytes.
pub const MAX_NAME_LEN: usize = 128;

/// How long start-up waits for the backend to record this node before carrying on.
const REGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How Docker should treat the driver's volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Volumes live on one node (the local backend): Swarm must not assume they are shared.
    Local,
    /// Every node reaches the same volume by name (network backends): cluster-wide in Swarm.
    Global,
}

pub struct Settings {
    pub state_dir: PathBuf,
    pub mount_dir: PathBuf,
    pub node_id: String,
    pub secrets: Secrets,
    /// None: derived from the backend (volumes with node topology are local).
    pub scope: Option<Scope>,
}

/// A volume as Docker's Get and List return it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeInfo {
    pub name: String,
    pub mountpoint: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<BTreeMap<String, serde_json::Value>>,
}

pub struct Driver {
    controller: Arc<dyn ControllerBackend>,
    node: Arc<dyn NodeBackend>,
    store: Store,
    records: Mutex<BTreeMap<String, Record>>,
    locks: KeyLocks,
    node_id: String,
    staging_dir: PathBuf,
    mount_dir: PathBuf,
    secrets: Secrets,
    scope: Scope,
}

/// Docker's rule for volume names (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), bounded like CSI names.
/// The name becomes a file and a directory name, so nothing else may pass.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(DriverError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 bytes");
    }
    if !name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return bad("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return bad("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 UTC time, the form Docker prints for CreatedAt.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl Driver {
    /// Loads the persisted volumes. References of volumes whose mountpoint is no longer
    /// mounted are dropped: no container can hold a mount that is not there (the host
    /// rebooted, or someone unmounted it), and keeping them would keep the volume from ever
    /// being unmounted by the last Unmount.
    pub async fn new(
        controller: Arc<dyn ControllerBackend>,
        node: Arc<dyn NodeBackend>,
        settings: Settings,
    ) -> anyhow::Result<Self> {
        let store = Store::new(&settings.state_dir);
        let mut records = store.load_all().map_err(|e| {
            anyhow::anyhow!(
                "reading the volume state in {}: {e}",
                settings.state_dir.display()
            )
        })?;
        let scope = settings.scope.unwrap_or_else(|| {
            if node.topology(&settings.node_id).is_empty() {
                Scope::Global
            } else {
                Scope::Local
            }
        });
        let driver = Driver {
            controller,
            node,
            store,
            records: Mutex::new(BTreeMap::new()),
            locks: KeyLocks::default(),
            node_id: settings.node_id,
            staging_dir: settings.state_dir.join("staging"),
            mount_dir: settings.mount_dir,
            secrets: settings.secrets,
            scope,
        };
        driver.register().await;
        let mounted = mounted_paths().await?;
        for rec in records.values_mut() {
            if !rec.mounts.is_empty() && !mounted.contains(&driver.target(&rec.name)) {
                tracing::info!(volume = %rec.name, volume_id = %rec.volume_id, stale = rec.mounts.len(),
                    "mountpoint is not mounted; dropping stale mount references");
                rec.mounts.clear();
                driver.store.save(rec).await.map_err(|e| {
                    anyhow::anyhow!("saving {}: {e}", driver.store.path_of(&rec.name).display())
                })?;
            }
        }
        tracing::info!(
            volumes = records.len(),
            scope = ?driver.scope,
            driver = driver.controller.driver_name(),
            "volume state loaded"
        );
        *driver.lock_records() = records;
        Ok(driver)
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.node_id.clone(),
            max_volumes: 0,
            topology: self.node.topology(&self.node_id),
        }
    }

    /// Makes this node known to the backend, which refuses to attach volumes to nodes it has
    /// never heard of. A backend that is down now is retried in the background (and again by
    /// the first Mount that needs it), so the plugin still starts and serves what it can.
    async fn register(&self) {
        let info = self.node_info();
        match tokio::time::timeout(REGISTER_TIMEOUT, self.controller.register_node(&info)).await {
            Ok(Ok(())) => {
                tracing::info!(node_id = %self.node_id, "node registered with the backend")
            }
            Ok(Err(e)) => {
                tracing::warn!(node_id = %self.node_id, error = %e, "node registration failed; retrying in the background");
                crate::csi::register_in_background(self.controller.clone(), info);
            }
            Err(_) => {
                tracing::warn!(node_id = %self.node_id, "node registration timed out; retrying in the background");
                crate::csi::register_in_background(self.controller.clone(), info);
            }
        }
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, name: &str) -> Option<Record> {
        self.lock_records().get(name).cloned()
    }

    /// A volume Docker may see: present and not waiting in the recycled pool.
    fn active(&self, name: &str) -> Result<Record> {
        match self.record(name) {
            Some(r) if !r.recycled => Ok(r),
            _ => Err(DriverError::NotFound(name.to_owned())),
        }
    }

    async fn save(&self, rec: Record) -> Result<()> {
        self.store
            .save(&rec)
            .await
            .map_err(|source| DriverError::State {
                name: rec.name.clone(),
                path: self.store.path_of(&rec.name),
                source,
            })?;
        self.lock_records().insert(rec.name.clone(), rec);
        Ok(())
    }

    async fn forget(&self, name: &str) -> Result<()> {
        self.store
            .remove(name)
            .await
            .map_err(|source| DriverError::State {
                name: name.to_owned(),
                path: self.store.path_of(name),
                source,
            })?;
        self.lock_records().remove(name);
        Ok(())
    }

    pub fn target(&self, name: &str) -> PathBuf {
        self.mount_dir.join(name)
    }

    fn staging(&self, name: &str) -> PathBuf {
        self.staging_dir.join(name)
    }

    pub async fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<()> {
        validate_name(name)?;
        let parsed = VolumeOptions::parse(opts)?;
        let _g = self.locks.lock(name).await;
        if let Some(rec) = self.record(name) {
            let same = opts.is_empty() || *opts == rec.options;
            if !rec.recycled {
                if same {
                    return Ok(());
                }
                return Err(DriverError::Conflict(format!(
                    "volume {name} already exists with options {}; remove it first, or create it \
                     again with the same options or none",
                    fmt_options(&rec.options)
                )));
            }
            if same {
                tracing::info!(volume = name, volume_id = %rec.volume_id, "reusing the recycled volume");
                return self
                    .save(Record {
                        recycled: false,
                        created_at: now_secs(),
                        ..rec
                    })
                    .await;
            }
            // Asked for something else: the scrubbed volume holds nothing worth keeping.
            tracing::info!(volume = name, volume_id = %rec.volume_id,
                "recycled volume does not match the new options; deleting it");
            self.controller
                .delete_volume(&rec.volume_id, &self.secrets)
                .await
                .or_else(gone_is_ok)
                .map_err(DriverError::backend("delete recycled", name))?;
            self.forget(name).await?;
        }

        let rec = match &parsed.volume_id {
            Some(id) => self.adopt(name, id, opts, &parsed).await?,
            None => self.provision(name, opts, &parsed).await?,
        };
        tracing::info!(volume = name, volume_id = %rec.volume_id, reclaim = rec.reclaim.as_str(),
            adopted = rec.adopted, "volume created");
        self.save(rec).await
    }

    async fn provision(
        &self,
        name: &str,
        opts: &BTreeMap<String, String>,
        parsed: &VolumeOptions,
    ) -> Result<Record> {
        let capability = parsed.capability();
        self.controller
            .check_capabilities(std::slice::from_ref(&capability))
            .map_err(|e| self.option_error(e, name, "create"))?;
        let topology = self.node.topology(&self.node_id);
        let req = CreateVolume {
            name: name.to_owned(),
            capacity: CapacityRange {
                required: parsed.size,
                limit: None,
            },
            capabilities: vec![capability],
            parameters: parsed.parameters.clone(),
            mutable_parameters: BTreeMap::new(),
            secrets: self.secrets.clone(),
            source: None,
            topology: if topology.is_empty() {
                Vec::new()
            } else {
                vec![topology]
            },
        };
        let vol = self
            .controller
            .create_volume(&req)
            .await
            .map_err(|e| self.option_error(e, name, "create"))?;
        Ok(Record {
            name: name.to_owned(),
            volume_id: vol.id,
            options: opts.clone(),
            reclaim: parsed.reclaim.unwrap_or(Reclaim::Delete),
            context: vol.context,
            capacity_bytes: vol.capacity_bytes,
            created_at: now_secs(),
            adopted: false,
            recycled: false,
            mounts: BTreeSet::new(),
            publish_context: BTreeMap::new(),
        })
    }

    /// Static provisioning: the backend volume exists; the name is bound to it.
    async fn adopt(
        &self,
        name: &str,
        volume_id: &str,
        opts: &BTreeMap<String, String>,
        parsed: &VolumeOptions,
    ) -> Result<Record> {
        // Two names on one volume would let one name's reclaim policy destroy the other's data.
        let _g = self.locks.lock(&format!("volume-id:{volume_id}")).await;
        if let Some(other) = self
            .lock_records()
            .values()
            .find(|r| r.volume_id == volume_id && r.name != name)
        {
            return Err(DriverError::Conflict(format!(
                "backend volume {volume_id} is already the Docker volume {}; use that name",
                other.name
            )));
        }
        let vol = self
            .controller
            .get_volume(volume_id)
            .await
            .map_err(|e| match e {
                BackendError::NotFound { .. } | BackendError::InvalidArgument { .. } => {
                    DriverError::InvalidOption {
                        key: options::VOLUME_ID.into(),
                        reason: format!(
                            "{volume_id:?} is not a volume of the {} backend ({e})",
                            self.controller.driver_name()
                        ),
                    }
                }
                other => DriverError::Backend {
                    action: "adopt",
                    name: name.to_owned(),
                    source: other,
                },
            })?;
        self.controller
            .check_capabilities(&[parsed.capability()])
            .map_err(|e| self.option_error(e, name, "adopt"))?;
        Ok(Record {
            name: name.to_owned(),
            volume_id: vol.id,
            options: opts.clone(),
            reclaim: parsed.reclaim.unwrap_or(Reclaim::Retain),
            context: vol.context,
            capacity_bytes: vol.capacity_bytes,
            created_at: now_secs(),
            adopted: true,
            recycled: false,
            mounts: BTreeSet::new(),
            publish_context: BTreeMap::new(),
        })
    }

    /// A backend's refusal of a parameter is a refusal of the user's `-o` option: say so, and
    /// list the options the driver itself takes, which the backend's message cannot.
    fn option_error(&self, e: BackendError, name: &str, action: &'static str) -> DriverError {
        match e {
            BackendError::InvalidArgument { field, reason }
                if field.starts_with("parameters") || field.starts_with("volume_capabilit") =>
            {
                let reason = match field.strip_prefix("parameters.") {
                    Some(key) => format!("{key}: {reason}"),
                    None => reason,
                };
                DriverError::BackendOption {
                    reason,
                    backend: self.controller.driver_name(),
                }
            }
            other => DriverError::Backend {
                action,
                name: name.to_owned(),
                source: other,
            },
        }
    }

    pub async fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let _g = self.locks.lock(name).await;
        let Some(rec) = self.record(name) else {
            // Unknown here (never ours, or already removed): Docker may forget it.
            return Ok(());
        };
        if rec.recycled {
            return Ok(());
        }
        if !rec.mounts.is_empty()
            && mount::mounted_at(&self.target(name))
                .await
                .ok()
                .flatten()
                .is_some()
        {
            return Err(DriverError::InUse {
                name: name.to_owned(),
                count: rec.mounts.len(),
            });
        }
        self.teardown(&rec).await?;
        match rec.reclaim {
            Reclaim::Delete => {
                self.controller
                    .delete_volume(&rec.volume_id, &self.secrets)
                    .await
                    .or_else(gone_is_ok)
                    .map_err(DriverError::backend("delete", name))?;
                self.forget(name).await?;
            }
            Reclaim::Retain => self.forget(name).await?,
            Reclaim::Recycle => {
                self.controller
                    .recycle_volume(&rec.volume_id, &self.secrets)
                    .await
                    .map_err(|e| match e {
                        BackendError::Unsupported(_) => DriverError::Conflict(format!(
                            "volume {name} has reclaim=recycle, but the {} backend cannot \
                             recycle ({e}); the volume was kept",
                            self.controller.driver_name()
                        )),
                        other => DriverError::Backend {
                            action: "recycle",
                            name: name.to_owned(),
                            source: other,
                        },
                    })?;
                self.save(Record {
                    recycled: true,
                    mounts: BTreeSet::new(),
                    publish_context: BTreeMap::new(),
                    ..rec.clone()
                })
                .await?;
            }
        }
        tracing::info!(volume = name, volume_id = %rec.volume_id, reclaim = rec.reclaim.as_str(), "volume removed");
        Ok(())
    }

    pub async fn mount(&self, name: &str, mount_id: &str) -> Result<PathBuf> {
        validate_name(name)?;
        if mount_id.is_empty() {
            return Err(DriverError::BadRequest {
                endpoint: "VolumeDriver.Mount",
                reason: "ID (the container's mount ID) is required".into(),
            });
        }
        let _g = self.locks.lock(name).await;
        let mut rec = self.active(name)?;
        let opts = VolumeOptions::parse(&rec.options)?;
        let target = self.target(name);
        if opts.access_mode == AccessMode::SingleNodeSingleWriter
            && rec.mounts.iter().any(|m| m != mount_id)
            && mount::mounted_at(&target).await.ok().flatten().is_some()
        {
            return Err(DriverError::SingleWriter {
                name: name.to_owned(),
            });
        }
        let first = rec.mounts.is_empty();
        if let Err(e) = self.bring_up(&mut rec, &opts).await {
            if first {
                // Nothing else uses it: do not leave a half-made mount behind.
                if let Err(t) = self.teardown(&rec).await {
                    tracing::warn!(volume = name, error = %t, "cleanup after a failed mount failed");
                }
            }
            return Err(e);
        }
        rec.mounts.insert(mount_id.to_owned());
        let refs = rec.mounts.len();
        let volume_id = rec.volume_id.clone();
        self.save(rec).await?;
        tracing::info!(volume = name, %volume_id, mount_id, refs, target = %target.display(), "volume mounted");
        Ok(target)
    }

    /// Attach (when the backend needs it), stage and publish. Each step is idempotent, so a
    /// volume already mounted costs a look at the mount table and nothing else; a mount that
    /// died (a FUSE daemon killed) is remade by the backend.
    async fn bring_up(&self, rec: &mut Record, opts: &VolumeOptions) -> Result<()> {
        let cap = opts.capability();
        let readonly = opts.access_mode.is_read_only();
        if self.controller.features().publish {
            let attach = || {
                self.controller
                    .controller_publish(&rec.volume_id, &self.node_id, &cap, readonly)
            };
            rec.publish_context = match attach().await {
                // The registration at start did not get through (backend down then): now.
                Err(BackendError::NotFound { what: "node", .. }) => {
                    self.controller
                        .register_node(&self.node_info())
                        .await
                        .map_err(DriverError::backend("register this node for", &rec.name))?;
                    attach().await
                }
                other => other,
            }
            .map_err(DriverError::backend("attach", &rec.name))?;
        }
        let staging = self.staging(&rec.name);
        self.node
            .stage(&StageRequest {
                volume_id: rec.volume_id.clone(),
                staging_path: staging.clone(),
                capability: cap.clone(),
                context: rec.context.clone(),
                publish_context: rec.publish_context.clone(),
                secrets: self.secrets.clone(),
            })
            .await
            .map_err(DriverError::backend("stage", &rec.name))?;
        self.node
            .publish(&PublishRequest {
                volume_id: rec.volume_id.clone(),
                staging_path: staging,
                target_path: self.target(&rec.name),
                capability: cap,
                readonly,
                context: rec.context.clone(),
            })
            .await
            .map_err(DriverError::backend("mount", &rec.name))
    }

    /// Unpublish, unstage, detach: each a no-op when already done.
    async fn teardown(&self, rec: &Record) -> Result<()> {
        let staging = self.staging(&rec.name);
        self.node
            .unpublish(&rec.volume_id, &self.target(&rec.name))
            .await
            .map_err(DriverError::backend("unmount", &rec.name))?;
        self.node
            .unstage(&rec.volume_id, &staging)
            .await
            .map_err(DriverError::backend("unstage", &rec.name))?;
        if let Err(e) = mount::remove_mount_point(&staging).await {
            tracing::warn!(volume = %rec.name, error = %e, "staging directory left behind");
        }
        if self.controller.features().publish {
            self.controller
                .controller_unpublish(&rec.volume_id, &self.node_id)
                .await
                .or_else(gone_is_ok)
                .map_err(DriverError::backend("detach", &rec.name))?;
        }
        Ok(())
    }

    pub async fn unmount(&self, name: &str, mount_id: &str) -> Result<()> {
        validate_name(name)?;
        let _g = self.locks.lock(name).await;
        let Some(mut rec) = self.record(name) else {
            return Ok(());
        };
        let known = rec.mounts.remove(mount_id);
        if !known {
            tracing::warn!(
                volume = name,
                mount_id,
                "unmount of a mount ID this volume does not hold"
            );
        }
        let refs = rec.mounts.len();
        if refs > 0 {
            if known {
                self.save(rec).await?;
            }
            tracing::info!(
                volume = name,
                mount_id,
                refs,
                "volume still in use; kept mounted"
            );
            return Ok(());
        }
        // Forget the reference first: if the unmount below fails, the next Mount reuses what is
        // left and the next Remove tries again; a dangling reference would never go away.
        self.save(rec.clone()).await?;
        self.teardown(&rec).await?;
        tracing::info!(volume = name, volume_id = %rec.volume_id, mount_id, "volume unmounted");
        Ok(())
    }

    /// The mountpoint when the volume is mounted on this node, else "".
    pub async fn path(&self, name: &str) -> Result<String> {
        validate_name(name)?;
        self.active(name)?;
        let target = self.target(name);
        Ok(match mount::mounted_at(&target).await {
            Ok(Some(_)) => target.to_string_lossy().into_owned(),
            _ => String::new(),
        })
    }

    pub async fn get(&self, name: &str) -> Result<VolumeInfo> {
        validate_name(name)?;
        let rec = self.active(name)?;
        let mounted = mounted_paths().await.unwrap_or_default();
        let mut info = self.info(&rec, &mounted);
        let mut status = BTreeMap::new();
        let opts = VolumeOptions::parse(&rec.options).ok();
        status.insert("volumeId".into(), rec.volume_id.clone().into());
        status.insert("backend".into(), self.controller.driver_name().into());
        status.insert("capacityBytes".into(), rec.capacity_bytes.into());
        status.insert("reclaim".into(), rec.reclaim.as_str().into());
        status.insert("adopted".into(), rec.adopted.into());
        status.insert("mounts".into(), rec.mounts.len().into());
        if let Some(o) = opts {
            status.insert(
                "accessMode".into(),
                options::access_mode_name(o.access_mode).into(),
            );
        }
        info.status = Some(status);
        Ok(info)
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mounted = mounted_paths().await.unwrap_or_default();
        let recs: Vec<Record> = self
            .lock_records()
            .values()
            .filter(|r| !r.recycled)
            .cloned()
            .collect();
        Ok(recs.iter().map(|r| self.info(r, &mounted)).collect())
    }

    fn info(&self, rec: &Record, mounted: &BTreeSet<PathBuf>) -> VolumeInfo {
        let target = self.target(&rec.name);
        VolumeInfo {
            name: rec.name.clone(),
            mountpoint: if mounted.contains(&target) {
                target.to_string_lossy().into_owned()
            } else {
                String::new()
            },
            created_at: rfc3339(rec.created_at),
            status: None,
        }
    }
}

fn gone_is_ok(e: BackendError) -> Result<(), BackendError> {
    match e {
        BackendError::NotFound { .. } => Ok(()),
        other => Err(other),
    }
}

fn fmt_options(o: &BTreeMap<String, String>) -> String {
    if o.is_empty() {
        return "(none)".into();
    }
    o.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn mounted_paths() -> Result<BTreeSet<PathBuf>> {
    let all = mount::mountinfo::read()
        .await
        .map_err(|e| DriverError::Backend {
            action: "read the mount table for",
            name: "(all)".into(),
            source: e,
        })?;
    Ok(all.into_iter().map(|m| m.mount_point).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["v", "my-vol_1.data", &"a".repeat(128)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(129),
            "é",
        ] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("invalid volume name"), "{bad}: {e}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
