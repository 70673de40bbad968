//! stowage-provisioner against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler from tests/infra/kube.sh), the real
//! stowage-controller on the local backend, and real bytes in its base directory.
//!
//! The same tests run in both binder modes: against a cluster whose KCM binds (`kube.sh
//! start`: the provisioner runs with --binder=kcm) and one whose KCM runs without its PV binder
//! (`kube.sh start --no-pv-binder`: --binder=builtin). tests/suites/35-provisioner.sh does
//! both, on the local backend and on NFS (STOWAGE_PROVISIONER_BACKEND=nfs, against nfs-ganesha).
//! Runs one test at a time (they share the cluster and the driver name).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use stowage_csi::v1;
use stowage_tests::provisioner::{
    Backend, Binder, Provisioner, World, node_json, proxy::HoldingProxy, serial, tail, wait_for,
    with_world,
};
use stowage_tests::{controller_clients, wire};

const T: Duration = Duration::from_secs(60);

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(dir.join(name), bytes).with_context(|| format!("writing into {}", dir.display()))
}

fn pv_name(pv: &PersistentVolume) -> String {
    pv.metadata.name.clone().unwrap_or_default()
}

fn has(v: &Option<Vec<String>>, s: &str) -> bool {
    v.as_ref().is_some_and(|v| v.iter().any(|x| x == s))
}

