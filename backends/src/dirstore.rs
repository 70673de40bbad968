//! The controller of every directory-per-volume backend (local, NFS; GlusterFS reuses it):
//! a volume is a directory under an instance's base, its metadata a JSON file beside it.
//!
//! Layout under the base:
//! ```text
//! <dir>/                          volume data (a name, or a template result such as ns-claim)
//! .stowage/volumes/<key>.json     metadata: name, capacity, parameters, source (key = hash of <dir>)
//! .stowage/snapshots/<snap>/      meta.json + data/ (copy-based snapshots)
//! .stowage/tmp/                   volumes being built; renamed into place when complete
//! .stowage/trash/                 volumes being deleted
//! archived-<dir>-<time>/          onDelete: archive
//! ```
//! Crash safety: a volume exists when its metadata AND its directory exist. Metadata is written
//! first, the directory is renamed into place last, so a controller killed at any point leaves
//! either nothing visible or a complete volume; a retry cleans the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::controller::{ControllerBackend, ControllerFeatures, Expanded};
use crate::error::{Error, Result};
use crate::fs::{DirAttrs, FileKind, Fs};
use crate::locks::KeyLocks;
use crate::params::{self, OnDelete};
use crate::relpath::RelPath;
use crate::types::{
    AccessType, Capability, CapacityRange, ContentSource, CreateVolume, NodeInfo, Page, Secrets,
    Snapshot, SnapshotFilter, Volume,
};
use crate::volume_id::VolumeId;

/// File a block volume keeps its data in (a sparse image attached as a loop device).
pub const BLOCK_IMAGE: &str = "disk.img";
/// Size given when a request names none: 1 GiB, like most drivers.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

const META_DIR: &str = ".stowage";

/// A kind of leftover of a killed call, see `DirBackend::purge_leftovers`.
enum Leftover {
    /// Entries `<key>.<uuid>` of a `.stowage` directory (`tmp`, `trash`).
    Tree(&'static str),
    /// `.stowage/volumes/.<key>.json.tmp-<uuid>`: an atomic metadata write cut short.
    MetaTemp,
}

/// Per-instance settings.
#[derive(Debug, Clone, Default)]
pub struct DirOptions {
    /// Mode, owner and group of new volume directories.
    pub attrs: DirAttrs,
    /// Raw block volumes (a sparse image file per volume) are offered.
    pub block: bool,
    /// Largest volume this instance hands out (0 = no limit).
    pub max_volume_bytes: u64,
}

/// Builds the volume context (volumeAttributes) a node needs to reach a volume's directory.
pub type ContextFn = Arc<dyn Fn(&RelPath) -> BTreeMap<String, String> + Send + Sync>;

/// One configured instance: a filesystem tree and how to describe its volumes to nodes.
pub struct Instance<F: Fs> {
    pub name: String,
    pub fs: F,
    pub options: DirOptions,
    pub context: ContextFn,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct VolumeMeta {
    name: String,
    path: String,
    capacity: u64,
    block: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_volume: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
    created: u64,
    /// ControllerPublish records: node ID → published read-only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    published: BTreeMap<String, bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct SnapshotMeta {
    name: String,
    source_volume_id: String,
    size: u64,
    block: bool,
    created: u64,
}

/// Work a backend adds around the directory lifecycle, per instance (GlusterFS: a quota limit
/// on each volume directory, so capacity is enforced). Local and NFS have none.
#[async_trait]
pub trait DirHooks: Send + Sync + 'static {
    /// The directory at `path` holds (or is about to hold) a volume of `capacity_bytes`.
    /// Called on a new volume's finished tree before it is renamed into place (a failure
    /// discards the tree: no volume without its limit appears), on an adopted or already
    /// existing volume (a repeated CreateVolume heals a crash between the two), and before a
    /// larger capacity is recorded by ControllerExpandVolume. Must be idempotent.
    async fn set_capacity(&self, path: &RelPath, capacity_bytes: u64) -> Result<()>;

