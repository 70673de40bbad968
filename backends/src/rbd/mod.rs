//! `rbd.stowage.io`: Ceph RBD images as block and filesystem volumes.
//!
//! The controller talks to the cluster through librados/librbd ([`ffi`], loaded at run time):
//! images are volumes, RBD snapshots are snapshots, clone v2 makes volumes from snapshots and
//! from volumes, resize expands. Nodes attach an image with krbd (`rbd device map`, the
//! production default), rbd-nbd, or rbd-fuse + a loop device (for nodes without the rbd/nbd
//! kernel modules), then mkfs (only when the device holds no filesystem) and mount.
//!
//! Names and IDs:
//! - volume ID `<instance>/<pool>/<image>`, image `<imagePrefix><name>` (a hash when the CSI
//!   name is long or has characters an image name should not);
//! - snapshot ID `<instance>/<pool>/<image id>/<snap>`, with the image's immutable ID, so a
//!   snapshot stays reachable after its volume was deleted (see below);
//! - image metadata `stowage.volume` marks a complete volume (written last at creation: an
//!   image without it is a half-made one, which a retry removes), `stowage.attach.*` records
//!   the nodes a volume is published to (ControllerPublish), and RADOS objects
//!   `stowage.snap.<snap>` claim snapshot names pool-wide (CSI names are global), and
//!   `stowage.node.<hash>` register nodes.
//!
//! DeleteVolume of an image that still has snapshots, or clones that depend on it, does not
//! destroy it: it is renamed `<imagePrefix>deleted-<image id>` (hidden from ListVolumes, the
//! name free for a new volume) and kept while a snapshot or clone needs it. Deleting its last
//! snapshot, or the last clone (or flattening it), moves it to the RBD trash and purges it.
//! Snapshots are therefore independent of their volume, as Kubernetes users expect.
//!
//! Credentials come from the CSI secrets `userID` / `userKey` and are never logged. Calls that
//! carry no secrets (ListVolumes, GetCapacity, ControllerPublish in this driver, node
//! registration) use the instance's `keyringFile` when configured, else a connection an
//! earlier call opened. One librados connection per cluster and user is opened and reused.

// Everything that talks to Ceph (cargo feature "rbd"); the instance settings and their
// checks below do not, so a build without it still explains a configured rbd backend.
#[cfg(feature = "rbd")]
pub mod controller;
#[cfg(feature = "rbd")]
pub mod ffi;
#[cfg(feature = "rbd")]
pub mod node;

#[cfg(feature = "rbd")]
use std::collections::BTreeMap;
#[cfg(feature = "rbd")]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
#[cfg(feature = "rbd")]
use std::sync::{Arc, Mutex};

use serde::Deserialize;
#[cfg(feature = "rbd")]
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::types::Secrets;
#[cfg(feature = "rbd")]
use ffi::CephError;

#[cfg(feature = "rbd")]
pub use controller::RbdController;
#[cfg(feature = "rbd")]
pub use node::RbdNode;

/// librbd's image feature bits (RBD_FEATURE_* in librbd.h).
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const FEATURE_DEEP_FLATTEN: u64 = 1 << 5;

pub const DRIVER: &str = "rbd.stowage.io";

/// CSI secret keys (the names ceph-csi uses, so existing Secrets work).
pub const SECRET_USER: &str = "userID";
pub const SECRET_KEY: &str = "userKey";

/// Volume context keys: what a node needs besides credentials.
pub const CTX_POOL: &str = "pool";
pub const CTX_IMAGE: &str = "imageName";
pub const CTX_MONITORS: &str = "monitors";
pub const CTX_ATTACH: &str = "attach";

/// Image metadata key holding the volume record; its presence marks a complete volume.
pub const META_VOLUME: &str = "stowage.volume";
/// Image metadata key prefix of ControllerPublish records, one per node.
pub const META_ATTACH: &str = "stowage.attach.";

