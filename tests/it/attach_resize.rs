//! stowage-provisioner's attach and resize duties against a real control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler from tests/infra/kube.sh) and the
//! real stowage-controller on the local backend, which advertises both
//! PUBLISH_UNPUBLISH_VOLUME (it records which node a volume is published to and refuses an RWO
//! volume to a second node) and EXPAND_VOLUME (with a size limit, `maxVolumeBytes`, past which
//! it answers OUT_OF_RANGE). Both binder modes (tests/suites/35-provisioner.sh).
//!
//! Attach: Node and CSINode objects made by hand, stowage-node processes registering the node
//! IDs with the backend, VolumeAttachments made by hand (and, in
//! `kcm_attaches_a_pod_volume`, by KCM's attach-detach controller for a pod). Resize: a claim
//! grown, grown past the limit (Infeasible), then lowered again (recovery).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use stowage_csi::v1;
use stowage_tests::provisioner::{World, node_json, serial, tail, wait_for, with_world};
use stowage_tests::{Plugin, controller_clients};

// The Ceph cluster of tests/infra/ceph.sh (STOWAGE_CEPH_ENV) and RBD plugin configs, shared with
// the RBD suite's tests.
#[path = "rbd_common.rs"]
mod rbd_common;

const T: Duration = Duration::from_secs(60);
const GI: i64 = 1 << 30;

fn pv_name(pv: &PersistentVolume) -> String {
    pv.metadata.name.clone().unwrap_or_default()
}

fn handle(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_default()
}

fn storage_of(
    m: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
) -> String {
    m.and_then(|m| m.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

fn claim_capacity(c: &PersistentVolumeClaim) -> String {
    storage_of(c.status.as_ref().and_then(|s| s.capacity.as_ref()))
}

fn resize_status(c: &PersistentVolumeClaim) -> Option<String> {
    c.status
        .as_ref()?
        .allocated_resource_statuses
        .as_ref()?
        .get("storage")
        .cloned()
}

fn condition<'a>(
    c: &'a PersistentVolumeClaim,
    t: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PersistentVolumeClaimCondition> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|x| x.type_ == t)
}

/// The backend's idea of the volume: capacity and the nodes it is published to.
async fn backend_volume(w: &World, volume_id: &str) -> Result<(i64, Vec<String>)> {
    let mut c = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
    let r = c
        .controller
        .controller_get_volume(v1::ControllerGetVolumeRequest {
            volume_id: volume_id.into(),
        })
        .await?
        .into_inner();
    let cap = r.volume.as_ref().map(|v| v.capacity_bytes).unwrap_or(0);
    let mut nodes = r.status.map(|s| s.published_node_ids).unwrap_or_default();
    nodes.sort();
    Ok((cap, nodes))
}

async fn set_request(w: &World, claim: &str, size: &str) -> Result<()> {
    w.pvcs()
        .patch(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": size}}}})),
        )
        .await
        .with_context(|| format!("setting the request of {claim} to {size}"))?;
    Ok(())
}

/// Restarts the world's controller with a size limit, on the same socket and base directory.
async fn limit_controller(w: &mut World, max_bytes: i64) -> Result<()> {
    w.ctl.kill();
    let cfg = w.dir.path().join("local-limited.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: local\ninstances:\n  default:\n    baseDir: {}\n    maxVolumeBytes: {max_bytes}\n",
            w.base.display()
        ),
    )?;
    let _ = std::fs::remove_file(w.dir.path().join("controller.sock"));
    w.ctl = Plugin::controller(w.dir.path(), &cfg)?;
    w.ctl.ready().await?;
    Ok(())
}

