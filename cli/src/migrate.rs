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
use stowage_backends::config::NfsInstance;
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
        "PV {pv}: {server}:{path} is under no NFS instance of {driver} in --config (instances: {listed}). Add an instance whose server is {server} and whose export/baseDir holds {path}, and give the same file to stowage-controller"
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

/// Refuses a PV whose claim is used by a pod that has not finished.
pub fn check_unused(old: &PersistentVolume, pods: &[Pod]) -> Result<(), Refusal> {
    let name = old.metadata.name.clone().unwrap_or_default();
    let Some(c) = old.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return Ok(());
    };
    let (ns, cn) = (
        c.namespace.as_deref().unwrap_or(""),
        c.name.as_deref().unwrap_or(""),
    );
    let using = users(pods, ns, cn);
    if using.is_empty() {
        Ok(())
    } else {
        Err(Refusal::InUse {
            pv: name,
            claim: format!("{ns}/{cn}"),
            pods: using.join(", "),
        })
    }
}

/// The instance of the controller's configuration that serves the PV's export path, and the
/// directory below its export/baseDir: (instance, subDir).
pub fn locate(
    old: &PersistentVolume,
    instances: &BTreeMap<String, NfsInstance>,
) -> Result<(String, String), Refusal> {
    let name = old.metadata.name.clone().unwrap_or_default();
    let Some(nfs) = old.spec.as_ref().and_then(|s| s.nfs.clone()) else {
        return Err(Refusal::NotInTreeNfs { pv: name });
    };
    let want = norm(&nfs.path);
    for (inst, i) in instances {
        if i.server != nfs.server {
            continue;
        }
        let root = norm(&format!(
            "{}/{}",
            i.export.trim_end_matches('/'),
            i.base_dir.trim_matches('/')
        ));
        let rel = want
            .strip_prefix(&root)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.is_empty() && !r.split('/').any(|c| c.is_empty() || c.starts_with('.')));
        if let Some(rel) = rel {
            return Ok((inst.clone(), rel.to_owned()));
        }
    }
    let listed: Vec<String> = instances
        .iter()
        .map(|(n, i)| format!("{n}: {}:{}/{}", i.server, i.export, i.base_dir))
        .collect();
    Err(Refusal::NoVolume {
        pv: name,
        server: nfs.server,
        path: nfs.path,
        driver: NFS_DRIVER,
        listed: if listed.is_empty() {
            "none".into()
        } else {
            listed.join(", ")
        },
    })
}

/// CreateVolume that adopts the directory as a Stowage volume (dirstore adopts an existing
/// directory without metadata, which is what makes Recycle work on it). onDelete=retain:
/// data the in-tree PV held is never deleted by Stowage unless someone asks for it.
pub fn adopt_request(
    old: &PersistentVolume,
    instance: &str,
    sub_dir: &str,
) -> v1::CreateVolumeRequest {
    use v1::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    let spec = old.spec.clone().unwrap_or_default();
    let bytes = spec
        .capacity
        .as_ref()
        .and_then(|c| c.get("storage"))
        .and_then(|q| stowage_provisioner::quantity::parse_bytes(&q.0).ok())
        .unwrap_or(0);
    let caps = spec
        .access_modes
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let mode = match m.as_str() {
                "ReadWriteMany" => Mode::MultiNodeMultiWriter,
                "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
                "ReadWriteOncePod" => Mode::SingleNodeSingleWriter,
                _ => Mode::SingleNodeWriter,
            };
            v1::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    mount_flags: spec.mount_options.clone().unwrap_or_default(),
                    ..Default::default()
                })),
                access_mode: Some(AccessMode { mode: mode as i32 }),
            }
        })
        .collect();
    v1::CreateVolumeRequest {
        name: format!("migrated-{}", old.metadata.name.as_deref().unwrap_or("")),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: i64::try_from(bytes).unwrap_or(0),
            limit_bytes: 0,
        }),
        volume_capabilities: caps,
        parameters: [
            ("instance".to_owned(), instance.to_owned()),
            ("subDir".to_owned(), sub_dir.to_owned()),
            ("onDelete".to_owned(), "retain".to_owned()),
        ]
        .into(),
        ..Default::default()
    }
}