/// One configured Ceph cluster (and default pool).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbdInstance {
    /// Monitor addresses as in ceph.conf's `mon host`, e.g. "10.0.0.1:6789,10.0.0.2:6789".
    pub monitors: String,
    /// Pool of new images unless the StorageClass says `pool`; ListVolumes covers this pool.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Prefix of the images Stowage makes (and the only ones it lists or deletes).
    #[serde(default = "default_prefix")]
    pub image_prefix: String,
    /// Image features, comma-separated; layering + exclusive-lock maps with any kernel client.
    #[serde(default = "default_features")]
    pub image_features: String,
    /// How nodes attach images unless the StorageClass says `attach`: krbd, rbd-nbd, rbd-fuse.
    #[serde(default = "default_attach")]
    pub attach: String,
    /// Extra `rbd device map --options` for krbd (e.g. [ms_mode=prefer-crc]).
    #[serde(default)]
    pub map_options: Vec<String>,
    /// Cephx user of `keyringFile`.
    #[serde(default = "default_user")]
    pub user_id: String,
    /// A keyring file (or a file holding only the key), for calls that carry no CSI secrets.
    /// A path, typically a mounted Kubernetes Secret; the key itself never goes in this file.
    pub keyring_file: Option<PathBuf>,
    /// Node: where rbd-fuse mounts and per-attachment client configs live.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Seconds before a cluster call (monitor or OSD operation) is given up.
    #[serde(default = "default_op_timeout")]
    pub op_timeout_secs: u64,
    /// ControllerPublish only to nodes that registered (stowage-node registers itself when it
    /// has `keyringFile`); false accepts any node ID.
    #[serde(default = "yes")]
    pub require_node_registration: bool,
}

fn default_pool() -> String {
    "rbd".into()
}
fn default_prefix() -> String {
    "csi-vol-".into()
}
fn default_features() -> String {
    "layering,exclusive-lock".into()
}
fn default_attach() -> String {
    "krbd".into()
}
fn default_user() -> String {
    "admin".into()
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/stowage/rbd")
}
fn default_op_timeout() -> u64 {
    30
}
fn yes() -> bool {
    true
}

/// How a node attaches an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    Krbd,
    Nbd,
    Fuse,
}

impl Attach {
    pub fn parse(field: &'static str, s: &str) -> Result<Attach> {
        match s {
            "krbd" => Ok(Attach::Krbd),
            "rbd-nbd" | "nbd" => Ok(Attach::Nbd),
            "rbd-fuse" | "fuse" => Ok(Attach::Fuse),
            other => Err(Error::invalid(
                field,
                format!("{other:?}: expected krbd, rbd-nbd or rbd-fuse"),
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::Krbd => "krbd",
            Attach::Nbd => "rbd-nbd",
            Attach::Fuse => "rbd-fuse",
        }
    }
}

/// Parses "layering,exclusive-lock,..." into librbd feature bits.
pub fn parse_features(field: &'static str, s: &str) -> Result<u64> {
    let mut bits = 0u64;
    for f in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        bits |= match f {
            "layering" => FEATURE_LAYERING,
            "exclusive-lock" => FEATURE_EXCLUSIVE_LOCK,
            "object-map" => FEATURE_OBJECT_MAP,
            "fast-diff" => FEATURE_FAST_DIFF,
            "deep-flatten" => FEATURE_DEEP_FLATTEN,
            other => {
                return Err(Error::invalid(
                    field,
                    format!(
                        "unknown image feature {other:?} (known: layering, exclusive-lock, object-map, fast-diff, deep-flatten)"
                    ),
                ));
            }
        };
    }
    if bits & FEATURE_LAYERING == 0 {
        return Err(Error::invalid(
            field,
            "layering is required (snapshots restore and volumes clone through it)",
        ));
    }
    // librbd refuses these combinations with a bare EINVAL; say why instead.
    if bits & FEATURE_OBJECT_MAP != 0 && bits & FEATURE_EXCLUSIVE_LOCK == 0 {
        return Err(Error::invalid(field, "object-map needs exclusive-lock"));
    }
    if bits & FEATURE_FAST_DIFF != 0 && bits & FEATURE_OBJECT_MAP == 0 {
        return Err(Error::invalid(field, "fast-diff needs object-map"));
    }
    Ok(bits)
}

#[cfg(feature = "rbd")]
pub(crate) fn hash_hex(s: &str, len: usize) -> String {
    let mut h = hex::encode(Sha256::digest(s.as_bytes()));
    h.truncate(len);
    h
}

/// A name usable inside an image or snapshot name: the CSI name itself when it is short and
/// plain, else a stable hash of it. Plain names never start with `h-`, so the two forms
/// cannot collide.
#[cfg(feature = "rbd")]
pub(crate) fn name_part(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && !name.starts_with("h-")
        && !name.starts_with("deleted-")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        name.to_owned()
    } else {
        format!("h-{}", hash_hex(name, 32))
    }
}