#[tokio::test]
async fn resize_grows_fails_infeasibly_and_recovers() -> Result<()> {
    let _g = serial().await;
    with_world("resize", false, async |w: &mut World| {
        limit_controller(w, 5 * GI).await?;
        w.start_provisioner(&[])?;
        let class = w
            .create_class(
                "grow",
                json!({"allowVolumeExpansion": true, "reclaimPolicy": "Delete"}),
            )
            .await?;
        w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let name = pv_name(&pv);
        let vid = handle(&pv);
        let pvcs = w.pvcs();
        let pvs = w.pvs();

        // Grow: the backend, the PV and the claim follow; no node step for a directory.
        set_request(w, "data", "2Gi").await?;
        let c = wait_for("the claim to show 2Gi", T, || async {
            let c = pvcs.get("data").await?;
            Ok((claim_capacity(&c) == "2Gi").then_some(c))
        })
        .await
        .with_context(|| tail(&w.prov_log(), 40))?;
        ensure!(
            resize_status(&c).is_none(),
            "resize status left: {:?}",
            c.status
        );
        ensure!(
            condition(&c, "Resizing").is_none()
                && condition(&c, "FileSystemResizePending").is_none(),
            "conditions left: {:?}",
            c.status
        );
        ensure!(
            storage_of(
                c.status
                    .as_ref()
                    .and_then(|s| s.allocated_resources.as_ref())
            ) == "2Gi"
        );
        let p = pvs.get(&name).await?;
        ensure!(storage_of(p.spec.as_ref().and_then(|s| s.capacity.as_ref())) == "2Gi");
        ensure!(backend_volume(w, &vid).await?.0 == 2 * GI);
        w.wait_event(
            &w.ns,
            "PersistentVolumeClaim",
            "data",
            "VolumeResizeSuccessful",
            T,
        )
        .await?;

        // Past the backend's limit: Infeasible, an event, nothing grows.
        set_request(w, "data", "10Gi").await?;
        let c = wait_for("the claim to be ControllerResizeInfeasible", T, || async {
            let c = pvcs.get("data").await?;
            Ok((resize_status(&c).as_deref() == Some("ControllerResizeInfeasible")).then_some(c))
        })
        .await
        .with_context(|| tail(&w.prov_log(), 40))?;
        let err = condition(&c, "ControllerResizeError")
            .and_then(|x| x.message.clone())
            .unwrap_or_default();
        ensure!(err.contains("OutOfRange") || err.contains("limit"), "{err}");
        ensure!(claim_capacity(&c) == "2Gi");
        let ev = w
            .wait_event(
                &w.ns,
                "PersistentVolumeClaim",
                "data",
                "VolumeResizeFailed",
                T,
            )
            .await?;
        ensure!(ev.type_.as_deref() == Some("Warning"));
        ensure!(backend_volume(w, &vid).await?.0 == 2 * GI);
        // Waiting for the user is quiet: no retry storm of status writes.
        let rv = c.metadata.resource_version.clone();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let again = pvcs.get("data").await?;
        ensure!(
            again.metadata.resource_version == rv,
            "the claim kept being written while infeasible"
        );

        // Recovery: the user lowers the request (above the capacity); it goes through.
        set_request(w, "data", "3Gi").await?;
        let c = wait_for("the claim to show 3Gi", T, || async {
            let c = pvcs.get("data").await?;
            Ok((claim_capacity(&c) == "3Gi").then_some(c))
        })
        .await
        .with_context(|| tail(&w.prov_log(), 40))?;
        ensure!(resize_status(&c).is_none(), "{:?}", c.status);
        ensure!(
            condition(&c, "ControllerResizeError").is_none(),
            "{:?}",
            c.status
        );
        ensure!(
            storage_of(
                c.status
                    .as_ref()
                    .and_then(|s| s.allocated_resources.as_ref())
            ) == "3Gi"
        );
        let p = pvs.get(&name).await?;
        ensure!(storage_of(p.spec.as_ref().and_then(|s| s.capacity.as_ref())) == "3Gi");
        ensure!(backend_volume(w, &vid).await?.0 == 3 * GI);

        // Counted on /metrics.
        let (_, text) = w
            .prov
            .as_ref()
            .context("no provisioner")?
            .http_get("/metrics")?;
        let want = r#"stowage_provisioner_operations_total{operation="expand",result="success"} 2"#;
        ensure!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
        ensure!(
            text.lines().any(|l| l.starts_with(
                r#"stowage_provisioner_operations_total{operation="expand",result="failure"}"#
            )),
            "no expand failure counted:\n{text}"
        );
        Ok(())
    })
    .await
}

/// Node, CSINode and stowage-node (which registers the node ID with the backend).
struct FakeNode {
    name: String,
    _plugin: Option<Plugin>,
}