    /// The volume directory at `path` is about to be deleted or archived (not on retain).
    /// Must be idempotent: a retried DeleteVolume calls it again.
    async fn release(&self, path: &RelPath) -> Result<()>;
}

/// The generic directory-per-volume controller over any [`Fs`].
pub struct DirBackend<F: Fs> {
    driver: &'static str,
    instances: BTreeMap<String, Instance<F>>,
    locks: KeyLocks,
    /// Per instance: the `.stowage` bookkeeping directories exist (made once, lazily, so a
    /// server that is down at start does not keep the controller from starting).
    layout: BTreeMap<String, tokio::sync::OnceCell<()>>,
    /// Per instance, optional: see [`DirHooks`].
    hooks: BTreeMap<String, Arc<dyn DirHooks>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash_hex(s: &str, len: usize) -> String {
    let mut h = hex::encode(Sha256::digest(s.as_bytes()));
    h.truncate(len);
    h
}

/// A block image the filesystem cannot make that large: name the request field the size came
/// from, so the caller knows what to change.
fn capacity_out_of_range(e: Error) -> Error {
    match e {
        Error::OutOfRange(m) => Error::OutOfRange(format!("capacity_range.required_bytes: {m}")),
        other => other,
    }
}

fn rel(s: &str) -> Result<RelPath> {
    RelPath::parse("path", s)
}

/// Maps a CSI name (any UTF-8 up to 128 bytes) to a directory name: the name itself when it
/// is a safe, short component, else a stable hash of it.
pub fn dir_name_for(name: &str, prefix: &str) -> String {
    let safe = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if safe {
        name.to_owned()
    } else {
        format!("{prefix}-{}", hash_hex(name, 32))
    }
}

impl<F: Fs> DirBackend<F> {
    pub fn new(driver: &'static str, instances: Vec<Instance<F>>) -> Result<Self> {
        if instances.is_empty() {
            return Err(Error::invalid(
                "instances",
                "at least one backend instance must be configured",
            ));
        }
        let mut map = BTreeMap::new();
        for i in instances {
            crate::volume_id::validate_instance_name(&i.name)?;
            map.insert(i.name.clone(), i);
        }
        let layout = map
            .keys()
            .map(|k| (k.clone(), tokio::sync::OnceCell::new()))
            .collect();
        Ok(DirBackend {
            driver,
            instances: map,
            locks: KeyLocks::default(),
            layout,
            hooks: BTreeMap::new(),
        })
    }

    /// Attaches [`DirHooks`] to one configured instance.
    pub fn with_hooks(mut self, instance: &str, hooks: Arc<dyn DirHooks>) -> Result<Self> {
        self.instance(instance)?;
        self.hooks.insert(instance.to_owned(), hooks);
        Ok(self)
    }

    async fn hook_capacity(&self, inst: &Instance<F>, path: &RelPath, bytes: u64) -> Result<()> {
        match self.hooks.get(&inst.name) {
            Some(h) => h.set_capacity(path, bytes).await,
            None => Ok(()),
        }
    }

    /// Creates the bookkeeping directories of an instance once.
    async fn prepare(&self, inst: &Instance<F>) -> Result<()> {
        let Some(cell) = self.layout.get(&inst.name) else {
            return Ok(());
        };
        cell.get_or_try_init(|| async {
            for d in ["volumes", "snapshots", "tmp", "trash", "nodes"] {
                Self::ensure_dirs(&inst.fs, &format!("{META_DIR}/{d}")).await?;
            }
            Ok::<(), Error>(())
        })
        .await
        .map(|_| ())
    }

    pub fn instance(&self, name: &str) -> Result<&Instance<F>> {
        self.instances
            .get(name)
            .ok_or_else(|| Error::not_found("backend instance", name))
    }

    /// The instance a CreateVolume or GetCapacity names, or the only/default one.
    fn choose_instance(&self, parameters: &BTreeMap<String, String>) -> Result<&Instance<F>> {
        if let Some(name) = parameters.get(params::INSTANCE) {
            return self.instances.get(name).ok_or_else(|| {
                Error::invalid(
                    "parameters.instance",
                    format!(
                        "{name:?} is not configured (have: {})",
                        self.instance_names()
                    ),
                )
            });
        }
        if self.instances.len() == 1 {
            return Ok(self.instances.values().next().expect("one instance"));
        }
        self.instances.get("default").ok_or_else(|| {
            Error::invalid(
                "parameters.instance",
                format!(
                    "required: several instances are configured ({})",
                    self.instance_names()
                ),
            )
        })
    }

    fn instance_names(&self) -> String {
        self.instances
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn meta_path(path: &RelPath) -> Result<RelPath> {
        rel(&format!(
            "{META_DIR}/volumes/{}.json",
            hash_hex(path.as_str(), 40)
        ))
    }

    fn snap_dir(snap: &RelPath) -> Result<RelPath> {
        rel(&format!("{META_DIR}/snapshots/{snap}"))
    }

    async fn ensure_dirs(fs: &F, path: &str) -> Result<()> {
        let mut cur: Option<RelPath> = None;
        for comp in path.split('/') {
            let next = match &cur {
                Some(c) => c.join(comp)?,
                None => RelPath::component("path", comp)?,
            };
            fs.mkdir(
                &next,
                DirAttrs {
                    mode: 0o755,
                    uid: None,
                    gid: None,
                },
            )
            .await?;
            cur = Some(next);
        }
        Ok(())
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(fs: &F, path: &RelPath) -> Result<Option<T>> {
        match fs.read_file(path).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("corrupt metadata {path}: {e}"))),
        }
    }

