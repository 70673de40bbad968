//! Objects as our own writes returned them, kept until the watch cache shows them (or for
//! half a minute). KCM's PV controller does the same ("storeObjectUpdate" into its own caches): a sync
//! triggered by one of our writes often runs before the watch has delivered the others, and
//! deciding on the older cached copy means a write that can only fail with a Conflict, a
//! retry, and a second sync for nothing.
//!
//! Only a strictly newer copy of the same object (same UID, higher resourceVersion) replaces
//! the cached one. resourceVersions are opaque by contract; like KCM, this compares them as
//! the integers (etcd revisions) every API server in practice makes them, and falls back to
//! the cache when either does not parse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use tokio::time::Instant;

/// How long a written copy is kept when the cache does not catch up (the object was deleted,
/// or the watch is down and will relist).
const KEEP: Duration = Duration::from_secs(30);
/// Pruned beyond this many entries (a burst of writes larger than a minute's worth).
const MAX: usize = 20_000;

pub struct Fresh<K> {
    objects: Mutex<HashMap<String, (Arc<K>, Instant)>>,
}

impl<K> Default for Fresh<K> {
    fn default() -> Self {
        Fresh {
            objects: Mutex::new(HashMap::new()),
        }
    }
}

fn rv(meta: &ObjectMeta) -> Option<u64> {
    meta.resource_version.as_deref()?.parse().ok()
}

/// Is `a` a later version of the same object than `b`?
pub fn is_newer(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    a.uid.is_some() && a.uid == b.uid && matches!((rv(a), rv(b)), (Some(x), Some(y)) if x > y)
}

fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

impl<K: Resource + Clone> Fresh<K> {
    /// Keeps `obj` as returned by a write.
    pub fn remember(&self, obj: &K) {
        let Ok(mut m) = self.objects.lock() else {
            return;
        };
        if m.len() >= MAX {
            m.retain(|_, (_, at)| at.elapsed() < KEEP);
        }
        let k = key(obj.meta());
        let newer = m
            .get(&k)
            .is_none_or(|(old, _)| !is_newer(old.meta(), obj.meta()));
        if newer {
            m.insert(k, (Arc::new(obj.clone()), Instant::now()));
        }
    }

    /// Drops the copy of an object we deleted.
    pub fn forget(&self, namespace: &str, name: &str) {
        if let Ok(mut m) = self.objects.lock() {
            m.remove(&format!("{namespace}/{name}"));
        }
    }

    /// The newer of the cached copy and our written one; forgets the written one once the
    /// cache has caught up with it.
    pub fn newest(&self, cached: Arc<K>) -> Arc<K> {
        let Ok(mut m) = self.objects.lock() else {
            return cached;
        };
        let k = key(cached.meta());
        match m.get(&k) {
            Some((w, at)) if at.elapsed() < KEEP && is_newer(w.meta(), cached.meta()) => w.clone(),
            Some(_) => {
                m.remove(&k);
                cached
            }
            None => cached,
        }
    }

    /// Every written copy still newer than what `cached` (name → cached copy) holds.
    pub fn newer_than(&self, cached: impl Fn(&str) -> Option<Arc<K>>) -> Vec<Arc<K>> {
        let Ok(mut m) = self.objects.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        m.retain(|_, (w, at)| {
            if at.elapsed() >= KEEP {
                return false;
            }
            let name = w.meta().name.as_deref().unwrap_or("");
            match cached(name) {
                Some(c) if !is_newer(w.meta(), c.meta()) => false,
                // Not in the cache (yet): a volume we just created.
                _ => {
                    out.push(w.clone());
                    true
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolume;

    fn pv(uid: &str, rv: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pv".into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn newer_only_for_the_same_object_and_a_higher_version() {
        assert!(is_newer(&pv("u", "11").metadata, &pv("u", "9").metadata));
        assert!(!is_newer(&pv("u", "9").metadata, &pv("u", "11").metadata));
        assert!(!is_newer(&pv("u", "9").metadata, &pv("u", "9").metadata));
        assert!(!is_newer(&pv("v", "11").metadata, &pv("u", "9").metadata));
        assert!(!is_newer(&pv("u", "x").metadata, &pv("u", "9").metadata));
    }

    #[tokio::test]
    async fn the_written_copy_wins_until_the_cache_catches_up() {
        let f = Fresh::<PersistentVolume>::default();
        f.remember(&pv("u", "12"));
        assert_eq!(
            f.newest(Arc::new(pv("u", "10"))).metadata.resource_version,
            Some("12".into())
        );
        assert_eq!(f.newer_than(|_| Some(Arc::new(pv("u", "10")))).len(), 1);
        // Not in the cache at all: still offered (a volume just created).
        assert_eq!(f.newer_than(|_| None).len(), 1);
        // An older write never replaces a newer one.
        f.remember(&pv("u", "11"));
        assert_eq!(
            f.newer_than(|_| None)[0].metadata.resource_version,
            Some("12".into())
        );
        // The cache caught up: forgotten.
        assert_eq!(
            f.newest(Arc::new(pv("u", "12"))).metadata.resource_version,
            Some("12".into())
        );
        assert!(f.newer_than(|_| None).is_empty());
        // A new object under the same name (another UID): the cache's copy.
        f.remember(&pv("u", "20"));
        assert_eq!(
            f.newest(Arc::new(pv("w", "15"))).metadata.uid,
            Some("w".into())
        );
    }
}