async fn fake_node(
    w: &World,
    name: &str,
    csi_driver: Option<&str>,
    register: bool,
    managed: bool,
) -> Result<FakeNode> {
    let mut n = node_json(name, &Default::default());
    if managed {
        n["metadata"]["annotations"] =
            json!({"volumes.kubernetes.io/controller-managed-attach-detach": "true"});
    }
    let node: Node = serde_json::from_value(n)?;
    Api::<Node>::all(w.client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))?;
    let drivers = match csi_driver {
        Some(d) => json!([{"name": d, "nodeID": name}]),
        None => json!([{"name": "other.example.com", "nodeID": name}]),
    };
    let csinode: CSINode = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"drivers": drivers}
    }))?;
    Api::<CSINode>::all(w.client.clone())
        .create(&PostParams::default(), &csinode)
        .await
        .with_context(|| format!("creating CSINode {name}"))?;
    let plugin = if register {
        let dir = w.dir.path().join(format!("node-{name}"));
        std::fs::create_dir_all(&dir)?;
        let cfg = w.dir.path().join("local.yaml");
        let mut p = Plugin::node(&dir, &cfg, name)?;
        p.ready().await?;
        Some(p)
    } else {
        None
    };
    Ok(FakeNode {
        name: name.into(),
        _plugin: plugin,
    })
}

fn va_json(name: &str, attacher: &str, node: &str, pv: &str) -> serde_json::Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttachment",
        "metadata": {"name": name},
        "spec": {"attacher": attacher, "nodeName": node, "source": {"persistentVolumeName": pv}}
    })
}

fn attach_error(va: &VolumeAttachment) -> Option<String> {
    va.status.as_ref()?.attach_error.as_ref()?.message.clone()
}

fn attached(va: &VolumeAttachment) -> bool {
    va.status.as_ref().is_some_and(|s| s.attached)
}

async fn wait_va<F>(w: &World, name: &str, what: &str, f: F) -> Result<VolumeAttachment>
where
    F: Fn(&VolumeAttachment) -> bool,
{
    let api: Api<VolumeAttachment> = Api::all(w.client.clone());
    let f = &f;
    wait_for(&format!("attachment {name}: {what}"), T, || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.filter(|v| f(v))) }
    })
    .await
    .with_context(|| tail(&w.prov_log(), 40))
}

