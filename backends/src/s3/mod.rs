//! `s3.stowage.io`: a volume is a bucket, or a prefix inside a shared bucket, on any S3
//! endpoint (AWS, Ceph RADOS Gateway, MinIO...).
//!
//! The controller speaks the S3 API ([`aws_sdk_s3`]) with credentials from the CSI secrets of
//! each request; it never mounts. Nodes mount with a FUSE mounter (s3fs, rclone) chosen per
//! StorageClass; the mounter runs as its own process so a node plugin restart leaves it alone,
//! and a dead mount (mounter killed: ENOTCONN) is healed on restart, on NodePublishVolume and
//! on NodeGetVolumeStats.
//!
//! Volume IDs: `<instance>/<bucket>` (bucket mode) or `<instance>/<bucket>/<prefix>` (prefix
//! mode), so every call, DeleteVolume included, knows where the volume lives from the ID alone;
//! the endpoint, region and addressing style belong to the instance.
//!
//! S3 has no quota: the capacity is recorded with the volume (bucket tags in bucket mode, a
//! small JSON object under the reserved `.stowage/` prefix of the shared bucket in prefix
//! mode), usage is reported by NodeGetVolumeStats from an object listing, and a volume grown
//! past its size is reported as an abnormal volume condition (which kubelet turns into an
//! event on the pods using it).
//!
//! Snapshots and clones are server-side copies (CopyObject, UploadPartCopy for big objects):
//! no object data passes through the controller (`controller/snapshot.rs`).

// The S3 API parts need the SDK (cargo feature "s3"); config, parameters and the FUSE
// mounters do not.
#[cfg(feature = "s3")]
pub mod client;
pub mod config;
#[cfg(feature = "s3")]
pub mod controller;
pub mod mounter;
#[cfg(feature = "s3")]
pub mod node;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::params::{self, OnDelete};
use crate::relpath::RelPath;
use crate::volume_id::VolumeId;

#[cfg(feature = "s3")]
pub use aws_sdk_s3;
pub use config::{S3Config, S3Instance};
#[cfg(feature = "s3")]
pub use controller::{S3Controller, controller};
#[cfg(feature = "s3")]
pub use node::S3Node;

pub const DRIVER: &str = "s3.stowage.io";

/// Secret keys (provisioner and node-stage secrets).
pub const SECRET_ACCESS_KEY_ID: &str = "accessKeyID";
pub const SECRET_SECRET_ACCESS_KEY: &str = "secretAccessKey";
pub const SECRET_SESSION_TOKEN: &str = "sessionToken";

/// StorageClass parameters.
pub const PARAM_MODE: &str = "mode";
pub const PARAM_BUCKET: &str = "bucket";
pub const PARAM_BUCKET_PREFIX: &str = "bucketPrefix";
pub const PARAM_NAME_TEMPLATE: &str = "nameTemplate";
pub const PARAM_MOUNTER: &str = "mounter";
pub const KNOWN_PARAMS: &[&str] = &[
    params::INSTANCE,
    params::ON_DELETE,
    PARAM_MODE,
    PARAM_BUCKET,
    PARAM_BUCKET_PREFIX,
    PARAM_NAME_TEMPLATE,
    PARAM_MOUNTER,
];

/// Volume context keys: everything a node needs to mount, so static PVs work too.
pub const CTX_ENDPOINT: &str = "endpoint";
pub const CTX_REGION: &str = "region";
pub const CTX_PATH_STYLE: &str = "pathStyle";
pub const CTX_BUCKET: &str = "bucket";
pub const CTX_PREFIX: &str = "prefix";
pub const CTX_MOUNTER: &str = "mounter";
pub const CTX_MOUNT_OPTIONS: &str = "mountOptions";
pub const CTX_CAPACITY: &str = "capacityBytes";

/// Reserved prefix of a shared bucket holding prefix-mode volume records.
pub const META_PREFIX: &str = ".stowage/volumes/";

/// Bucket tags of a bucket-mode volume.
pub const TAG_VOLUME: &str = "stowage.io/volume";
pub const TAG_CAPACITY: &str = "stowage.io/capacity";
pub const TAG_ON_DELETE: &str = "stowage.io/on-delete";
pub const TAG_MOUNTER: &str = "stowage.io/mounter";
pub const TAG_CREATED: &str = "stowage.io/created";
pub const TAG_ARCHIVED: &str = "stowage.io/archived";

/// Size given when a request names none: 1 GiB, like most drivers.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bucket,
    Prefix,
}

