//! The S3 controller: buckets or prefixes as volumes, through the S3 API.
//!
//! A volume exists when its record does: bucket tags (bucket mode) or the JSON object
//! `.stowage/volumes/<prefix>.json` in the shared bucket (prefix mode). The record is written
//! last on create and removed last on delete, so a controller killed half-way (or an endpoint
//! that goes down half-way) leaves something a retry completes: a bucket without tags is
//! adopted, objects of a half-deleted volume are deleted again.
//!
//! Credentials come from the secrets of each request. CSI gives ListVolumes and
//! ControllerGetVolume none, so the controller remembers (in memory only, never on disk or in
//! a log) the distinct credentials that worked for each instance, and lists and looks up with
//! those: it reports the volumes reachable with credentials it has been given since it started.

mod record;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};

use super::client::{self, Creds, Endpoint, Target, code_of, map_err, status_of};
use super::config::{S3Config, S3Instance};
use super::mounter::{self, Kind};
use super::{
    CTX_BUCKET, CTX_CAPACITY, CTX_ENDPOINT, CTX_MOUNT_OPTIONS, CTX_MOUNTER, CTX_PATH_STYLE,
    CTX_PREFIX, CTX_REGION, DEFAULT_CAPACITY, DRIVER, Location, META_PREFIX, Mode, S3Params,
    TAG_ARCHIVED, bucket_name_for, check_bucket, check_bucket_prefix, hash_hex, on_delete_str,
    prefix_name_for,
};
use crate::controller::{ControllerBackend, ControllerFeatures, Expanded};
use crate::error::{Error, Result};
use crate::locks::KeyLocks;
use crate::params::{self, OnDelete};
use crate::types::{
    AccessType, Capability, CapacityRange, ContentSource, CreateVolume, Page, Secrets, Snapshot,
    SnapshotFilter, Volume,
};
use crate::volume_id::VolumeId;
use record::{Meta, source_of, source_str};

/// How many distinct credentials per instance are remembered for secret-less calls.
const MAX_KNOWN_CREDS: usize = 16;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Inst {
    name: String,
    ep: Endpoint,
    mode: Mode,
    bucket: Option<String>,
    bucket_prefix: String,
    mounter: Kind,
    mount_options: Vec<String>,
    max_volume_bytes: u64,
    /// Cleared the first time the endpoint refuses DeleteObjects.
    batch_delete: AtomicBool,
    /// Credentials that worked, most recent first.
    known: Mutex<Vec<Creds>>,
    clients: Mutex<HashMap<String, Client>>,
}

impl Inst {
    fn client(&self, creds: &Creds) -> Client {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(creds.fingerprint())
            .or_insert_with(|| client::build(&self.ep, creds))
            .clone()
    }

    fn remember(&self, creds: &Creds) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        k.retain(|c| c != creds);
        k.insert(0, creds.clone());
        k.truncate(MAX_KNOWN_CREDS);
    }

    fn known(&self) -> Vec<Creds> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn context(&self, loc: &Location, meta: &Meta) -> BTreeMap<String, String> {
        let mut ctx = BTreeMap::from([
            (CTX_REGION.to_string(), self.ep.region.clone()),
            (CTX_PATH_STYLE.to_string(), self.ep.path_style.to_string()),
            (CTX_BUCKET.to_string(), loc.bucket.clone()),
            (CTX_MOUNTER.to_string(), meta.mounter.clone()),
            (CTX_CAPACITY.to_string(), meta.capacity.to_string()),
        ]);
        if let Some(u) = &self.ep.url {
            ctx.insert(CTX_ENDPOINT.into(), u.clone());
        }
        if let Some(p) = &loc.prefix {
            ctx.insert(CTX_PREFIX.into(), p.clone());
        }
        if !self.mount_options.is_empty() && meta.mounter == self.mounter.as_str() {
            let sep = if self.mounter == Kind::Rclone {
                " "
            } else {
                ","
            };
            ctx.insert(CTX_MOUNT_OPTIONS.into(), self.mount_options.join(sep));
        }
        ctx
    }
}

pub struct S3Controller {
    instances: BTreeMap<String, Inst>,
    locks: KeyLocks,
}