    async fn write_json<T: Serialize>(fs: &F, path: &RelPath, v: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
        fs.write_file_atomic(path, &bytes).await
    }

    /// Metadata of a complete volume (metadata and directory both present).
    async fn load_volume(inst: &Instance<F>, path: &RelPath) -> Result<Option<VolumeMeta>> {
        let Some(meta) = Self::read_json::<VolumeMeta>(&inst.fs, &Self::meta_path(path)?).await?
        else {
            return Ok(None);
        };
        match inst.fs.stat(path).await? {
            Some(st) if st.kind == FileKind::Dir => Ok(Some(meta)),
            _ => Ok(None),
        }
    }

    fn to_volume(inst: &Instance<F>, id: &VolumeId, meta: &VolumeMeta) -> Volume {
        let mut context = (inst.context)(&id.path);
        if meta.block {
            context.insert("block".into(), "true".into());
        }
        Volume {
            id: id.to_string(),
            capacity_bytes: meta.capacity,
            context,
            source: match (&meta.source_snapshot, &meta.source_volume) {
                (Some(s), _) => Some(ContentSource::Snapshot(s.clone())),
                (None, Some(v)) => Some(ContentSource::Volume(v.clone())),
                _ => None,
            },
            topology: Vec::new(),
        }
    }

    fn parse_id<'a>(
        &'a self,
        field: &'static str,
        s: &str,
    ) -> Result<Option<(&'a Instance<F>, VolumeId)>> {
        let id = VolumeId::parse(field, s)?;
        // An ID of an instance no longer configured cannot be acted on, but for delete and get
        // it is "not found", not a malformed request.
        Ok(self.instances.get(&id.instance).map(|i| (i, id)))
    }

    fn wants_block(caps: &[Capability]) -> bool {
        caps.iter().any(|c| c.is_block())
    }

    /// Builds the volume's tree in a temporary place, then renames it into `dest`.
    async fn build_volume(
        &self,
        inst: &Instance<F>,
        dest: &RelPath,
        meta: &VolumeMeta,
        key: &str,
    ) -> Result<()> {
        let fs = &inst.fs;
        // Leftovers of an earlier attempt at the same volume (controller killed mid-create).
        Self::purge_leftovers(fs, key, &[Leftover::Tree("tmp")]).await?;
        let tmp = rel(&format!(
            "{META_DIR}/tmp/{key}.{}",
            uuid::Uuid::new_v4().simple()
        ))?;
        let res = async {
            if let Some(snap) = &meta.source_snapshot {
                let sid = VolumeId::parse("volume_content_source.snapshot.snapshot_id", snap)?;
                fs.copy_tree(&Self::snap_dir(&sid.path)?.join("data")?, &tmp)
                    .await?;
            } else if let Some(src) = &meta.source_volume {
                let vid = VolumeId::parse("volume_content_source.volume.volume_id", src)?;
                fs.copy_tree(&vid.path, &tmp).await?;
            } else {
                fs.mkdir(&tmp, inst.options.attrs).await?;
            }
            fs.set_attrs(&tmp, inst.options.attrs).await?;
            if meta.block {
                let img = tmp.join(BLOCK_IMAGE)?;
                if fs.stat(&img).await?.is_none() {
                    fs.create_file(&img, 0o600).await?;
                }
                let size = fs.stat(&img).await?.map_or(0, |s| s.size);
                if size < meta.capacity {
                    fs.set_len(&img, meta.capacity)
                        .await
                        .map_err(capacity_out_of_range)?;
                }
            }
            self.hook_capacity(inst, &tmp, meta.capacity).await?;
            Self::write_json(fs, &Self::meta_path(dest)?, meta).await?;
            if let Some(parent) = dest.parent() {
                Self::ensure_dirs(fs, parent.as_str()).await?;
            }
            fs.rename(&tmp, dest).await
        }
        .await;
        if res.is_err() {
            if let Some(h) = self.hooks.get(&inst.name) {
                let _ = h.release(&tmp).await;
            }
            let _ = fs.remove_all(&tmp).await;
        }
        res
    }

