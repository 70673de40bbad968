//! The RBD controller: images, snapshots, clones, resize and publish records through librbd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::ffi::{self, CephError, ImageOptions};
use super::{
    Attach, CTX_ATTACH, CTX_IMAGE, CTX_MONITORS, CTX_POOL, Connections, Creds, DRIVER, META_ATTACH,
    META_VOLUME, PoolRef, RbdInstance, blocking, ceph_err, check_pool_name, creds_for, hash_hex,
    name_part, parse_features,
};
use crate::controller::{ControllerBackend, ControllerFeatures, Expanded};
use crate::error::{Error, Result};
use crate::locks::KeyLocks;
use crate::params;
use crate::relpath::RelPath;
use crate::types::{
    AccessType, Capability, CapacityRange, ContentSource, CreateVolume, NodeInfo, Page, Secrets,
    Snapshot, SnapshotFilter, Volume,
};
use crate::volume_id::{MAX_ID_LEN, VolumeId};

/// StorageClass parameters.
pub const P_POOL: &str = "pool";
pub const P_FEATURES: &str = "imageFeatures";
pub const P_ATTACH: &str = "attach";
/// never (default: copy-on-write clones) | always (copy the data at once, parent link gone).
pub const P_FLATTEN: &str = "cloneFlatten";
const KNOWN: &[&str] = &[params::INSTANCE, P_POOL, P_FEATURES, P_ATTACH, P_FLATTEN];

/// Mutable parameters (VolumeAttributesClass): librbd QoS limits, kept as image-level config
/// overrides (`conf_*` metadata) that librbd clients (rbd-nbd, rbd-fuse) apply; 0 = no limit.
/// krbd does not apply librbd QoS.
const MUTABLE: &[(&str, &str)] = &[
    ("qosIopsLimit", "conf_rbd_qos_iops_limit"),
    ("qosBpsLimit", "conf_rbd_qos_bps_limit"),
];

fn check_mutable(mutable: &BTreeMap<String, String>) -> Result<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    for (k, v) in mutable {
        let Some((_, meta)) = MUTABLE.iter().find(|(name, _)| name == k) else {
            return Err(Error::invalid(
                "mutable_parameters",
                format!(
                    "{k:?} is not mutable (mutable: {})",
                    MUTABLE
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if v.parse::<u64>().is_err() {
            return Err(Error::invalid(
                "mutable_parameters",
                format!("{k}: {v:?} is not a whole number"),
            ));
        }
        out.push((*meta, v.clone()));
    }
    Ok(out)
}

/// Size given when a request names none.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// Sizes are rounded up to whole MiB: every block layer (krbd, nbd, loop) is happy with that.
const ALIGN: u64 = 1 << 20;
/// Prefix of RBD snapshots Stowage makes for CSI snapshots.
pub const SNAP_PREFIX: &str = "csi-snap-";
/// Prefix of the short-lived snapshot a volume clone is made from.
const CLONE_SNAP_PREFIX: &str = "stowage-clone-";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct VolumeRecord {
    name: String,
    volume_id: String,
    block: bool,
    attach: String,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_volume: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct AttachRecord {
    node: String,
    readonly: bool,
    multi: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct SnapClaim {
    name: String,
    source_volume_id: String,
    snapshot_id: String,
}

/// A volume ID taken apart.
#[derive(Debug, Clone)]
struct VolRef {
    instance: String,
    pool: String,
    image: String,
}

impl VolRef {
    fn id(&self) -> String {
        format!("{}/{}/{}", self.instance, self.pool, self.image)
    }
}

/// A snapshot ID taken apart.
#[derive(Debug, Clone)]
struct SnapRef {
    instance: String,
    pool: String,
    image_id: String,
    snap: String,
}

impl SnapRef {
    fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.instance, self.pool, self.image_id, self.snap
        )
    }
}

pub struct RbdController {
    instances: BTreeMap<String, RbdInstance>,
    conns: Arc<Connections>,
    locks: KeyLocks,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ALIGN).saturating_mul(ALIGN)
}

pub(crate) fn node_oid(node: &str) -> String {
    format!("stowage.node.{}", hash_hex(node, 40))
}

fn claim_oid(snap: &str) -> String {
    format!("stowage.snap.{snap}")
}

fn deleted_name(prefix: &str, image_id: &str) -> String {
    format!("{prefix}deleted-{image_id}")
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

fn is(e: &CephError, errno: i32) -> bool {
    e.is(errno)
}

/// NotFound for a missing object, the usual mapping otherwise.
fn or_not_found(e: CephError, what: &'static str, id: &str, doing: &str) -> Error {
    if is(&e, libc::ENOENT) {
        Error::not_found(what, id)
    } else {
        ceph_err(e, doing)
    }
}

fn read_record(img: &ffi::Image) -> Result<Option<VolumeRecord>> {
    match img
        .metadata_get(META_VOLUME)
        .map_err(|e| ceph_err(e, "reading volume record of"))?
    {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::Internal(format!("corrupt {META_VOLUME} on {}: {e}", img.name))),
    }
}

fn attachments(img: &ffi::Image) -> Result<Vec<(String, AttachRecord)>> {
    let all = img
        .metadata_list()
        .map_err(|e| ceph_err(e, "listing metadata of"))?;
    Ok(all
        .into_iter()
        .filter(|(k, _)| k.starts_with(META_ATTACH))
        .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|r| (k, r)))
        .collect())
}

/// Removes an image renamed for its dependents once none is left: snapshots gone and no clone
/// links. Best effort: a failure leaves it for the next snapshot or clone deletion.
fn purge_if_unused(pool: &ffi::Pool, image_id: &str, prefix: &str) {
    let Ok(img) = pool.open_by_id(image_id) else {
        return;
    };
    let name = match img.current_name() {
        Ok(n) if n == deleted_name(prefix, image_id) => n,
        _ => return,
    };
    let busy = img.snaps().map_or(true, |s| !s.is_empty())
        || img.children().map_or(true, |c| !c.is_empty());
    drop(img);
    if busy {
        return;
    }
    // Trash first: the name disappears at once, the data removal follows.
    match pool
        .trash_move(&name)
        .and_then(|_| pool.trash_remove(image_id))
    {
        Ok(()) => {
            tracing::info!(image = %name, "purged deleted image: nothing depends on it any more")
        }
        Err(e) => tracing::warn!(image = %name, error = %e, "could not purge deleted image yet"),
    }
}

