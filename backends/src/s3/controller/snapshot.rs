//! S3 snapshots: server-side copies (CopyObject / UploadPartCopy) of a volume's objects, so no
//! data passes through the controller.
//!
//! S3 cannot freeze a bucket, so a snapshot is a copy taken object by object: it is
//! point-in-time per object, not across objects (like every copy-based snapshot, writers that
//! need more must quiesce first).
//!
//! Where a snapshot lives:
//! - of a prefix-mode volume: in the same shared bucket, under the reserved
//!   `.stowage/snapshots/<snap>/` (mounts see only the volume's own prefix);
//! - of a bucket-mode volume: in a bucket of its own, `<bucketPrefix>s-<hash>`, under the same
//!   key layout, because deleting the volume deletes its bucket and a snapshot must outlive
//!   its source.
//!
//! The record `.stowage/snapshots/<snap>.json` is written after the copy and removed first on
//! delete, so a snapshot cut short is never listed and a retry (same name) copies again.
//!
//! Snapshot IDs: `<instance>/<snap>/<bucket>`, so every call finds the snapshot from the ID
//! alone. `<snap>` is the CSI name when short and safe (group snapshot members, whose names
//! start `grp-`, must keep their names for `crate::group` to find them), else a hash of it.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};

use super::{Inst, S3Controller, now_secs, paginate};
use crate::error::{Error, Result};
use crate::relpath::RelPath;
use crate::s3::client::{Target, code_of, map_err, status_of};
use crate::s3::{check_bucket, hash_hex};
use crate::types::{Page, Secrets, Snapshot, SnapshotFilter};
use crate::volume_id::VolumeId;

/// Reserved prefix holding snapshot records and data.
pub const SNAP_PREFIX: &str = ".stowage/snapshots/";

/// Longest CSI name kept as it is in a snapshot ID.
const MAX_PLAIN_NAME: usize = 48;

/// A snapshot's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct SnapMeta {
    /// Hash of the CSI name: a different name hashing to the same component is a conflict.
    name_hash: String,
    pub(super) source_volume_id: String,
    /// The source volume's capacity: the smallest volume it can be restored into.
    pub(super) size: u64,
    created: u64,
    /// The bucket was created for this snapshot (bucket-mode source) and goes with it.
    own_bucket: bool,
}

/// Where one snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SnapLoc {
    pub(super) bucket: String,
    pub(super) snap: String,
}

impl SnapLoc {
    fn record_key(&self) -> String {
        format!("{SNAP_PREFIX}{}.json", self.snap)
    }

    /// Key prefix of the copied objects.
    pub(super) fn data_prefix(&self) -> String {
        format!("{SNAP_PREFIX}{}/", self.snap)
    }

    fn to_id(&self, instance: &str) -> Result<VolumeId> {
        VolumeId::new(
            instance,
            RelPath::component("snapshot_id", &self.snap)?.join(&self.bucket)?,
        )
    }

    /// None when the ID cannot be one of ours (CSI: such a snapshot does not exist).
    pub(super) fn from_id(id: &VolumeId) -> Option<SnapLoc> {
        let parts: Vec<&str> = id.path.components().collect();
        let [snap, bucket] = parts.as_slice() else {
            return None;
        };
        check_bucket("snapshot_id", bucket).ok()?;
        Some(SnapLoc {
            bucket: (*bucket).to_owned(),
            snap: (*snap).to_owned(),
        })
    }
}

/// The ID component for a CSI snapshot name.
fn snap_component(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= MAX_PLAIN_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        name.to_owned()
    } else {
        format!("snap-{}", hash_hex(name, 24))
    }
}

/// The bucket of a bucket-mode volume's snapshot. `s-` plus a hash keeps it apart from volume
/// buckets, whose hashed names start `v-`; a volume literally named like one is refused by
/// the tag check in `create`.
fn own_bucket_for(bucket_prefix: &str, snap: &str) -> Result<String> {
    let room = 63usize.saturating_sub(bucket_prefix.len() + 2).min(32);
    if room < 16 {
        return Err(Error::invalid(
            "bucketPrefix",
            format!("{bucket_prefix:?} leaves too little room for a snapshot bucket name"),
        ));
    }
    let b = format!("{bucket_prefix}s-{}", hash_hex(snap, room));
    check_bucket("bucketPrefix", &b)?;
    Ok(b)
}

