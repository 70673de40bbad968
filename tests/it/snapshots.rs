//! stowage-provisioner's snapshot duty against a real control plane (tests/infra/kube.sh) with
//! the real stowage-controller on the local backend, in both binder modes
//! (tests/suites/35-provisioner.sh): the CRDs of provisioner/deploy/crds applied with kubectl,
//! classes and snapshots written with kubectl the way users write them and read back through
//! the Rust types, a snapshot of a volume with known bytes, a restore into a new claim read
//! back through the real stowage-node, deletion with Delete and Retain checked on the backend
//! (the controller's ListSnapshots and the snapshot directory), a pre-provisioned content
//! bound to a new snapshot, and bad classes reported on the snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use stowage_csi::v1;
use stowage_provisioner::snapshot::types::{
    DeletionPolicy, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent,
};
use stowage_tests::provisioner::{World, serial, tail, wait_for, with_world};
use stowage_tests::{Plugin, controller_clients, is_root, local_config, node_client, wire};

const T: Duration = Duration::from_secs(60);
const FIN_SOURCE: &str = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
const FIN_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
const FIN_CONTENT: &str = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";

/// Applies the checked-in CRDs (idempotent) and waits until the API serves them.
fn apply_crds(w: &World) -> Result<()> {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../provisioner/deploy/crds/snapshot.storage.k8s.io.yaml");
    w.cluster
        .kubectl(&["apply", "-f", &crds.to_string_lossy()])?;
    w.cluster.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout",
        "60s",
        "crd/volumesnapshots.snapshot.storage.k8s.io",
        "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
        "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
    ])?;
    Ok(())
}

/// kubectl apply of a document given as JSON (kubectl reads JSON as YAML).
fn kubectl_apply(w: &World, doc: serde_json::Value) -> Result<()> {
    let path = w.dir.path().join(format!(
        "obj-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::write(&path, serde_json::to_vec(&doc)?)?;
    w.cluster
        .kubectl(&["apply", "-f", &path.to_string_lossy()])?;
    Ok(())
}

fn snapshots(w: &World) -> Api<VolumeSnapshot> {
    Api::namespaced(w.client.clone(), &w.ns)
}

fn contents(w: &World) -> Api<VolumeSnapshotContent> {
    Api::all(w.client.clone())
}

fn classes(w: &World) -> Api<VolumeSnapshotClass> {
    Api::all(w.client.clone())
}

/// A VolumeSnapshotClass written the way users write them, with kubectl.
fn create_class(
    w: &World,
    suffix: &str,
    driver: &str,
    policy: &str,
    params: serde_json::Value,
) -> Result<String> {
    let name = w.class_name(suffix);
    kubectl_apply(
        w,
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {"name": name},
            "driver": driver,
            "deletionPolicy": policy,
            "parameters": params,
        }),
    )?;
    Ok(name)
}

fn create_snapshot(w: &World, name: &str, class: Option<&str>, claim: &str) -> Result<()> {
    let mut spec = json!({"source": {"persistentVolumeClaimName": claim}});
    if let Some(c) = class {
        spec["volumeSnapshotClassName"] = json!(c);
    }
    kubectl_apply(
        w,
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": w.ns},
            "spec": spec,
        }),
    )
}

async fn wait_ready(w: &World, name: &str) -> Result<VolumeSnapshot> {
    let api = snapshots(w);
    wait_for(&format!("snapshot {name} readyToUse"), T, || async {
        let s = api.get_opt(name).await?;
        Ok(s.filter(|s| s.status.as_ref().and_then(|st| st.ready_to_use) == Some(true)))
    })
    .await
    .with_context(|| format!("provisioner log:\n{}", tail(&w.prov_log(), 40)))
}

async fn wait_snapshot_error(w: &World, name: &str, want: &str) -> Result<String> {
    let api = snapshots(w);
    wait_for(
        &format!("an error on snapshot {name} saying {want:?}"),
        T,
        || async {
            let s = api.get_opt(name).await?;
            let msg = s
                .and_then(|s| s.status)
                .and_then(|st| st.error)
                .and_then(|e| e.message)
                .unwrap_or_default();
            Ok(msg.contains(want).then_some(msg))
        },
    )
    .await
    .with_context(|| format!("provisioner log:\n{}", tail(&w.prov_log(), 40)))
}