/// Cephx credentials for one call.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Creds {
    pub user: String,
    pub key: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds {{ user: {:?}, key: *** }}", self.user)
    }
}

/// Reads the key from a keyring file (`key = ...` under a section) or a bare-key file.
pub fn read_key_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading keyringFile {}", path.display()), e))?;
    let key = text
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("key")
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('='))
                .map(|k| k.trim().to_owned())
        })
        .or_else(|| {
            let t = text.trim();
            (!t.is_empty() && !t.contains(char::is_whitespace)).then(|| t.to_owned())
        })
        .ok_or_else(|| {
            Error::invalid(
                "keyringFile",
                format!("{} holds no cephx key", path.display()),
            )
        })?;
    Ok(key)
}

/// Credentials from CSI secrets, else from the instance's keyring file.
pub fn creds_for(inst: &RbdInstance, secrets: &Secrets) -> Result<Option<Creds>> {
    match (secrets.get(SECRET_USER), secrets.get(SECRET_KEY)) {
        (Some(u), Some(k)) if !u.is_empty() && !k.is_empty() => {
            if u.contains(['\0', '\n', ' ']) || k.contains(['\0', '\n', ' ']) {
                return Err(Error::invalid(
                    "secrets",
                    "userID or userKey contains whitespace or NUL",
                ));
            }
            let user = u.strip_prefix("client.").unwrap_or(u).to_owned();
            return Ok(Some(Creds {
                user,
                key: k.to_owned(),
            }));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::invalid(
                "secrets",
                format!("{SECRET_USER} and {SECRET_KEY} must be given together"),
            ));
        }
        _ => {}
    }
    match &inst.keyring_file {
        Some(p) => Ok(Some(Creds {
            user: inst.user_id.clone(),
            key: read_key_file(p)?,
        })),
        None => Ok(None),
    }
}

/// A pool handle that keeps its cluster connection alive (fields drop in order: pool first).
#[cfg(feature = "rbd")]
pub struct PoolRef {
    pub pool: ffi::Pool,
    _cluster: Arc<ffi::Cluster>,
}

#[cfg(feature = "rbd")]
struct Conn {
    cluster: Arc<ffi::Cluster>,
    pools: Mutex<HashMap<String, Arc<PoolRef>>>,
}

/// Open connections, one per (monitors, user, key): reused by every call.
#[cfg(feature = "rbd")]
#[derive(Default)]
pub struct Connections {
    conns: Mutex<HashMap<(String, String, String), Arc<Conn>>>,
    /// Per monitors string, the last credentials that connected (for calls without secrets).
    last: Mutex<HashMap<String, Creds>>,
    /// Serializes connects so that a burst of first calls opens one connection, not fifty.
    connecting: tokio::sync::Mutex<()>,
}

