//! Usage of mounted Stowage volumes for `stowage status`: what each kubelet reports in its
//! stats summary (`/api/v1/nodes/<node>/proxy/stats/summary`, `pods[].volume[]` with a
//! `pvcRef`), which for CSI volumes is the driver's own NodeGetVolumeStats answer. Pure here:
//! which nodes to ask, parsing a summary and putting the figures on the report's rows;
//! `status.rs` does the requests. A claim no running pod mounts has no usage (nothing on any
//! node measures it), and is shown as `-`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::explain::Report;

/// Bytes used and the volume's capacity as its filesystem sees it, from one kubelet.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

impl Usage {
    /// `8.0Mi/54Mi (15%)`.
    pub fn human(&self) -> String {
        let pct = if self.capacity_bytes > 0 {
            format!(
                " ({}%)",
                (self.used_bytes as u128 * 100 / self.capacity_bytes as u128)
            )
        } else {
            String::new()
        };
        format!(
            "{}/{}{pct}",
            binary(self.used_bytes),
            binary(self.capacity_bytes)
        )
    }
}

/// Bytes in binary units, one decimal below 10 (`8.0Mi`, `54Mi`, `512`): rounded, for a
/// person reading a table. Not `stowage_provisioner::quantity::format_bytes`, which writes the
/// exact quantity Kubernetes objects need (`1536Mi`, or plain bytes when no unit divides).
fn binary(b: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if b < 1024 {
        return b.to_string();
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v < 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

/// `namespace/claim` → usage.
pub type UsageMap = BTreeMap<String, Usage>;

/// The nodes worth asking: those running a pod that mounts one of `claims` (`namespace/name`),
/// directly or as a generic ephemeral volume (claim `<pod>-<volume>`).
pub fn nodes_to_ask(pods: &[Pod], claims: &BTreeSet<String>) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for p in pods {
        let (Some(spec), Some(ns), Some(pod)) = (
            p.spec.as_ref(),
            p.metadata.namespace.as_deref(),
            p.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let running = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Running");
        if !running {
            continue;
        }
        let mounts_one = spec.volumes.iter().flatten().any(|v| {
            let claim = match (&v.persistent_volume_claim, &v.ephemeral) {
                (Some(c), _) => c.claim_name.clone(),
                (None, Some(_)) => format!("{pod}-{}", v.name),
                _ => return false,
            };
            claims.contains(&format!("{ns}/{claim}"))
        });
        if mounts_one {
            nodes.insert(node.to_owned());
        }
    }
    nodes
}

#[derive(Deserialize)]
struct Summary {
    #[serde(default)]
    pods: Vec<PodStats>,
}

#[derive(Deserialize)]
struct PodStats {
    #[serde(default)]
    volume: Vec<VolumeStats>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeStats {
    pvc_ref: Option<PvcRef>,
    used_bytes: Option<u64>,
    capacity_bytes: Option<u64>,
}

#[derive(Deserialize)]
struct PvcRef {
    name: String,
    namespace: String,
}

/// The claims' usage in one kubelet stats summary (JSON). Volumes without a claim (emptyDir,
/// configMap) or without figures are left out; a claim mounted by two pods on the node appears
/// twice with the same figures, and the first is kept.
pub fn parse_summary(json: &[u8]) -> Result<UsageMap, serde_json::Error> {
    let s: Summary = serde_json::from_slice(json)?;
    let mut out = UsageMap::new();
    for v in s.pods.into_iter().flat_map(|p| p.volume) {
        if let (Some(r), Some(used), Some(cap)) = (v.pvc_ref, v.used_bytes, v.capacity_bytes) {
            out.entry(format!("{}/{}", r.namespace, r.name))
                .or_insert(Usage {
                    used_bytes: used,
                    capacity_bytes: cap,
                });
        }
    }
    Ok(out)
}

/// Puts the figures on the report's claim rows and on the rows of the volumes bound to them.
pub fn apply(r: &mut Report, usage: &UsageMap) {
    for c in &mut r.claims {
        c.usage = usage.get(&format!("{}/{}", c.namespace, c.name)).copied();
    }
    for v in &mut r.volumes {
        v.usage = usage.get(&v.claim).copied();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_figures() {
        let cases = [
            (0, 0, "0/0"),
            (512, 1024, "512/1.0Ki (50%)"),
            (8 << 20, 54 << 20, "8.0Mi/54Mi (14%)"),
            (3 << 30, 10 << 30, "3.0Gi/10Gi (30%)"),
            (1536, 0, "1.5Ki/0"),
            (u64::MAX, u64::MAX, "16Ei/16Ei (100%)"),
        ];
        for (used, cap, want) in cases {
            let u = Usage {
                used_bytes: used,
                capacity_bytes: cap,
            };
            assert_eq!(u.human(), want, "{used}/{cap}");
        }
    }

    #[test]
    fn summary_keeps_claims_with_figures_only() {
        let json = br#"{"node":{"nodeName":"n1"},"pods":[
          {"podRef":{"name":"a","namespace":"apps"},"volume":[
            {"name":"data","usedBytes":8388608,"capacityBytes":56623104,"pvcRef":{"name":"data-a","namespace":"apps"}},
            {"name":"tmp","usedBytes":4096,"capacityBytes":1000}
          ]},
          {"podRef":{"name":"b","namespace":"apps"},"volume":[
            {"name":"data","pvcRef":{"name":"no-figures","namespace":"apps"}}
          ]},
          {"podRef":{"name":"c","namespace":"apps"}}
        ]}"#;
        let m = parse_summary(json).unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(
            m["apps/data-a"],
            Usage {
                used_bytes: 8388608,
                capacity_bytes: 56623104
            }
        );
        assert!(parse_summary(b"{}").unwrap().is_empty());
        assert!(parse_summary(b"not json").is_err());
    }

    fn pod(ns: &str, name: &str, node: &str, phase: &str, vols: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"nodeName": node, "containers": [], "volumes": vols},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn nodes_running_pods_of_the_claims() {
        let claims: BTreeSet<String> = ["apps/data", "apps/web-scratch"]
            .into_iter()
            .map(String::from)
            .collect();
        let pods = [
            pod(
                "apps",
                "db",
                "n1",
                "Running",
                serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]),
            ),
            // Generic ephemeral volume: claim <pod>-<volume>.
            pod(
                "apps",
                "web",
                "n2",
                "Running",
                serde_json::json!([{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]),
            ),
            // Not running, another namespace, another claim, no node: not asked.
            pod(
                "apps",
                "done",
                "n3",
                "Succeeded",
                serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]),
            ),
            pod(
                "other",
                "db",
                "n4",
                "Running",
                serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]),
            ),
            pod(
                "apps",
                "x",
                "n5",
                "Running",
                serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "elsewhere"}}]),
            ),
            pod(
                "apps",
                "pending",
                "",
                "Running",
                serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]),
            ),
        ];
        let got: Vec<String> = nodes_to_ask(&pods, &claims).into_iter().collect();
        assert_eq!(got, ["n1", "n2"]);
    }
}