async fn wait_va_gone(w: &World, name: &str) -> Result<()> {
    let api: Api<VolumeAttachment> = Api::all(w.client.clone());
    wait_for(&format!("attachment {name} to go"), T, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
    .with_context(|| tail(&w.prov_log(), 40))
}

/// Removes what an attach test made outside its namespace: attachments (finalizers stripped),
/// CSINodes and Nodes.
async fn attach_cleanup(w: &World, prefix: &str, nodes: &[FakeNode]) {
    let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
    if let Ok(list) = vas.list(&ListParams::default()).await {
        for va in list.items {
            let n = va.metadata.name.clone().unwrap_or_default();
            if n.starts_with(prefix) || va.spec.node_name.starts_with(prefix) {
                let _ = vas
                    .patch(
                        &n,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = vas.delete(&n, &DeleteParams::default()).await;
            }
        }
    }
    for n in nodes {
        let _ = Api::<CSINode>::all(w.client.clone())
            .delete(&n.name, &DeleteParams::default())
            .await;
        let _ = Api::<Node>::all(w.client.clone())
            .delete(&n.name, &DeleteParams::default())
            .await;
    }
}

#[tokio::test]
async fn attach_detach_and_attach_errors() -> Result<()> {
    let _g = serial().await;
    with_world("attach", true, async |w: &mut World| {
        let ns = w.ns.clone();
        let driver = w.driver;
        let fin = format!("external-attacher/{driver}");
        let mut nodes = Vec::new();
        let r = async {
            nodes.push(fake_node(w, &format!("{ns}-a"), Some(driver), true, false).await?);
            nodes.push(fake_node(w, &format!("{ns}-b"), Some(driver), true, false).await?);
            // A node whose CSINode lists another driver only.
            nodes.push(fake_node(w, &format!("{ns}-c"), None, false, false).await?);
            let class = w
                .create_class("att", json!({"reclaimPolicy": "Delete"}))
                .await?;
            w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
                .await?;
            let pv = w.wait_bound("data", T).await?;
            let pvn = pv_name(&pv);
            let vid = handle(&pv);
            let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
            let mk = |name: &str, node: &str, pv: &str| {
                let vas = vas.clone();
                let va: VolumeAttachment =
                    serde_json::from_value(va_json(name, driver, node, pv)).unwrap_or_default();
                async move { vas.create(&PostParams::default(), &va).await }
            };

            // Attach to node a: published on the backend, finalizers on both objects.
            let va_a = format!("{ns}-va-a");
            mk(&va_a, &format!("{ns}-a"), &pvn).await?;
            let a = wait_va(w, &va_a, "attached", attached).await?;
            ensure!(attach_error(&a).is_none());
            ensure!(a.metadata.finalizers.iter().flatten().any(|f| *f == fin));
            let ann = a.metadata.annotations.clone().unwrap_or_default();
            ensure!(
                ann.get("attacher.stowage.io/node-id") == Some(&format!("{ns}-a")),
                "{ann:?}"
            );
            let p = w.pvs().get(&pvn).await?;
            ensure!(p.metadata.finalizers.iter().flatten().any(|f| *f == fin));
            ensure!(backend_volume(w, &vid).await?.1 == vec![format!("{ns}-a")]);

            // RWO elsewhere, a node without the driver, a node without CSINode, a missing PV:
            // each a clear attachError and an event, none attached.
            let va_b = format!("{ns}-va-b");
            mk(&va_b, &format!("{ns}-b"), &pvn).await?;
            let b = wait_va(w, &va_b, "attachError", |v| attach_error(v).is_some()).await?;
            let msg = attach_error(&b).unwrap_or_default();
            ensure!(
                msg.contains("already published") || msg.contains("single-node"),
                "{msg}"
            );
            ensure!(!attached(&b));
            w.wait_event("default", "VolumeAttachment", &va_b, "AttachFailed", T)
                .await?;
            let cases = [
                (
                    format!("{ns}-va-c"),
                    format!("{ns}-c"),
                    pvn.clone(),
                    "not registered in the CSINode",
                ),
                (
                    format!("{ns}-va-d"),
                    format!("{ns}-ghost"),
                    pvn.clone(),
                    "has no CSINode object",
                ),
                (
                    format!("{ns}-va-e"),
                    format!("{ns}-a"),
                    format!("{ns}-no-such-pv"),
                    "not found",
                ),
            ];
            for (va, node, pv, want) in &cases {
                mk(va, node, pv).await?;
                let v = wait_va(w, va, "attachError", |v| attach_error(v).is_some()).await?;
                let m = attach_error(&v).unwrap_or_default();
                ensure!(m.contains(want), "{va}: {m}");
            }
            // Failing attachments retry with backoff, not in a loop: the error keeps its
            // first time and the object is not rewritten.
            let before = vas.get(&va_b).await?;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let after = vas.get(&va_b).await?;
            ensure!(
                before.metadata.resource_version == after.metadata.resource_version,
                "attachment rewritten while failing the same way"
            );
            ensure!(
                w.prov.as_mut().map(|p| !p.exited()).unwrap_or(false),
                "provisioner died"
            );

            // Detach a: unpublished, finalizer gone, object gone. Then b's retry succeeds.
            vas.delete(&va_a, &DeleteParams::default()).await?;
            wait_va_gone(w, &va_a).await?;
            let b = wait_va(w, &va_b, "attached after a detached", attached).await?;
            ensure!(
                attach_error(&b).is_none(),
                "attachError not cleared: {:?}",
                b.status
            );
            ensure!(backend_volume(w, &vid).await?.1 == vec![format!("{ns}-b")]);

            // Everything goes; the PV keeps the attach finalizer until the last attachment
            // is gone, then the provisioner's Delete reclaim removes it.
            for (va, ..) in &cases {
                vas.delete(va, &DeleteParams::default()).await?;
                wait_va_gone(w, va).await?;
            }
            w.pvcs().delete("data", &DeleteParams::default()).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let p = w.pvs().get(&pvn).await?;
            ensure!(
                p.metadata.finalizers.iter().flatten().any(|f| *f == fin),
                "PV released while attached"
            );
            vas.delete(&va_b, &DeleteParams::default()).await?;
            wait_va_gone(w, &va_b).await?;
            ensure!(
                backend_volume(w, &vid)
                    .await
                    .map(|v| v.1.is_empty())
                    .unwrap_or(true)
            );
            w.wait_pv_gone(&pvn, T).await?;

            let (_, text) = w
                .prov
                .as_ref()
                .context("no provisioner")?
                .http_get("/metrics")?;
            for want in [
                r#"stowage_provisioner_operations_total{operation="attach",result="success"} 2"#,
                r#"stowage_provisioner_operations_total{operation="detach",result="success"} 2"#,
            ] {
                ensure!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
            }
            Ok(())
        }
        .await;
        attach_cleanup(w, &ns, &nodes).await;
        r
    })
    .await
}

/// KCM's attach-detach controller makes the attachment for a pod on a node that lets the
/// controller attach; Stowage attaches it; deleting the pod detaches it. (No CSIDriver object:
/// Kubernetes then treats the driver as attachRequired.)
#[tokio::test]
async fn kcm_attaches_a_pod_volume() -> Result<()> {
    let _g = serial().await;
    with_world("kcm_attach", true, async |w: &mut World| {
        let ns = w.ns.clone();
        let driver = w.driver;
        let mut nodes = Vec::new();
        let r = async {
            let node = format!("{ns}-n");
            nodes.push(fake_node(w, &node, Some(driver), true, true).await?);
            let class = w
                .create_class("pod", json!({"reclaimPolicy": "Delete"}))
                .await?;
            w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
                .await?;
            let pv = w.wait_bound("data", T).await?;
            let vid = handle(&pv);
            w.wait_service_account().await?;
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "user", "namespace": ns},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "c", "image": "busybox"}],
                    "tolerations": [{"operator": "Exists"}],
                    "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]
                }
            }))?;
            let pods: Api<Pod> = Api::namespaced(w.client.clone(), &ns);
            pods.create(&PostParams::default(), &pod).await?;
            let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
            let find = || async {
                let list = vas.list(&ListParams::default()).await?;
                Ok::<_, anyhow::Error>(list.items.into_iter().find(|v| {
                    v.spec.node_name == node
                        && v.spec.source.persistent_volume_name.as_deref() == Some(&pv_name(&pv))
                }))
            };
            let va = wait_for(
                "KCM's attachment, attached",
                Duration::from_secs(120),
                || async { Ok(find().await?.filter(attached)) },
            )
            .await
            .with_context(|| tail(&w.prov_log(), 40))?;
            ensure!(va.spec.attacher == driver);
            ensure!(backend_volume(w, &vid).await?.1 == vec![node.clone()]);
            // No kubelet confirms the pod's end: force it; KCM then detaches.
            pods.delete(
                "user",
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await?;
            wait_for("the attachment to go", Duration::from_secs(120), || async {
                Ok(find().await?.is_none().then_some(()))
            })
            .await
            .with_context(|| tail(&w.prov_log(), 40))?;
            ensure!(backend_volume(w, &vid).await?.1.is_empty());
            Ok(())
        }
        .await;
        attach_cleanup(w, &ns, &nodes).await;
        r
    })
    .await
}