fn snapshot_of(sid: &str, source: &str, s: &ffi::SnapInfo) -> Snapshot {
    Snapshot {
        id: sid.to_owned(),
        source_volume_id: source.to_owned(),
        size_bytes: s.size,
        created: UNIX_EPOCH + Duration::from_secs(u64::try_from(s.created).unwrap_or(0)),
        ready: true,
    }
}

/// Pages a sorted list by "last ID returned" tokens; a token that is not an ID is ABORTED.
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
    let page = items[begin..end].iter().map(|(_, v)| v.clone()).collect();
    let next_token = (end < items.len()).then(|| items[end - 1].0.clone());
    Ok(Page {
        items: page,
        next_token,
    })
}

impl RbdController {
    pub fn new(instances: &BTreeMap<String, RbdInstance>) -> Result<Self> {
        if instances.is_empty() {
            return Err(Error::invalid(
                "instances",
                "at least one Ceph cluster must be configured",
            ));
        }
        let instances = super::instance_map(instances)?;
        // Fail at start, with the library's name, rather than at the first CreateVolume.
        ffi::ensure_loaded().map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        Ok(RbdController {
            instances,
            conns: Arc::new(Connections::default()),
            locks: KeyLocks::default(),
        })
    }

    fn choose_instance(&self, p: &BTreeMap<String, String>) -> Result<(&str, &RbdInstance)> {
        let names = || {
            self.instances
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(n) = p.get(params::INSTANCE) {
            return self
                .instances
                .get_key_value(n)
                .map(|(k, v)| (k.as_str(), v))
                .ok_or_else(|| {
                    Error::invalid(
                        "parameters.instance",
                        format!("{n:?} is not configured (have: {})", names()),
                    )
                });
        }
        if self.instances.len() == 1
            && let Some((k, v)) = self.instances.iter().next()
        {
            return Ok((k, v));
        }
        self.instances
            .get_key_value("default")
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| {
                Error::invalid(
                    "parameters.instance",
                    format!("required: several instances are configured ({})", names()),
                )
            })
    }

    /// Parses a volume ID; None when it names an instance not configured here.
    fn vol_ref(&self, field: &'static str, s: &str) -> Result<Option<VolRef>> {
        let id = VolumeId::parse(field, s)?;
        let parts: Vec<&str> = id.path.components().collect();
        let [pool, image] = parts[..] else {
            return Err(Error::not_found("volume", s));
        };
        if !self.instances.contains_key(&id.instance) {
            return Ok(None);
        }
        check_pool_name(field, pool)?;
        Ok(Some(VolRef {
            instance: id.instance.clone(),
            pool: pool.to_owned(),
            image: image.to_owned(),
        }))
    }

    fn snap_ref(&self, field: &'static str, s: &str) -> Result<Option<SnapRef>> {
        let id = VolumeId::parse(field, s)?;
        let parts: Vec<&str> = id.path.components().collect();
        let [pool, image_id, snap] = parts[..] else {
            return Err(Error::not_found("snapshot", s));
        };
        if !self.instances.contains_key(&id.instance) || !snap.starts_with(SNAP_PREFIX) {
            return Ok(None);
        }
        check_pool_name(field, pool)?;
        Ok(Some(SnapRef {
            instance: id.instance.clone(),
            pool: pool.to_owned(),
            image_id: image_id.to_owned(),
            snap: snap.to_owned(),
        }))
    }

    fn inst(&self, name: &str) -> Result<&RbdInstance> {
        self.instances
            .get(name)
            .ok_or_else(|| Error::not_found("backend instance", name))
    }

    async fn pool(
        &self,
        inst: &RbdInstance,
        pool: &str,
        secrets: &Secrets,
    ) -> Result<Arc<PoolRef>> {
        let creds: Option<Creds> = creds_for(inst, secrets)?;
        self.conns
            .pool(&inst.monitors, creds, pool, inst.op_timeout_secs)
            .await
    }

