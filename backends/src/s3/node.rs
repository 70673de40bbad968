//! The S3 node: FUSE mounts that outlive the plugin and heal when their mounter dies.
//!
//! Staging writes a record (`<nodeStateDir>/<hash of staging path>/record.json`, the credential
//! files beside it, all mode 0600 in a 0700 directory) marked `starting`, then starts the
//! mounter (see [`super::mounter`]) at the staging path and, once the mount is live, records
//! its pid and clears the mark. The record comes first because the mounter outlives the
//! plugin: a plugin killed in between must find a record of the mount it left, or no retry
//! could tell that mount from somebody else's. A `starting` record is settled under the
//! staging path's lock, by the start-up pass, a retried NodeStageVolume or NodeUnstageVolume:
//! the mount is adopted when it is live and its mounter is this record's (found by its exact
//! command line, see [`mounter::find`]), otherwise the mounter is stopped, the mount detached
//! and the record dropped.
//!
//! The record says what was mounted, how, and where it is published. With it the node can
//! remount without the CO's help:
//! - when the plugin starts, every recorded mount whose mounter is gone (ENOTCONN) is remounted
//!   and its publish targets are bound again;
//! - NodePublishVolume and NodeGetVolumeStats check the mount first and heal it the same way.
//!
//! Stats: S3 has no quota, so usage is the sum of object sizes under the volume (listed with
//! the node-stage credentials, cached briefly), capacity is the recorded size, and a volume
//! grown past its size is reported abnormal.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::client::{self, Creds, Endpoint, Target, code_of, map_err};
use super::config::S3Config;
use super::mounter::{self, CREDENTIALS_FILE, Kind, MountSpec, PASSWD_FILE};
use super::{
    CTX_BUCKET, CTX_CAPACITY, CTX_ENDPOINT, CTX_MOUNT_OPTIONS, CTX_MOUNTER, CTX_PATH_STYLE,
    CTX_PREFIX, CTX_REGION, DRIVER, Location, TAG_CAPACITY,
};
use crate::command::MOUNT_TIMEOUT;
use crate::error::{Error, Result};
use crate::locks::KeyLocks;
use crate::metrics::{self, FuseLabels};
use crate::mount::{self, Probe};
use crate::node::{NodeBackend, NodeFeatures, PublishRequest, StageRequest};
use crate::types::{Usage, VolumeStats};
use crate::volume_id::VolumeId;

const FUSE_S3: FuseLabels = FuseLabels { backend: "s3" };

const RECORD: &str = "record.json";
/// Usage listings are reused this long (kubelet asks every minute; bursts should not list
/// a large bucket several times).
const STATS_TTL: Duration = Duration::from_secs(10);
/// Bound on each S3 call the node makes itself (pre-mount check, usage).
const NODE_S3_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishedTarget {
    readonly: bool,
    #[serde(default)]
    flags: Vec<String>,
}

/// What the node remembers about one staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    volume_id: String,
    staging_path: PathBuf,
    spec: MountSpec,
    /// Recorded size from the volume context (fallback when the record on S3 is unreadable).
    capacity: u64,
    pid: u32,
    /// Written before the mounter starts, cleared once it is live: a record still starting
    /// belongs to a NodeStageVolume that never answered (the plugin died in it). Absent in
    /// records of older plugins, which wrote them only after the mount.
    #[serde(default)]
    starting: bool,
    #[serde(default)]
    targets: BTreeMap<PathBuf, PublishedTarget>,
}

impl Record {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            url: self.spec.endpoint.clone(),
            region: self.spec.region.clone(),
            path_style: self.spec.path_style,
            timeout: NODE_S3_TIMEOUT,
        }
    }

    fn location(&self) -> Location {
        Location {
            bucket: self.spec.bucket.clone(),
            prefix: self.spec.prefix.clone(),
        }
    }
}