async fn wait_gone<K>(api: &Api<K>, name: &str, w: &World) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    wait_for(&format!("{name} to be deleted"), T, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
    .with_context(|| format!("provisioner log:\n{}", tail(&w.prov_log(), 40)))
}

/// The snapshot IDs the backend lists.
async fn backend_snapshots(w: &World) -> Result<Vec<String>> {
    let mut c = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
    let r = c
        .controller
        .list_snapshots(v1::ListSnapshotsRequest::default())
        .await?
        .into_inner();
    let mut ids: Vec<String> = r
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The directory a local snapshot's data lives in (`<instance>/<name>` handles).
fn snapshot_dir(w: &World, id: &str) -> PathBuf {
    let name = id.split_once('/').map(|(_, n)| n).unwrap_or(id);
    w.base.join(".stowage/snapshots").join(name)
}

fn handle(pv: &PersistentVolume) -> (String, std::collections::HashMap<String, String>) {
    let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
    (
        csi.map(|c| c.volume_handle.clone()).unwrap_or_default(),
        csi.and_then(|c| c.volume_attributes.clone())
            .unwrap_or_default()
            .into_iter()
            .collect(),
    )
}

/// Reads a file of a volume through the real node plugin: stage, publish, read, unpublish,
/// unstage.
async fn read_through_node(w: &World, pv: &PersistentVolume, file: &str) -> Result<Vec<u8>> {
    let dir = w.dir.path().join("node");
    std::fs::create_dir_all(&dir)?;
    let cfg = local_config(&dir, &w.base)?;
    let mut node = Plugin::node(&dir, &cfg, "snap-node")?;
    let mut n = node_client(node.ready().await?);
    let (volume_id, context) = handle(pv);
    let staging = dir.join("staging");
    let target = dir.join("target");
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: context.clone(),
        ..Default::default()
    })
    .await
    .context("NodeStageVolume")?;
    n.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(wire::rwo()),
        volume_context: context,
        ..Default::default()
    })
    .await
    .context("NodePublishVolume")?;
    let data = std::fs::read(target.join(file));
    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await?;
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id,
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await?;
    node.kill();
    data.with_context(|| format!("reading {file} in the published volume"))
}

fn has_finalizer<K: kube::Resource>(o: &K, f: &str) -> bool {
    o.meta().finalizers.iter().flatten().any(|x| x == f)
}