#[cfg(feature = "rbd")]
impl Connections {
    /// A pool on the cluster at `monitors`, connecting (bounded by `timeout`) when needed.
    pub async fn pool(
        &self,
        monitors: &str,
        creds: Option<Creds>,
        pool: &str,
        timeout_secs: u64,
    ) -> Result<Arc<PoolRef>> {
        let creds = match creds {
            Some(c) => c,
            None => self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(monitors)
                .cloned()
                .ok_or_else(|| {
                    Error::invalid(
                        "secrets",
                        format!(
                            "{SECRET_USER} and {SECRET_KEY} are required (or configure keyringFile for calls without secrets)"
                        ),
                    )
                })?,
        };
        let key = (
            monitors.to_owned(),
            creds.user.clone(),
            hash_hex(&creds.key, 64),
        );
        let conn = {
            let found = self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            match found {
                Some(c) => c,
                None => {
                    let _g = self.connecting.lock().await;
                    let again = self
                        .conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&key)
                        .cloned();
                    match again {
                        Some(c) => c,
                        None => {
                            let (m, c2) = (monitors.to_owned(), creds.clone());
                            let cluster = blocking(move || {
                                ffi::Cluster::connect(&ffi::ConnectOptions {
                                    monitors: &m,
                                    user: &c2.user,
                                    key: &c2.key,
                                    op_timeout_secs: timeout_secs,
                                })
                                .map_err(|e| ceph_err(e, "connecting to"))
                            })
                            .await?;
                            tracing::info!(monitors, user = %creds.user, "connected to ceph");
                            let conn = Arc::new(Conn {
                                cluster: Arc::new(cluster),
                                pools: Mutex::new(HashMap::new()),
                            });
                            self.conns
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(key.clone(), conn.clone());
                            conn
                        }
                    }
                }
            }
        };
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(monitors.to_owned(), creds);
        if let Some(p) = conn
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool)
        {
            return Ok(p.clone());
        }
        let (cluster, name) = (conn.cluster.clone(), pool.to_owned());
        let p = blocking(move || {
            let pool = cluster.pool(&name).map_err(|e| match e.errno() {
                Some(libc::ENOENT) => {
                    Error::invalid("parameters.pool", format!("pool {name:?} does not exist"))
                }
                _ => ceph_err(e, "opening pool"),
            })?;
            Ok(Arc::new(PoolRef {
                pool,
                _cluster: cluster,
            }))
        })
        .await?;
        conn.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool.to_owned(), p.clone());
        Ok(p)
    }

    /// The cluster handle behind a pool's connection, for cluster-wide stats.
    pub async fn cluster_stat(
        &self,
        monitors: &str,
        creds: Option<Creds>,
        pool: &str,
        t: u64,
    ) -> Result<(u64, u64)> {
        let p = self.pool(monitors, creds, pool, t).await?;
        blocking(move || {
            p._cluster
                .stat()
                .map_err(|e| ceph_err(e, "cluster stat of"))
        })
        .await
    }
}

/// Runs blocking librados/librbd work off the async threads.
#[cfg(feature = "rbd")]
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("ceph call panicked or was cancelled: {e}")))?
}

/// Maps a librados/librbd failure onto the error kinds callers act on.
#[cfg(feature = "rbd")]
pub fn ceph_err(e: CephError, doing: &str) -> Error {
    let msg = format!("{doing} {e}");
    match &e {
        CephError::Library { .. } => Error::FailedPrecondition(e.to_string()),
        CephError::Invalid(m) => Error::invalid("request", m),
        CephError::Call { errno, .. } => match *errno {
            libc::ETIMEDOUT => Error::Unavailable(format!(
                "{msg}: the cluster did not answer in time (monitors or OSDs down?)"
            )),
            libc::ENOTCONN | libc::ESHUTDOWN | libc::ECONNREFUSED | libc::EHOSTUNREACH => {
                Error::Unavailable(msg)
            }
            libc::ENOENT => Error::NotFound {
                what: "ceph object",
                id: msg,
            },
            libc::EEXIST => Error::AlreadyExists(msg),
            libc::EBUSY | libc::ENOTEMPTY => Error::FailedPrecondition(format!(
                "{msg}: in use (mapped or open on a node, or has snapshots/clones)"
            )),
            libc::ENOSPC | libc::EDQUOT => Error::ResourceExhausted(msg),
            libc::EACCES | libc::EPERM => Error::FailedPrecondition(format!(
                "{msg}: permission denied (check the cephx user, key and caps)"
            )),
            libc::ERANGE | libc::EFBIG => Error::OutOfRange(msg),
            _ => Error::Internal(msg),
        },
    }
}

