//! A volume's record: bucket tags (bucket mode) or the JSON object
//! `.stowage/volumes/<prefix>.json` in the shared bucket (prefix mode), read and written here.

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Tag, Tagging};
use serde::{Deserialize, Serialize};

use super::{Inst, S3Controller};
use crate::error::{Error, Result};
use crate::params::OnDelete;
use crate::s3::client::{code_of, map_err, status_of};
use crate::s3::{
    Location, TAG_ARCHIVED, TAG_CAPACITY, TAG_CREATED, TAG_MOUNTER, TAG_ON_DELETE, TAG_VOLUME,
};
use crate::types::ContentSource;

/// A volume's record (bucket tags or a JSON object).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct Meta {
    /// Hash of the CSI name: same-name requests are repeats, other names are conflicts.
    pub(super) name_hash: String,
    pub(super) capacity: u64,
    pub(super) on_delete: String,
    pub(super) mounter: String,
    pub(super) created: u64,
    /// What the volume was made from (`snapshot:<id>` or `volume:<id>`), so a repeated
    /// CreateVolume with another source is a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) source: Option<String>,
}

/// Bucket tag recording a bucket-mode volume's content source.
const TAG_SOURCE: &str = "stowage.io/source";

pub(super) fn source_str(s: &ContentSource) -> String {
    match s {
        ContentSource::Snapshot(id) => format!("snapshot:{id}"),
        ContentSource::Volume(id) => format!("volume:{id}"),
    }
}

pub(super) fn source_of(s: &str) -> Option<ContentSource> {
    if let Some(id) = s.strip_prefix("snapshot:") {
        Some(ContentSource::Snapshot(id.to_owned()))
    } else {
        s.strip_prefix("volume:")
            .map(|id| ContentSource::Volume(id.to_owned()))
    }
}

impl Meta {
    pub(super) fn on_delete(&self) -> OnDelete {
        OnDelete::parse(&self.on_delete).unwrap_or_default()
    }

    pub(super) fn to_tags(&self) -> Vec<(String, String)> {
        let mut tags = vec![
            (TAG_VOLUME.into(), self.name_hash.clone()),
            (TAG_CAPACITY.into(), self.capacity.to_string()),
            (TAG_ON_DELETE.into(), self.on_delete.clone()),
            (TAG_MOUNTER.into(), self.mounter.clone()),
            (TAG_CREATED.into(), self.created.to_string()),
        ];
        if let Some(src) = &self.source {
            tags.push((TAG_SOURCE.into(), src.clone()));
        }
        tags
    }

    pub(super) fn from_tags(tags: &[(String, String)]) -> Option<Meta> {
        let get = |k: &str| tags.iter().find(|(tk, _)| tk == k).map(|(_, v)| v.clone());
        if get(TAG_ARCHIVED).is_some() {
            return None;
        }
        Some(Meta {
            name_hash: get(TAG_VOLUME)?,
            capacity: get(TAG_CAPACITY)?.parse().ok()?,
            on_delete: get(TAG_ON_DELETE).unwrap_or_else(|| "delete".into()),
            mounter: get(TAG_MOUNTER).unwrap_or_else(|| "s3fs".into()),
            created: get(TAG_CREATED).and_then(|c| c.parse().ok()).unwrap_or(0),
            source: get(TAG_SOURCE),
        })
    }
}

impl S3Controller {
    pub(super) async fn read_meta(inst: &Inst, c: &Client, loc: &Location) -> Result<Option<Meta>> {
        match &loc.prefix {
            None => Ok(Self::bucket_tags(inst, c, &loc.bucket)
                .await?
                .and_then(|t| Meta::from_tags(&t))),
            Some(_) => {
                let key = loc.meta_key().unwrap_or_default();
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
                let bytes = out.body.collect().await.map_err(|e| {
                    Error::Unavailable(format!("reading s3://{}/{key}: {e}", loc.bucket))
                })?;
                serde_json::from_slice(&bytes.into_bytes())
                    .map(Some)
                    .map_err(|e| {
                        Error::Internal(format!("corrupt record s3://{}/{key}: {e}", loc.bucket))
                    })
            }
        }
    }