    fn context(inst: &RbdInstance, v: &VolRef, attach: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (CTX_POOL.to_string(), v.pool.clone()),
            (CTX_IMAGE.to_string(), v.image.clone()),
            (CTX_MONITORS.to_string(), inst.monitors.clone()),
            (CTX_ATTACH.to_string(), attach.to_string()),
        ])
    }

    fn to_volume(inst: &RbdInstance, v: &VolRef, rec: &VolumeRecord, size: u64) -> Volume {
        let mut context = Self::context(inst, v, &rec.attach);
        if rec.block {
            context.insert("block".into(), "true".into());
        }
        Volume {
            id: v.id(),
            capacity_bytes: size,
            context,
            source: match (&rec.source_snapshot, &rec.source_volume) {
                (Some(s), _) => Some(ContentSource::Snapshot(s.clone())),
                (None, Some(v)) => Some(ContentSource::Volume(v.clone())),
                _ => None,
            },
            topology: Vec::new(),
        }
    }

    /// Takes a volume image out of sight: renamed when snapshots or clones still need it,
    /// removed otherwise (then its parent, if it was a deleted one, may go too).
    fn retire_image(pool: &ffi::Pool, image: &str, prefix: &str) -> Result<()> {
        match pool.open(image) {
            Ok(img) => Self::retire_open(pool, image, img, prefix),
            Err(e) if is(&e, libc::ENOENT) => {
                Self::finish_interrupted_removal(pool, image, prefix).map(|_| ())
            }
            Err(e) => Err(ceph_err(e, "opening")),
        }
    }

    /// Finishes a removal of `image` that a killed client left half done; true when there was
    /// one. Call it when opening the image by name gave ENOENT.
    ///
    /// librbd's `rbd_remove` first moves the image to the trash with source REMOVING (its name
    /// leaves the directory, so `rbd_open` by name answers ENOENT), then deletes the data
    /// objects and the header. A process killed in between leaves the whole image, its data
    /// and its metadata records in a trash entry that `rbd_trash_list` does not even show:
    /// answering "already gone" would never give the space back. `rbd_remove` of the same
    /// name resumes exactly such an entry (it looks for a trash entry of that name with source
    /// REMOVING) and answers ENOENT when there is none, so it is both the check and the fix.
    fn finish_interrupted_removal(pool: &ffi::Pool, image: &str, prefix: &str) -> Result<bool> {
        match pool.remove_image(image) {
            Ok(()) => {}
            Err(e) if is(&e, libc::ENOENT) => return Ok(false),
            Err(e) if is(&e, libc::EBUSY) => {
                return Err(Error::FailedPrecondition(format!(
                    "image {image} is half removed and still open by a client (a killed client's watch expires after osd_client_watch_timeout, 30 s by default): retry"
                )));
            }
            Err(e) => return Err(ceph_err(e, "finishing the interrupted removal of")),
        }
        tracing::warn!(
            image,
            "finished removing an image that an interrupted removal left in the trash"
        );
        // Its parent link went with the header, so a `deleted-` parent kept only for this
        // clone cannot be named: give every deleted image the check its last clone's removal
        // would have made (each is purged only when nothing depends on it).
        match pool.list_images() {
            Ok(images) => {
                for (id, name) in images {
                    if name == deleted_name(prefix, &id) {
                        purge_if_unused(pool, &id, prefix);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not list images to purge unused deleted ones")
            }
        }
        Ok(true)
    }

    /// [`Self::retire_image`] for an image the caller already opened (one open fewer).
    fn retire_open(pool: &ffi::Pool, image: &str, img: ffi::Image, prefix: &str) -> Result<()> {
        let snaps = img
            .snaps()
            .map_err(|e| ceph_err(e, "listing snapshots of"))?;
        let children = img
            .children()
            .map_err(|e| ceph_err(e, "listing clones of"))?;
        let parent = img.parent().map_err(|e| ceph_err(e, "reading parent of"))?;
        if !snaps.is_empty() || !children.is_empty() {
            let id = img.id().map_err(|e| ceph_err(e, "reading id of"))?;
            drop(img);
            let to = deleted_name(prefix, &id);
            pool.rename(image, &to)
                .map_err(|e| ceph_err(e, "renaming (kept for its snapshots/clones)"))?;
            tracing::info!(image, kept_as = %to, snapshots = snaps.len(), clones = children.len(),
                "volume deleted; image kept while snapshots or clones depend on it");
            return Ok(());
        }
        drop(img);
        match pool.remove_image(image) {
            Ok(()) => {}
            Err(e) if is(&e, libc::ENOENT) => {}
            Err(e) if is(&e, libc::EBUSY) => {
                return Err(Error::FailedPrecondition(format!(
                    "image {image} is still open or mapped by a client (a node did not unstage it)"
                )));
            }
            Err(e) => return Err(ceph_err(e, "removing")),
        }
        if let Some(p) = parent {
            purge_if_unused(pool, &p.image_id, prefix);
        }
        Ok(())
    }

    /// The snapshot behind a snapshot ID, with its source volume ID.
    fn find_snap(pool: &ffi::Pool, s: &SnapRef) -> Result<Option<Snapshot>> {
        let img = match pool.open_by_id(&s.image_id) {
            Ok(i) => i,
            Err(e) if is(&e, libc::ENOENT) => return Ok(None),
            Err(e) => return Err(ceph_err(e, "opening")),
        };
        let snaps = img
            .snaps()
            .map_err(|e| ceph_err(e, "listing snapshots of"))?;
        let Some(info) = snaps.iter().find(|x| x.name == s.snap) else {
            return Ok(None);
        };
        let source = read_record(&img)?.map(|r| r.volume_id).unwrap_or_default();
        Ok(Some(snapshot_of(&s.id(), &source, info)))
    }

    fn snaps_of_image(
        instance: &str,
        pool: &ffi::Pool,
        img: &ffi::Image,
        out: &mut Vec<(String, Snapshot)>,
    ) -> Result<()> {
        let snaps = img
            .snaps()
            .map_err(|e| ceph_err(e, "listing snapshots of"))?;
        if !snaps.iter().any(|s| s.name.starts_with(SNAP_PREFIX)) {
            return Ok(());
        }
        let id = img.id().map_err(|e| ceph_err(e, "reading id of"))?;
        let source = read_record(img)?.map(|r| r.volume_id).unwrap_or_default();
        for s in snaps.iter().filter(|s| s.name.starts_with(SNAP_PREFIX)) {
            let sid = format!("{instance}/{}/{id}/{}", pool.name, s.name);
            out.push((sid.clone(), snapshot_of(&sid, &source, s)));
        }
        Ok(())
    }
}

#[async_trait]
impl ControllerBackend for RbdController {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> ControllerFeatures {
        ControllerFeatures {
            snapshots: true,
            clone: true,
            expand: true,
            publish: true,
            capacity: true,
            single_node_multi_writer: true,
            modify: true,
        }
    }

    fn check_capabilities(&self, caps: &[Capability]) -> Result<()> {
        for c in caps {
            match &c.access_type {
                AccessType::Mount { fs_type, .. } => {
                    if c.access_mode.is_multi_node() {
                        return Err(Error::invalid(
                            "volume_capabilities",
                            "a filesystem on an RBD image is single-node (ReadWriteOnce, ReadWriteOncePod): \
                             mounted on two nodes at once it is corrupted; use a block volume for multi-node access",
                        ));
                    }
                    if !matches!(fs_type.as_str(), "" | "ext4" | "xfs") {
                        return Err(Error::invalid(
                            "volume_capabilities",
                            format!("fs_type {fs_type:?}: ext4 or xfs"),
                        ));
                    }
                }
                AccessType::Block => {}
            }
        }
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        let (iname, inst) = self.choose_instance(&req.parameters)?;
        params::check_known(&req.parameters, KNOWN)?;
        self.check_mutable_parameters(&req.mutable_parameters)?;
        self.check_capabilities(&req.capabilities)?;
        let block = req.capabilities.iter().any(Capability::is_block);
        let pool_name = req
            .parameters
            .get(P_POOL)
            .cloned()
            .unwrap_or_else(|| inst.pool.clone());
        check_pool_name("parameters.pool", &pool_name)?;
        let features = parse_features(
            "parameters.imageFeatures",
            req.parameters
                .get(P_FEATURES)
                .unwrap_or(&inst.image_features),
        )?;
        let attach = Attach::parse(
            "parameters.attach",
            req.parameters.get(P_ATTACH).unwrap_or(&inst.attach),
        )?;
        let flatten = match req.parameters.get(P_FLATTEN).map(String::as_str) {
            None | Some("never") => false,
            Some("always") => true,
            Some(o) => {
                return Err(Error::invalid(
                    "parameters.cloneFlatten",
                    format!("{o:?}: expected never or always"),
                ));
            }
        };
        let v = VolRef {
            instance: iname.to_owned(),
            pool: pool_name.clone(),
            image: format!("{}{}", inst.image_prefix, name_part(&req.name)),
        };
        let id = v.id();
        if id.len() > MAX_ID_LEN {
            return Err(Error::invalid(
                "parameters.pool",
                format!("the volume ID {id:?} would be longer than {MAX_ID_LEN} bytes"),
            ));
        }
        RelPath::parse("name", &format!("{}/{}", v.pool, v.image))?;
        let capacity = round_up(req.capacity.choose(DEFAULT_CAPACITY).max(1));
        if !req.capacity.admits(capacity) {
            return Err(Error::OutOfRange(format!(
                "capacity_range {:?} cannot be satisfied in whole MiB",
                req.capacity
            )));
        }
        let source = match &req.source {
            None => None,
            Some(ContentSource::Snapshot(s)) => {
                let r = self
                    .snap_ref("volume_content_source.snapshot.snapshot_id", s)
                    .map_err(|_| Error::not_found("snapshot", s))?
                    .ok_or_else(|| Error::not_found("snapshot", s))?;
                if r.instance != v.instance || r.pool != v.pool {
                    return Err(Error::invalid(
                        "volume_content_source",
                        "the snapshot is in another cluster or pool",
                    ));
                }
                Some(ContentSource::Snapshot(s.clone()))
            }
            Some(ContentSource::Volume(s)) => {
                let r = self
                    .vol_ref("volume_content_source.volume.volume_id", s)
                    .map_err(|_| Error::not_found("volume", s))?
                    .ok_or_else(|| Error::not_found("volume", s))?;
                if r.instance != v.instance || r.pool != v.pool {
                    return Err(Error::invalid(
                        "volume_content_source",
                        "the source volume is in another cluster or pool",
                    ));
                }
                Some(ContentSource::Volume(s.clone()))
            }
        };
        let _g = self.locks.lock(&id).await;
        let pool = self.pool(inst, &pool_name, &req.secrets).await?;
        let rec = VolumeRecord {
            name: req.name.clone(),
            volume_id: id.clone(),
            block,
            attach: attach.as_str().to_owned(),
            created: now_secs(),
            source_snapshot: match &source {
                Some(ContentSource::Snapshot(s)) => Some(s.clone()),
                _ => None,
            },
            source_volume: match &source {
                Some(ContentSource::Volume(s)) => Some(s.clone()),
                _ => None,
            },
        };
        let opts = ImageOptions {
            features,
            order: 22,
        };
        let capacity_range = req.capacity;
        let prefix = inst.image_prefix.clone();
        let (v2, snap_ref) = (
            v.clone(),
            match &source {
                Some(ContentSource::Snapshot(s)) => self.snap_ref("snapshot_id", s)?,
                _ => None,
            },
        );
        let src_vol = match &source {
            Some(ContentSource::Volume(s)) => self.vol_ref("volume_id", s)?,
            _ => None,
        };
        let qos = check_mutable(&req.mutable_parameters)?;
        let started = std::time::Instant::now();
        let (rec, size) = blocking(move || {
            let p = &pool.pool;
            let v = v2;
            // An image already there: ours and complete (a repeated call), or half-made by a
            // call that failed midway (no record): that one is removed and made again.
            match p.open(&v.image) {
                Ok(img) => match read_record(&img)? {
                    // A clone starts with a copy of its parent's metadata: a record naming
                    // another volume means the clone was never finished.
                    Some(existing) if existing.volume_id == rec.volume_id => {
                        let size = img.size().map_err(|e| ceph_err(e, "sizing"))?;
                        if existing.name != rec.name {
                            return Err(Error::AlreadyExists(format!(
                                "image {} already holds volume {:?}",
                                v.image, existing.name
                            )));
                        }
                        if !capacity_range.admits(size) {
                            return Err(Error::AlreadyExists(format!(
                                "volume {:?} exists with {size} bytes, incompatible with capacity_range {capacity_range:?}",
                                rec.name
                            )));
                        }
                        if existing.source_snapshot != rec.source_snapshot
                            || existing.source_volume != rec.source_volume
                        {
                            return Err(Error::AlreadyExists(format!(
                                "volume {:?} exists with a different content source",
                                rec.name
                            )));
                        }
                        if existing.block != rec.block {
                            return Err(Error::AlreadyExists(format!(
                                "volume {:?} exists with a different access type",
                                rec.name
                            )));
                        }
                        return Ok((existing, size));
                    }
                    _ => {
                        drop(img);
                        tracing::warn!(image = %v.image, "removing a half-made image left by an earlier attempt");
                        Self::retire_image(p, &v.image, &prefix)?;
                    }
                },
                // A half-removed image of an earlier volume with this name would otherwise
                // stay in the trash for ever, beside the new image of the same name.
                Err(e) if is(&e, libc::ENOENT) => {
                    Self::finish_interrupted_removal(p, &v.image, &prefix)?;
                }
                Err(e) => return Err(ceph_err(e, "opening")),
            }
            let made = (|| -> Result<()> {
                if let Some(s) = &snap_ref {
                    let sid = s.id();
                    let parent = p
                        .open_by_id(&s.image_id)
                        .map_err(|e| or_not_found(e, "snapshot", &sid, "opening"))?;
                    let info = parent
                        .snaps()
                        .map_err(|e| ceph_err(e, "listing snapshots of"))?
                        .into_iter()
                        .find(|x| x.name == s.snap)
                        .ok_or_else(|| Error::not_found("snapshot", &sid))?;
                    if capacity < info.size {
                        return Err(Error::OutOfRange(format!(
                            "capacity_range: {capacity} bytes is smaller than the snapshot's {}",
                            info.size
                        )));
                    }
                    if read_record(&parent)?.is_some_and(|r| r.block != rec.block) {
                        return Err(Error::invalid(
                            "volume_content_source",
                            "snapshot access type (block or filesystem) differs from the request",
                        ));
                    }
                    let parent_name = parent
                        .current_name()
                        .map_err(|e| ceph_err(e, "reading name of"))?;
                    drop(parent);
                    p.clone_image(&parent_name, &s.snap, &v.image, &opts)
                        .map_err(|e| ceph_err(e, "cloning snapshot into"))?;
                } else if let Some(src) = &src_vol {
                    let sid = src.id();
                    let parent = p
                        .open(&src.image)
                        .map_err(|e| or_not_found(e, "source volume", &sid, "opening"))?;
                    let prec = read_record(&parent)?
                        .ok_or_else(|| Error::not_found("source volume", &sid))?;
                    let psize = parent.size().map_err(|e| ceph_err(e, "sizing"))?;
                    if capacity < psize {
                        return Err(Error::OutOfRange(format!(
                            "capacity_range: {capacity} bytes is smaller than the source volume's {psize}"
                        )));
                    }
                    if prec.block != rec.block {
                        return Err(Error::invalid(
                            "volume_content_source",
                            "source volume access type (block or filesystem) differs from the request",
                        ));
                    }
                    // Clone v2 from a short-lived snapshot; removing it afterwards moves it to
                    // the trash namespace, where it lives exactly as long as the clone needs it.
                    let tmp = format!("{CLONE_SNAP_PREFIX}{}", hash_hex(&v.image, 16));
                    match parent.snap_create(&tmp) {
                        Ok(()) => {}
                        Err(e) if is(&e, libc::EEXIST) => {}
                        Err(e) => return Err(ceph_err(e, "snapshotting")),
                    }
                    let cloned = p.clone_image(&src.image, &tmp, &v.image, &opts);
                    let removed = parent.snap_remove(&tmp);
                    cloned.map_err(|e| ceph_err(e, "cloning volume into"))?;
                    removed.map_err(|e| ceph_err(e, "removing the clone's snapshot of"))?;
                } else {
                    p.create_image(&v.image, capacity, &opts)
                        .map_err(|e| ceph_err(e, "creating image"))?;
                    return Ok(());
                }
                let img = p.open(&v.image).map_err(|e| ceph_err(e, "opening"))?;
                // librbd copies the parent's metadata into a clone: its volume record and its
                // publish records are not the clone's.
                for (k, _) in img.metadata_list().map_err(|e| ceph_err(e, "listing metadata of"))? {
                    if k.starts_with("stowage.") {
                        img.metadata_remove(&k)
                            .map_err(|e| ceph_err(e, "clearing inherited metadata of"))?;
                    }
                }
                if img.size().map_err(|e| ceph_err(e, "sizing"))? < capacity {
                    img.resize(capacity).map_err(|e| ceph_err(e, "resizing"))?;
                }
                if flatten {
                    img.flatten().map_err(|e| ceph_err(e, "flattening"))?;
                }
                Ok(())
            })();
            let finish = made.and_then(|()| {
                let img = p.open(&v.image).map_err(|e| ceph_err(e, "opening"))?;
                for (k, val) in &qos {
                    img.metadata_set(k, val).map_err(|e| ceph_err(e, "setting QoS on"))?;
                }
                // The record goes last: it is what makes the volume exist.
                img.metadata_set(META_VOLUME, &json(&rec)?)
                    .map_err(|e| ceph_err(e, "recording volume on"))?;
                img.size().map_err(|e| ceph_err(e, "sizing"))
            });
            match finish {
                Ok(size) => Ok((rec, size)),
                Err(err) => {
                    // Best effort: the cluster may be what failed; a retry cleans up then.
                    if !matches!(err, Error::AlreadyExists(_) | Error::NotFound { .. } | Error::OutOfRange(_) | Error::InvalidArgument { .. }) {
                        let _ = p.remove_image(&v.image);
                    }
                    Err(err)
                }
            }
        })
        .await?;
        tracing::info!(volume_id = %id, size, elapsed_ms = started.elapsed().as_millis() as u64, "rbd volume ready");
        Ok(Self::to_volume(inst, &v, &rec, size))
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let Some(v) = self.vol_ref("volume_id", volume_id)? else {
            return Ok(());
        };
        let inst = self.inst(&v.instance)?;
        let _g = self.locks.lock(&v.id()).await;
        let pool = self.pool(inst, &v.pool, secrets).await?;
        let prefix = inst.image_prefix.clone();
        let vid = volume_id.to_owned();
        blocking(move || {
            let p = &pool.pool;
            let img = match p.open(&v.image) {
                Ok(i) => i,
                // Gone, or half removed by a delete killed inside rbd_remove (its publish
                // records were checked before that removal began): finish it first.
                Err(e) if is(&e, libc::ENOENT) => {
                    return Self::finish_interrupted_removal(p, &v.image, &prefix).map(|_| ());
                }
                Err(e) => return Err(ceph_err(e, "opening")),
            };
            if let Some((_, a)) = attachments(&img)?.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vid} is published to node {}: ControllerUnpublishVolume first",
                    a.node
                )));
            }
            Self::retire_open(p, &v.image, img, &prefix)
        })
        .await?;
        tracing::info!(volume_id, "rbd volume deleted");
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Volume> {
        let v = self
            .vol_ref("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let inst = self.inst(&v.instance)?;
        let pool = self.pool(inst, &v.pool, &Secrets::default()).await?;
        let (v2, vid) = (v.clone(), volume_id.to_owned());
        let (rec, size) = blocking(move || {
            let img = pool
                .pool
                .open(&v2.image)
                .map_err(|e| or_not_found(e, "volume", &vid, "opening"))?;
            let rec = read_record(&img)?.ok_or_else(|| Error::not_found("volume", &vid))?;
            Ok((rec, img.size().map_err(|e| ceph_err(e, "sizing"))?))
        })
        .await?;
        Ok(Self::to_volume(inst, &v, &rec, size))
    }

    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let mut all: Vec<(String, Volume)> = Vec::new();
        for (iname, inst) in &self.instances {
            let pool = self.pool(inst, &inst.pool, &Secrets::default()).await?;
            let (prefix, iname2, inst2) = (inst.image_prefix.clone(), iname.clone(), inst.clone());
            let vols = blocking(move || {
                let p = &pool.pool;
                let hidden = format!("{prefix}deleted-");
                let mut out = Vec::new();
                for (_, name) in p
                    .list_images()
                    .map_err(|e| ceph_err(e, "listing images of"))?
                {
                    if !name.starts_with(&prefix) || name.starts_with(&hidden) {
                        continue;
                    }
                    let Ok(img) = p.open(&name) else { continue };
                    let Some(rec) = read_record(&img)? else {
                        continue;
                    };
                    let size = img.size().map_err(|e| ceph_err(e, "sizing"))?;
                    let v = VolRef {
                        instance: iname2.clone(),
                        pool: p.name.clone(),
                        image: name,
                    };
                    out.push((v.id(), Self::to_volume(&inst2, &v, &rec, size)));
                }
                Ok(out)
            })
            .await?;
            all.extend(vols);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        paginate(&all, start, max)
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64> {
        let (_, inst) = self.choose_instance(parameters)?;
        let pool = parameters.get(P_POOL).unwrap_or(&inst.pool);
        check_pool_name("parameters.pool", pool)?;
        let creds = creds_for(inst, &Secrets::default())?;
        let (_, avail) = self
            .conns
            .cluster_stat(&inst.monitors, creds, pool, inst.op_timeout_secs)
            .await?;
        Ok(avail)
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let v = self
            .vol_ref("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let inst = self.inst(&v.instance)?;
        let _g = self.locks.lock(&v.id()).await;
        let pool = self.pool(inst, &v.pool, secrets).await?;
        let vid = volume_id.to_owned();
        let size = blocking(move || {
            let img = pool
                .pool
                .open(&v.image)
                .map_err(|e| or_not_found(e, "volume", &vid, "opening"))?;
            read_record(&img)?.ok_or_else(|| Error::not_found("volume", &vid))?;
            let size = img.size().map_err(|e| ceph_err(e, "sizing"))?;
            let want = round_up(range.choose(size));
            if range.limit.is_some_and(|l| l > 0 && want > l) {
                return Err(Error::OutOfRange(format!(
                    "capacity_range {range:?} cannot be satisfied in whole MiB"
                )));
            }
            if want > size {
                img.resize(want).map_err(|e| ceph_err(e, "resizing"))?;
                tracing::info!(volume_id = %vid, from = size, to = want, "image resized");
                return Ok(want);
            }
            Ok(size)
        })
        .await?;
        // The node grows the filesystem, or refreshes a loop device's size for block volumes.
        Ok(Expanded {
            capacity_bytes: size,
            node_expansion_required: true,
        })
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        params::check_known(parameters, &[])?;
        let v = self
            .vol_ref("source_volume_id", source_volume_id)?
            .ok_or_else(|| Error::not_found("source volume", source_volume_id))?;
        let inst = self.inst(&v.instance)?;
        let snap = format!("{SNAP_PREFIX}{}", name_part(name));
        let _g = self.locks.lock(&format!("snap:{}/{snap}", v.pool)).await;
        let pool = self.pool(inst, &v.pool, secrets).await?;
        let (name, src) = (name.to_owned(), source_volume_id.to_owned());
        blocking(move || {
            let p = &pool.pool;
            let oid = claim_oid(&snap);
            let read_claim = || -> Result<Option<SnapClaim>> {
                match p.read_object(&oid).map_err(|e| ceph_err(e, "reading snapshot claim"))? {
                    None => Ok(None),
                    Some(b) => serde_json::from_slice(&b)
                        .map(Some)
                        .map_err(|e| Error::Internal(format!("corrupt {oid}: {e}"))),
                }
            };
            let check_claim = |c: &SnapClaim| -> Result<()> {
                if c.name != name || c.source_volume_id != src {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {name:?} already exists for volume {}",
                        c.source_volume_id
                    )));
                }
                Ok(())
            };
            let img = p
                .open(&v.image)
                .map_err(|e| or_not_found(e, "source volume", &src, "opening"))?;
            if read_record(&img)?.is_none() {
                // The name may be claimed by a snapshot of a volume deleted since: that is
                // still "same name, other source".
                if let Some(c) = read_claim()? {
                    check_claim(&c)?;
                }
                return Err(Error::not_found("source volume", &src));
            }
            let image_id = img.id().map_err(|e| ceph_err(e, "reading id of"))?;
            let sref = SnapRef {
                instance: v.instance.clone(),
                pool: v.pool.clone(),
                image_id,
                snap: snap.clone(),
            };
            let sid = sref.id();
            if sid.len() > MAX_ID_LEN {
                return Err(Error::invalid(
                    "name",
                    format!("the snapshot ID would be longer than {MAX_ID_LEN} bytes"),
                ));
            }
            match read_claim()? {
                Some(c) => {
                    check_claim(&c)?;
                    if c.snapshot_id != sid {
                        return Err(Error::AlreadyExists(format!(
                            "snapshot {name:?} exists as {} (of an earlier volume with the same name)",
                            c.snapshot_id
                        )));
                    }
                }
                None => {
                    let claim = SnapClaim {
                        name: name.clone(),
                        source_volume_id: src.clone(),
                        snapshot_id: sid.clone(),
                    };
                    match p.create_object(&oid, json(&claim)?.as_bytes()) {
                        Ok(()) => {}
                        Err(e) if is(&e, libc::EEXIST) => {
                            // Another controller claimed it between our read and create.
                            if let Some(c) = read_claim()? {
                                check_claim(&c)?;
                            }
                        }
                        Err(e) => return Err(ceph_err(e, "claiming snapshot name")),
                    }
                }
            }
            match img.snap_create(&snap) {
                Ok(()) => {}
                Err(e) if is(&e, libc::EEXIST) => {}
                Err(e) => return Err(ceph_err(e, "snapshotting")),
            }
            let info = img
                .snaps()
                .map_err(|e| ceph_err(e, "listing snapshots of"))?
                .into_iter()
                .find(|x| x.name == snap)
                .ok_or_else(|| Error::Internal(format!("snapshot {snap} vanished after creation")))?;
            tracing::info!(snapshot_id = %sid, volume_id = %src, "rbd snapshot ready");
            Ok(snapshot_of(&sid, &src, &info))
        })
        .await
    }

    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        let Some(s) = self.snap_ref("snapshot_id", snapshot_id)? else {
            return Ok(());
        };
        let inst = self.inst(&s.instance)?;
        let _g = self
            .locks
            .lock(&format!("snap:{}/{}", s.pool, s.snap))
            .await;
        let pool = self.pool(inst, &s.pool, secrets).await?;
        let prefix = inst.image_prefix.clone();
        blocking(move || {
            let p = &pool.pool;
            match p.open_by_id(&s.image_id) {
                Ok(img) => {
                    img.snap_remove(&s.snap)
                        .map_err(|e| ceph_err(e, "removing snapshot of"))?;
                }
                Err(e) if is(&e, libc::ENOENT) => {}
                Err(e) => return Err(ceph_err(e, "opening")),
            }
            let oid = claim_oid(&s.snap);
            if let Some(b) = p
                .read_object(&oid)
                .map_err(|e| ceph_err(e, "reading snapshot claim"))?
            {
                let mine = serde_json::from_slice::<SnapClaim>(&b)
                    .map(|c| c.snapshot_id == s.id())
                    .unwrap_or(true);
                if mine {
                    p.remove_object(&oid)
                        .map_err(|e| ceph_err(e, "removing snapshot claim"))?;
                }
            }
            purge_if_unused(p, &s.image_id, &prefix);
            Ok(())
        })
        .await
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let mut all: Vec<(String, Snapshot)> = Vec::new();
        if let Some(sid) = &filter.snapshot_id {
            let Ok(Some(s)) = self.snap_ref("snapshot_id", sid) else {
                return Ok(Page {
                    items: Vec::new(),
                    next_token: None,
                });
            };
            let inst = self.inst(&s.instance)?;
            let pool = self.pool(inst, &s.pool, &Secrets::default()).await?;
            if let Some(found) = blocking(move || Self::find_snap(&pool.pool, &s)).await? {
                all.push((found.id.clone(), found));
            }
        } else if let Some(vid) = &filter.source_volume_id {
            let Ok(Some(v)) = self.vol_ref("source_volume_id", vid) else {
                return Ok(Page {
                    items: Vec::new(),
                    next_token: None,
                });
            };
            let inst = self.inst(&v.instance)?;
            let pool = self.pool(inst, &v.pool, &Secrets::default()).await?;
            let vid = vid.clone();
            all = blocking(move || {
                let mut out = Vec::new();
                if let Ok(img) = pool.pool.open(&v.image)
                    && read_record(&img)?.is_some_and(|r| r.volume_id == vid)
                {
                    Self::snaps_of_image(&v.instance, &pool.pool, &img, &mut out)?;
                }
                Ok(out)
            })
            .await?;
        } else {
            for (iname, inst) in &self.instances {
                let pool = self.pool(inst, &inst.pool, &Secrets::default()).await?;
                let (prefix, iname) = (inst.image_prefix.clone(), iname.clone());
                let found = blocking(move || {
                    let p = &pool.pool;
                    let mut out = Vec::new();
                    for (_, name) in p
                        .list_images()
                        .map_err(|e| ceph_err(e, "listing images of"))?
                    {
                        if !name.starts_with(&prefix) {
                            continue;
                        }
                        if let Ok(img) = p.open(&name) {
                            Self::snaps_of_image(&iname, p, &img, &mut out)?;
                        }
                    }
                    Ok(out)
                })
                .await?;
                all.extend(found);
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        paginate(&all, start, max)
    }

    fn check_mutable_parameters(&self, mutable: &BTreeMap<String, String>) -> Result<()> {
        check_mutable(mutable).map(|_| ())
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        let qos = check_mutable(mutable)?;
        let v = self
            .vol_ref("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let inst = self.inst(&v.instance)?;
        let _g = self.locks.lock(&v.id()).await;
        let pool = self.pool(inst, &v.pool, secrets).await?;
        let vid = volume_id.to_owned();
        blocking(move || {
            let img = pool
                .pool
                .open(&v.image)
                .map_err(|e| or_not_found(e, "volume", &vid, "opening"))?;
            read_record(&img)?.ok_or_else(|| Error::not_found("volume", &vid))?;
            for (k, val) in &qos {
                img.metadata_set(k, val)
                    .map_err(|e| ceph_err(e, "setting QoS on"))?;
            }
            Ok(())
        })
        .await
    }

    async fn recycle_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let v = self
            .vol_ref("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let inst = self.inst(&v.instance)?;
        let _g = self.locks.lock(&v.id()).await;
        let pool = self.pool(inst, &v.pool, secrets).await?;
        let prefix = inst.image_prefix.clone();
        let vid = volume_id.to_owned();
        blocking(move || {
            let p = &pool.pool;
            let img = p
                .open(&v.image)
                .map_err(|e| or_not_found(e, "volume", &vid, "opening"))?;
            let mut rec = read_record(&img)?.ok_or_else(|| Error::not_found("volume", &vid))?;
            if let Some((_, a)) = attachments(&img)?.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vid} is published to node {}; it cannot be recycled while in use",
                    a.node
                )));
            }
            let size = img.size().map_err(|e| ceph_err(e, "sizing"))?;
            let features = img.features().map_err(|e| ceph_err(e, "reading features of"))?;
            drop(img);
            // A fresh image: the old blocks are gone (or, if snapshots still need them, kept
            // under the deleted name where no claim can reach them).
            Self::retire_image(p, &v.image, &prefix)?;
            let keep = features
                & (ffi::FEATURE_LAYERING
                    | ffi::FEATURE_EXCLUSIVE_LOCK
                    | ffi::FEATURE_OBJECT_MAP
                    | ffi::FEATURE_FAST_DIFF
                    | ffi::FEATURE_DEEP_FLATTEN);
            p.create_image(&v.image, size, &ImageOptions { features: keep, order: 22 })
                .map_err(|e| ceph_err(e, "creating image"))?;
            rec.source_snapshot = None;
            rec.source_volume = None;
            rec.created = now_secs();
            let img = p.open(&v.image).map_err(|e| ceph_err(e, "opening"))?;
            img.metadata_set(META_VOLUME, &json(&rec)?)
                .map_err(|e| ceph_err(e, "recording volume on"))?;
            tracing::info!(volume_id = %vid, "rbd volume recycled: fresh image of the same name and size");
            Ok(())
        })
        .await
    }

    /// stowage-node calls this at start (through the node's own keyringFile credentials): the
    /// record in each instance's pool lets ControllerPublish tell real nodes from typos and
    /// enforce the node's attach limit.
    async fn register_node(&self, node: &NodeInfo) -> Result<()> {
        for inst in self.instances.values() {
            let pool = self.pool(inst, &inst.pool, &Secrets::default()).await?;
            let (oid, body) = (node_oid(&node.node_id), json(node)?);
            blocking(move || {
                pool.pool
                    .write_object(&oid, body.as_bytes())
                    .map_err(|e| ceph_err(e, "registering node in"))
            })
            .await?;
        }
        Ok(())
    }

    async fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
    ) -> Result<BTreeMap<String, String>> {
        let v = self
            .vol_ref("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let inst = self.inst(&v.instance)?;
        self.check_capabilities(std::slice::from_ref(capability))?;
        let _g = self.locks.lock(&v.id()).await;
        // Volume lock first, then the node's: the same order as in unpublish.
        let _n = self.locks.lock(&format!("node:{node_id}")).await;
        let pool = self.pool(inst, &v.pool, &Secrets::default()).await?;
        let registry = self.pool(inst, &inst.pool, &Secrets::default()).await?;
        let require_registration = inst.require_node_registration;
        let (vid, node) = (volume_id.to_owned(), node_id.to_owned());
        let multi = capability.access_mode.is_multi_node();
        let want_block = capability.is_block();
        blocking(move || {
            let img = pool
                .pool
                .open(&v.image)
                .map_err(|e| or_not_found(e, "volume", &vid, "opening"))?;
            let rec = read_record(&img)?.ok_or_else(|| Error::not_found("volume", &vid))?;
            if rec.block && !want_block {
                return Err(Error::invalid(
                    "volume_capability",
                    "the volume was made for raw block access",
                ));
            }
            let info: Option<NodeInfo> = registry
                .pool
                .read_object(&node_oid(&node))
                .map_err(|e| ceph_err(e, "reading node registry"))?
                .and_then(|b| serde_json::from_slice(&b).ok());
            if require_registration && info.is_none() {
                return Err(Error::not_found(
                    "node (stowage-node registers itself at start when it has keyringFile)",
                    &node,
                ));
            }
            let key = format!("{META_ATTACH}{}", hash_hex(&node, 32));
            let all = attachments(&img)?;
            if let Some((_, mine)) = all.iter().find(|(k, _)| *k == key) {
                if mine.readonly != readonly {
                    return Err(Error::AlreadyExists(format!(
                        "volume {vid} is already published to node {node} with readonly={}",
                        mine.readonly
                    )));
                }
                return Ok(());
            }
            if let Some((_, other)) = all.iter().find(|(_, a)| !(multi && a.multi)) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vid} is published to node {}; a single-node volume cannot be published to {node} too (unpublish it there first)",
                    other.node
                )));
            }
            // The node's attach limit: the volumes published to it are listed in one object.
            let mut vols = node_volumes(&registry.pool, &node)?;
            let max = info.map_or(0, |i| i.max_volumes);
            if max > 0 && !vols.contains(&vid) && vols.len() as i64 >= max {
                return Err(Error::ResourceExhausted(format!(
                    "node {node} already has {} volumes of this driver published, its limit",
                    vols.len()
                )));
            }
            let rec = AttachRecord {
                node: node.clone(),
                readonly,
                multi,
            };
            img.metadata_set(&key, &json(&rec)?)
                .map_err(|e| ceph_err(e, "recording publish on"))?;
            if !vols.contains(&vid) {
                vols.push(vid.clone());
                set_node_volumes(&registry.pool, &node, &vols)?;
            }
            tracing::info!(volume_id = %vid, node = %node, readonly, "published");
            Ok(())
        })
        .await?;
        Ok(BTreeMap::new())
    }

    async fn controller_unpublish(&self, volume_id: &str, node_id: &str) -> Result<()> {
        let Some(v) = self.vol_ref("volume_id", volume_id).ok().flatten() else {
            return Ok(());
        };
        let inst = self.inst(&v.instance)?;
        let _g = self.locks.lock(&v.id()).await;
        let _n = self.locks.lock(&format!("node:{node_id}")).await;
        let pool = self.pool(inst, &v.pool, &Secrets::default()).await?;
        let registry = self.pool(inst, &inst.pool, &Secrets::default()).await?;
        let (node, vid) = (node_id.to_owned(), volume_id.to_owned());
        blocking(move || {
            let img = match pool.pool.open(&v.image) {
                Ok(i) => i,
                Err(e) if is(&e, libc::ENOENT) => return Ok(()),
                Err(e) => return Err(ceph_err(e, "opening")),
            };
            let mine = format!("{META_ATTACH}{}", hash_hex(&node, 32));
            for (k, a) in attachments(&img)? {
                if node.is_empty() || k == mine {
                    img.metadata_remove(&k)
                        .map_err(|e| ceph_err(e, "removing publish record of"))?;
                    let mut vols = node_volumes(&registry.pool, &a.node)?;
                    if vols.contains(&vid) {
                        vols.retain(|x| *x != vid);
                        set_node_volumes(&registry.pool, &a.node, &vols)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }
}

fn node_volumes_oid(node: &str) -> String {
    format!("stowage.node-volumes.{}", hash_hex(node, 40))
}

/// The volume IDs published to a node (for its attach limit).
fn node_volumes(pool: &ffi::Pool, node: &str) -> Result<Vec<String>> {
    match pool
        .read_object(&node_volumes_oid(node))
        .map_err(|e| ceph_err(e, "reading the node's volume list"))?
    {
        None => Ok(Vec::new()),
        Some(b) => Ok(serde_json::from_slice(&b).unwrap_or_default()),
    }
}

fn set_node_volumes(pool: &ffi::Pool, node: &str, vols: &[String]) -> Result<()> {
    let oid = node_volumes_oid(node);
    if vols.is_empty() {
        return pool
            .remove_object(&oid)
            .map_err(|e| ceph_err(e, "updating the node's volume list"));
    }
    pool.write_object(&oid, json(&vols)?.as_bytes())
        .map_err(|e| ceph_err(e, "updating the node's volume list"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_mib() {
        assert_eq!(round_up(1), ALIGN);
        assert_eq!(round_up(ALIGN), ALIGN);
        assert_eq!(round_up(16 << 20), 16 << 20);
        assert_eq!(round_up(ALIGN + 1), 2 * ALIGN);
    }

    #[test]
    fn pages_by_last_id() {
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("i/p/v{i}"), i)).collect();
        let p1 = paginate(&items, None, 2).unwrap();
        assert_eq!(p1.items, vec![0, 1]);
        let p2 = paginate(&items, p1.next_token.as_deref(), 2).unwrap();
        assert_eq!(p2.items, vec![2, 3]);
        assert!(matches!(
            paginate(&items, Some("junk"), 2),
            Err(Error::Aborted(_))
        ));
    }
}