/// Deletes a claim and waits until the API no longer has it.
async fn delete_claim(w: &World, name: &str) -> Result<()> {
    w.pvcs().delete(name, &DeleteParams::default()).await?;
    let pvcs = w.pvcs();
    wait_for(&format!("claim {name} to go"), T, || async {
        Ok(pvcs.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

#[tokio::test]
async fn dynamic_with_delete() -> Result<()> {
    let _g = serial().await;
    with_world("dynamic_delete", true, async |w: &mut World| {
        let class = w
            .create_class(
                "fast",
                json!({"reclaimPolicy": "Delete", "mountOptions": ["noatime"],
                       "parameters": {"subDir": "${pvc.metadata.namespace}-${pvc.metadata.name}"}}),
            )
            .await?;
        let claim = w
            .create_claim("data", Some(&class), "2Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let pv = w.wait_bound("data", T).await?;

        // The PV records everything about the volume.
        assert_eq!(pv_name(&pv), format!("pvc-{uid}"));
        let ann = pv.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            ann.get("pv.kubernetes.io/provisioned-by")
                .map(String::as_str),
            Some(w.driver)
        );
        assert!(has(
            &pv.metadata.finalizers,
            "provisioner.stowage.io/finalizer"
        ));
        let spec = pv.spec.clone().unwrap();
        let csi = spec.csi.clone().unwrap();
        assert_eq!(csi.driver, w.driver);
        assert_eq!(csi.volume_handle, format!("default/{}-data", w.ns));
        assert_eq!(spec.capacity.unwrap()["storage"].0, "2Gi");
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(class.as_str()));
        assert_eq!(spec.mount_options, Some(vec!["noatime".to_string()]));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        let cref = spec.claim_ref.unwrap();
        assert_eq!(
            (cref.name.as_deref(), cref.uid.as_deref()),
            (Some("data"), Some(uid.as_str()))
        );

        // Real storage behind it.
        let dir = w.volume_dir(&pv);
        assert!(dir.is_dir(), "{} missing", dir.display());
        write_file(&dir, "payload", b"hello")?;

        // kubectl describe shows what happened.
        let described = w
            .cluster
            .kubectl(&["-n", &w.ns, "describe", "pvc", "data"])?;
        assert!(described.contains("ProvisioningSucceeded"), "{described}");
        assert!(described.contains("Provisioning"), "{described}");

        delete_claim(w, "data").await?;
        w.wait_pv_gone(&pv_name(&pv), T).await?;
        assert!(!dir.exists(), "the backend volume must go with the PV");

        // What happened is counted on /metrics, with the provisioning latency.
        let prov = w.prov.as_ref().context("no provisioner")?;
        let (status, _) = prov.http_get("/healthz")?;
        assert!(status.contains(" 200"), "{status}");
        let (status, text) = prov.http_get("/metrics")?;
        assert!(status.contains(" 200"), "{status}");
        for want in [
            r#"stowage_provisioner_operations_total{operation="provision",result="success"} 1"#,
            r#"stowage_provisioner_operations_total{operation="delete",result="success"} 1"#,
            r#"stowage_provisioner_operation_duration_seconds_count{operation="provision"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want} missing:\n{text}\nlog:\n{}",
                prov.log_text()
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dynamic_with_retain() -> Result<()> {
    let _g = serial().await;
    with_world("dynamic_retain", true, async |w: &mut World| {
        let class = w
            .create_class("keep", json!({"reclaimPolicy": "Retain"}))
            .await?;
        w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        assert!(
            pv.metadata
                .finalizers
                .iter()
                .flatten()
                .all(|f| f != "provisioner.stowage.io/finalizer")
        );
        let dir = w.volume_dir(&pv);
        write_file(&dir, "keep-me", b"precious")?;
        delete_claim(w, "data").await?;
        w.wait_pv_phase(&pv_name(&pv), "Released", T).await?;
        // Give a wrong-doer time to act, then check nothing did.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let still = w.pvs().get(&pv_name(&pv)).await?;
        assert_eq!(
            still.status.and_then(|s| s.phase).as_deref(),
            Some("Released")
        );
        assert_eq!(std::fs::read(dir.join("keep-me"))?, b"precious");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn recycle_scrubs_and_reuses() -> Result<()> {
    let _g = serial().await;
    with_world("recycle", true, async |w: &mut World| {
        let class = w
            .create_class(
                "reuse",
                json!({"reclaimPolicy": "Retain", "parameters": {"stowage.io/reclaim": "recycle"}}),
            )
            .await?;
        w.create_claim("first", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("first", T).await?;
        let name = pv_name(&pv);
        assert_eq!(
            pv.spec
                .as_ref()
                .unwrap()
                .persistent_volume_reclaim_policy
                .as_deref(),
            Some("Recycle")
        );
        let dir = w.volume_dir(&pv);
        write_file(&dir, "secret.txt", b"old tenant data")?;
        std::fs::create_dir_all(dir.join("sub/deeper"))?;
        write_file(&dir.join("sub/deeper"), "more", b"x")?;

        delete_claim(w, "first").await?;
        let pv = w.wait_pv_phase(&name, "Available", T).await?;
        assert!(
            pv.spec.as_ref().unwrap().claim_ref.is_none(),
            "a recycled volume is free for any claim"
        );
        assert!(dir.is_dir(), "the volume itself stays");
        assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "old data must be gone");
        w.wait_event("default", "PersistentVolume", &name, "VolumeRecycled", T)
            .await?;

        // A new claim gets the recycled volume (not a new one).
        w.create_claim("second", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let again = w.wait_bound("second", T).await?;
        assert_eq!(pv_name(&again), name);
        assert_eq!(w.backend_dirs().len(), 1);
        // Scrubbed once: a sync on a stale cached copy must not scrub the next tenant's data.
        write_file(&dir, "new tenant", b"keep me")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(std::fs::read(dir.join("new tenant"))?, b"keep me");
        let (_, text) = w
            .prov
            .as_ref()
            .context("no provisioner")?
            .http_get("/metrics")?;
        let want =
            r#"stowage_provisioner_operations_total{operation="recycle",result="success"} 1"#;
        assert!(
            text.lines().any(|l| l == want),
            "{want} missing:\n{text}\nlog:\n{}",
            w.prov_log()
        );
        Ok(())
    })
    .await
}

/// A PV an admin switches to Recycle by hand after its claim is gone; with KCM binding, KCM has
/// already marked it Failed ("No recycler plugin found") before the provisioner runs.
#[tokio::test]
async fn recycle_set_by_hand_on_a_failed_volume() -> Result<()> {
    let _g = serial().await;
    with_world("recycle_by_hand", true, async |w: &mut World| {
        let class = w
            .create_class("manual", json!({"reclaimPolicy": "Retain"}))
            .await?;
        w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let name = pv_name(&pv);
        write_file(&w.volume_dir(&pv), "old", b"old")?;
        // The provisioner is down while the admin acts.
        w.prov.as_mut().unwrap().kill();
        delete_claim(w, "data").await?;
        w.pvs()
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Recycle"}})),
            )
            .await?;
        if w.binder() == Binder::Kcm {
            let failed = w.wait_pv_phase(&name, "Failed", T).await?;
            let msg = failed.status.and_then(|s| s.message).unwrap_or_default();
            assert!(msg.contains("recycler"), "KCM's message: {msg}");
        } else {
            // Without KCM's binder nobody touches it until the provisioner is back.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        w.start_provisioner(&[])?;
        w.wait_pv_phase(&name, "Available", T).await?;
        assert_eq!(std::fs::read_dir(w.volume_dir(&pv))?.count(), 0);
        Ok(())
    })
    .await
}

/// Creates a volume on the backend through CSI and a static PV for it.
async fn static_volume(
    w: &World,
    name: &str,
    class: &str,
    size: &str,
    labels: serde_json::Value,
) -> Result<String> {
    let mut c = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
    let vol = c
        .controller
        .create_volume(wire::create(name, 1 << 30))
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-{name}", w.ns), "labels": labels},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": class,
            "csi": {"driver": w.driver, "volumeHandle": vol.volume_id},
        }
    }))?;
    w.pvs().create(&PostParams::default(), &pv).await?;
    Ok(format!("{}-{name}", w.ns))
}

#[tokio::test]
async fn static_volume_binds_only_a_matching_claim() -> Result<()> {
    let _g = serial().await;
    with_world("static_binding", true, async |w: &mut World| {
        // A class name with no StorageClass object: nothing gets provisioned for it.
        let class = w.class_name("static");
        let pv = static_volume(w, "gold", &class, "2Gi", json!({"tier": "gold"})).await?;
        let pvs = w.pvs();
        wait_for("the static volume to be Available", T, || async {
            let p = pvs.get(&pv).await?;
            Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Available")).then_some(()))
        })
        .await?;
        // Too big and wrong selector: both stay Pending.
        w.create_claim(
            "too-big",
            Some(&class),
            "5Gi",
            &["ReadWriteOnce"],
            json!({}),
        )
        .await?;
        w.create_claim(
            "wrong-tier",
            Some(&class),
            "1Gi",
            &["ReadWriteOnce"],
            json!({"spec": {"selector": {"matchLabels": {"tier": "silver"}}}}),
        )
        .await?;
        w.create_claim(
            "wrong-mode",
            Some(&class),
            "1Gi",
            &["ReadWriteMany"],
            json!({}),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        for c in ["too-big", "wrong-tier", "wrong-mode"] {
            let claim = w.claim(c).await?.unwrap();
            assert_eq!(
                claim.status.and_then(|s| s.phase).as_deref(),
                Some("Pending"),
                "{c}"
            );
            assert!(claim.spec.and_then(|s| s.volume_name).is_none(), "{c}");
        }
        // The matching one gets it.
        w.create_claim(
            "fits",
            Some(&class),
            "1Gi",
            &["ReadWriteOnce"],
            json!({"spec": {"selector": {"matchLabels": {"tier": "gold"}}}}),
        )
        .await?;
        let bound = w.wait_bound("fits", T).await?;
        assert_eq!(pv_name(&bound), pv);
        let claim = w.claim("fits").await?.unwrap();
        let ann = claim.metadata.annotations.unwrap_or_default();
        assert_eq!(
            ann.get("pv.kubernetes.io/bind-completed")
                .map(String::as_str),
            Some("yes")
        );
        assert_eq!(claim.status.unwrap().capacity.unwrap()["storage"].0, "2Gi");
        // No provisioning happened for any of them.
        assert_eq!(w.backend_dirs(), vec!["gold".to_string()]);
        Ok(())
    })
    .await
}

/// A claim made while the cluster had no default StorageClass gets one once an admin marks a
/// class default (KCM's retroactive assignment; Stowage does it with --binder builtin), and is
/// then provisioned with it.
#[tokio::test]
async fn a_claim_without_class_gets_the_later_default() -> Result<()> {
    let _g = serial().await;
    with_world("default_class", true, async |w: &mut World| {
        w.create_claim("late", None, "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = w.claim("late").await?.context("claim gone")?;
        assert_eq!(
            c.spec.as_ref().and_then(|s| s.storage_class_name.clone()),
            None,
            "no default existed when the claim was made"
        );
        assert!(w.backend_dirs().is_empty(), "nothing to provision with yet");

        let class = w
            .create_class(
                "default",
                json!({"metadata": {"annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                       "reclaimPolicy": "Delete"}),
            )
            .await?;
        let pv = w.wait_bound("late", T).await?;
        let c = w.claim("late").await?.context("claim gone")?;
        assert_eq!(
            c.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()),
            Some(class.as_str())
        );
        assert_eq!(
            pv.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()),
            Some(class.as_str())
        );
        assert!(w.volume_dir(&pv).is_dir(), "the backend volume exists");
        delete_claim(w, "late").await?;
        w.wait_pv_gone(&pv_name(&pv), T).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wait_for_first_consumer() -> Result<()> {
    let _g = serial().await;
    with_world("wffc", true, async |w: &mut World| {
        let node_name = format!("{}-node", w.ns);
        let labels = BTreeMap::from([("topology.stowage.io/node".to_string(), node_name.clone())]);
        let node: Node = serde_json::from_value(node_json(&node_name, &labels))?;
        let nodes: Api<Node> = Api::all(w.client.clone());
        nodes.create(&PostParams::default(), &node).await?;
        let r = async {
            let class = w
                .create_class("late", json!({"volumeBindingMode": "WaitForFirstConsumer"}))
                .await?;
            w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
                .await?;
            w.wait_event(
                &w.ns,
                "PersistentVolumeClaim",
                "data",
                "WaitForFirstConsumer",
                T,
            )
            .await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            ensure!(
                w.backend_dirs().is_empty(),
                "provisioned before a consumer existed"
            );
            let claim = w.claim("data").await?.unwrap();
            ensure!(claim.spec.and_then(|s| s.volume_name).is_none());

            w.wait_service_account().await?;
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "user", "namespace": w.ns},
                "spec": {
                    "containers": [{"name": "c", "image": "busybox"}],
                    "tolerations": [{"operator": "Exists"}],
                    "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]
                }
            }))?;
            let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.ns);
            pods.create(&PostParams::default(), &pod).await?;
            let pv = w.wait_bound("data", T).await?;
            let claim = w.claim("data").await?.unwrap();
            let ann = claim.metadata.annotations.unwrap_or_default();
            ensure!(
                ann.get("volume.kubernetes.io/selected-node") == Some(&node_name),
                "the scheduler chose the node: {ann:?}"
            );
            ensure!(w.volume_dir(&pv).is_dir());
            // The scheduler places the pod once its volume is bound.
            wait_for("the pod to be scheduled", T, || async {
                let p = pods.get("user").await?;
                Ok(p.spec.and_then(|s| s.node_name).filter(|n| *n == node_name))
            })
            .await?;
            Ok(())
        }
        .await;
        let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
        r
    })
    .await
}

#[tokio::test]
async fn access_modes_the_driver_cannot_serve_are_refused() -> Result<()> {
    let _g = serial().await;
    with_world("access_modes", true, async |w: &mut World| {
        let class = w.create_class("modes", json!({})).await?;
        // Local raw block volumes are images on one node (no multi-node writer); NFS has no
        // raw block volumes at all.
        w.create_claim(
            "shared-block",
            Some(&class),
            "1Gi",
            &["ReadWriteMany"],
            json!({"spec": {"volumeMode": "Block"}}),
        )
        .await?;
        let ev = w
            .wait_event(
                &w.ns,
                "PersistentVolumeClaim",
                "shared-block",
                "ProvisioningFailed",
                T,
            )
            .await?;
        let msg = ev.message.unwrap_or_default();
        let why = match w.backend {
            Backend::Local => "multi-node writers are not supported",
            Backend::Nfs { .. } => "raw block access is not supported",
        };
        assert!(msg.contains(why), "the event says why: {msg}");
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        // ReadWriteOncePod is served.
        w.create_claim(
            "single-pod",
            Some(&class),
            "1Gi",
            &["ReadWriteOncePod"],
            json!({}),
        )
        .await?;
        let pv = w.wait_bound("single-pod", T).await?;
        assert_eq!(
            pv.spec.unwrap().access_modes,
            Some(vec!["ReadWriteOncePod".to_string()])
        );
        // The refused claim is still Pending, with nothing made for it.
        let c = w.claim("shared-block").await?.unwrap();
        assert_eq!(c.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
        let uid = c.metadata.uid.unwrap_or_default();
        assert!(w.pvs().get_opt(&format!("pvc-{uid}")).await?.is_none());
        assert_eq!(w.backend_dirs().len(), 1, "only the RWOP volume exists");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn killed_mid_provisioning_makes_exactly_one_volume() -> Result<()> {
    let _g = serial().await;
    with_world("crash", false, async |w: &mut World| {
        // The provisioner talks to the controller through a proxy that holds CreateVolume's
        // answer: the backend volume exists, the provisioner has not heard of it.
        let upstream = stowage_csi::client::connect(&w.ctl.endpoint).await?;
        let sock = w.dir.path().join("proxy.sock");
        let mut proxy = HoldingProxy::start(&sock, upstream).await?;
        w.start_provisioner_at(&format!("unix://{}", sock.display()), &[])?;
        let class = w.create_class("crash", json!({})).await?;
        let claim = w
            .create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let uid = claim.metadata.uid.unwrap_or_default();
        tokio::time::timeout(T, proxy.wait_held())
            .await
            .context("CreateVolume never reached the controller")??;
        assert_eq!(
            w.backend_dirs(),
            vec![format!("pvc-{uid}")],
            "the volume exists on the backend"
        );
        assert!(
            w.pvs().get_opt(&format!("pvc-{uid}")).await?.is_none(),
            "but no PV yet"
        );

        w.prov.as_mut().unwrap().kill();
        drop(proxy);
        w.start_provisioner(&[])?;
        let pv = w.wait_bound("data", T).await?;
        assert_eq!(pv_name(&pv), format!("pvc-{uid}"));
        // Exactly one volume and one PV for the claim.
        let all = w.pvs().list(&Default::default()).await?;
        let for_claim = all
            .items
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.uid.as_deref())
                    == Some(uid.as_str())
            })
            .count();
        assert_eq!(for_claim, 1);
        let mut c = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
        let listed = c
            .controller
            .list_volumes(v1::ListVolumesRequest::default())
            .await?
            .into_inner();
        assert_eq!(listed.entries.len(), 1, "{listed:?}");
        assert_eq!(w.backend_dirs(), vec![format!("pvc-{uid}")]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn delete_waits_for_the_backend() -> Result<()> {
    let _g = serial().await;
    with_world("backend_down", true, async |w: &mut World| {
        let class = w
            .create_class("flaky", json!({"reclaimPolicy": "Delete"}))
            .await?;
        w.create_claim("data", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let name = pv_name(&pv);
        let dir = w.volume_dir(&pv);
        // The backend goes away: the NFS server, or (local backend) the controller itself.
        match w.backend {
            Backend::Nfs { .. } => w.backend.stop_server()?,
            Backend::Local => w.ctl.kill(),
        }
        delete_claim(w, "data").await?;
        let ev = w
            .wait_event(
                "default",
                "PersistentVolume",
                &name,
                "VolumeFailedDelete",
                T,
            )
            .await?;
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        let still = w.pvs().get(&name).await?;
        assert_eq!(
            still.status.and_then(|s| s.phase).as_deref(),
            Some("Released")
        );
        assert!(dir.is_dir(), "nothing deleted while the backend was down");
        // It comes back: the retry succeeds.
        match w.backend {
            Backend::Nfs { .. } => w.backend.start_server()?,
            Backend::Local => w.restart_controller().await?,
        }
        w.wait_pv_gone(&name, T).await?;
        assert!(!dir.exists());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn import_creates_pvs_for_volumes_without_one() -> Result<()> {
    let _g = serial().await;
    with_world("import", true, async |w: &mut World| {
        // One dynamically provisioned volume (has a PV), two made on the backend directly.
        let class = w.create_class("dyn", json!({})).await?;
        w.create_claim(
            "dynamic",
            Some(&class),
            "1Gi",
            &["ReadWriteOnce"],
            json!({}),
        )
        .await?;
        let dyn_pv = w.wait_bound("dynamic", T).await?;
        let mut c = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
        for n in ["legacy-a", "legacy-b"] {
            c.controller.create_volume(wire::create(n, 3 << 30)).await?;
        }
        let import = |args: &[&str]| -> Result<(bool, String)> {
            let out = std::process::Command::new(stowage_tests::bin("stowage-provisioner")?)
                .arg("--csi-endpoint")
                .arg(&w.ctl_endpoint)
                .arg("import")
                .args(args)
                .env("KUBECONFIG", &w.sa_kubeconfig)
                .output()?;
            Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        };
        let (ok, listing) = import(&[])?;
        assert!(ok, "{listing}");
        assert!(
            listing.contains("default/legacy-a") && listing.contains("default/legacy-b"),
            "{listing}"
        );
        assert!(listing.contains(&pv_name(&dyn_pv)), "{listing}");
        assert!(listing.contains("2 without a PV"), "{listing}");

        let static_class = w.class_name("imported");
        let (ok, out) = import(&["--storage-class", &static_class, "default/legacy-a"])?;
        assert!(ok, "{out}");
        assert!(
            out.contains("created PV stowage-default-legacy-a-"),
            "{out}"
        );
        assert!(out.contains("reclaim Retain"), "{out}");
        let (ok, again) = import(&["--storage-class", &static_class, "default/legacy-a"])?;
        assert!(
            ok && again.contains("skipped default/legacy-a: already has PV"),
            "{again}"
        );
        // The driver refuses what it cannot serve (ValidateVolumeCapabilities).
        let (ok, refused) = import(&[
            "--access-mode",
            "ReadWriteMany",
            "--volume-mode",
            "Block",
            "default/legacy-b",
        ])?;
        assert!(
            !ok && refused.contains("failed  default/legacy-b"),
            "{refused}"
        );

        w.create_claim(
            "reuse",
            Some(&static_class),
            "3Gi",
            &["ReadWriteOnce"],
            json!({}),
        )
        .await?;
        let pv = w.wait_bound("reuse", T).await?;
        assert!(pv_name(&pv).starts_with("stowage-default-legacy-a-"));
        assert_eq!(
            pv.spec.unwrap().persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn two_replicas_with_leader_election() -> Result<()> {
    let _g = serial().await;
    with_world("leader", false, async |w: &mut World| {
        let lease_ns = "stowage-system";
        let args = [
            "--leader-elect=true",
            "--leader-election-namespace",
            lease_ns,
            "--leader-election-lease-duration",
            "4s",
        ];
        let mut a = Provisioner::start(
            w.dir.path(),
            "replica-a",
            &w.sa_kubeconfig,
            &w.ctl_endpoint,
            w.binder(),
            &args,
        )?;
        let mut b = Provisioner::start(
            w.dir.path(),
            "replica-b",
            &w.sa_kubeconfig,
            &w.ctl_endpoint,
            w.binder(),
            &args,
        )?;
        let class = w.create_class("ha", json!({})).await?;
        for i in 0..5 {
            w.create_claim(
                &format!("c{i}"),
                Some(&class),
                "1Gi",
                &["ReadWriteOnce"],
                json!({}),
            )
            .await?;
        }
        for i in 0..5 {
            w.wait_bound(&format!("c{i}"), T).await?;
        }
        assert_eq!(w.backend_dirs().len(), 5);
        let leaders = [&a, &b]
            .iter()
            .filter(|p| p.log_text().contains("became the leader"))
            .count();
        assert_eq!(
            leaders,
            1,
            "A:\n{}\nB:\n{}",
            tail(&a.log_text(), 20),
            tail(&b.log_text(), 20)
        );
        // The leader dies without releasing its lease: the other takes over.
        let (leader, standby) = if a.log_text().contains("became the leader") {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        leader.kill();
        w.create_claim("after", Some(&class), "1Gi", &["ReadWriteOnce"], json!({}))
            .await?;
        w.wait_bound("after", T)
            .await
            .with_context(|| tail(&standby.log_text(), 30))?;
        assert!(standby.log_text().contains("became the leader"));
        assert_eq!(w.backend_dirs().len(), 6);
        Ok(())
    })
    .await
}
