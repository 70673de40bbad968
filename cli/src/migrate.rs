//! `stowage migrate-intree`: in-tree `nfs:` PVs become `nfs.stowage.io` CSI PVs on the same
//! export path, without copying data. The decision is pure ([`plan`]): the Stowage volume is
//! the one the driver itself lists with the same server and share, so the node mounts exactly
//! what the in-tree plugin mounted; PVs used by pods are refused. [`apply`] then swaps the
//! object under the same name (a PV's source is immutable): reclaim set to Retain for the
//! swap, the old PV deleted, the new one created with the same claimRef (UID included), so
//! the claim, which still names the PV, binds to it again and keeps its data.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use stowage_csi::v1;

/// Where the in-tree source of a migrated PV is kept (for the record, and to undo by hand).
pub const ANN_MIGRATED_FROM: &str = "stowage.io/migrated-from-intree-nfs";
pub const NFS_DRIVER: &str = "nfs.stowage.io";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("PV {pv} is not an in-tree nfs PV")]
    NotInTreeNfs { pv: String },
    #[error(
        "PV {pv} is used by pod {pods} (claim {claim}); its mounts are the in-tree plugin's and would not move. Stop the pods (scale the workload to 0), run migrate-intree again, then start them: the claim keeps its data"
    )]
    InUse {
        pv: String,
        claim: String,
        pods: String,
    },
    #[error(
        "PV {pv}: {server}:{path} is not a volume of {driver}: no configured NFS instance of stowage-controller lists it (the driver lists {listed}). Add an instance whose server is {server} and whose export/baseDir holds {path}"
    )]
    NoVolume {
        pv: String,
        server: String,
        path: String,
        driver: &'static str,
        listed: String,
    },
}

fn norm(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_owned()
    }
}

/// Pods (not finished) that use the claim.
fn users(pods: &[Pod], ns: &str, claim: &str) -> Vec<String> {
    pods.iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim)
                })
            })
        })
        .filter_map(|p| Some(format!("{ns}/{}", p.metadata.name.as_deref()?)))
        .collect()
}

/// The CSI PV that replaces `old`, or why not.
pub fn plan(
    old: &PersistentVolume,
    volumes: &[v1::Volume],
    pods: &[Pod],
) -> Result<PersistentVolume, Refusal> {
    let name = old.metadata.name.clone().unwrap_or_default();
    let spec = old.spec.clone().unwrap_or_default();
    let Some(nfs) = spec.nfs.clone() else {
        return Err(Refusal::NotInTreeNfs { pv: name });
    };
    if let Some(c) = &spec.claim_ref {
        let (ns, cn) = (
            c.namespace.as_deref().unwrap_or(""),
            c.name.as_deref().unwrap_or(""),
        );
        let using = users(pods, ns, cn);
        if !using.is_empty() {
            return Err(Refusal::InUse {
                pv: name,
                claim: format!("{ns}/{cn}"),
                pods: using.join(", "),
            });
        }
    }
    let want = norm(&nfs.path);
    let vol = volumes.iter().find(|v| {
        v.volume_context.get("server").map(String::as_str) == Some(nfs.server.as_str())
            && v.volume_context.get("share").map(|s| norm(s)) == Some(want.clone())
    });
    let Some(vol) = vol else {
        let mut listed: Vec<String> = volumes
            .iter()
            .take(5)
            .map(|v| {
                format!(
                    "{}:{}",
                    v.volume_context.get("server").cloned().unwrap_or_default(),
                    v.volume_context.get("share").cloned().unwrap_or_default()
                )
            })
            .collect();
        if volumes.len() > 5 {
            listed.push("...".into());
        }
        return Err(Refusal::NoVolume {
            pv: name,
            server: nfs.server,
            path: nfs.path,
            driver: NFS_DRIVER,
            listed: if listed.is_empty() {
                "nothing".into()
            } else {
                listed.join(", ")
            },
        });
    };
    let mut annotations = old.metadata.annotations.clone().unwrap_or_default();
    annotations.insert(
        ANN_MIGRATED_FROM.to_owned(),
        json!({"server": nfs.server, "path": nfs.path, "readOnly": nfs.read_only}).to_string(),
    );
    let mut claim_ref = spec.claim_ref.clone();
    if let Some(c) = claim_ref.as_mut() {
        // The claim's UID stays (it is the same claim); its version is of the old object.
        c.resource_version = None;
    }
    let mut new_spec = spec.clone();
    new_spec.nfs = None;
    new_spec.claim_ref = claim_ref;
    new_spec.csi = Some(CSIPersistentVolumeSource {
        driver: NFS_DRIVER.to_owned(),
        volume_handle: vol.volume_id.clone(),
        read_only: nfs.read_only,
        volume_attributes: Some(vol.volume_context.clone().into_iter().collect()),
        ..Default::default()
    });
    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name),
            labels: old.metadata.labels.clone(),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(new_spec),
        status: None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Timeout(String),
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Api { what, source }
}