struct Inner {
    state_dir: PathBuf,
    /// Per staging path: stage, publish, heal and stats of one mount never interleave.
    locks: KeyLocks,
    stats: Mutex<HashMap<String, (Instant, u64, u64, u64)>>,
}

/// Node side of `s3.stowage.io`.
#[derive(Clone)]
pub struct S3Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Node")
            .field("state_dir", &self.inner.state_dir)
            .finish()
    }
}

impl S3Node {
    /// Builds the node backend and, inside a Tokio runtime, starts healing the mounts a
    /// previous run of the plugin left.
    pub fn new(c: &S3Config) -> Self {
        let node = S3Node {
            inner: Arc::new(Inner {
                state_dir: c.node_state_dir.clone(),
                locks: KeyLocks::default(),
                stats: Mutex::new(HashMap::new()),
            }),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let n = node.clone();
            rt.spawn(async move {
                n.heal_all().await;
            });
        }
        node
    }

    /// Remounts every recorded mount that is dead or gone; called at start.
    pub async fn heal_all(&self) {
        let records = match self.inner.records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the S3 mount records");
                return;
            }
        };
        for rec in records {
            let _g = self
                .inner
                .locks
                .lock(&rec.staging_path.to_string_lossy())
                .await;
            // Re-read under the lock: a request may have changed it meanwhile.
            let dir = self.inner.dir_of(&rec.staging_path);
            let Ok(Some(rec)) = read_record(&dir).await else {
                continue;
            };
            if rec.starting {
                // No NodeStageVolume of this process runs here (it would hold the lock and
                // finish its record before letting go): this is one a dead plugin left.
                if let Err(e) = self.inner.settle_unfinished(rec, None).await {
                    tracing::warn!(error = %e, "could not settle an unfinished S3 staging at start");
                }
                continue;
            }
            // Only a path that is really gone is forgotten. A dead FUSE mount answers stat
            // with ENOTCONN (or, cached a moment, with old attributes): that is the mount to
            // heal, and forgetting its record would leave it dead for good (every mount of a
            // node pod dies with its container, so this is the usual case after a restart).
            if let Err(e) = tokio::fs::symlink_metadata(&rec.staging_path).await
                && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
            {
                tracing::info!(volume_id = %rec.volume_id, "staging path is gone; forgetting the mount");
                let _ = tokio::fs::remove_dir_all(&dir).await;
                continue;
            }
            match self.inner.ensure_live(rec).await {
                Ok(true) => {}
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not heal an S3 mount at start"),
            }
        }
        self.inner.count_running().await;
    }
}

async fn read_record(dir: &Path) -> Result<Option<Record>> {
    match tokio::fs::read(dir.join(RECORD)).await {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Internal(format!("corrupt mount record {}: {e}", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", dir.display()), e)),
    }
}

/// Writes a file readable by root only, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))
}

fn read_creds(dir: &Path) -> Result<Creds> {
    let text = std::fs::read_to_string(dir.join(CREDENTIALS_FILE))
        .map_err(|e| Error::io(format!("reading credentials in {}", dir.display()), e))?;
    let get = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(a, _)| a.trim() == k)
            .map(|(_, b)| b.trim().to_owned())
    };
    Ok(Creds {
        access_key: get("aws_access_key_id").unwrap_or_default(),
        secret_key: get("aws_secret_access_key").unwrap_or_default(),
        session_token: get("aws_session_token"),
    })
}

impl Inner {
    fn dir_of(&self, staging: &Path) -> PathBuf {
        mounter::record_dir(&self.state_dir, staging)
    }