    /// A bucket's tags; None when the bucket does not exist.
    pub(super) async fn bucket_tags(
        inst: &Inst,
        c: &Client,
        bucket: &str,
    ) -> Result<Option<Vec<(String, String)>>> {
        match c.get_bucket_tagging().bucket(bucket).send().await {
            Ok(out) => Ok(Some(
                out.tag_set()
                    .iter()
                    .map(|t| (t.key().to_owned(), t.value().to_owned()))
                    .collect(),
            )),
            Err(e) if code_of(&e) == Some("NoSuchBucket") => Ok(None),
            Err(e) if matches!(code_of(&e), Some("NoSuchTagSet" | "NoSuchTagSetError")) => {
                Ok(Some(Vec::new()))
            }
            Err(e) => Err(map_err(format!("GetBucketTagging {bucket}"), &inst.ep, e)),
        }
    }

    /// Replaces Stowage's tags on a bucket, keeping anyone else's.
    pub(super) async fn put_tags(
        inst: &Inst,
        c: &Client,
        bucket: &str,
        ours: Vec<(String, String)>,
    ) -> Result<()> {
        let mut tags: Vec<(String, String)> = Self::bucket_tags(inst, c, bucket)
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("stowage.io/"))
            .collect();
        tags.extend(ours);
        if tags.is_empty() {
            return c
                .delete_bucket_tagging()
                .bucket(bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| map_err(format!("DeleteBucketTagging {bucket}"), &inst.ep, e));
        }
        let set = tags
            .into_iter()
            .map(|(k, v)| {
                Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|e| Error::Internal(format!("building tags: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let tagging = Tagging::builder()
            .set_tag_set(Some(set))
            .build()
            .map_err(|e| Error::Internal(format!("building tags: {e}")))?;
        c.put_bucket_tagging()
            .bucket(bucket)
            .tagging(tagging)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_err(format!("PutBucketTagging {bucket}"), &inst.ep, e))
    }

    pub(super) async fn write_meta(
        inst: &Inst,
        c: &Client,
        loc: &Location,
        meta: &Meta,
    ) -> Result<()> {
        match loc.meta_key() {
            None => Self::put_tags(inst, c, &loc.bucket, meta.to_tags()).await,
            Some(key) => {
                let body = serde_json::to_vec(meta).map_err(|e| Error::Internal(e.to_string()))?;
                c.put_object()
                    .bucket(&loc.bucket)
                    .key(&key)
                    .content_type("application/json")
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_err(format!("writing s3://{}/{key}", loc.bucket), &inst.ep, e))
            }
        }
    }

    pub(super) async fn remove_meta(inst: &Inst, c: &Client, loc: &Location) -> Result<()> {
        match loc.meta_key() {
            None => Self::put_tags(inst, c, &loc.bucket, Vec::new()).await,
            Some(key) => match c.delete_object().bucket(&loc.bucket).key(&key).send().await {
                Ok(_) => Ok(()),
                Err(e) if matches!(code_of(&e), Some("NoSuchKey" | "NoSuchBucket")) => Ok(()),
                Err(e) => Err(map_err(
                    format!("deleting s3://{}/{key}", loc.bucket),
                    &inst.ep,
                    e,
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_archived_buckets_are_not_volumes() {
        let m = Meta {
            name_hash: "abc".into(),
            capacity: 42,
            on_delete: "retain".into(),
            mounter: "s3fs".into(),
            created: 7,
            source: Some("snapshot:rgw/snap-1/san-s-0123".into()),
        };
        assert_eq!(Meta::from_tags(&m.to_tags()), Some(m.clone()));
        let mut t = m.to_tags();
        t.push((TAG_ARCHIVED.into(), "1".into()));
        assert_eq!(Meta::from_tags(&t), None);
        assert_eq!(Meta::from_tags(&[]), None);
    }
}