/// A raw block volume needs the node to finish (the kubelet grows nothing for a directory, but
/// a block image's consumer must see the new size): the claim waits in NodeResizePending with
/// FileSystemResizePending, its capacity unchanged, the PV already grown.
#[tokio::test]
async fn block_resize_waits_for_the_node() -> Result<()> {
    let _g = serial().await;
    with_world("resize_block", true, async |w: &mut World| {
        let class = w
            .create_class(
                "blk",
                json!({"allowVolumeExpansion": true, "reclaimPolicy": "Delete"}),
            )
            .await?;
        w.create_claim(
            "raw",
            Some(&class),
            "1Gi",
            &["ReadWriteOnce"],
            json!({"spec": {"volumeMode": "Block"}}),
        )
        .await?;
        let pv = w.wait_bound("raw", T).await?;
        set_request(w, "raw", "2Gi").await?;
        let pvcs = w.pvcs();
        let c = wait_for("the claim to wait for the node", T, || async {
            let c = pvcs.get("raw").await?;
            Ok((resize_status(&c).as_deref() == Some("NodeResizePending")).then_some(c))
        })
        .await
        .with_context(|| tail(&w.prov_log(), 40))?;
        ensure!(
            condition(&c, "FileSystemResizePending").is_some(),
            "{:?}",
            c.status
        );
        ensure!(condition(&c, "Resizing").is_none(), "{:?}", c.status);
        ensure!(
            claim_capacity(&c) == "1Gi",
            "capacity is the kubelet's to set"
        );
        let p = w.pvs().get(&pv_name(&pv)).await?;
        ensure!(storage_of(p.spec.as_ref().and_then(|s| s.capacity.as_ref())) == "2Gi");
        ensure!(backend_volume(w, &handle(&pv)).await?.0 == 2 * GI);
        w.wait_event(
            &w.ns,
            "PersistentVolumeClaim",
            "raw",
            "FileSystemResizeRequired",
            T,
        )
        .await?;
        Ok(())
    })
    .await
}