    async fn records(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut rd = match tokio::fs::read_dir(&self.state_dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(Error::io(
                    format!("reading {}", self.state_dir.display()),
                    e,
                ));
            }
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            match read_record(&e.path()).await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "skipping an unreadable mount record"),
            }
        }
        Ok(out)
    }

    /// Sets `stowage_fuse_mounts_running{backend="s3"}` to the mounts on record (one record per
    /// staged volume, alive or being healed), so the gauge is right after a plugin restart too.
    async fn count_running(&self) {
        if let Ok(r) = self.records().await {
            metrics::get()
                .fuse_running
                .get_or_create(&FUSE_S3)
                .set(r.iter().filter(|r| !r.starting).count() as i64);
        }
    }

    async fn save(&self, rec: &Record) -> Result<()> {
        let dir = self.dir_of(&rec.staging_path);
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(move || write_private(&dir.join(RECORD), &bytes))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    async fn prepare_dir(&self, staging: &Path, creds: &Creds) -> Result<PathBuf> {
        let dir = self.dir_of(staging);
        let state = self.state_dir.clone();
        let creds = creds.clone();
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            for p in [&state, &d] {
                std::fs::create_dir_all(p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io(format!("chmod {}", p.display()), e))?;
            }
            write_private(
                &d.join(PASSWD_FILE),
                format!("{}:{}\n", creds.access_key, creds.secret_key).as_bytes(),
            )?;
            let mut ini = format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                creds.access_key, creds.secret_key
            );
            if let Some(t) = &creds.session_token {
                ini.push_str(&format!("aws_session_token = {t}\n"));
            }
            write_private(&d.join(CREDENTIALS_FILE), ini.as_bytes())?;
            write_private(&d.join("rclone.conf"), b"")?;
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(dir)
    }

    /// Starts the mounter for a record (its files already in place) and saves the new pid.
    async fn mount(&self, rec: &mut Record) -> Result<()> {
        let dir = self.dir_of(&rec.staging_path);
        mount::ensure_dir(&rec.staging_path).await?;
        let pid = metrics::timed(
            "s3",
            "mounter_start",
            mounter::start(&rec.spec, &rec.staging_path, &dir, MOUNT_TIMEOUT),
        )
        .await?;
        rec.pid = pid;
        rec.starting = false;
        self.save(rec).await
    }

    /// The pid of a record's running mounter: the recorded one if it still is, else one found
    /// by its command line (a record still starting has none; a plugin killed while healing
    /// leaves the old one).
    fn mounter_pid(&self, rec: &Record) -> Option<u32> {
        if mounter::is_mounter_of(rec.pid, &rec.staging_path) {
            return Some(rec.pid);
        }
        mounter::find(
            &rec.spec,
            &rec.staging_path,
            &self.dir_of(&rec.staging_path),
        )
    }

    /// Settles a record left `starting` by a NodeStageVolume that never answered. Adopts the
    /// mount (and returns the now finished record) when it is live, its mounter is this
    /// record's and, if `want` is given, the record's settings are the requested ones.
    /// Otherwise stops that mounter, detaches what it mounted and removes the record and its
    /// files (`Ok(None)`: the caller may mount afresh). A live mount there without this
    /// record's mounter is somebody else's: refused, left alone. The caller holds the lock.
    async fn settle_unfinished(
        &self,
        mut rec: Record,
        want: Option<&MountSpec>,
    ) -> Result<Option<Record>> {
        let staging = rec.staging_path.clone();
        let pid = self.mounter_pid(&rec);
        if let Some(pid) = pid
            && want.is_none_or(|w| *w == rec.spec)
            && Self::staged_alive(&rec).await?
        {
            // The same readiness test as `mounter::start`: still running a moment after its
            // first answer (s3fs with a rejected key mounts, then exits).
            tokio::time::sleep(Duration::from_millis(20)).await;
            if mounter::is_mounter_of(pid, &staging) && Self::staged_alive(&rec).await? {
                rec.pid = pid;
                rec.starting = false;
                self.save(&rec).await?;
                tracing::info!(volume_id = %rec.volume_id, staging = %staging.display(), pid, "adopted the S3 mount of an unfinished NodeStageVolume");
                return Ok(Some(rec));
            }
        }
        if let Some(pid) = pid {
            // Stopped before the unmount: a mounter still starting could mount after it.
            mounter::stop(pid, &staging).await;
        }
        if let Some(m) = mount::mounted_at(&staging).await? {
            let ours_dead = m.fs_type == format!("fuse.{}", rec.spec.kind.as_str())
                && !matches!(mounter::probe_live(&staging).await, Probe::Alive);
            if pid.is_none() && !ours_dead {
                return Err(Error::FailedPrecondition(format!(
                    "{} already has a {} mount that is not this volume's",
                    staging.display(),
                    m.fs_type
                )));
            }
            detach(&staging).await?;
        }
        let dir = self.dir_of(&staging);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
        }
        tracing::info!(volume_id = %rec.volume_id, staging = %staging.display(), "undid an unfinished NodeStageVolume");
        Ok(None)
    }

    /// Whether the staged FUSE mount is there and answering.
    async fn staged_alive(rec: &Record) -> Result<bool> {
        let Some(m) = mount::mounted_at(&rec.staging_path).await? else {
            return Ok(false);
        };
        if !m.fs_type.starts_with("fuse") {
            return Ok(false);
        }
        Ok(matches!(
            mounter::probe_live(&rec.staging_path).await,
            Probe::Alive
        ))
    }

    /// Heals the mount when it is dead: unmounts the dead staging mount and every publish
    /// bind on top of it, starts the mounter again, binds the targets again. Returns whether
    /// anything had to be done. The caller holds the staging path's lock.
    async fn ensure_live(&self, mut rec: Record) -> Result<bool> {
        let alive = Self::staged_alive(&rec).await?;
        let mut dead_targets = Vec::new();
        for t in rec.targets.keys() {
            let bound = mount::mounted_at(t).await?.is_some();
            if !alive || !bound || !matches!(mounter::probe_live(t).await, Probe::Alive) {
                dead_targets.push(t.clone());
            }
        }
        if alive && dead_targets.is_empty() {
            return Ok(false);
        }
        if !alive {
            tracing::warn!(volume_id = %rec.volume_id, staging = %rec.staging_path.display(), "S3 mount is dead (mounter gone); remounting");
            for t in rec.targets.keys() {
                detach(t).await?;
            }
            detach(&rec.staging_path).await?;
            mounter::stop(rec.pid, &rec.staging_path).await;
            self.mount(&mut rec).await?;
            metrics::get().fuse_healed.get_or_create(&FUSE_S3).inc();
        }
        for t in &dead_targets {
            if let Some(pt) = rec.targets.get(t) {
                detach(t).await?;
                mount::ensure_dir(t).await?;
                mount::bind(&rec.staging_path, t, pt.readonly, &pt.flags).await?;
                tracing::info!(volume_id = %rec.volume_id, target = %t.display(), "publish target bound again");
            }
        }
        Ok(true)
    }

    fn record_for_path<'a>(
        records: &'a [Record],
        volume_id: &str,
        path: &Path,
    ) -> Option<&'a Record> {
        records
            .iter()
            .filter(|r| r.volume_id == volume_id)
            .find(|r| r.staging_path == path || r.targets.contains_key(path))
            .or_else(|| records.iter().find(|r| r.volume_id == volume_id))
    }

    /// Usage (bytes, objects) and capacity of a volume, from S3, cached for [`STATS_TTL`].
    async fn usage(&self, rec: &Record) -> Result<(u64, u64, u64)> {
        let key = rec.volume_id.clone();
        if let Some((at, b, o, c)) = self
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            && at.elapsed() < STATS_TTL
        {
            return Ok((b, o, c));
        }
        let dir = self.dir_of(&rec.staging_path);
        let creds = read_creds(&dir)?;
        let ep = rec.endpoint();
        let c = client::build(&ep, &creds);
        let loc = rec.location();
        let prefix = loc.key_prefix();
        let (bytes, objects) = Target {
            client: &c,
            ep: &ep,
            bucket: &loc.bucket,
            prefix: &prefix,
        }
        .usage()
        .await?;
        let capacity = self
            .recorded_capacity(&c, &ep, &loc)
            .await
            .unwrap_or(rec.capacity);
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), bytes, objects, capacity));
        Ok((bytes, objects, capacity))
    }

    /// The capacity recorded by the controller (it changes on expansion, the context does not).
    async fn recorded_capacity(
        &self,
        c: &aws_sdk_s3::Client,
        ep: &Endpoint,
        loc: &Location,
    ) -> Option<u64> {
        match loc.meta_key() {
            None => {
                let out = c
                    .get_bucket_tagging()
                    .bucket(&loc.bucket)
                    .send()
                    .await
                    .ok()?;
                out.tag_set()
                    .iter()
                    .find(|t| t.key() == TAG_CAPACITY)
                    .and_then(|t| t.value().parse().ok())
            }
            Some(key) => {
                let out = c.get_object().bucket(&loc.bucket).key(&key).send().await;
                let out = match out {
                    Ok(o) => o,
                    Err(e) => {
                        if code_of(&e) != Some("NoSuchKey") {
                            tracing::debug!(error = %map_err("reading the volume record", ep, e), "capacity from context");
                        }
                        return None;
                    }
                };
                let bytes = out.body.collect().await.ok()?.into_bytes();
                let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                v.get("capacity")?.as_u64()
            }
        }
    }
}

