//! The YAML configuration file: which backend this process serves and its named instances.
//!
//! One process serves one backend (one CSI driver name, one socket), because CSIDriver objects
//! differ per backend (attachRequired, fsGroupPolicy) and a crash in one backend's mount helper
//! must not take the others down. Several instances of that backend (NFS servers, base
//! directories) can live in one file; StorageClass parameter `instance` picks one.
//!
//! ```yaml
//! backend: nfs
//! instances:
//!   main:
//!     server: 10.0.0.5
//!     export: /export
//!     baseDir: stowage
//! ```
//! Secrets never go here: they come in CSI requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum Config {
    Local(Instances<LocalInstance>),
    Nfs(Instances<NfsInstance>),
    S3(S3Config),
    Glusterfs(crate::glusterfs::GlusterConfig),
    Rbd(Instances<crate::rbd::RbdInstance>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instances<T> {
    pub instances: BTreeMap<String, T>,
}

/// Ownership and size limit of new volume directories, common to the directory backends
/// (serde's `flatten` cannot be combined with `deny_unknown_fields`, so each instance type
/// repeats the fields and hands them over through [`DirSettings`]).
#[derive(Debug, Clone, Default)]
pub struct DirSettings {
    pub dir_mode: Option<String>,
    pub dir_uid: Option<u32>,
    pub dir_gid: Option<u32>,
    pub max_volume_bytes: u64,
}

impl DirSettings {
    pub fn attrs(&self) -> Result<crate::fs::DirAttrs> {
        let mode = match &self.dir_mode {
            None => 0o777,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    Error::invalid(
                        "dirMode",
                        format!("{m:?} is not an octal mode such as \"0775\""),
                    )
                })?,
        };
        Ok(crate::fs::DirAttrs {
            mode,
            uid: self.dir_uid,
            gid: self.dir_gid,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalInstance {
    /// Directory holding this instance's volumes (created if missing).
    pub base_dir: PathBuf,
    /// Offer raw block volumes (sparse image + loop device). Default true.
    #[serde(default = "yes")]
    pub block: bool,
    /// Mode of new volume directories, octal text as in chmod ("0775"). Default 0777.
    pub dir_mode: Option<String>,
    pub dir_uid: Option<u32>,
    pub dir_gid: Option<u32>,
    /// Largest volume handed out, in bytes (0 or absent = no limit).
    #[serde(default)]
    pub max_volume_bytes: u64,
    /// How directory volumes' sizes are enforced: `auto` (default: project quotas when the
    /// base directory's filesystem has them on, else recorded only), `quota`, `image` (an
    /// ext4 image per volume on a loop device), `off`. See `local::capacity`.
    pub capacity: Option<String>,
}

macro_rules! dir_settings {
    ($t:ty) => {
        impl $t {
            pub fn dir_settings(&self) -> DirSettings {
                DirSettings {
                    dir_mode: self.dir_mode.clone(),
                    dir_uid: self.dir_uid,
                    dir_gid: self.dir_gid,
                    max_volume_bytes: self.max_volume_bytes,
                }
            }
        }
    };
}
dir_settings!(LocalInstance);
dir_settings!(NfsInstance);

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NfsInstance {
    /// NFS server address (IP or name) as both controller and nodes reach it.
    pub server: String,
    /// Exported path (the pseudo path for NFSv4/ganesha), e.g. /export.
    pub export: String,
    /// Directory inside the export that holds the volumes; "" = the export root.
    #[serde(default)]
    pub base_dir: String,
    /// NFS and MOUNT ports; absent = ask the server's portmapper.
    pub nfs_port: Option<u16>,
    pub mount_port: Option<u16>,
    /// AUTH_SYS identity of the controller's NFS client (the owner of what it creates).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Connect from a port below 1024 (needs root); servers with `secure` exports demand it.
    #[serde(default)]
    pub privileged_port: bool,
    /// Mount options nodes use unless the StorageClass gives mountOptions, e.g. [nfsvers=4.1].
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// Seconds before an NFS call from the controller is given up.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Mode of new volume directories, octal text as in chmod ("0775"). Default 0777.
    pub dir_mode: Option<String>,
    pub dir_uid: Option<u32>,
    pub dir_gid: Option<u32>,
    /// Largest volume handed out, in bytes (0 or absent = no limit).
    #[serde(default)]
    pub max_volume_bytes: u64,
}

fn default_timeout() -> u64 {
    10
}

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

impl Config {
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| Error::invalid("config", e))?;
        let names: Vec<&String> = match &cfg {
            Config::Local(i) => i.instances.keys().collect(),
            Config::Nfs(i) => i.instances.keys().collect(),
            Config::S3(i) => i.instances.keys().collect(),
            Config::Glusterfs(i) => i.instances.keys().collect(),
            Config::Rbd(i) => i.instances.keys().collect(),
        };
        if names.is_empty() {
            return Err(Error::invalid(
                "config",
                "instances: at least one instance is required",
            ));
        }
        for n in names {
            crate::volume_id::validate_instance_name(n).map_err(|_| {
                Error::invalid(
                    "config",
                    format!("instance name {n:?} must be 1-32 of [a-z0-9-_]"),
                )
            })?;
        }
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => {
                Error::invalid("config", format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Whether the backend's controller offers snapshots (and so group snapshots). Node
    /// plugins need it too: plugin capabilities describe the driver, whichever endpoint is asked.
    pub fn offers_snapshots(&self) -> bool {
        match self {
            Config::Local(_) | Config::Nfs(_) => true,
            // Subdir mode only: copies through the management mount.
            Config::Glusterfs(c) => c.subdir_mode(),
            // Server-side copies of the bucket or prefix.
            Config::S3(_) => true,
            // RBD snapshots.
            Config::Rbd(_) => true,
        }
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            Config::Local(_) => crate::local::DRIVER,
            Config::Nfs(_) => crate::nfs::DRIVER,
            Config::S3(_) => crate::s3::DRIVER,
            Config::Glusterfs(_) => crate::glusterfs::DRIVER,
            Config::Rbd(_) => crate::rbd::DRIVER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_examples() {
        let c = Config::parse(
            "backend: local\ninstances:\n  default:\n    baseDir: /tmp/x\n    dirMode: \"0750\"\n",
        )
        .unwrap();
        let Config::Local(l) = &c else {
            panic!("not local")
        };
        assert_eq!(
            l.instances["default"].dir_settings().attrs().unwrap().mode,
            0o750
        );
        assert!(l.instances["default"].block);
        let c = Config::parse(
            "backend: nfs\ninstances:\n  main:\n    server: 127.0.0.1\n    export: /export\n    mountOptions: [nfsvers=4.1]\n",
        )
        .unwrap();
        assert_eq!(c.driver_name(), "nfs.stowage.io");
    }

    #[test]
    fn refuses_bad_config() {
        for bad in [
            "backend: zfs\ninstances: {}\n",
            "backend: local\ninstances: {}\n",
            "backend: local\ninstances:\n  default:\n    baseDir: /x\n    bogus: 1\n",
            "backend: local\ninstances:\n  Bad_Name:\n    baseDir: /x\n",
            "backend: nfs\ninstances:\n  a:\n    export: /e\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        let e = Config::parse(
            "backend: local\ninstances:\n  d:\n    baseDir: /x\n    dirMode: \"999\"\n",
        )
        .unwrap()
        .clone();
        let Config::Local(l) = e else { panic!() };
        assert!(l.instances["d"].dir_settings().attrs().is_err());
    }
}
