//! Claims restored from a VolumeSnapshot: which snapshot a claim names (`dataSource` or
//! `dataSourceRef`), and what it amounts to for this driver ([`plan::restore_source`]).

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::{Api, Client};

use super::plan::{self, RestoreSource};
use super::types::{GROUP, VolumeSnapshot, VolumeSnapshotContent};
use crate::objects as o;

/// The snapshot a claim restores from, when its data source is a VolumeSnapshot in its own
/// namespace.
pub fn snapshot_source_name(c: &PersistentVolumeClaim) -> Option<&str> {
    let spec = c.spec.as_ref()?;
    if let Some(ds) = spec.data_source.as_ref() {
        return (ds.kind == "VolumeSnapshot" && ds.api_group.as_deref() == Some(GROUP))
            .then_some(ds.name.as_str());
    }
    let r = spec.data_source_ref.as_ref()?;
    let same_ns = r
        .namespace
        .as_deref()
        .is_none_or(|ns| ns == o::namespace(&c.metadata));
    (r.kind == "VolumeSnapshot" && r.api_group.as_deref() == Some(GROUP) && same_ns)
        .then_some(r.name.as_str())
}

/// Looks the claim's snapshot and its content up in the API (a restore is rare; no cache
/// is kept for it). None when the claim does not restore from a snapshot.
pub async fn lookup(
    client: &Client,
    driver: &str,
    claim: &PersistentVolumeClaim,
) -> Option<RestoreSource> {
    let name = snapshot_source_name(claim)?;
    let ns = o::namespace(&claim.metadata);
    let snapshot = match Api::<VolumeSnapshot>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return Some(RestoreSource::NotReady(format!(
                "reading volumesnapshot {ns}/{name}: {e}"
            )));
        }
    };
    let bound = snapshot
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.bound_volume_snapshot_content_name.clone());
    let content = match bound {
        Some(b) => match Api::<VolumeSnapshotContent>::all(client.clone())
            .get_opt(&b)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return Some(RestoreSource::NotReady(format!(
                    "reading volumesnapshotcontent {b}: {e}"
                )));
            }
        },
        None => None,
    };
    Some(plan::restore_source(
        driver,
        name,
        snapshot.as_ref(),
        content.as_ref(),
    ))
}