/// Detaches every mount at `p` lazily: a dead FUSE mount (and binds of it) cannot be
/// unmounted the normal way, and the kernel may still answer stats of it from its cache, so
/// the usual "is it dead?" test of `mount::unmount` cannot be relied on here.
async fn detach(p: &Path) -> Result<()> {
    for _ in 0..8 {
        if mount::mounted_at(p).await?.is_none() {
            return Ok(());
        }
        let out = crate::command::run_status("umount", &["-l", mount::path_str(p)?], MOUNT_TIMEOUT)
            .await?;
        if out.status != 0 && mount::mounted_at(p).await?.is_some() {
            return Err(Error::Internal(format!(
                "umount -l {} failed: {}",
                p.display(),
                out.stderr.trim()
            )));
        }
    }
    Ok(())
}

/// Reads the mount description from the volume context (what the controller put there, or a
/// static PV's volumeAttributes); the ID says which bucket and prefix.
fn spec_from(req: &StageRequest) -> Result<(MountSpec, u64)> {
    const F: &str = "volume_context";
    let id = VolumeId::parse("volume_id", &req.volume_id)?;
    let loc = Location::from_id("volume_id", &id)?;
    let ctx = &req.context;
    if let Some(b) = ctx.get(CTX_BUCKET).filter(|b| !b.is_empty())
        && *b != loc.bucket
    {
        return Err(Error::invalid(
            F,
            format!("bucket {b:?} does not match the volume ID"),
        ));
    }
    if let Some(p) = ctx.get(CTX_PREFIX).filter(|p| !p.is_empty())
        && Some(p) != loc.prefix.as_ref()
    {
        return Err(Error::invalid(
            F,
            format!("prefix {p:?} does not match the volume ID"),
        ));
    }
    let endpoint = ctx.get(CTX_ENDPOINT).filter(|e| !e.is_empty()).cloned();
    if let Some(u) = &endpoint {
        client::check_endpoint_url("volume_context.endpoint", u)?;
    }
    let region = ctx
        .get(CTX_REGION)
        .filter(|r| !r.is_empty())
        .cloned()
        .unwrap_or_else(|| "us-east-1".into());
    client::check_region("volume_context.region", &region)?;
    let path_style = match ctx.get(CTX_PATH_STYLE).map(String::as_str) {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::invalid(
                "volume_context.pathStyle",
                format!("{other:?}: expected true or false"),
            ));
        }
    };
    let kind = match ctx.get(CTX_MOUNTER).filter(|m| !m.is_empty()) {
        Some(m) => Kind::parse("volume_context.mounter", m)?,
        None => Kind::S3fs,
    };
    let flags = req.capability.mount_flags();
    let options = if !flags.is_empty() {
        mounter::parse_options(kind, flags)?
    } else {
        match ctx.get(CTX_MOUNT_OPTIONS).filter(|o| !o.is_empty()) {
            Some(o) => mounter::parse_options(kind, std::slice::from_ref(o))?,
            None => Vec::new(),
        }
    };
    let capacity = match ctx.get(CTX_CAPACITY) {
        None => 0,
        Some(c) => c.parse().map_err(|_| {
            Error::invalid(
                "volume_context.capacityBytes",
                format!("{c:?} is not a number"),
            )
        })?,
    };
    Ok((
        MountSpec {
            kind,
            endpoint,
            region,
            path_style,
            bucket: loc.bucket,
            prefix: loc.prefix,
            readonly: req.capability.access_mode.is_read_only(),
            options,
        },
        capacity,
    ))
}