#[tokio::test]
async fn snapshot_restore_delete_retain() -> Result<()> {
    let _g = serial().await;
    with_world("snapshots", true, async |w: &mut World| {
        if !is_root() {
            bail!("needs root: the node plugin bind-mounts the restored volume");
        }
        apply_crds(w)?;
        let sc = w.create_class("sc", json!({"reclaimPolicy": "Delete"})).await?;
        w.create_claim("src", Some(&sc), "64Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        let src_pv = w.wait_bound("src", T).await?;
        // Known bytes, written on the backend (the local volume's directory).
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(w.volume_dir(&src_pv).join("data.bin"), &bytes)?;

        // The class through kubectl, read back through the Rust types (round trip).
        let del = create_class(w, "del", w.driver, "Delete", json!({"team": "blue"}))?;
        let c = classes(w).get(&del).await?;
        ensure!(c.spec.driver == w.driver && c.spec.deletion_policy == DeletionPolicy::Delete);
        ensure!(c.spec.parameters.as_ref().and_then(|p| p.get("team")).map(String::as_str) == Some("blue"));

        let started = Instant::now();
        create_snapshot(w, "snap1", Some(&del), "src")?;
        let s = wait_ready(w, "snap1").await?;
        let took = started.elapsed();
        eprintln!("FIGURE snapshot create to readyToUse: {} ms", took.as_millis());
        let st = s.status.clone().context("status")?;
        let content_name = st.bound_volume_snapshot_content_name.clone().context("bound content")?;
        ensure!(content_name == format!("snapcontent-{}", s.metadata.uid.as_deref().unwrap_or("")));
        ensure!(st.creation_time.is_some(), "creationTime missing: {st:?}");
        ensure!(st.restore_size.as_ref().map(|q| q.0.as_str()) == Some("64Mi"), "restoreSize: {st:?}");
        ensure!(st.error.is_none());
        ensure!(has_finalizer(&s, FIN_SOURCE) && has_finalizer(&s, FIN_BOUND), "finalizers: {:?}", s.metadata.finalizers);
        let content = contents(w).get(&content_name).await?;
        ensure!(has_finalizer(&content, FIN_CONTENT));
        ensure!(content.spec.volume_snapshot_ref.uid == s.metadata.uid, "content not bound back");
        ensure!(content.spec.source.volume_handle.as_deref() == Some(handle(&src_pv).0.as_str()));
        let snap_id = content.status.as_ref().and_then(|c| c.snapshot_handle.clone()).context("snapshotHandle")?;
        ensure!(snap_id.ends_with(&format!("snapshot-{}", s.metadata.uid.as_deref().unwrap_or(""))), "snapshot not named after the VolumeSnapshot UID: {snap_id}");
        ensure!(backend_snapshots(w).await?.contains(&snap_id), "backend has no {snap_id}");
        ensure!(snapshot_dir(w, &snap_id).join("data/data.bin").exists());
        w.wait_event(&w.ns.clone(), "VolumeSnapshot", "snap1", "SnapshotReady", T).await?;

        // The source changes after the snapshot; the restore has the old bytes.
        std::fs::write(w.volume_dir(&src_pv).join("data.bin"), b"changed")?;
        w.create_claim(
            "restored",
            Some(&sc),
            "64Mi",
            &["ReadWriteOnce"],
            json!({"spec": {"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap1"}}}),
        )
        .await?;
        let restored = w.wait_bound("restored", T).await?;
        let read = read_through_node(w, &restored, "data.bin").await?;
        ensure!(read == bytes, "restored bytes differ ({} bytes read)", read.len());

        // Delete policy: snapshot, content and the backend's snapshot all go.
        snapshots(w).delete("snap1", &DeleteParams::default()).await?;
        wait_gone(&snapshots(w), "snap1", w).await?;
        wait_gone(&contents(w), &content_name, w).await?;
        wait_for("the backend snapshot to go", T, || async {
            Ok((!backend_snapshots(w).await?.contains(&snap_id)).then_some(()))
        })
        .await?;
        ensure!(!snapshot_dir(w, &snap_id).exists(), "snapshot directory left behind");

        // Retain policy: the snapshot goes, content and backend snapshot stay.
        let keep = create_class(w, "keep", w.driver, "Retain", json!({}))?;
        create_snapshot(w, "snap2", Some(&keep), "src")?;
        let s2 = wait_ready(w, "snap2").await?;
        let c2 = s2.status.and_then(|s| s.bound_volume_snapshot_content_name).context("bound")?;
        let id2 = contents(w).get(&c2).await?.status.and_then(|s| s.snapshot_handle).context("handle")?;
        snapshots(w).delete("snap2", &DeleteParams::default()).await?;
        wait_gone(&snapshots(w), "snap2", w).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let kept = contents(w).get_opt(&c2).await?.context("Retain content deleted")?;
        ensure!(kept.metadata.deletion_timestamp.is_none());
        ensure!(backend_snapshots(w).await?.contains(&id2), "Retain snapshot deleted on the backend");
        ensure!(snapshot_dir(w, &id2).join("data/data.bin").exists());

        // Pre-provisioned: a content naming the retained snapshot by handle binds to a new
        // VolumeSnapshot, which becomes ready (checked with the driver's ListSnapshots).
        let pre = format!("{}-pre", w.ns);
        kubectl_apply(
            w,
            json!({
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshotContent",
                "metadata": {"name": pre},
                "spec": {
                    "deletionPolicy": "Retain",
                    "driver": w.driver,
                    "source": {"snapshotHandle": id2},
                    "volumeSnapshotRef": {"name": "imported", "namespace": w.ns},
                },
            }),
        )?;
        kubectl_apply(
            w,
            json!({
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": "imported", "namespace": w.ns},
                "spec": {"source": {"volumeSnapshotContentName": pre}},
            }),
        )?;
        let imported = wait_ready(w, "imported").await?;
        let bound = contents(w).get(&pre).await?;
        ensure!(bound.spec.volume_snapshot_ref.uid == imported.metadata.uid, "pre-provisioned content not bound");
        ensure!(imported.status.and_then(|s| s.bound_volume_snapshot_content_name).as_deref() == Some(pre.as_str()));

        // Deleting Retain contents leaves the backend snapshot (no DeleteSnapshot).
        snapshots(w).delete("imported", &DeleteParams::default()).await?;
        wait_gone(&snapshots(w), "imported", w).await?;
        for c in [&c2, &pre] {
            contents(w).delete(c, &DeleteParams::default()).await?;
            wait_gone(&contents(w), c, w).await?;
        }
        ensure!(backend_snapshots(w).await?.contains(&id2), "Retain content's snapshot deleted");
        let mut cc = controller_clients(stowage_csi::client::connect(&w.ctl.endpoint).await?);
        cc.controller
            .delete_snapshot(v1::DeleteSnapshotRequest { snapshot_id: id2, ..Default::default() })
            .await?;
        for c in [del, keep] {
            let _ = classes(w).delete(&c, &DeleteParams::default()).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_classes_and_waiting_restores() -> Result<()> {
    let _g = serial().await;
    with_world("snapshot_errors", true, async |w: &mut World| {
        apply_crds(w)?;
        let sc = w.create_class("sc", json!({})).await?;
        w.create_claim("src", Some(&sc), "16Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        w.wait_bound("src", T).await?;
        let ns = w.ns.clone();

        // A class of a driver nobody runs, for a volume of ours.
        let unknown = create_class(w, "unknown", "nope.example.com", "Delete", json!({}))?;
        create_snapshot(w, "bad-driver", Some(&unknown), "src")?;
        wait_snapshot_error(w, "bad-driver", "nope.example.com").await?;
        w.wait_event(&ns, "VolumeSnapshot", "bad-driver", "SnapshotFailed", T).await?;

        // A snapshotter secret that does not exist: CreateSnapshot is not called.
        let secret = create_class(
            w,
            "secret",
            w.driver,
            "Delete",
            json!({
                "csi.storage.k8s.io/snapshotter-secret-name": "missing-${volumesnapshot.name}",
                "csi.storage.k8s.io/snapshotter-secret-namespace": "${volumesnapshot.namespace}",
            }),
        )?;
        create_snapshot(w, "no-secret", Some(&secret), "src")?;
        let msg = wait_snapshot_error(w, "no-secret", "missing-no-secret").await?;
        ensure!(msg.contains("not found"), "{msg}");
        w.wait_event(&ns, "VolumeSnapshot", "no-secret", "SnapshotCreationFailed", T).await?;
        ensure!(backend_snapshots(w).await?.is_empty(), "a snapshot was made without its secret");

        // A claim restoring from the snapshot that is not ready waits, with an event, and
        // the snapshot stays while it waits (source protection).
        w.create_claim(
            "waiting",
            Some(&sc),
            "16Mi",
            &["ReadWriteOnce"],
            json!({"spec": {"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "no-secret"}}}),
        )
        .await?;
        let ev = w.wait_event(&ns, "PersistentVolumeClaim", "waiting", "ProvisioningFailed", T).await?;
        ensure!(ev.message.as_deref().unwrap_or("").contains("not ready"), "{:?}", ev.message);
        ensure!(w.claim("waiting").await?.and_then(|c| c.spec).and_then(|s| s.volume_name).is_none());
        snapshots(w).delete("no-secret", &DeleteParams::default()).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(snapshots(w).get_opt("no-secret").await?.is_some(), "a snapshot being restored from was deleted");
        w.pvcs().delete("waiting", &DeleteParams::default()).await?;
        wait_gone(&snapshots(w), "no-secret", w).await?;

        // A data source of another kind: refused with the reason.
        w.create_claim(
            "wrong-kind",
            Some(&sc),
            "16Mi",
            &["ReadWriteOnce"],
            json!({"spec": {"dataSourceRef": {"apiGroup": "example.com", "kind": "Backup", "name": "b"}}}),
        )
        .await?;
        let ev = w.wait_event(&ns, "PersistentVolumeClaim", "wrong-kind", "ProvisioningFailed", T).await?;
        ensure!(ev.message.as_deref().unwrap_or("").contains("example.com/Backup"), "{:?}", ev.message);
        // Deleted while the provisioner runs: its finalizer goes (no content was made).
        snapshots(w).delete("bad-driver", &DeleteParams::default()).await?;
        wait_gone(&snapshots(w), "bad-driver", w).await?;
        for c in [unknown, secret] {
            let _ = classes(w).delete(&c, &DeleteParams::default()).await;
        }
        Ok(())
    })
    .await
}