/// Builds the controller; checks the configuration but contacts no endpoint (one that is down
/// at start must not keep the controller from serving the others).
pub fn controller(c: &S3Config) -> Result<S3Controller> {
    let mut instances = BTreeMap::new();
    for (name, cfg) in &c.instances {
        instances.insert(name.clone(), instance(name, cfg)?);
    }
    if instances.is_empty() {
        return Err(Error::invalid(
            "instances",
            "at least one backend instance must be configured",
        ));
    }
    Ok(S3Controller {
        instances,
        locks: KeyLocks::default(),
    })
}

fn instance(name: &str, cfg: &S3Instance) -> Result<Inst> {
    let bad =
        |field: &str, e: Error| Error::invalid("config", format!("instance {name}: {field}: {e}"));
    if let Some(u) = &cfg.endpoint {
        client::check_endpoint_url("endpoint", u).map_err(|e| bad("endpoint", e))?;
    }
    client::check_region("region", &cfg.region).map_err(|e| bad("region", e))?;
    let mode = match &cfg.mode {
        Some(m) => Mode::parse("mode", m).map_err(|e| bad("mode", e))?,
        None => Mode::Bucket,
    };
    if let Some(b) = &cfg.bucket {
        check_bucket("bucket", b).map_err(|e| bad("bucket", e))?;
    }
    if mode == Mode::Prefix && cfg.bucket.is_none() {
        return Err(Error::invalid(
            "config",
            format!("instance {name}: mode prefix needs bucket (the shared bucket)"),
        ));
    }
    check_bucket_prefix("bucketPrefix", &cfg.bucket_prefix).map_err(|e| bad("bucketPrefix", e))?;
    let mounter = match &cfg.mounter {
        Some(m) => Kind::parse("mounter", m).map_err(|e| bad("mounter", e))?,
        None => Kind::S3fs,
    };
    let mount_options =
        mounter::parse_options(mounter, &cfg.mount_options).map_err(|e| bad("mountOptions", e))?;
    Ok(Inst {
        name: name.to_owned(),
        ep: Endpoint {
            url: cfg
                .endpoint
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            region: cfg.region.clone(),
            path_style: cfg.path_style,
            timeout: Duration::from_secs(cfg.timeout_secs.clamp(1, 600)),
        },
        mode,
        bucket: cfg.bucket.clone(),
        bucket_prefix: cfg.bucket_prefix.clone(),
        mounter,
        mount_options,
        max_volume_bytes: cfg.max_volume_bytes,
        batch_delete: AtomicBool::new(true),
        known: Mutex::new(Vec::new()),
        clients: Mutex::new(HashMap::new()),
    })
}

/// The volume's coordinates: instance, location, client.
struct Vol<'a> {
    inst: &'a Inst,
    id: VolumeId,
    loc: Location,
}

impl S3Controller {
    fn choose_instance(&self, parameters: &BTreeMap<String, String>) -> Result<&Inst> {
        let names = || {
            self.instances
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(name) = parameters.get(params::INSTANCE) {
            return self.instances.get(name).ok_or_else(|| {
                Error::invalid(
                    "parameters.instance",
                    format!("{name:?} is not configured (have: {})", names()),
                )
            });
        }
        if self.instances.len() == 1
            && let Some(i) = self.instances.values().next()
        {
            return Ok(i);
        }
        self.instances.get("default").ok_or_else(|| {
            Error::invalid(
                "parameters.instance",
                format!("required: several instances are configured ({})", names()),
            )
        })
    }

    /// Parses an ID; None when it names an instance this controller does not have.
    fn vol(&self, field: &'static str, volume_id: &str) -> Result<Option<Vol<'_>>> {
        let id = VolumeId::parse(field, volume_id)?;
        let Some(inst) = self.instances.get(&id.instance) else {
            return Ok(None);
        };
        let loc = Location::from_id(field, &id)?;
        Ok(Some(Vol { inst, id, loc }))
    }

    /// The client for a mutating call: its own secrets are required.
    fn client_for(&self, inst: &Inst, which: &str, secrets: &Secrets) -> Result<(Client, Creds)> {
        let creds = Creds::from_secrets(which, secrets)?;
        Ok((inst.client(&creds), creds))
    }

    /// Clients for a read-only call: its own secrets when it has some, else every remembered
    /// set of credentials.
    fn read_clients(&self, inst: &Inst, secrets: Option<&Secrets>) -> Result<Vec<Client>> {
        if let Some(s) = secrets.filter(|s| !s.0.is_empty()) {
            let creds = Creds::from_secrets("secret", s)?;
            return Ok(vec![inst.client(&creds)]);
        }
        Ok(inst.known().iter().map(|c| inst.client(c)).collect())
    }

    /// Creates a bucket; Ok when this account already owns it.
    async fn create_bucket(inst: &Inst, c: &Client, bucket: &str) -> Result<()> {
        let mut req = c.create_bucket().bucket(bucket);
        // Only AWS wants a location constraint outside us-east-1; RGW and MinIO compare it
        // with their own zone group names and refuse what they do not know.
        if inst.ep.url.is_none() && inst.ep.region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(inst.ep.region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e) if code_of(&e) == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) if code_of(&e) == Some("BucketAlreadyExists") => {
                Err(Error::AlreadyExists(format!(
                    "bucket {bucket} on {} belongs to another account; choose another bucketPrefix or nameTemplate",
                    inst.ep.display()
                )))
            }
            Err(e) => Err(map_err(format!("CreateBucket {bucket}"), &inst.ep, e)),
        }
    }