    /// Removes what a controller killed in the middle of a call left of volume `key` (callers
    /// hold the volume's lock): half-built trees in `tmp/`, half-removed ones in `trash/`
    /// (DeleteVolume renames the tree there, then removes it), and temporaries of an
    /// interrupted atomic write of the volume's metadata. A retried call cleans them, so
    /// nothing of a deleted volume outlives its DeleteVolume.
    async fn purge_leftovers(fs: &F, key: &str, what: &[Leftover]) -> Result<()> {
        for w in what {
            let (dir, prefix) = match w {
                Leftover::Tree(dir) => (*dir, format!("{key}.")),
                Leftover::MetaTemp => ("volumes", format!(".{key}.json.tmp-")),
            };
            let dir = rel(&format!("{META_DIR}/{dir}"))?;
            for e in fs.read_dir(&dir).await? {
                if e.name.starts_with(&prefix) {
                    fs.remove_all(&dir.join(&e.name)?).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes empty parent directories a template created (a/b/c → b, a), never the base.
    async fn prune_parents(fs: &F, path: &RelPath) {
        let mut cur = path.parent();
        while let Some(p) = cur {
            match fs.read_dir(&p).await {
                Ok(entries) if entries.is_empty() => {
                    if fs.remove_dir(&p).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
            cur = p.parent();
        }
    }

    fn node_path(node_id: &str) -> Result<RelPath> {
        rel(&format!(
            "{META_DIR}/nodes/{}.json",
            dir_name_for(node_id, "node")
        ))
    }

    /// How many volumes of this instance are published to `node_id`.
    async fn published_count(inst: &Instance<F>, node_id: &str) -> Result<usize> {
        let dir = rel(&format!("{META_DIR}/volumes"))?;
        let mut n = 0;
        for e in inst.fs.read_dir(&dir).await? {
            if let Some(meta) = Self::read_json::<VolumeMeta>(&inst.fs, &dir.join(&e.name)?).await?
            {
                n += usize::from(meta.published.contains_key(node_id));
            }
        }
        Ok(n)
    }

    async fn find_snapshot(inst: &Instance<F>, snap: &RelPath) -> Result<Option<SnapshotMeta>> {
        Self::read_json(&inst.fs, &Self::snap_dir(snap)?.join("meta.json")?).await
    }

    async fn all_volumes(&self) -> Result<Vec<(String, Volume)>> {
        let mut out = Vec::new();
        for inst in self.instances.values() {
            let dir = rel(&format!("{META_DIR}/volumes"))?;
            if inst.fs.stat(&dir).await?.is_none() {
                continue;
            }
            for e in inst.fs.read_dir(&dir).await? {
                if !e.name.ends_with(".json") {
                    continue;
                }
                let Some(meta) =
                    Self::read_json::<VolumeMeta>(&inst.fs, &dir.join(&e.name)?).await?
                else {
                    continue;
                };
                let Ok(path) = RelPath::parse("path", &meta.path) else {
                    continue;
                };
                if inst.fs.stat(&path).await?.is_none() {
                    continue;
                }
                let id = VolumeId {
                    instance: inst.name.clone(),
                    path,
                };
                out.push((id.to_string(), Self::to_volume(inst, &id, &meta)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn all_snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for inst in self.instances.values() {
            let dir = rel(&format!("{META_DIR}/snapshots"))?;
            if inst.fs.stat(&dir).await?.is_none() {
                continue;
            }
            for e in inst.fs.read_dir(&dir).await? {
                let Ok(snap) = RelPath::component("snapshot", &e.name) else {
                    continue;
                };
                if e.name.starts_with('.') {
                    continue;
                }
                if let Some(meta) = Self::find_snapshot(inst, &snap).await? {
                    let id = VolumeId {
                        instance: inst.name.clone(),
                        path: snap,
                    };
                    out.push(snapshot_of(&id, &meta));
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

fn snapshot_of(id: &VolumeId, meta: &SnapshotMeta) -> Snapshot {
    Snapshot {
        id: id.to_string(),
        source_volume_id: meta.source_volume_id.clone(),
        size_bytes: meta.size,
        created: UNIX_EPOCH + Duration::from_secs(meta.created),
        ready: true,
    }
}

/// Pages a sorted list by "the last ID returned" tokens: robust against items added or
/// removed between pages. A token that is not an ID is refused (CSI: ABORTED).
fn paginate<T: Clone>(items: &[(String, T)], start: Option<&str>, max: usize) -> Result<Page<T>> {
    let begin = match start.filter(|s| !s.is_empty()) {
        None => 0,
        Some(tok) => {
            VolumeId::parse("starting_token", tok)
                .map_err(|_| Error::Aborted(format!("starting_token {tok:?} is not valid")))?;
            items.partition_point(|(k, _)| k.as_str() <= tok)
        }
    };
    let max = if max == 0 { usize::MAX } else { max };
    let end = begin.saturating_add(max).min(items.len());
    let page: Vec<T> = items[begin..end].iter().map(|(_, v)| v.clone()).collect();
    let next_token = if end < items.len() {
        Some(items[end - 1].0.clone())
    } else {
        None
    };
    Ok(Page {
        items: page,
        next_token,
    })
}

#[async_trait]
impl<F: Fs> ControllerBackend for DirBackend<F> {
    fn driver_name(&self) -> &'static str {
        self.driver
    }

    fn features(&self) -> ControllerFeatures {
        ControllerFeatures {
            snapshots: true,
            clone: true,
            expand: true,
            capacity: true,
            single_node_multi_writer: true,
            modify: true,
            publish: true,
        }
    }

    fn check_capabilities(&self, caps: &[Capability]) -> Result<()> {
        let block_ok = self.instances.values().any(|i| i.options.block);
        for c in caps {
            match &c.access_type {
                AccessType::Block if !block_ok => {
                    return Err(Error::invalid(
                        "volume_capabilities",
                        format!(
                            "{} volumes are directories: raw block access is not supported",
                            self.driver
                        ),
                    ));
                }
                AccessType::Block
                    if c.access_mode.is_multi_node() && !c.access_mode.is_read_only() =>
                {
                    return Err(Error::invalid(
                        "volume_capabilities",
                        "raw block volumes are image files on one node: multi-node writers are not supported",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        let inst = self.choose_instance(&req.parameters)?;
        let p = params::DirParams::parse(&req.parameters)?;
        params::check_mutable(&req.mutable_parameters)?;
        self.prepare(inst).await?;
        self.check_capabilities(&req.capabilities)?;
        let block = Self::wants_block(&req.capabilities);
        if block && !inst.options.block {
            return Err(Error::invalid(
                "volume_capabilities",
                format!("instance {} does not offer raw block volumes", inst.name),
            ));
        }
        let dir = match &p.sub_dir {
            Some(t) => params::expand_template(t, &req.parameters)?,
            None => dir_name_for(&req.name, "vol"),
        };
        let path = RelPath::parse("parameters.subDir", &dir)?;
        if path
            .components()
            .any(|c| c.starts_with('.') || c.starts_with("archived-"))
        {
            return Err(Error::invalid(
                "parameters.subDir",
                format!("{dir:?}: names may not start with '.' or 'archived-'"),
            ));
        }
        let id = VolumeId::new(&inst.name, path.clone()).map_err(|_| {
            Error::invalid(
                "name",
                "the volume's directory name makes an ID longer than 128 bytes",
            )
        })?;

        let capacity = req.capacity.choose(DEFAULT_CAPACITY);
        if inst.options.max_volume_bytes > 0 && capacity > inst.options.max_volume_bytes {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {capacity} bytes is more than this instance's limit of {} bytes",
                inst.options.max_volume_bytes
            )));
        }
        if !req.capacity.admits(capacity) {
            return Err(Error::OutOfRange(format!(
                "capacity_range {:?} cannot be satisfied",
                req.capacity
            )));
        }

        let (source_snapshot, source_volume) = match &req.source {
            Some(ContentSource::Snapshot(s)) => (Some(s.clone()), None),
            Some(ContentSource::Volume(v)) => (None, Some(v.clone())),
            None => (None, None),
        };

        let key = hash_hex(path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;

        if let Some(existing) = Self::load_volume(inst, &path).await? {
            if existing.name != req.name {
                return Err(Error::AlreadyExists(format!(
                    "directory {path} already holds volume {:?}; choose another name or subDir",
                    existing.name
                )));
            }
            if !req.capacity.admits(existing.capacity) {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists with capacity {} bytes, incompatible with capacity_range {:?}",
                    req.name, existing.capacity, req.capacity
                )));
            }
            if existing.source_snapshot != source_snapshot
                || existing.source_volume != source_volume
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists with a different content source",
                    req.name
                )));
            }
            if existing.block != block {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists with a different access type",
                    req.name
                )));
            }
            self.hook_capacity(inst, &path, existing.capacity).await?;
            return Ok(Self::to_volume(inst, &id, &existing));
        }

        // Sources must exist and fit.
        if let Some(snap) = &source_snapshot {
            let sid = VolumeId::parse("volume_content_source.snapshot.snapshot_id", snap)
                .map_err(|_| Error::not_found("snapshot", snap))?;
            let sinst = self
                .instance(&sid.instance)
                .map_err(|_| Error::not_found("snapshot", snap))?;
            if sid.instance != inst.name {
                return Err(Error::invalid(
                    "volume_content_source",
                    "snapshot is on another backend instance",
                ));
            }
            let smeta = Self::find_snapshot(sinst, &sid.path)
                .await?
                .ok_or_else(|| Error::not_found("snapshot", snap))?;
            if capacity < smeta.size {
                return Err(Error::OutOfRange(format!(
                    "capacity_range: {capacity} bytes is smaller than snapshot size {}",
                    smeta.size
                )));
            }
            if smeta.block != block {
                return Err(Error::invalid(
                    "volume_content_source",
                    "snapshot access type (block or filesystem) differs from the request",
                ));
            }
        }
        if let Some(src) = &source_volume {
            let vid = VolumeId::parse("volume_content_source.volume.volume_id", src)
                .map_err(|_| Error::not_found("volume", src))?;
            if vid.instance != inst.name {
                return Err(Error::invalid(
                    "volume_content_source",
                    "source volume is on another backend instance",
                ));
            }
            let vmeta = Self::load_volume(inst, &vid.path)
                .await?
                .ok_or_else(|| Error::not_found("source volume", src))?;
            if capacity < vmeta.capacity {
                return Err(Error::OutOfRange(format!(
                    "capacity_range: {capacity} bytes is smaller than the source volume's {}",
                    vmeta.capacity
                )));
            }
            if vmeta.block != block {
                return Err(Error::invalid(
                    "volume_content_source",
                    "source volume access type (block or filesystem) differs from the request",
                ));
            }
        }

        let stored_params: BTreeMap<String, String> = req
            .parameters
            .iter()
            .filter(|(k, _)| params::is_stored(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = VolumeMeta {
            name: req.name.clone(),
            path: path.to_string(),
            capacity,
            block,
            source_snapshot,
            source_volume,
            parameters: stored_params,
            created: now_secs(),
            published: BTreeMap::new(),
        };
        if inst.fs.stat(&path).await?.is_some() {
            // A directory without our metadata: left by onDelete=retain or made by an admin.
            // Adopting it is what users of subdir drivers expect when a claim comes back.
            tracing::info!(volume = %id, "adopting existing directory");
            self.hook_capacity(inst, &path, capacity).await?;
            Self::write_json(&inst.fs, &Self::meta_path(&path)?, &meta).await?;
        } else {
            self.build_volume(inst, &path, &meta, &key).await?;
        }
        Ok(Self::to_volume(inst, &id, &meta))
    }

    async fn delete_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Ok(());
        };
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let fs = &inst.fs;
        let meta_path = Self::meta_path(&id.path)?;
        self.prepare(inst).await?;
        // What an earlier, killed attempt at this delete (or at the create) left behind.
        let leftovers = [
            Leftover::Tree("tmp"),
            Leftover::Tree("trash"),
            Leftover::MetaTemp,
        ];
        let Some(meta) = Self::read_json::<VolumeMeta>(fs, &meta_path).await? else {
            // Never ours (or already deleted): leave the volume tree alone; the leftovers are
            // named by this ID's key and so are ours either way.
            Self::purge_leftovers(fs, &key, &leftovers).await?;
            return Ok(());
        };
        let on_delete = params::DirParams::parse(&meta.parameters)
            .map(|p| p.on_delete)
            .unwrap_or_default();
        if fs.stat(&id.path).await?.is_some() {
            if on_delete != OnDelete::Retain
                && let Some(h) = self.hooks.get(&inst.name)
            {
                h.release(&id.path).await?;
            }
            match on_delete {
                OnDelete::Retain => {}
                OnDelete::Archive => {
                    let flat = id.path.as_str().replace('/', "_");
                    let to = rel(&format!("archived-{flat}-{}", now_secs()))?;
                    fs.rename(&id.path, &to).await?;
                }
                OnDelete::Delete => {
                    // Rename first: the volume disappears atomically, the slow removal follows.
                    let trash = rel(&format!(
                        "{META_DIR}/trash/{key}.{}",
                        uuid::Uuid::new_v4().simple()
                    ))?;
                    fs.rename(&id.path, &trash).await?;
                    fs.remove_all(&trash).await?;
                }
            }
        }
        Self::purge_leftovers(fs, &key, &leftovers).await?;
        fs.remove_file(&meta_path).await?;
        if on_delete != OnDelete::Retain {
            Self::prune_parents(fs, &id.path).await;
        }
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Volume> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        Ok(Self::to_volume(inst, &id, &meta))
    }

    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let all = self.all_volumes().await?;
        paginate(&all, start, max)
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64> {
        let inst = self.choose_instance(parameters)?;
        let avail = inst.fs.fs_stats().await?.available_bytes;
        Ok(match inst.options.max_volume_bytes {
            0 => avail,
            m => avail.min(m),
        })
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _secrets: &Secrets,
    ) -> Result<Expanded> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let mut meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let want = range.choose(meta.capacity);
        if inst.options.max_volume_bytes > 0 && want > inst.options.max_volume_bytes {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {want} bytes is more than the limit of {}",
                inst.options.max_volume_bytes
            )));
        }
        if want > meta.capacity {
            self.hook_capacity(inst, &id.path, want).await?;
            if meta.block {
                inst.fs
                    .set_len(&id.path.join(BLOCK_IMAGE)?, want)
                    .await
                    .map_err(capacity_out_of_range)?;
            }
            meta.capacity = want;
            Self::write_json(&inst.fs, &Self::meta_path(&id.path)?, &meta).await?;
        }
        Ok(Expanded {
            capacity_bytes: meta.capacity,
            node_expansion_required: meta.block,
        })
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        _parameters: &BTreeMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<Snapshot> {
        let (inst, vid) = self
            .parse_id("source_volume_id", source_volume_id)?
            .ok_or_else(|| Error::not_found("source volume", source_volume_id))?;
        self.prepare(inst).await?;
        let snap = RelPath::component("name", &dir_name_for(name, "snap"))?;
        let sid = VolumeId::new(&inst.name, snap.clone())?;
        let _guard = self.locks.lock(&format!("snap:{sid}")).await;
        if let Some(existing) = Self::find_snapshot(inst, &snap).await? {
            if existing.name != name || existing.source_volume_id != source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists for volume {}",
                    existing.source_volume_id
                )));
            }
            return Ok(snapshot_of(&sid, &existing));
        }
        let vkey = hash_hex(vid.path.as_str(), 40);
        // Hold the volume's lock so that no delete or expand interleaves with the copy.
        let _vguard = self.locks.lock(&format!("{}/{}", inst.name, vkey)).await;
        let vmeta = Self::load_volume(inst, &vid.path)
            .await?
            .ok_or_else(|| Error::not_found("source volume", source_volume_id))?;
        let fs = &inst.fs;
        let tmp = rel(&format!("{META_DIR}/snapshots/.{snap}.tmp"))?;
        fs.remove_all(&tmp).await?;
        let meta = SnapshotMeta {
            name: name.to_owned(),
            source_volume_id: source_volume_id.to_owned(),
            size: vmeta.capacity,
            block: vmeta.block,
            created: now_secs(),
        };
        let res = async {
            fs.mkdir(
                &tmp,
                DirAttrs {
                    mode: 0o700,
                    uid: None,
                    gid: None,
                },
            )
            .await?;
            fs.copy_tree(&vid.path, &tmp.join("data")?).await?;
            Self::write_json(fs, &tmp.join("meta.json")?, &meta).await?;
            fs.rename(&tmp, &Self::snap_dir(&snap)?).await
        }
        .await;
        if res.is_err() {
            let _ = fs.remove_all(&tmp).await;
        }
        res?;
        Ok(snapshot_of(&sid, &meta))
    }