fn snapshot_of(id: &str, m: &SnapMeta) -> Snapshot {
    Snapshot {
        id: id.to_owned(),
        source_volume_id: m.source_volume_id.clone(),
        size_bytes: m.size,
        created: UNIX_EPOCH + Duration::from_secs(m.created),
        ready: true,
    }
}

impl S3Controller {
    /// Parses a snapshot ID; None when it names nothing this controller could have made.
    fn snap_of(&self, snapshot_id: &str) -> Option<(&Inst, VolumeId, SnapLoc)> {
        let id = VolumeId::parse("snapshot_id", snapshot_id).ok()?;
        let inst = self.instances.get(&id.instance)?;
        let loc = SnapLoc::from_id(&id)?;
        Some((inst, id, loc))
    }

    pub(super) async fn read_snap(
        inst: &Inst,
        c: &Client,
        loc: &SnapLoc,
    ) -> Result<Option<SnapMeta>> {
        let key = loc.record_key();
        let out = match c.get_object().bucket(&loc.bucket).key(&key).send().await {
            Ok(o) => o,
            Err(e) if matches!(code_of(&e), Some("NoSuchKey" | "NoSuchBucket")) => {
                return Ok(None);
            }
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => {
                return Err(map_err(
                    format!("reading s3://{}/{key}", loc.bucket),
                    &inst.ep,
                    e,
                ));
            }
        };
        let bytes =
            out.body.collect().await.map_err(|e| {
                Error::Unavailable(format!("reading s3://{}/{key}: {e}", loc.bucket))
            })?;
        serde_json::from_slice(&bytes.into_bytes())
            .map(Some)
            .map_err(|e| Error::Internal(format!("corrupt record s3://{}/{key}: {e}", loc.bucket)))
    }

    /// A snapshot to restore from, read with the restoring request's client: its location
    /// and record. NotFound when it does not exist.
    pub(super) async fn restore_source(
        &self,
        inst: &Inst,
        c: &Client,
        snapshot_id: &str,
    ) -> Result<(SnapLoc, SnapMeta)> {
        let missing = || Error::not_found("snapshot", snapshot_id);
        let (sinst, _, loc) = self.snap_of(snapshot_id).ok_or_else(missing)?;
        if sinst.name != inst.name {
            return Err(Error::invalid(
                "volume_content_source",
                "the snapshot is on another backend instance",
            ));
        }
        let meta = Self::read_snap(inst, c, &loc).await?.ok_or_else(missing)?;
        Ok((loc, meta))
    }