/// What the driver will answer for the adopted directory (for --dry-run, which must not
/// write the volume's metadata).
pub fn predicted_volume(old: &PersistentVolume, instance: &str, sub_dir: &str) -> v1::Volume {
    let nfs = old.spec.clone().and_then(|s| s.nfs).unwrap_or_default();
    v1::Volume {
        volume_id: format!("{instance}/{sub_dir}"),
        volume_context: [
            ("server".to_owned(), nfs.server),
            ("share".to_owned(), norm(&nfs.path)),
        ]
        .into(),
        ..Default::default()
    }
}

/// The CSI PV that replaces `old` on volume `vol` (same name, claimRef, reclaim policy,
/// mount options, capacity and access modes).
pub fn plan(old: &PersistentVolume, vol: &v1::Volume) -> Result<PersistentVolume, Refusal> {
    let name = old.metadata.name.clone().unwrap_or_default();
    let spec = old.spec.clone().unwrap_or_default();
    let Some(nfs) = spec.nfs.clone() else {
        return Err(Refusal::NotInTreeNfs { pv: name });
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

    fn inst(server: &str, export: &str, base: &str) -> NfsInstance {
        serde_json::from_value(json!({"server": server, "export": export, "baseDir": base}))
            .unwrap()
    }

    #[test]
    fn locate_table() {
        let instances = BTreeMap::from([
            ("a".to_owned(), inst("10.0.0.6", "/export", "")),
            ("b".to_owned(), inst("10.0.0.5", "/export", "stowage")),
            ("c".to_owned(), inst("10.0.0.5", "/export/", "")),
        ]);
        let cases = [
            ("/export/wp", Some(("c", "wp"))),
            ("/export/wp/", Some(("c", "wp"))),
            ("/export/stowage/wp", Some(("b", "wp"))),
            ("/export/team/wp", Some(("c", "team/wp"))),
            ("/export", None),
            ("/export/.stowage", None),
            ("/exportx/wp", None),
            ("/srv/wp", None),
        ];
        for (path, want) in cases {
            let got = locate(&intree(path), &instances).ok();
            let want = want.map(|(i, r)| (i.to_owned(), r.to_owned()));
            assert_eq!(got, want, "{path}");
        }
        let e = locate(&intree("/srv/wp"), &instances).unwrap_err();
        assert!(e.to_string().contains("b: 10.0.0.5:/export/stowage"), "{e}");
        let mut csi = intree("/export/wp");
        csi.spec.as_mut().unwrap().nfs = None;
        assert!(matches!(
            locate(&csi, &instances),
            Err(Refusal::NotInTreeNfs { .. })
        ));
    }

    #[test]
    fn adopt_request_keeps_size_modes_and_options() {
        let r = adopt_request(&intree("/export/wp"), "c", "wp");
        assert_eq!(r.capacity_range.unwrap().required_bytes, 5 << 30);
        assert_eq!(r.parameters["subDir"], "wp");
        assert_eq!(r.parameters["onDelete"], "retain");
        let cap = &r.volume_capabilities[0];
        assert_eq!(
            cap.access_mode.unwrap().mode,
            v1::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32
        );
    }

    #[test]
    fn plan_table() {
        let vol = vol("main/wp", "10.0.0.5", "/export/wp");
        let new = plan(&intree("/export/wp/"), &vol).unwrap();
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

        // A pod that is running or about to run: refused, naming it; finished pods and pods
        // of other claims do not count.
        let old = intree("/export/wp");
        assert!(
            check_unused(
                &old,
                &[pod("old", "wp", "Succeeded"), pod("x", "other", "Running")]
            )
            .is_ok()
        );
        let e = check_unused(&old, &[pod("web-0", "wp", "Running")]).unwrap_err();
        assert!(
            matches!(&e, Refusal::InUse { pods, .. } if pods == "web/web-0"),
            "{e}"
        );
        assert!(e.to_string().contains("scale the workload to 0"));
        assert!(check_unused(&old, &[pod("web-0", "wp", "Pending")]).is_err());
    }
}