impl Mode {
    pub fn parse(field: &'static str, s: &str) -> Result<Self> {
        match s {
            "bucket" => Ok(Mode::Bucket),
            "prefix" => Ok(Mode::Prefix),
            other => Err(Error::invalid(
                field,
                format!("{other:?}: expected bucket or prefix"),
            )),
        }
    }
}

/// Where a volume lives on its endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub bucket: String,
    /// Prefix mode: the volume's top-level "directory" (no slashes).
    pub prefix: Option<String>,
}

impl Location {
    /// `prefix/` for listings; "" for a whole bucket.
    pub fn key_prefix(&self) -> String {
        match &self.prefix {
            Some(p) => format!("{p}/"),
            None => String::new(),
        }
    }

    pub fn meta_key(&self) -> Option<String> {
        self.prefix
            .as_ref()
            .map(|p| format!("{META_PREFIX}{p}.json"))
    }

    pub fn to_id(&self, instance: &str) -> Result<VolumeId> {
        let path = match &self.prefix {
            None => RelPath::component("volume_id", &self.bucket)?,
            Some(p) => RelPath::component("volume_id", &self.bucket)?.join(p)?,
        };
        VolumeId::new(instance, path)
    }

    pub fn from_id(field: &'static str, id: &VolumeId) -> Result<Self> {
        let parts: Vec<&str> = id.path.components().collect();
        let loc = match parts.as_slice() {
            [b] => Location {
                bucket: (*b).to_owned(),
                prefix: None,
            },
            [b, p] => Location {
                bucket: (*b).to_owned(),
                prefix: Some((*p).to_owned()),
            },
            _ => {
                return Err(Error::invalid(
                    field,
                    "an S3 volume ID is <instance>/<bucket> or <instance>/<bucket>/<prefix>",
                ));
            }
        };
        check_bucket(field, &loc.bucket)?;
        Ok(loc)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            None => write!(f, "s3://{}", self.bucket),
            Some(p) => write!(f, "s3://{}/{p}/", self.bucket),
        }
    }
}

/// S3 bucket naming rules (the strict, DNS-compatible set: no dots, so virtual-hosted
/// addressing over TLS works too).
pub fn check_bucket(field: &'static str, b: &str) -> Result<()> {
    let ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
        && !b.contains("..")
        && !b.starts_with("xn--")
        && !b.ends_with("-s3alias")
        && b.parse::<std::net::Ipv4Addr>().is_err();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{b:?} is not a valid bucket name (3-63 of a-z 0-9 . -, starting and ending with a letter or digit)"
            ),
        ))
    }
}

pub fn hash_hex(s: &str, len: usize) -> String {
    let mut h = hex::encode(Sha256::digest(s.as_bytes()));
    h.truncate(len);
    h
}

/// The bucket a bucket-mode volume gets: `<bucketPrefix><name>` when that is a valid bucket
/// name, else `<bucketPrefix>v-<hash of name>` (CSI names may be 128 bytes of anything).
pub fn bucket_name_for(bucket_prefix: &str, name: &str) -> Result<String> {
    let direct = format!("{bucket_prefix}{name}");
    if check_bucket("name", &direct).is_ok() && !direct.contains('.') {
        return Ok(direct);
    }
    let room = 63usize.saturating_sub(bucket_prefix.len() + 2).min(32);
    if room < 16 {
        return Err(Error::invalid(
            "parameters.bucketPrefix",
            format!("{bucket_prefix:?} leaves too little room for a bucket name (max 45 bytes)"),
        ));
    }
    let hashed = format!("{bucket_prefix}v-{}", hash_hex(name, room));
    check_bucket("parameters.bucketPrefix", &hashed)?;
    Ok(hashed)
}

/// The prefix a prefix-mode volume gets: the name when it is a safe path component, else a
/// hash of it.
pub fn prefix_name_for(name: &str) -> String {
    crate::dirstore::dir_name_for(name, "vol")
}

/// CreateVolume parameters.
#[derive(Debug, Clone)]
pub struct S3Params {
    pub mode: Option<Mode>,
    pub bucket: Option<String>,
    pub bucket_prefix: Option<String>,
    pub name_template: Option<String>,
    pub mounter: Option<mounter::Kind>,
    pub on_delete: OnDelete,
}