    async fn bucket_exists(inst: &Inst, c: &Client, bucket: &str) -> Result<bool> {
        match c.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(map_err(format!("HeadBucket {bucket}"), &inst.ep, e)),
        }
    }

    fn to_volume(inst: &Inst, id: &VolumeId, loc: &Location, meta: &Meta) -> Volume {
        Volume {
            id: id.to_string(),
            capacity_bytes: meta.capacity,
            context: inst.context(loc, meta),
            source: meta.source.as_deref().and_then(source_of),
            topology: Vec::new(),
        }
    }

    /// Where a new volume goes.
    fn place(inst: &Inst, p: &S3Params, req: &CreateVolume) -> Result<(Location, VolumeId)> {
        let base = match &p.name_template {
            Some(t) => {
                let s = params::expand_template(t, &req.parameters)
                    .map_err(|e| Error::invalid("parameters.nameTemplate", e))?;
                if s.is_empty() {
                    return Err(Error::invalid(
                        "parameters.nameTemplate",
                        "expands to nothing",
                    ));
                }
                s
            }
            None => req.name.clone(),
        };
        match p.mode.unwrap_or(inst.mode) {
            Mode::Bucket => {
                let bp = p.bucket_prefix.as_deref().unwrap_or(&inst.bucket_prefix);
                let loc = Location {
                    bucket: bucket_name_for(bp, &base)?,
                    prefix: None,
                };
                let id = loc.to_id(&inst.name)?;
                Ok((loc, id))
            }
            Mode::Prefix => {
                let bucket = p
                    .bucket
                    .clone()
                    .or_else(|| inst.bucket.clone())
                    .ok_or_else(|| {
                        Error::invalid(
                            "parameters.bucket",
                            format!(
                                "prefix mode needs a shared bucket (instance {} has none)",
                                inst.name
                            ),
                        )
                    })?;
                let mut loc = Location {
                    bucket,
                    prefix: Some(prefix_name_for(&base)),
                };
                let id = match loc.to_id(&inst.name) {
                    Ok(id) => id,
                    // Too long for a 128-byte ID: a hashed prefix always fits.
                    Err(_) => {
                        loc.prefix = Some(format!("vol-{}", hash_hex(&base, 24)));
                        loc.to_id(&inst.name)?
                    }
                };
                Ok((loc, id))
            }
        }
    }

    /// Empties a volume's objects; Recycle and delete share it.
    async fn empty(inst: &Inst, c: &Client, loc: &Location) -> Result<u64> {
        let prefix = loc.key_prefix();
        Target {
            client: c,
            ep: &inst.ep,
            bucket: &loc.bucket,
            prefix: &prefix,
        }
        .delete_all(&inst.batch_delete, None)
        .await
    }

    async fn delete_bucket(inst: &Inst, c: &Client, bucket: &str) -> Result<()> {
        let loc = Location {
            bucket: bucket.to_owned(),
            prefix: None,
        };
        // A node still writing can refill the bucket between emptying and deleting it; a few
        // rounds settle that, a writer that never stops gets the error.
        for round in 0..3 {
            Self::empty(inst, c, &loc).await?;
            match c.delete_bucket().bucket(bucket).send().await {
                Ok(_) => return Ok(()),
                Err(e) if code_of(&e) == Some("NoSuchBucket") => return Ok(()),
                Err(e) if code_of(&e) == Some("BucketNotEmpty") && round < 2 => continue,
                Err(e) => return Err(map_err(format!("DeleteBucket {bucket}"), &inst.ep, e)),
            }
        }
        Ok(())
    }

    /// Every volume reachable with one client.
    async fn volumes_with(inst: &Inst, c: &Client) -> Result<Vec<(String, Volume)>> {
        let mut out = Vec::new();
        let buckets = c
            .list_buckets()
            .send()
            .await
            .map_err(|e| map_err("ListBuckets", &inst.ep, e))?;
        for b in buckets.buckets() {
            let Some(name) = b.name() else { continue };
            if check_bucket("bucket", name).is_err() {
                continue;
            }
            // A bucket deleted between ListBuckets and its listing (another volume or
            // snapshot going away meanwhile) holds nothing to report.
            let res: Result<()> = async {
                let loc = Location {
                    bucket: name.to_owned(),
                    prefix: None,
                };
                if let Some(meta) = Self::read_meta(inst, c, &loc).await? {
                    let id = loc.to_id(&inst.name)?;
                    out.push((id.to_string(), Self::to_volume(inst, &id, &loc, &meta)));
                    return Ok(());
                }
                let mut token: Option<String> = None;
                loop {
                    let page = c
                        .list_objects_v2()
                        .bucket(name)
                        .prefix(META_PREFIX)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| {
                            map_err(
                                format!("ListObjectsV2 s3://{name}/{META_PREFIX}"),
                                &inst.ep,
                                e,
                            )
                        })?;
                    for o in page.contents() {
                        let Some(p) = o
                            .key()
                            .and_then(|k| k.strip_prefix(META_PREFIX))
                            .and_then(|k| k.strip_suffix(".json"))
                        else {
                            continue;
                        };
                        let loc = Location {
                            bucket: name.to_owned(),
                            prefix: Some(p.to_owned()),
                        };
                        let Ok(id) = loc.to_id(&inst.name) else {
                            continue;
                        };
                        if let Some(meta) = Self::read_meta(inst, c, &loc).await? {
                            out.push((id.to_string(), Self::to_volume(inst, &id, &loc, &meta)));
                        }
                    }
                    token = page.next_continuation_token().map(str::to_owned);
                    if page.is_truncated() != Some(true) || token.is_none() {
                        break;
                    }
                }
                Ok(())
            }
            .await;
            match res {
                Err(Error::NotFound { .. }) => {}
                other => other?,
            }
        }
        Ok(out)
    }
}

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
    Ok(Page {
        items: items[begin..end].iter().map(|(_, v)| v.clone()).collect(),
        next_token: (end < items.len()).then(|| items[end - 1].0.clone()),
    })
}