    async fn delete_snapshot(&self, snapshot_id: &str, _secrets: &Secrets) -> Result<()> {
        let Some((inst, sid)) = self.parse_id("snapshot_id", snapshot_id)? else {
            return Ok(());
        };
        if sid.path.components().count() != 1 {
            return Ok(());
        }
        let _guard = self.locks.lock(&format!("snap:{sid}")).await;
        let fs = &inst.fs;
        let dir = Self::snap_dir(&sid.path)?;
        if fs.stat(&dir).await?.is_none() {
            return Ok(());
        }
        self.prepare(inst).await?;
        let trash = rel(&format!(
            "{META_DIR}/trash/snap-{}.{}",
            hash_hex(sid.path.as_str(), 16),
            uuid::Uuid::new_v4().simple()
        ))?;
        fs.rename(&dir, &trash).await?;
        fs.remove_all(&trash).await?;
        Ok(())
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let all: Vec<(String, Snapshot)> = self
            .all_snapshots()
            .await?
            .into_iter()
            .filter(|s| filter.snapshot_id.as_deref().is_none_or(|id| s.id == id))
            .filter(|s| {
                filter
                    .source_volume_id
                    .as_deref()
                    .is_none_or(|v| s.source_volume_id == v)
            })
            .map(|s| (s.id.clone(), s))
            .collect();
        paginate(&all, start, max)
    }