#[path = "attach_proxy.rs"]
mod publish_proxy;

/// The provisioner SIGKILLed after ControllerPublishVolume reached the backend but before the
/// attachment's status said so, then restarted: one attachment, attached, the volume
/// published to that one node, one finalizer.
#[tokio::test]
async fn killed_mid_attach_leaves_one_attachment() -> Result<()> {
    let _g = serial().await;
    with_world("attach_killed", false, async |w: &mut World| {
        let ns = w.ns.clone();
        let driver = w.driver;
        let fin = format!("external-attacher/{driver}");
        let mut nodes = Vec::new();
        let r = async {
            let node = format!("{ns}-a");
            nodes.push(fake_node(w, &node, Some(driver), true, false).await?);
            let upstream = stowage_csi::client::connect(&w.ctl.endpoint).await?;
            let sock = w.dir.path().join("proxy.sock");
            let mut proxy = publish_proxy::PublishProxy::start(&sock, upstream).await?;
            w.start_provisioner_at(&format!("unix://{}", sock.display()), &[])?;
            let class = w
                .create_class("kill", json!({"reclaimPolicy": "Delete"}))
                .await?;
            w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
                .await?;
            let pv = w.wait_bound("data", T).await?;
            let vid = handle(&pv);
            let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
            let name = format!("{ns}-va");
            let va: VolumeAttachment =
                serde_json::from_value(va_json(&name, driver, &node, &pv_name(&pv)))?;
            vas.create(&PostParams::default(), &va).await?;
            tokio::time::timeout(T, proxy.wait_held())
                .await
                .context("ControllerPublishVolume never reached the proxy")??;
            ensure!(backend_volume(w, &vid).await?.1 == vec![node.clone()]);
            ensure!(!attached(&vas.get(&name).await?));
            w.prov.as_mut().context("no provisioner")?.kill();
            drop(proxy);
            w.start_provisioner(&[])?;
            let a = wait_va(w, &name, "attached after the restart", attached).await?;
            ensure!(
                a.metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .filter(|f| **f == fin)
                    .count()
                    == 1,
                "{:?}",
                a.metadata.finalizers
            );
            ensure!(backend_volume(w, &vid).await?.1 == vec![node.clone()]);
            let mine = vas
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|v| v.spec.source.persistent_volume_name.as_deref() == Some(&pv_name(&pv)))
                .count();
            ensure!(mine == 1, "{mine} attachments for the volume");
            vas.delete(&name, &DeleteParams::default()).await?;
            wait_va_gone(w, &name).await?;
            ensure!(backend_volume(w, &vid).await?.1.is_empty());
            Ok(())
        }
        .await;
        attach_cleanup(w, &ns, &nodes).await;
        r
    })
    .await
}

