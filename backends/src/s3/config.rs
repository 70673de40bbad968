//! `backend: s3` configuration: the S3 endpoints and how volumes map onto buckets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `backend: s3`: S3 endpoints (AWS, Ceph RGW, MinIO...). Credentials are never configured
/// here: they come from the CSI secrets of each request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Config {
    pub instances: BTreeMap<String, S3Instance>,
    /// Node only: where staged mounts are recorded (with their credentials, mode 0600) so that
    /// a restarted node plugin can find and heal them.
    #[serde(default = "default_s3_state_dir")]
    pub node_state_dir: PathBuf,
}

fn default_s3_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/stowage/s3")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Instance {
    /// `http(s)://host[:port]`; absent = AWS (the regional endpoint of `region`).
    pub endpoint: Option<String>,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which RGW and MinIO usually need.
    #[serde(default)]
    pub path_style: bool,
    /// `bucket` (a bucket per volume, default) or `prefix` (a prefix per volume in `bucket`).
    pub mode: Option<String>,
    /// The shared bucket of prefix mode (created if missing).
    pub bucket: Option<String>,
    /// Prepended to bucket names in bucket mode, e.g. `k8s-`.
    #[serde(default)]
    pub bucket_prefix: String,
    /// FUSE mounter nodes use: s3fs (default) or rclone.
    pub mounter: Option<String>,
    /// Mounter options used when the StorageClass gives no mountOptions.
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// Seconds before one S3 call from the controller is given up.
    #[serde(default = "default_s3_timeout")]
    pub timeout_secs: u64,
    /// Largest volume handed out, in bytes (0 or absent = no limit).
    #[serde(default)]
    pub max_volume_bytes: u64,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

fn default_s3_timeout() -> u64 {
    30
}
