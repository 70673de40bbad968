//! The `stowage` admin CLI against the real control plane of tests/infra/kube.sh, the real
//! stowage-controller (local backend) and stowage-provisioner: `stowage status` must list
//! what the API server holds and pick out the stuck items with the cluster's own reasons.
//! Suite tests/suites/87-cli.sh. One test at a time (they share the cluster).

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use stowage_tests::bin;
use stowage_tests::provisioner::{World, serial, wait_for, with_world};

const T: Duration = Duration::from_secs(60);

fn stowage(w: &World, args: &[&str]) -> Result<Output> {
    Command::new(bin("stowage")?)
        .args(args)
        .env("KUBECONFIG", &w.cluster.admin_kubeconfig)
        .output()
        .context("running stowage")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn status_json(w: &World) -> Result<Value> {
    let o = stowage(w, &["status", "-o", "json", "--pending-after", "0"])?;
    ensure!(o.status.success(), "stowage status failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).with_context(|| format!("status JSON: {}", text(&o)))
}

fn find<'a>(list: &'a Value, f: impl Fn(&Value) -> bool) -> Option<&'a Value> {
    list.as_array()?.iter().find(|v| f(v))
}

fn problem<'a>(r: &'a Value, kind: &str, name: &str) -> Option<&'a Value> {
    find(&r["problems"], |p| p["kind"] == kind && p["name"] == name)
}

#[tokio::test]
async fn status_lists_and_explains() -> Result<()> {
    let _g = serial().await;
    with_world("cli_status", true, async |w: &mut World| {
        let ns = w.ns.clone();
        // A bound claim.
        let good = w.create_class("fast", json!({"reclaimPolicy": "Delete"})).await?;
        w.create_claim("data", Some(&good), "64Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        let pv = w.wait_bound("data", T).await?;
        let pv_name = pv.metadata.name.clone().unwrap_or_default();
        // A claim whose class has a parameter the driver refuses: Pending with an event.
        let bad = w
            .create_class("bad", json!({"parameters": {"bogusParam": "1"}}))
            .await?;
        w.create_claim("stuck", Some(&bad), "64Mi", &["ReadWriteOnce"], json!({}))
            .await?;
        w.wait_event(&ns, "PersistentVolumeClaim", "stuck", "ProvisioningFailed", T)
            .await?;
        // A PV whose claim is gone: Released, kept by Retain.
        let kept = format!("{ns}-kept");
        let pv_obj = json!({
            "metadata": {"name": kept},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": format!("{ns}-none"),
                     "claimRef": {"namespace": ns, "name": "gone", "uid": "6b1c7b0e-0000-4000-8000-000000000001"},
                     "csi": {"driver": w.driver, "volumeHandle": "default/not-there"}}
        });
        w.pvs()
            .create(&PostParams::default(), &serde_json::from_value(pv_obj)?)
            .await?;
        w.wait_pv_phase(&kept, "Released", T).await?;
        // An attachment to a node without a CSINode: the provisioner's attach duty sets
        // attachError.
        let vas: Api<VolumeAttachment> = Api::all(w.client.clone());
        let va_name = format!("{ns}-va");
        let va: VolumeAttachment = serde_json::from_value(json!({
            "metadata": {"name": va_name},
            "spec": {"attacher": w.driver, "nodeName": format!("{ns}-ghost"),
                     "source": {"persistentVolumeName": pv_name}}
        }))?;
        vas.create(&PostParams::default(), &va).await?;
        wait_for("attachError", T, || {
            let vas = vas.clone();
            let n = va_name.clone();
            async move {
                Ok(vas
                    .get_opt(&n)
                    .await?
                    .filter(|v| v.status.as_ref().is_some_and(|s| s.attach_error.is_some())))
            }
        })
        .await?;

        let r = status_json(w)?;
        let c = find(&r["claims"], |c| c["namespace"] == ns.as_str() && c["name"] == "data")
            .context("claim data not listed")?;
        ensure!(c["phase"] == "Bound" && c["volume"] == pv_name.as_str(), "{c}");
        ensure!(c["backend"] == "local" && c["class"] == good.as_str(), "{c}");
        let v = find(&r["volumes"], |v| v["name"] == pv_name.as_str()).context("PV not listed")?;
        ensure!(v["phase"] == "Bound" && v["claim"] == format!("{ns}/data"), "{v}");
        ensure!(v["capacity"] == "64Mi" && v["attach"] == "error", "{v}");
        let p = problem(&r, "PersistentVolumeClaim", "stuck").context("stuck claim not reported")?;
        let reason = p["reason"].as_str().unwrap_or_default();
        ensure!(p["state"] == "Pending", "{p}");
        ensure!(
            reason.contains("ProvisioningFailed") && reason.contains("bogusParam"),
            "{p}"
        );
        let p = problem(&r, "PersistentVolume", &kept).context("released PV not reported")?;
        ensure!(p["state"] == "Released", "{p}");
        ensure!(p["reason"].as_str().unwrap_or_default().contains("Retain"), "{p}");
        let p = problem(&r, "VolumeAttachment", &va_name).context("attachError not reported")?;
        ensure!(
            p["reason"].as_str().unwrap_or_default().contains("CSINode"),
            "{p}"
        );
        ensure!(
            problem(&r, "PersistentVolumeClaim", "data").is_none(),
            "a bound claim reported as stuck: {r}"
        );

        // The table and YAML forms say the same.
        let o = stowage(w, &["status", "--pending-after", "0", "-n", &ns])?;
        let t = text(&o);
        ensure!(o.status.success(), "{t}");
        ensure!(t.contains("STUCK") && t.contains(&format!("{ns}/stuck")), "{t}");
        ensure!(t.contains("fix: "), "{t}");
        println!("stowage status (table):\n{}", String::from_utf8_lossy(&o.stdout));
        let o = stowage(w, &["status", "-o", "yaml", "-n", &ns])?;
        ensure!(o.status.success(), "{}", text(&o));
        let y = String::from_utf8_lossy(&o.stdout);
        ensure!(y.contains("problems:") && y.contains(&pv_name), "{y}");
        let o = stowage(w, &["status", "-o", "wide", "-n", &ns])?;
        ensure!(
            String::from_utf8_lossy(&o.stdout).contains("default/"),
            "wide output lacks the handle: {}",
            text(&o)
        );
        let _ = vas.delete(&va_name, &DeleteParams::default()).await;
        Ok(())
    })
    .await
}