    pub(super) async fn snapshot_create(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        if name.is_empty() {
            return Err(Error::invalid("name", "is required"));
        }
        // No snapshot class parameters exist yet: a typo must not pass silently.
        crate::params::check_known(parameters, &[])?;
        let missing = || Error::not_found("source volume", source_volume_id);
        let v = self
            .vol("source_volume_id", source_volume_id)
            .map_err(|_| missing())?
            .ok_or_else(missing)?;
        let inst = v.inst;
        let (c, creds) = self.client_for(inst, "snapshotter secret", secrets)?;
        let snap = snap_component(name);
        let bucket = match &v.loc.prefix {
            Some(_) => v.loc.bucket.clone(),
            None => own_bucket_for(&inst.bucket_prefix, &snap)?,
        };
        let mut loc = SnapLoc { bucket, snap };
        let id = match loc.to_id(&inst.name) {
            Ok(id) => id,
            // A long instance and bucket name leave too little room: a short hash fits.
            Err(_) => {
                loc.snap = format!("snap-{}", hash_hex(name, 16));
                if v.loc.prefix.is_none() {
                    loc.bucket = own_bucket_for(&inst.bucket_prefix, &loc.snap)?;
                }
                loc.to_id(&inst.name)?
            }
        };
        let sid = id.to_string();
        let _g = self.locks.lock(&format!("snap:{sid}")).await;
        let name_hash = hash_hex(name, 32);
        if let Some(m) = Self::read_snap(inst, &c, &loc).await? {
            inst.remember(&creds);
            if m.name_hash != name_hash || m.source_volume_id != source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists for volume {}",
                    m.source_volume_id
                )));
            }
            return Ok(snapshot_of(&sid, &m));
        }
        // Hold the source's lock so that no delete or recycle interleaves with the copy.
        let _vg = self.locks.lock(&v.id.to_string()).await;
        let smeta = Self::read_meta(inst, &c, &v.loc)
            .await?
            .ok_or_else(missing)?;
        let own_bucket = v.loc.prefix.is_none();
        if own_bucket {
            match Self::bucket_tags(inst, &c, &loc.bucket).await? {
                Some(tags) if tags.iter().any(|(k, _)| k.starts_with("stowage.io/")) => {
                    return Err(Error::AlreadyExists(format!(
                        "bucket {} (the snapshot's bucket) holds a volume; choose another snapshot name",
                        loc.bucket
                    )));
                }
                Some(_) => {}
                None => Self::create_bucket(inst, &c, &loc.bucket).await?,
            }
        }
        let data = loc.data_prefix();
        // A copy cut short left objects behind: start clean so deleted files do not linger.
        let dest = Target {
            client: &c,
            ep: &inst.ep,
            bucket: &loc.bucket,
            prefix: &data,
        };
        dest.delete_all(&inst.batch_delete, None).await?;
        let sp = v.loc.key_prefix();
        let n = Target {
            client: &c,
            ep: &inst.ep,
            bucket: &v.loc.bucket,
            prefix: &sp,
        }
        .copy_all(&loc.bucket, &data)
        .await?;
        let meta = SnapMeta {
            name_hash,
            source_volume_id: source_volume_id.to_owned(),
            size: smeta.capacity,
            created: now_secs(),
            own_bucket,
        };
        let body = serde_json::to_vec(&meta).map_err(|e| Error::Internal(e.to_string()))?;
        let key = loc.record_key();
        c.put_object()
            .bucket(&loc.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| map_err(format!("writing s3://{}/{key}", loc.bucket), &inst.ep, e))?;
        inst.remember(&creds);
        tracing::info!(snapshot_id = %sid, source = %source_volume_id, objects = n, "S3 snapshot created");
        Ok(snapshot_of(&sid, &meta))
    }

    pub(super) async fn snapshot_delete(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        let Some((inst, id, loc)) = self.snap_of(snapshot_id) else {
            return Ok(());
        };
        let (c, creds) = self.client_for(inst, "snapshotter secret", secrets)?;
        let _g = self.locks.lock(&format!("snap:{id}")).await;
        let meta = Self::read_snap(inst, &c, &loc).await?;
        // Without a record the bucket may still be one a creation cut short made: ours exactly
        // when its name is the one this snapshot would get.
        let own_bucket = match &meta {
            Some(m) => m.own_bucket,
            None => own_bucket_for(&inst.bucket_prefix, &loc.snap).is_ok_and(|b| b == loc.bucket),
        };
        if meta.is_some() {
            // Record first: a delete cut short leaves unlisted objects a retry removes, never
            // a listed snapshot with missing objects.
            let key = loc.record_key();
            match c.delete_object().bucket(&loc.bucket).key(&key).send().await {
                Ok(_) => {}
                Err(e) if matches!(code_of(&e), Some("NoSuchKey" | "NoSuchBucket")) => {}
                Err(e) => {
                    return Err(map_err(
                        format!("deleting s3://{}/{key}", loc.bucket),
                        &inst.ep,
                        e,
                    ));
                }
            }
        }
        let data = loc.data_prefix();
        let n = match (Target {
            client: &c,
            ep: &inst.ep,
            bucket: &loc.bucket,
            prefix: &data,
        })
        .delete_all(&inst.batch_delete, None)
        .await
        {
            Ok(n) => n,
            // No such bucket: nothing left to delete.
            Err(Error::NotFound { .. }) => 0,
            Err(e) => return Err(e),
        };
        if own_bucket {
            // DeleteBucket, not an emptying delete: anything else someone put there stays.
            match c.delete_bucket().bucket(&loc.bucket).send().await {
                Ok(_) => {}
                Err(e) if code_of(&e) == Some("NoSuchBucket") => {}
                Err(e) if code_of(&e) == Some("BucketNotEmpty") => {
                    tracing::warn!(snapshot_id, bucket = %loc.bucket, "snapshot bucket holds other objects; kept");
                }
                Err(e) => {
                    return Err(map_err(format!("DeleteBucket {}", loc.bucket), &inst.ep, e));
                }
            }
        }
        inst.remember(&creds);
        if meta.is_some() {
            tracing::info!(snapshot_id, objects = n, "S3 snapshot deleted");
        }
        Ok(())
    }

    /// Every snapshot reachable with one client: each bucket's `.stowage/snapshots/` records
    /// (listed with a delimiter, so the copied objects are not walked).
    async fn snapshots_with(inst: &Inst, c: &Client) -> Result<Vec<(String, Snapshot)>> {
        let buckets = c
            .list_buckets()
            .send()
            .await
            .map_err(|e| map_err("ListBuckets", &inst.ep, e))?;
        let mut out = Vec::new();
        for b in buckets.buckets() {
            let Some(bucket) = b.name() else { continue };
            if check_bucket("bucket", bucket).is_err() {
                continue;
            }
            // A bucket deleted between ListBuckets and its listing (another volume or
            // snapshot going away meanwhile) holds nothing to report.
            let res: Result<()> = async {
                let mut token: Option<String> = None;
                loop {
                    let page = c
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(SNAP_PREFIX)
                        .delimiter("/")
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| {
                            map_err(
                                format!("ListObjectsV2 s3://{bucket}/{SNAP_PREFIX}"),
                                &inst.ep,
                                e,
                            )
                        })?;
                    for o in page.contents() {
                        let Some(snap) = o
                            .key()
                            .and_then(|k| k.strip_prefix(SNAP_PREFIX))
                            .and_then(|k| k.strip_suffix(".json"))
                        else {
                            continue;
                        };
                        let loc = SnapLoc {
                            bucket: bucket.to_owned(),
                            snap: snap.to_owned(),
                        };
                        let Ok(id) = loc.to_id(&inst.name) else {
                            continue;
                        };
                        if let Some(m) = Self::read_snap(inst, c, &loc).await? {
                            let id = id.to_string();
                            out.push((id.clone(), snapshot_of(&id, &m)));
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

    pub(super) async fn snapshot_list(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let mut all: BTreeMap<String, Snapshot> = BTreeMap::new();
        if let Some(sid) = &filter.snapshot_id {
            // One record to read, not a walk over every bucket.
            if let Some((inst, _, loc)) = self.snap_of(sid) {
                for c in &self.read_clients(inst, None)? {
                    match Self::read_snap(inst, c, &loc).await {
                        Ok(Some(m)) => {
                            all.insert(sid.clone(), snapshot_of(sid, &m));
                            break;
                        }
                        Ok(None) => {}
                        // Other tenants' credentials may not see this bucket.
                        Err(Error::FailedPrecondition(_)) | Err(Error::InvalidArgument { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        } else {
            for inst in self.instances.values() {
                for c in &self.read_clients(inst, None)? {
                    match Self::snapshots_with(inst, c).await {
                        Ok(s) => all.extend(s),
                        Err(Error::InvalidArgument { .. }) | Err(Error::FailedPrecondition(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let items: Vec<(String, Snapshot)> = all
            .into_iter()
            .filter(|(_, s)| {
                filter
                    .source_volume_id
                    .as_deref()
                    .is_none_or(|v| s.source_volume_id == v)
            })
            .collect();
        paginate(&items, start, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_group_members_keep_their_names() {
        let loc = SnapLoc {
            bucket: "shared".into(),
            snap: snap_component("grp-0123456789abcdef01234567-0123456789abcdef"),
        };
        let id = loc.to_id("rgw").unwrap();
        assert_eq!(
            crate::group::group_of(&id.to_string()).as_deref(),
            Some("rgw/grp-0123456789abcdef01234567")
        );
        assert_eq!(SnapLoc::from_id(&id), Some(loc));
        let bad = VolumeId::parse("s", "rgw/only-one").unwrap();
        assert_eq!(SnapLoc::from_id(&bad), None);
        let bad = VolumeId::parse("s", "rgw/snap/Bad_Bucket").unwrap();
        assert_eq!(SnapLoc::from_id(&bad), None);
    }

    #[test]
    fn names_and_buckets() {
        assert_eq!(snap_component("snap-1"), "snap-1");
        for weird in ["", "a.b", "-x", "has space", &"x".repeat(49)] {
            let s = snap_component(weird);
            assert!(s.starts_with("snap-") && s.len() == 29, "{weird:?} -> {s}");
        }
        let b = own_bucket_for("san-", "snap-1").unwrap();
        assert!(b.starts_with("san-s-") && b.len() == 38, "{b}");
        assert_eq!(b, own_bucket_for("san-", "snap-1").unwrap());
        assert_ne!(b, own_bucket_for("san-", "snap-2").unwrap());
        assert!(own_bucket_for(&"a".repeat(46), "x").is_err());
    }
}
