//! What the plugin remembers about each Docker volume, one JSON file per volume name under
//! `<state-dir>/volumes/`, written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a plugin killed at any moment restarts with either the old or the new record
//! and never a torn one. One file per name means concurrent calls on different volumes never
//! rewrite each other's state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::options::Reclaim;

/// One Docker volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub name: String,
    /// The backend volume (`<instance>/<path>`), as the CSI plugins know it.
    pub volume_id: String,
    /// The driver options as the user gave them (compared on a repeated Create).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    pub reclaim: Reclaim,
    /// The backend's volume context (what a node needs to stage it).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Adopted with volumeId rather than created by this driver.
    #[serde(default)]
    pub adopted: bool,
    /// Removed with reclaim=recycle: scrubbed, invisible to Docker, waiting for the next
    /// Create with this name.
    #[serde(default)]
    pub recycled: bool,
    /// Docker mount IDs (one per container mount) holding the volume mounted on this node.
    #[serde(default)]
    pub mounts: BTreeSet<String>,
    /// What ControllerPublish returned, for backends that attach (attachRequired).
    #[serde(default)]
    pub publish_context: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Self {
        Store {
            dir: state_dir.join("volumes"),
        }
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        // Names are validated ([A-Za-z0-9_.-], no leading dot), so they are safe file names.
        self.dir.join(format!("{name}.json"))
    }

    /// Every record on disk. An unreadable file is logged and skipped rather than keeping the
    /// plugin from starting: its volume stays on the backend, and creating the name again
    /// finds it there.
    pub fn load_all(&self) -> std::io::Result<BTreeMap<String, Record>> {
        std::fs::create_dir_all(&self.dir)?;
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                // A write the plugin did not finish (killed between create and rename).
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if path.file_stem().and_then(|s| s.to_str()) == Some(r.name.as_str()) => {
                    out.insert(r.name.clone(), r);
                }
                Ok(r) => {
                    tracing::error!(file = %path.display(), name = %r.name, "state file name does not match the volume it describes; ignored");
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable state file; ignored");
                }
            }
        }
        Ok(out)
    }

    pub async fn save(&self, r: &Record) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
        let dir = self.dir.clone();
        let path = self.path_of(&r.name);
        tokio::task::spawn_blocking(move || write_atomic(&dir, &path, &bytes))
            .await
            .map_err(std::io::Error::other)?
    }

    pub async fn remove(&self, name: &str) -> std::io::Result<()> {
        let path = self.path_of(name);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> Record {
        Record {
            name: name.into(),
            volume_id: format!("default/{name}"),
            options: BTreeMap::from([("size".into(), "1Gi".into())]),
            reclaim: Reclaim::Delete,
            context: BTreeMap::new(),
            capacity_bytes: 1 << 30,
            created_at: 1,
            adopted: false,
            recycled: false,
            mounts: BTreeSet::from(["m1".to_string()]),
            publish_context: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn round_trips_and_skips_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path());
        s.save(&rec("a")).await.unwrap();
        s.save(&rec("b")).await.unwrap();
        let mut b2 = rec("b");
        b2.mounts.clear();
        s.save(&b2).await.unwrap();
        std::fs::write(dir.path().join("volumes/c.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("volumes/.tmp-dead"), b"half").unwrap();
        std::fs::write(
            dir.path().join("volumes/d.json"),
            serde_json::to_vec(&rec("x")).unwrap(),
        )
        .unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(all["a"], rec("a"));
        assert!(all["b"].mounts.is_empty());
        s.remove("a").await.unwrap();
        s.remove("a").await.unwrap();
        assert_eq!(s.load_all().unwrap().len(), 1);
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