/// Checks an instance's static settings once, at start.
pub fn validate_instance(name: &str, i: &RbdInstance) -> Result<()> {
    crate::volume_id::validate_instance_name(name)?;
    if i.monitors.trim().is_empty() || i.monitors.contains(['\0', '\n']) {
        return Err(Error::invalid(
            "monitors",
            format!("instance {name}: monitors must be set"),
        ));
    }
    check_pool_name("pool", &i.pool)?;
    parse_features("imageFeatures", &i.image_features)?;
    Attach::parse("attach", &i.attach)?;
    if i.image_prefix.is_empty()
        || i.image_prefix.len() > 24
        || !i
            .image_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Error::invalid(
            "imagePrefix",
            "1-24 of [A-Za-z0-9._-] (it starts every image name Stowage makes)",
        ));
    }
    Ok(())
}

pub fn check_pool_name(field: &'static str, p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && p.len() <= 100
        && !p.starts_with(['.', '-'])
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{p:?} is not a pool name Stowage accepts"),
        ))
    }
}

/// Parameters shared by controller and node: pool names in IDs, instances by name.
#[cfg(feature = "rbd")]
pub(crate) fn instance_map(
    instances: &BTreeMap<String, RbdInstance>,
) -> Result<BTreeMap<String, RbdInstance>> {
    for (n, i) in instances {
        validate_instance(n, i)?;
    }
    Ok(instances.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_parse_and_refuse() {
        assert_eq!(
            parse_features("f", "layering,exclusive-lock").unwrap(),
            FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK
        );
        assert!(parse_features("f", "exclusive-lock").is_err());
        assert!(parse_features("f", "layering,object-map").is_err());
        let e = parse_features("parameters.imageFeatures", "layering,jornaling").unwrap_err();
        assert!(e.to_string().contains("jornaling"), "{e}");
    }

    #[test]
    fn names_are_plain_or_hashed() {
        assert_eq!(name_part("pvc-1"), "pvc-1");
        assert!(name_part(&"x".repeat(100)).starts_with("h-"));
        assert!(name_part("a/b").starts_with("h-"));
        assert!(name_part("h-abc").starts_with("h-") && name_part("h-abc") != "h-abc");
        assert_eq!(name_part("a b"), name_part("a b"));
    }

    #[test]
    fn key_files() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(
            &k,
            "[client.admin]\n\tkey = AQBx==\n\tcaps mon = \"allow *\"\n",
        )
        .unwrap();
        assert_eq!(read_key_file(&k).unwrap(), "AQBx==");
        std::fs::write(&k, "AQBy==\n").unwrap();
        assert_eq!(read_key_file(&k).unwrap(), "AQBy==");
        std::fs::write(&k, "").unwrap();
        assert!(read_key_file(&k).is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let c = crate::Config::parse(include_str!("../../../examples/rbd.yaml")).unwrap();
        let crate::Config::Rbd(r) = c else {
            panic!("not rbd")
        };
        for (n, i) in &r.instances {
            validate_instance(n, i).unwrap();
        }
        assert_eq!(r.instances["main"].attach, "krbd");
    }

    #[test]
    fn creds_never_print_the_key() {
        let c = Creds {
            user: "admin".into(),
            key: "SECRETKEY".into(),
        };
        assert!(!format!("{c:?}").contains("SECRETKEY"));
    }
}