/// Swaps `old` for `new` (same name) and waits for its claim to be Bound to it again.
pub async fn apply(
    client: &Client,
    old: &PersistentVolume,
    new: &PersistentVolume,
) -> Result<(), MigrateError> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let name = old.metadata.name.clone().unwrap_or_default();
    // Retain first: deleting the object must never let anything recycle or delete the data.
    pvs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}})),
    )
    .await
    .map_err(api(format!("setting PV {name} to Retain")))?;
    match pvs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(api(format!("deleting PV {name}"))(e)),
    }
    // kubernetes.io/pv-protection holds a bound PV; the claim is not left without a PV for
    // long, and it is the same data.
    let _ = pvs
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    wait(
        Duration::from_secs(60),
        &format!("PV {name} to go"),
        || async {
            Ok(pvs
                .get_opt(&name)
                .await
                .map_err(api(format!("reading PV {name}")))?
                .is_none())
        },
    )
    .await?;
    pvs.create(&PostParams::default(), new)
        .await
        .map_err(api(format!("creating the CSI PV {name}")))?;
    if let Some(c) = new.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) {
        let (Some(ns), Some(cn)) = (c.namespace.as_deref(), c.name.as_deref()) else {
            return Ok(());
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let pvs = pvs.clone();
        wait(
            Duration::from_secs(120),
            &format!("claim {ns}/{cn} to be Bound to {name} again"),
            || async {
                let claim = claims
                    .get_opt(cn)
                    .await
                    .map_err(api(format!("reading claim {ns}/{cn}")))?;
                let Some(claim) = claim else {
                    // The claim is gone: the PV goes Released, as before the migration.
                    return Ok(true);
                };
                let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
                    && claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
                        == Some(name.as_str());
                let pv_bound = pvs
                    .get_opt(&name)
                    .await
                    .map_err(api(format!("reading PV {name}")))?
                    .and_then(|p| p.status.and_then(|s| s.phase))
                    .as_deref()
                    == Some("Bound");
                Ok(bound && pv_bound)
            },
        )
        .await?;
    }
    Ok(())
}

async fn wait<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<(), MigrateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, MigrateError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(MigrateError::Timeout(format!(
                "waited {}s for {what}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The reclaim policy and claim of a PV, for the report.
pub fn summary(pv: &PersistentVolume) -> BTreeMap<&'static str, String> {
    let s = pv.spec.clone().unwrap_or_default();
    BTreeMap::from([
        (
            "reclaim",
            s.persistent_volume_reclaim_policy.unwrap_or_default(),
        ),
        (
            "claim",
            s.claim_ref
                .map(|c| {
                    format!(
                        "{}/{}",
                        c.namespace.unwrap_or_default(),
                        c.name.unwrap_or_default()
                    )
                })
                .unwrap_or_default(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn intree(path: &str) -> PersistentVolume {
        obj(json!({
            "metadata": {"name": "legacy", "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}},
            "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Recycle", "mountOptions": ["nfsvers=4.1", "hard"],
                     "nfs": {"server": "10.0.0.5", "path": path},
                     "claimRef": {"namespace": "web", "name": "wp", "uid": "u-1", "resourceVersion": "77"}}
        }))
    }

    fn vol(id: &str, server: &str, share: &str) -> v1::Volume {
        v1::Volume {
            volume_id: id.into(),
            volume_context: [
                ("server".into(), server.into()),
                ("share".into(), share.into()),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn pod(name: &str, claim: &str, phase: &str) -> Pod {
        obj(json!({"metadata": {"name": name, "namespace": "web"},
                   "spec": {"containers": [{"name": "c"}],
                            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
                   "status": {"phase": phase}}))
    }

    #[test]
    fn plan_table() {
        let vols = vec![
            vol("main/other", "10.0.0.5", "/export/other"),
            vol("main/wp", "10.0.0.5", "/export/wp"),
            vol("second/wp", "10.0.0.6", "/export/wp"),
        ];
        // Same server and share (a trailing slash does not matter), finished pods do not count.
        let new = plan(
            &intree("/export/wp/"),
            &vols,
            &[pod("old", "wp", "Succeeded"), pod("x", "other", "Running")],
        )
        .unwrap();
        let spec = new.spec.clone().unwrap();
        assert!(spec.nfs.is_none());
        let csi = spec.csi.clone().unwrap();
        assert_eq!(
            (csi.driver.as_str(), csi.volume_handle.as_str()),
            (NFS_DRIVER, "main/wp")
        );
        assert_eq!(csi.volume_attributes.unwrap()["share"], "/export/wp");
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Recycle")
        );
        assert_eq!(
            spec.mount_options,
            Some(vec!["nfsvers=4.1".into(), "hard".into()])
        );
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".into()]));
        let c = spec.claim_ref.unwrap();
        assert_eq!(
            (c.uid.as_deref(), c.resource_version.as_deref()),
            (Some("u-1"), None)
        );
        let ann = new.metadata.annotations.unwrap();
        assert!(ann[ANN_MIGRATED_FROM].contains("/export/wp/"));
        assert_eq!(ann["pv.kubernetes.io/bound-by-controller"], "yes");

        // A pod that is running or about to run: refused, naming it.
        let e = plan(
            &intree("/export/wp"),
            &vols,
            &[pod("web-0", "wp", "Running")],
        )
        .unwrap_err();
        assert!(
            matches!(&e, Refusal::InUse { pods, .. } if pods == "web/web-0"),
            "{e}"
        );
        assert!(e.to_string().contains("scale the workload to 0"));
        let e = plan(
            &intree("/export/wp"),
            &vols,
            &[pod("web-0", "wp", "Pending")],
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::InUse { .. }));

        // No instance serves that path: refused, with what the driver does list.
        let e = plan(&intree("/srv/elsewhere"), &vols, &[]).unwrap_err();
        assert!(
            matches!(&e, Refusal::NoVolume { listed, .. } if listed.contains("10.0.0.5:/export/wp")),
            "{e}"
        );

        // Not in-tree NFS.
        let mut csi = intree("/export/wp");
        csi.spec.as_mut().unwrap().nfs = None;
        assert!(matches!(
            plan(&csi, &vols, &[]),
            Err(Refusal::NotInTreeNfs { .. })
        ));
    }
}