/// The real RBD driver, which needs ControllerPublish (attachRequired): attach records the node
/// on the image in Ceph and fences the RWO image from a second node; detach lifts it; a resize
/// grows the image and leaves the filesystem to the node. Runs when STOWAGE_CEPH_ENV names a
/// tests/infra/ceph.sh cluster.
#[tokio::test]
async fn rbd_attach_fences_and_resizes() -> Result<()> {
    let _g = serial().await;
    let Some(env) = rbd_common::cluster() else {
        return Ok(());
    };
    with_world("attach_rbd", false, async |w: &mut World| {
        let driver = "rbd.stowage.io";
        let ns = w.ns.clone();
        let fin = format!("external-attacher/{driver}");
        // The world's local controller makes way for an RBD one on the same socket; node IDs
        // are not registered (no stowage-node here), so the driver takes any.
        w.ctl.kill();
        let cfg = rbd_common::config(
            &env,
            w.dir.path(),
            "rbd",
            "    requireNodeRegistration: false\n",
        );
        let _ = std::fs::remove_file(w.dir.path().join("controller.sock"));
        w.ctl = Plugin::controller(w.dir.path(), &cfg)?;
        w.ctl.ready().await?;
        w.start_provisioner(&[])?;
        let mut nodes = Vec::new();
        let r = async {
            let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
                "metadata": {"name": "ceph", "namespace": ns},
                "stringData": {"userID": "admin", "userKey": env["CEPH_ADMIN_KEY"]},
            }))?;
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(w.client.clone(), &ns)
                .create(&PostParams::default(), &secret)
                .await?;
            let mut params = serde_json::Map::new();
            for kind in [
                "provisioner",
                "controller-publish",
                "controller-expand",
                "node-stage",
            ] {
                params.insert(
                    format!("csi.storage.k8s.io/{kind}-secret-name"),
                    json!("ceph"),
                );
                params.insert(
                    format!("csi.storage.k8s.io/{kind}-secret-namespace"),
                    json!(ns),
                );
            }
            params.insert("csi.storage.k8s.io/fstype".into(), json!("ext4"));
            let class = w
                .create_class(
                    "rbd",
                    json!({"provisioner": driver, "allowVolumeExpansion": true,
                           "reclaimPolicy": "Delete", "parameters": params}),
                )
                .await?;
            nodes.push(fake_node(w, &format!("{ns}-a"), Some(driver), false, false).await?);
            nodes.push(fake_node(w, &format!("{ns}-b"), Some(driver), false, false).await?);
            w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
                .await?;
            let pv = w.wait_bound("data", Duration::from_secs(120)).await?;
            let pvn = pv_name(&pv);
            let vid = handle(&pv);
            ensure!(
                pv.spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .map(|c| c.driver.as_str())
                    == Some(driver)
            );
            let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
            for n in ["a", "b"] {
                let va: VolumeAttachment = serde_json::from_value(va_json(
                    &format!("{ns}-va-{n}"),
                    driver,
                    &format!("{ns}-{n}"),
                    &pvn,
                ))?;
                vas.create(&PostParams::default(), &va).await?;
                if n == "a" {
                    wait_va(w, &va_name(&ns, "a"), "attached", attached).await?;
                }
            }
            let a = vas.get(&va_name(&ns, "a")).await?;
            ensure!(a.metadata.finalizers.iter().flatten().any(|f| *f == fin));
            ensure!(rbd_image(&env, &vid)?.1 == vec![format!("{ns}-a")]);
            let b = wait_va(w, &va_name(&ns, "b"), "attachError", |v| {
                attach_error(v).is_some()
            })
            .await?;
            let msg = attach_error(&b).unwrap_or_default();
            ensure!(
                msg.contains("FailedPrecondition") && msg.contains("single-node"),
                "{msg}"
            );
            // Detach a: the image is free for b, whose retry attaches it.
            vas.delete(&va_name(&ns, "a"), &DeleteParams::default())
                .await?;
            wait_va_gone(w, &va_name(&ns, "a")).await?;
            wait_va(w, &va_name(&ns, "b"), "attached after a detached", attached).await?;
            ensure!(rbd_image(&env, &vid)?.1 == vec![format!("{ns}-b")]);

            // Resize: the image grows, the PV follows, the filesystem is the node's job.
            set_request(w, "data", "2Gi").await?;
            let pvcs = w.pvcs();
            let c = wait_for("the claim to wait for the node", T, || async {
                let c = pvcs.get("data").await?;
                Ok((resize_status(&c).as_deref() == Some("NodeResizePending")).then_some(c))
            })
            .await
            .with_context(|| tail(&w.prov_log(), 40))?;
            ensure!(
                condition(&c, "FileSystemResizePending").is_some(),
                "{:?}",
                c.status
            );
            ensure!(rbd_image(&env, &vid)?.0 == 2 * GI);
            let p = w.pvs().get(&pvn).await?;
            ensure!(storage_of(p.spec.as_ref().and_then(|s| s.capacity.as_ref())) == "2Gi");

            vas.delete(&va_name(&ns, "b"), &DeleteParams::default())
                .await?;
            wait_va_gone(w, &va_name(&ns, "b")).await?;
            ensure!(rbd_image(&env, &vid)?.1.is_empty());
            w.pvcs().delete("data", &DeleteParams::default()).await?;
            w.wait_pv_gone(&pvn, Duration::from_secs(120)).await?;
            Ok(())
        }
        .await;
        attach_cleanup(w, &ns, &nodes).await;
        r
    })
    .await
}

