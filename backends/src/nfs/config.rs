//! `backend: nfs` configuration: the NFS export (and directory inside it) of each instance.
//!
//! ```yaml
//! backend: nfs
//! instances:
//!   main:
//!     server: 10.0.0.5
//!     export: /export
//!     baseDir: stowage
//! ```

use serde::Deserialize;

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

crate::fs::dir_settings!(NfsInstance);