impl S3Params {
    pub fn parse(p: &BTreeMap<String, String>) -> Result<Self> {
        for k in ["endpoint", "region", "pathStyle"] {
            if p.contains_key(k) {
                return Err(Error::invalid(
                    "parameters",
                    format!(
                        "{k} is set per instance in the driver configuration (volume IDs name the instance, and DeleteVolume receives nothing else): choose one with parameter instance"
                    ),
                ));
            }
        }
        params::check_known(p, KNOWN_PARAMS)?;
        let bucket = p.get(PARAM_BUCKET).filter(|s| !s.is_empty()).cloned();
        if let Some(b) = &bucket {
            check_bucket("parameters.bucket", b)?;
        }
        let bucket_prefix = p.get(PARAM_BUCKET_PREFIX).cloned();
        if let Some(bp) = &bucket_prefix {
            check_bucket_prefix("parameters.bucketPrefix", bp)?;
        }
        Ok(S3Params {
            mode: p
                .get(PARAM_MODE)
                .map(|m| Mode::parse("parameters.mode", m))
                .transpose()?,
            bucket,
            bucket_prefix,
            name_template: p
                .get(PARAM_NAME_TEMPLATE)
                .filter(|s| !s.is_empty())
                .cloned(),
            mounter: p
                .get(PARAM_MOUNTER)
                .map(|m| mounter::Kind::parse("parameters.mounter", m))
                .transpose()?,
            on_delete: p
                .get(params::ON_DELETE)
                .map(|s| OnDelete::parse(s))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

pub fn check_bucket_prefix(field: &'static str, bp: &str) -> Result<()> {
    let ok = bp.len() <= 45
        && bp
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && bp.bytes().next().is_none_or(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{bp:?}: at most 45 of a-z 0-9 -, starting with a letter or digit"),
        ))
    }
}

pub fn on_delete_str(o: OnDelete) -> &'static str {
    match o {
        OnDelete::Delete => "delete",
        OnDelete::Retain => "retain",
        OnDelete::Archive => "archive",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_are_valid_and_stable() {
        assert_eq!(bucket_name_for("", "pvc-123").unwrap(), "pvc-123");
        assert_eq!(bucket_name_for("k8s-", "pvc-1").unwrap(), "k8s-pvc-1");
        let h = bucket_name_for("k8s-", &"X".repeat(128)).unwrap();
        assert!(h.starts_with("k8s-v-") && h.len() == 38, "{h}");
        assert_eq!(h, bucket_name_for("k8s-", &"X".repeat(128)).unwrap());
        for weird in ["Upper", "a", "a.b", "-x", "x_y", "192.168.1.1", "ab/../c"] {
            let b = bucket_name_for("", weird).unwrap();
            check_bucket("b", &b).unwrap();
            assert!(b.starts_with("v-"), "{weird} -> {b}");
        }
        assert!(bucket_name_for(&"a".repeat(50), "Needs-Hashing").is_err());
    }

    #[test]
    fn refuses_bad_buckets_and_params() {
        for bad in [
            "ab",
            "Ab1",
            "a..b",
            "-ab",
            "ab-",
            "xn--ab",
            "10.0.0.1",
            &"a".repeat(64),
        ] {
            assert!(check_bucket("bucket", bad).is_err(), "{bad}");
        }
        let p = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = S3Params::parse(&p(&[("endpoint", "http://x")])).unwrap_err();
        assert!(e.to_string().contains("instance"), "{e}");
        let e = S3Params::parse(&p(&[("mode", "object")])).unwrap_err();
        assert!(e.to_string().contains("parameters.mode"), "{e}");
        let e = S3Params::parse(&p(&[("bucket", "Bad_Bucket")])).unwrap_err();
        assert!(e.to_string().contains("parameters.bucket"), "{e}");
        let e = S3Params::parse(&p(&[("mounter", "goofys")])).unwrap_err();
        assert!(e.to_string().contains("parameters.mounter"), "{e}");
        let e = S3Params::parse(&p(&[("bucketprefix", "x")])).unwrap_err();
        assert!(e.to_string().contains("bucketprefix"), "{e}");
        let ok = S3Params::parse(&p(&[
            ("mode", "prefix"),
            ("bucket", "shared"),
            ("onDelete", "retain"),
        ]))
        .unwrap();
        assert_eq!(ok.mode, Some(Mode::Prefix));
    }

    #[test]
    fn ids_round_trip() {
        let loc = Location {
            bucket: "shared".into(),
            prefix: Some("pvc-1".into()),
        };
        let id = loc.to_id("rgw").unwrap();
        assert_eq!(id.to_string(), "rgw/shared/pvc-1");
        assert_eq!(Location::from_id("volume_id", &id).unwrap(), loc);
        let id = VolumeId::parse("volume_id", "rgw/a/b/c").unwrap();
        assert!(Location::from_id("volume_id", &id).is_err());
        let id = VolumeId::parse("volume_id", "rgw/Bad_Bucket").unwrap();
        assert!(Location::from_id("volume_id", &id).is_err());
    }
}