/// What Ceph itself says of an RBD volume (`<instance>/<pool>/<image>` handle): its size and
/// the nodes recorded as published in the image's metadata.
fn rbd_image(
    env: &std::collections::HashMap<String, String>,
    volume_id: &str,
) -> Result<(i64, Vec<String>)> {
    let mut parts = volume_id.rsplitn(3, '/');
    let image = parts.next().unwrap_or_default();
    let pool = parts.next().unwrap_or("rbd");
    let rbd = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("rbd")
            .args(["-c", &env["CEPH_CONF"], "-p", pool])
            .args(args)
            .output()
            .context("running rbd")?;
        ensure!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let info: serde_json::Value =
        serde_json::from_str(&rbd(&["info", "--format", "json", image])?)?;
    let size = info["size"].as_i64().unwrap_or(0);
    let mut nodes: Vec<String> = rbd(&["image-meta", "list", image])?
        .lines()
        .filter(|l| l.starts_with("stowage.attach."))
        .filter_map(|l| l.split_once('{').map(|(_, v)| format!("{{{}", v.trim())))
        .filter_map(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
        .filter_map(|v| v["node"].as_str().map(str::to_owned))
        .collect();
    nodes.sort();
    Ok((size, nodes))
}

fn va_name(ns: &str, n: &str) -> String {
    format!("{ns}-va-{n}")
}

/// `--controllers provision` leaves attachments and resizes to someone else.
#[tokio::test]
async fn controllers_flag_turns_duties_off() -> Result<()> {
    let _g = serial().await;
    with_world("duties_off", false, async |w: &mut World| {
        w.start_provisioner(&["--controllers", "provision"])?;
        let ns = w.ns.clone();
        let class = w
            .create_class("off", json!({"allowVolumeExpansion": true}))
            .await?;
        w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
        let name = format!("{ns}-va");
        let va: VolumeAttachment =
            serde_json::from_value(va_json(&name, w.driver, &format!("{ns}-x"), &pv_name(&pv)))?;
        vas.create(&PostParams::default(), &va).await?;
        set_request(w, "data", "2Gi").await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let va = vas.get(&name).await?;
        let r = async {
            // The API server gives a new attachment `status: {attached: false}`; nothing more.
            ensure!(
                !attached(&va) && attach_error(&va).is_none() && va.metadata.finalizers.is_none(),
                "{va:?}"
            );
            let c = w.pvcs().get("data").await?;
            ensure!(
                claim_capacity(&c) == "1Gi" && resize_status(&c).is_none(),
                "{:?}",
                c.status
            );
            let log = w.prov_log();
            ensure!(
                log.contains("starting controller controller=\"provision\""),
                "{log}"
            );
            ensure!(
                !log.contains("starting controller controller=\"attach\""),
                "{log}"
            );
            Ok(())
        }
        .await;
        let _ = vas.delete(&name, &DeleteParams::default()).await;
        r
    })
    .await
}
