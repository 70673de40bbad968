//! `backend: local` configuration: one base directory per instance.
//!
//! ```yaml
//! backend: local
//! instances:
//!   default:
//!     baseDir: /var/lib/stowage/local
//!     capacity: image
//! ```

use std::path::PathBuf;

use serde::Deserialize;

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

crate::fs::dir_settings!(LocalInstance);

fn yes() -> bool {
    true
}