    fn check_mutable_parameters(&self, mutable: &BTreeMap<String, String>) -> Result<()> {
        params::check_mutable(mutable)
    }

    /// Records which node may use the volume: a single-node volume is refused to a second node
    /// (RWO enforced across nodes, which NFS drivers usually cannot do), and a node's volume
    /// limit from NodeGetInfo is honoured. Only called when the CSIDriver has attachRequired.
    async fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
    ) -> Result<BTreeMap<String, String>> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        self.check_capabilities(std::slice::from_ref(capability))?;
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let mut meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let node: NodeInfo = Self::read_json(&inst.fs, &Self::node_path(node_id)?)
            .await?
            .ok_or_else(|| {
                Error::not_found(
                    "node",
                    format!("{node_id} (no node plugin of that ID has registered)"),
                )
            })?;
        if let Some(&ro) = meta.published.get(node_id) {
            if ro == readonly {
                return Ok(BTreeMap::new());
            }
            return Err(Error::AlreadyExists(format!(
                "volume {volume_id} is already published to {node_id} with readonly={ro}"
            )));
        }
        let single_node = !capability.access_mode.is_multi_node();
        if single_node && let Some(other) = meta.published.keys().next() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is single-node and already published to node {other}"
            )));
        }
        if node.max_volumes > 0
            && Self::published_count(inst, node_id).await? >= node.max_volumes as usize
        {
            return Err(Error::ResourceExhausted(format!(
                "node {node_id} already holds its maximum of {} volumes",
                node.max_volumes
            )));
        }
        meta.published.insert(node_id.to_owned(), readonly);
        Self::write_json(&inst.fs, &Self::meta_path(&id.path)?, &meta).await?;
        Ok(BTreeMap::new())
    }

    async fn controller_unpublish(&self, volume_id: &str, node_id: &str) -> Result<()> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Ok(());
        };
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let Some(mut meta) = Self::load_volume(inst, &id.path).await? else {
            return Ok(());
        };
        let before = meta.published.len();
        if node_id.is_empty() {
            meta.published.clear();
        } else {
            meta.published.remove(node_id);
        }
        if meta.published.len() != before {
            Self::write_json(&inst.fs, &Self::meta_path(&id.path)?, &meta).await?;
        }
        Ok(())
    }

    async fn published_nodes(&self, volume_id: &str) -> Result<Vec<String>> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        Ok(meta.published.keys().cloned().collect())
    }

    async fn register_node(&self, node: &NodeInfo) -> Result<()> {
        if node.node_id.is_empty() {
            return Err(Error::invalid("node_id", "must not be empty"));
        }
        for inst in self.instances.values() {
            self.prepare(inst).await?;
            Self::write_json(&inst.fs, &Self::node_path(&node.node_id)?, node).await?;
        }
        Ok(())
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<()> {
        params::check_mutable(mutable)?;
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let mut meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        meta.parameters
            .extend(mutable.iter().map(|(k, v)| (k.clone(), v.clone())));
        Self::write_json(&inst.fs, &Self::meta_path(&id.path)?, &meta).await
    }

    async fn recycle_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        let Some((inst, id)) = self.parse_id("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let key = hash_hex(id.path.as_str(), 40);
        let _guard = self.locks.lock(&format!("{}/{}", inst.name, key)).await;
        let meta = Self::load_volume(inst, &id.path)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let fs = &inst.fs;
        if meta.block {
            // A fresh sparse image of the same size: old blocks are gone, not just unlinked.
            let img = id.path.join(BLOCK_IMAGE)?;
            fs.remove_file(&img).await?;
            fs.create_file(&img, 0o600).await?;
            fs.set_len(&img, meta.capacity).await?;
        } else {
            fs.clear_dir(&id.path).await?;
        }
        fs.set_attrs(&id.path, inst.options.attrs).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_are_safe_and_stable() {
        assert_eq!(dir_name_for("pvc-123", "vol"), "pvc-123");
        let h = dir_name_for(&"x".repeat(128), "vol");
        assert!(h.starts_with("vol-") && h.len() == 36);
        assert_eq!(h, dir_name_for(&"x".repeat(128), "vol"));
        assert!(dir_name_for("../etc", "vol").starts_with("vol-"));
        assert!(dir_name_for(".hidden", "vol").starts_with("vol-"));
        assert!(dir_name_for("a/b", "vol").starts_with("vol-"));
    }

    #[test]
    fn pages_by_last_id() {
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("i/v{i}"), i)).collect();
        let p1 = paginate(&items, None, 2).unwrap();
        assert_eq!(p1.items, vec![0, 1]);
        let p2 = paginate(&items, p1.next_token.as_deref(), 2).unwrap();
        assert_eq!(p2.items, vec![2, 3]);
        let p3 = paginate(&items, p2.next_token.as_deref(), 2).unwrap();
        assert_eq!(p3.items, vec![4]);
        assert!(p3.next_token.is_none());
        assert!(matches!(
            paginate(&items, Some("garbage"), 2),
            Err(Error::Aborted(_))
        ));
        // The last item of a page deleted before the next call: the token still works.
        let fewer: Vec<_> = items.iter().filter(|(k, _)| k != "i/v1").cloned().collect();
        assert_eq!(
            paginate(&fewer, p1.next_token.as_deref(), 2).unwrap().items,
            vec![2, 3]
        );
    }
}