#[async_trait]
impl NodeBackend for S3Node {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> NodeFeatures {
        NodeFeatures {
            // Nothing to grow on the node (the size is a record on the gateway): answering
            // NodeExpandVolume lets a resize finish the usual way.
            expand: true,
            single_node_multi_writer: true,
            volume_mount_group: false,
        }
    }

    async fn stage(&self, req: &StageRequest) -> Result<()> {
        if req.capability.is_block() {
            return Err(Error::invalid(
                "volume_capability",
                "S3 volumes are FUSE filesystems: raw block access is not supported",
            ));
        }
        let (spec, capacity) = spec_from(req)?;
        let creds = Creds::from_secrets("node-stage secret", &req.secrets)?;
        let inner = &self.inner;
        let _g = inner.locks.lock(&req.staging_path.to_string_lossy()).await;
        let dir = inner.dir_of(&req.staging_path);
        let mut found = read_record(&dir).await?;
        if let Some(rec) = &found
            && rec.volume_id != req.volume_id
        {
            return Err(Error::AlreadyExists(format!(
                "{} is the staging path of volume {}",
                req.staging_path.display(),
                rec.volume_id
            )));
        }
        if let Some(rec) = found.take_if(|r| r.starting) {
            // A retry of a NodeStageVolume the plugin died in.
            if inner.settle_unfinished(rec, Some(&spec)).await?.is_some() {
                inner.count_running().await;
                return Ok(());
            }
        }
        if let Some(rec) = found {
            if rec.spec == spec {
                inner.ensure_live(rec).await?;
                return Ok(());
            }
            if Inner::staged_alive(&rec).await? {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already staged at {} with other mount settings",
                    req.volume_id,
                    req.staging_path.display()
                )));
            }
            // Our own dead mount with old settings: replace it with the requested one.
            detach(&req.staging_path).await?;
            mounter::stop(rec.pid, &req.staging_path).await;
        }
        mount::ensure_dir(&req.staging_path).await?;
        if let Some(m) = mount::mounted_at(&req.staging_path).await? {
            // No record, but a mount. A plugin older than the `starting` record, killed in
            // NodeStageVolume, left this volume's mounter: its command line names this
            // volume, this path and this path's record directory. Replace it.
            let Some(pid) = mounter::find(&spec, &req.staging_path, &dir) else {
                // Something we have no record of sits there: never mount on top of it.
                return Err(Error::FailedPrecondition(format!(
                    "{} already has a {} mount that is not this volume's",
                    req.staging_path.display(),
                    m.fs_type
                )));
            };
            tracing::warn!(volume_id = %req.volume_id, staging = %req.staging_path.display(), pid, "replacing this volume's unrecorded S3 mount");
            mounter::stop(pid, &req.staging_path).await;
            detach(&req.staging_path).await?;
        }
        // One listing first: wrong credentials, a missing bucket or an unreachable endpoint
        // give a clear error here instead of a mounter's log line.
        let ep = Endpoint {
            url: spec.endpoint.clone(),
            region: spec.region.clone(),
            path_style: spec.path_style,
            timeout: NODE_S3_TIMEOUT,
        };
        let c = client::build(&ep, &creds);
        let loc = Location {
            bucket: spec.bucket.clone(),
            prefix: spec.prefix.clone(),
        };
        c.list_objects_v2()
            .bucket(&loc.bucket)
            .prefix(loc.key_prefix())
            .max_keys(1)
            .send()
            .await
            .map_err(|e| match map_err(format!("checking {loc}"), &ep, e) {
                Error::NotFound { .. } => Error::not_found("volume", &req.volume_id),
                other => other,
            })?;
        inner.prepare_dir(&req.staging_path, &creds).await?;
        let mut rec = Record {
            volume_id: req.volume_id.clone(),
            staging_path: req.staging_path.clone(),
            spec,
            capacity,
            pid: 0,
            starting: true,
            targets: BTreeMap::new(),
        };
        // Before the mounter starts: it outlives this process (see the module comment).
        inner.save(&rec).await?;
        if let Err(e) = inner.mount(&mut rec).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        tracing::info!(volume_id = %req.volume_id, mounter = rec.spec.kind.as_str(), pid = rec.pid, "S3 volume mounted");
        inner.count_running().await;
        Ok(())
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.locks.lock(&staging_path.to_string_lossy()).await;
        let dir = inner.dir_of(staging_path);
        let rec = read_record(&dir).await?;
        let pid = rec.as_ref().and_then(|r| inner.mounter_pid(r));
        if let (Some(r), Some(pid)) = (&rec, pid)
            && r.starting
        {
            // Its NodeStageVolume never answered: the mounter may still be starting and
            // mount after the unmount below, so it is stopped first.
            mounter::stop(pid, staging_path).await;
        }
        mount::unmount(staging_path).await?;
        if let Some(pid) = pid {
            // fusermount-style exit takes a moment; a mounter stuck on a dead endpoint is
            // stopped so it does not linger.
            let deadline = Instant::now() + Duration::from_secs(5);
            while mounter::is_mounter_of(pid, staging_path) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            mounter::stop(pid, staging_path).await;
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
        }
        inner
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id);
        inner.count_running().await;
        Ok(())
    }

    async fn publish(&self, req: &PublishRequest) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.locks.lock(&req.staging_path.to_string_lossy()).await;
        let dir = inner.dir_of(&req.staging_path);
        let Some(mut rec) = read_record(&dir).await? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged at {}",
                req.volume_id,
                req.staging_path.display()
            )));
        };
        if rec.volume_id != req.volume_id {
            return Err(Error::FailedPrecondition(format!(
                "{} is the staging path of volume {}, not {}",
                req.staging_path.display(),
                rec.volume_id,
                req.volume_id
            )));
        }
        if rec.starting {
            return Err(Error::FailedPrecondition(format!(
                "staging of volume {} at {} did not finish; NodeStageVolume must be retried",
                req.volume_id,
                req.staging_path.display()
            )));
        }
        inner.ensure_live(rec.clone()).await?;
        mount::publish_bind(req).await?;
        rec = read_record(&dir).await?.unwrap_or(rec);
        rec.targets.insert(
            req.target_path.clone(),
            PublishedTarget {
                readonly: req.readonly,
                flags: Vec::new(),
            },
        );
        inner.save(&rec).await
    }

    async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        mount::unpublish(target_path).await?;
        let inner = &self.inner;
        for rec in inner.records().await? {
            if rec.volume_id == volume_id && rec.targets.contains_key(target_path) {
                let _g = inner.locks.lock(&rec.staging_path.to_string_lossy()).await;
                if let Some(mut r) = read_record(&inner.dir_of(&rec.staging_path)).await? {
                    r.targets.remove(target_path);
                    inner.save(&r).await?;
                }
            }
        }
        Ok(())
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let inner = &self.inner;
        let mut records = inner.records().await?;
        // An unfinished staging is no staged volume: only NodeStageVolume settles it.
        records.retain(|r| !r.starting);
        let Some(rec) = Inner::record_for_path(&records, volume_id, path).cloned() else {
            // Not staged by this node (or by a node without records): plain statvfs.
            return mount::path_stats(path).await;
        };
        if matches!(mounter::probe_live(path).await, Probe::Missing) {
            return Err(Error::not_found("volume path", path.display()));
        }
        let healed = {
            let _g = inner.locks.lock(&rec.staging_path.to_string_lossy()).await;
            match read_record(&inner.dir_of(&rec.staging_path)).await? {
                Some(r) if !r.starting => inner.ensure_live(r).await,
                _ => Ok(false),
            }
        };
        let mut abnormal = match healed {
            Ok(_) => None,
            Err(e) => Some(format!(
                "S3 mount at {} is dead and could not be remounted: {e}",
                path.display()
            )),
        };
        if abnormal.is_none()
            && let Probe::Dead(why) = mounter::probe_live(path).await
        {
            abnormal = Some(format!(
                "volume at {} does not answer: {why}",
                path.display()
            ));
        }
        let (used, objects, capacity) = match inner.usage(&rec).await {
            Ok(u) => u,
            Err(e) => {
                return Ok(VolumeStats {
                    usage: Usage {
                        total_bytes: rec.capacity,
                        available_bytes: rec.capacity,
                        ..Default::default()
                    },
                    abnormal: abnormal.or(Some(format!("usage unknown: {e}"))),
                    is_block: false,
                });
            }
        };
        if abnormal.is_none() && capacity > 0 && used > capacity {
            tracing::warn!(
                volume_id,
                used,
                capacity,
                "S3 volume has grown past its size"
            );
            abnormal = Some(format!(
                "volume uses {used} bytes, more than its size of {capacity} bytes (S3 does not enforce capacity)"
            ));
        }
        Ok(VolumeStats {
            usage: Usage {
                total_bytes: capacity,
                available_bytes: capacity.saturating_sub(used),
                used_bytes: used,
                total_inodes: 0,
                free_inodes: 0,
                used_inodes: objects,
            },
            abnormal,
            is_block: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AccessMode, AccessType, Capability, Secrets};

    fn req(ctx: &[(&str, &str)], flags: &[&str]) -> StageRequest {
        StageRequest {
            volume_id: "rgw/shared/pvc-1".into(),
            staging_path: "/st".into(),
            capability: Capability {
                access_type: AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                    volume_mount_group: String::new(),
                },
                access_mode: AccessMode::MultiNodeReaderOnly,
            },
            context: ctx
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            publish_context: Default::default(),
            secrets: Secrets::default(),
        }
    }

    #[test]
    fn context_is_validated() {
        let (s, cap) = spec_from(&req(
            &[
                ("endpoint", "http://127.0.0.1:7480"),
                ("pathStyle", "true"),
                ("capacityBytes", "5"),
            ],
            &["uid=1"],
        ))
        .unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_deref(), cap),
            ("shared", Some("pvc-1"), 5)
        );
        assert!(s.readonly && s.path_style);
        for (ctx, field) in [
            (&[("endpoint", "ftp://x")][..], "endpoint"),
            (&[("pathStyle", "yes")][..], "pathStyle"),
            (&[("bucket", "other")][..], "volume_context"),
            (&[("mounter", "goofys")][..], "mounter"),
            (&[("region", "a b")][..], "region"),
            (&[("capacityBytes", "x")][..], "capacityBytes"),
        ] {
            let e = spec_from(&req(ctx, &[])).unwrap_err();
            assert!(e.to_string().contains(field), "{ctx:?}: {e}");
        }
        let e = spec_from(&req(&[], &["passwd_file=/x"])).unwrap_err();
        assert!(e.to_string().contains("mount_flags"), "{e}");
    }
}