#[async_trait]
impl ControllerBackend for S3Controller {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> ControllerFeatures {
        ControllerFeatures {
            // Both are server-side copies of every object (snapshot.rs).
            snapshots: true,
            clone: true,
            // Only the record changes: S3 has no quota to grow.
            expand: true,
            publish: false,
            capacity: false,
            single_node_multi_writer: true,
            modify: true,
        }
    }

    fn check_capabilities(&self, caps: &[Capability]) -> Result<()> {
        for c in caps {
            if let AccessType::Block = c.access_type {
                return Err(Error::invalid(
                    "volume_capabilities",
                    "S3 volumes are FUSE filesystems: raw block access is not supported",
                ));
            }
            let fs = c.fs_type();
            if !fs.is_empty() && !fs.starts_with("fuse") && fs != "s3" {
                return Err(Error::invalid(
                    "volume_capabilities",
                    format!("fs_type {fs:?}: S3 volumes are FUSE mounts; leave fs_type empty"),
                ));
            }
        }
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        let p = S3Params::parse(&req.parameters)?;
        self.check_capabilities(&req.capabilities)?;
        params::check_mutable(&req.mutable_parameters)?;
        let inst = self.choose_instance(&req.parameters)?;
        let source_volume = match &req.source {
            Some(ContentSource::Volume(src)) => {
                let v = self
                    .vol("volume_content_source.volume.volume_id", src)
                    .map_err(|_| Error::not_found("source volume", src))?
                    .ok_or_else(|| Error::not_found("source volume", src))?;
                if v.inst.name != inst.name {
                    return Err(Error::invalid(
                        "volume_content_source",
                        "the source volume is on another backend instance",
                    ));
                }
                Some(v.loc)
            }
            _ => None,
        };
        let capacity = req.capacity.choose(DEFAULT_CAPACITY);
        if inst.max_volume_bytes > 0 && capacity > inst.max_volume_bytes {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {capacity} bytes is more than instance {}'s limit of {}",
                inst.name, inst.max_volume_bytes
            )));
        }
        let on_delete = match req.mutable_parameters.get(params::ON_DELETE) {
            Some(v) => OnDelete::parse(v)?,
            None => p.on_delete,
        };
        let (loc, id) = Self::place(inst, &p, req)?;
        let (c, creds) = self.client_for(inst, "provisioner secret", &req.secrets)?;
        let _g = self.locks.lock(&id.to_string()).await;
        let name_hash = hash_hex(&req.name, 32);
        // The objects to copy in: (bucket, key prefix) of the source volume or snapshot.
        let copy_from: Option<(String, String)> = match (&req.source, source_volume) {
            (None, _) => None,
            (Some(ContentSource::Volume(src)), Some(sloc)) => {
                let smeta = Self::read_meta(inst, &c, &sloc)
                    .await?
                    .ok_or_else(|| Error::not_found("source volume", src))?;
                if capacity < smeta.capacity {
                    return Err(Error::OutOfRange(format!(
                        "capacity_range: {capacity} bytes is smaller than the source volume's {}",
                        smeta.capacity
                    )));
                }
                let kp = sloc.key_prefix();
                Some((sloc.bucket, kp))
            }
            (Some(ContentSource::Snapshot(sid)), _) => {
                let (sloc, smeta) = self.restore_source(inst, &c, sid).await?;
                if capacity < smeta.size {
                    return Err(Error::OutOfRange(format!(
                        "capacity_range: {capacity} bytes is smaller than the snapshot's {}",
                        smeta.size
                    )));
                }
                let dp = sloc.data_prefix();
                Some((sloc.bucket, dp))
            }
            (Some(ContentSource::Volume(src)), None) => {
                return Err(Error::not_found("source volume", src));
            }
        };
        let source = req.source.as_ref().map(source_str);
        if let Some(m) = Self::read_meta(inst, &c, &loc).await? {
            inst.remember(&creds);
            if m.name_hash != name_hash {
                return Err(Error::AlreadyExists(format!(
                    "{loc} already holds the volume of another CreateVolume name"
                )));
            }
            if m.source != source {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists with another content source",
                    req.name
                )));
            }
            if !req.capacity.admits(m.capacity) {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists with capacity {} bytes, which the request does not admit",
                    req.name, m.capacity
                )));
            }
            return Ok(Self::to_volume(inst, &id, &loc, &m));
        }
        let meta = Meta {
            name_hash,
            capacity,
            on_delete: on_delete_str(on_delete).into(),
            mounter: p.mounter.unwrap_or(inst.mounter).as_str().into(),
            created: now_secs(),
            source,
        };
        match &loc.prefix {
            None => {
                if let Some(tags) = Self::bucket_tags(inst, &c, &loc.bucket).await? {
                    if tags.iter().any(|(k, _)| k == TAG_ARCHIVED) {
                        return Err(Error::AlreadyExists(format!(
                            "bucket {} holds an archived volume; delete it or choose another name",
                            loc.bucket
                        )));
                    }
                    // A bucket without a record: left by onDelete=retain, by an admin, or by
                    // an earlier attempt cut short. Adopting it is what a returning claim wants.
                    tracing::info!(volume_id = %id, "adopting existing bucket");
                } else {
                    Self::create_bucket(inst, &c, &loc.bucket).await?;
                }
            }
            Some(prefix) => {
                if !Self::bucket_exists(inst, &c, &loc.bucket).await? {
                    Self::create_bucket(inst, &c, &loc.bucket).await?;
                }
                // The "directory" object: mounters that list before they mount find the prefix.
                let key = format!("{prefix}/");
                c.put_object()
                    .bucket(&loc.bucket)
                    .key(&key)
                    .body(ByteStream::from_static(b""))
                    .send()
                    .await
                    .map_err(|e| {
                        map_err(format!("creating s3://{}/{key}", loc.bucket), &inst.ep, e)
                    })?;
            }
        }
        if let Some((sbucket, sprefix)) = &copy_from {
            // Before the record: a clone or restore cut short is finished (copied again) by
            // the retry. Server-side copies: no data passes through the controller.
            let n = Target {
                client: &c,
                ep: &inst.ep,
                bucket: sbucket,
                prefix: sprefix,
            }
            .copy_all(&loc.bucket, &loc.key_prefix())
            .await?;
            tracing::info!(volume_id = %id, source = ?req.source, objects = n, "volume filled from its source");
        }
        Self::write_meta(inst, &c, &loc, &meta).await?;
        inst.remember(&creds);
        tracing::info!(volume_id = %id, location = %loc, capacity, "S3 volume created");
        Ok(Self::to_volume(inst, &id, &loc, &meta))
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let Some(v) = self.vol("volume_id", volume_id)? else {
            return Ok(());
        };
        let inst = v.inst;
        let (c, creds) = self.client_for(inst, "provisioner secret", secrets)?;
        let _g = self.locks.lock(&v.id.to_string()).await;
        let Some(meta) = Self::read_meta(inst, &c, &v.loc).await? else {
            // Never ours, already gone, or retained: leave whatever is there alone.
            inst.remember(&creds);
            return Ok(());
        };
        let loc = &v.loc;
        match (meta.on_delete(), &loc.prefix) {
            (OnDelete::Retain, _) => Self::remove_meta(inst, &c, loc).await?,
            (OnDelete::Delete, None) => Self::delete_bucket(inst, &c, &loc.bucket).await?,
            (OnDelete::Delete, Some(_)) => {
                Self::empty(inst, &c, loc).await?;
                Self::remove_meta(inst, &c, loc).await?;
            }
            (OnDelete::Archive, None) => {
                // Buckets cannot be renamed: the archived bucket keeps its name and data and
                // is marked, so that it is never adopted as a new volume.
                Self::put_tags(
                    inst,
                    &c,
                    &loc.bucket,
                    vec![(TAG_ARCHIVED.into(), now_secs().to_string())],
                )
                .await?;
            }
            (OnDelete::Archive, Some(prefix)) => {
                let src = loc.key_prefix();
                let dest = format!("archived-{prefix}-{}/", now_secs());
                let t = Target {
                    client: &c,
                    ep: &inst.ep,
                    bucket: &loc.bucket,
                    prefix: &src,
                };
                let n = t.copy_all(&loc.bucket, &dest).await?;
                t.delete_all(&inst.batch_delete, None).await?;
                Self::remove_meta(inst, &c, loc).await?;
                tracing::info!(volume_id = %v.id, objects = n, archive = %dest, "volume archived");
            }
        }
        inst.remember(&creds);
        tracing::info!(volume_id = %v.id, on_delete = %meta.on_delete, "S3 volume deleted");
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Volume> {
        let Some(v) = self.vol("volume_id", volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let clients = self.read_clients(v.inst, None)?;
        if clients.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "cannot look up {volume_id}: this call carries no secrets and no credentials for instance {} have been received since the controller started",
                v.inst.name
            )));
        }
        for c in &clients {
            match Self::read_meta(v.inst, c, &v.loc).await {
                Ok(Some(m)) => return Ok(Self::to_volume(v.inst, &v.id, &v.loc, &m)),
                Ok(None) => {}
                // Other tenants' credentials may not see this bucket.
                Err(Error::FailedPrecondition(_)) | Err(Error::InvalidArgument { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::not_found("volume", volume_id))
    }

    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let mut all: BTreeMap<String, Volume> = BTreeMap::new();
        for inst in self.instances.values() {
            let clients = self.read_clients(inst, None)?;
            if clients.is_empty() {
                tracing::debug!(instance = %inst.name, "ListVolumes: no credentials received yet for this instance");
            }
            for c in &clients {
                match Self::volumes_with(inst, c).await {
                    Ok(vs) => all.extend(vs),
                    // Credentials revoked since: the others may still list.
                    Err(Error::InvalidArgument { .. }) | Err(Error::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let items: Vec<(String, Volume)> = all.into_iter().collect();
        paginate(&items, start, max)
    }

    async fn capacity(&self, _parameters: &BTreeMap<String, String>) -> Result<u64> {
        Err(Error::Unsupported(
            "GetCapacity (S3 has no capacity to report)".into(),
        ))
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let v = self
            .vol("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let (c, creds) = self.client_for(v.inst, "controller-expand secret", secrets)?;
        let _g = self.locks.lock(&v.id.to_string()).await;
        let mut meta = Self::read_meta(v.inst, &c, &v.loc)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let want = range.choose(meta.capacity);
        if v.inst.max_volume_bytes > 0 && want > v.inst.max_volume_bytes {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {want} bytes is more than the limit of {}",
                v.inst.max_volume_bytes
            )));
        }
        if want > meta.capacity {
            meta.capacity = want;
            Self::write_meta(v.inst, &c, &v.loc, &meta).await?;
        }
        v.inst.remember(&creds);
        Ok(Expanded {
            capacity_bytes: meta.capacity,
            node_expansion_required: false,
        })
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        self.snapshot_create(name, source_volume_id, parameters, secrets)
            .await
    }

    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        self.snapshot_delete(snapshot_id, secrets).await
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        self.snapshot_list(filter, start, max).await
    }

    fn check_mutable_parameters(&self, mutable: &BTreeMap<String, String>) -> Result<()> {
        params::check_mutable(mutable)
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        params::check_mutable(mutable)?;
        let v = self
            .vol("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let (c, creds) = self.client_for(v.inst, "controller-modify secret", secrets)?;
        let _g = self.locks.lock(&v.id.to_string()).await;
        let mut meta = Self::read_meta(v.inst, &c, &v.loc)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        if let Some(o) = mutable.get(params::ON_DELETE) {
            meta.on_delete = on_delete_str(OnDelete::parse(o)?).into();
            Self::write_meta(v.inst, &c, &v.loc, &meta).await?;
        }
        v.inst.remember(&creds);
        Ok(())
    }

    async fn recycle_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let v = self
            .vol("volume_id", volume_id)?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let (c, creds) = self.client_for(v.inst, "provisioner secret", secrets)?;
        let _g = self.locks.lock(&v.id.to_string()).await;
        Self::read_meta(v.inst, &c, &v.loc)
            .await?
            .ok_or_else(|| Error::not_found("volume", volume_id))?;
        let n = Self::empty(v.inst, &c, &v.loc).await?;
        if let Some(prefix) = &v.loc.prefix {
            let key = format!("{prefix}/");
            c.put_object()
                .bucket(&v.loc.bucket)
                .key(&key)
                .body(ByteStream::from_static(b""))
                .send()
                .await
                .map_err(|e| {
                    map_err(
                        format!("creating s3://{}/{key}", v.loc.bucket),
                        &v.inst.ep,
                        e,
                    )
                })?;
        }
        v.inst.remember(&creds);
        tracing::info!(volume_id = %v.id, objects = n, "S3 volume recycled");
        Ok(())
    }
}

impl std::fmt::Debug for S3Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Controller")
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let parse = |y: &str| {
            crate::Config::parse(y).and_then(|c| match c {
                crate::Config::S3(s) => controller(&s).map(|_| ()),
                _ => Err(Error::Internal("not s3".into())),
            })
        };
        parse("backend: s3\ninstances:\n  rgw:\n    endpoint: http://127.0.0.1:7480\n    pathStyle: true\n").unwrap();
        for bad in [
            "backend: s3\ninstances:\n  a:\n    endpoint: ftp://x\n",
            "backend: s3\ninstances:\n  a:\n    mode: prefix\n",
            "backend: s3\ninstances:\n  a:\n    bucket: Bad_Bucket\n",
            "backend: s3\ninstances:\n  a:\n    mounter: goofys\n",
            "backend: s3\ninstances:\n  a:\n    mountOptions: [passwd_file=/x]\n",
            "backend: s3\ninstances:\n  a:\n    accessKey: x\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages() {
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("i/v{i}"), i)).collect();
        let p = paginate(&items, None, 2).unwrap();
        assert_eq!(p.items, vec![0, 1]);
        let p = paginate(&items, p.next_token.as_deref(), 0).unwrap();
        assert_eq!(p.items, vec![2, 3, 4]);
        assert!(matches!(
            paginate(&items, Some("garbage"), 2),
            Err(Error::Aborted(_))
        ));
    }
}
