//! `stowage status` decisions, pure: which PVs and claims belong to Stowage drivers, what state
//! each is in, and which are stuck and why. The kube client (`status.rs`) only lists objects and
//! hands them here, so every explanation is covered by the table tests below.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

/// Every Stowage driver is named `<backend>.stowage.io`.
pub const DRIVER_SUFFIX: &str = ".stowage.io";

const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const ANN_BETA_STORAGE_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

pub fn is_stowage_driver(driver: &str) -> bool {
    driver.len() > DRIVER_SUFFIX.len() && driver.ends_with(DRIVER_SUFFIX)
}

/// `nfs` for `nfs.stowage.io`.
pub fn backend_of(driver: &str) -> &str {
    driver.strip_suffix(DRIVER_SUFFIX).unwrap_or(driver)
}

/// What `status` reads: every object of these kinds the caller may list.
pub struct Inputs<'a> {
    pub pvs: &'a [PersistentVolume],
    pub claims: &'a [PersistentVolumeClaim],
    pub classes: &'a [StorageClass],
    pub attachments: &'a [VolumeAttachment],
    /// Events about claims and PVs.
    pub events: &'a [Event],
    pub now: Timestamp,
    /// A claim Pending for longer than this (seconds) counts as stuck.
    pub pending_after_secs: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRow {
    pub name: String,
    pub phase: String,
    pub driver: String,
    pub backend: String,
    pub class: String,
    pub capacity: String,
    pub access_modes: Vec<String>,
    pub reclaim_policy: String,
    /// `namespace/name` of the claim it is bound or reserved to, "" for none.
    pub claim: String,
    pub volume_handle: String,
    /// "-" (no VolumeAttachment), "attached", "attaching" or "error", with the node.
    pub attach: String,
    pub node: String,
    pub age_seconds: i64,
    /// From the kubelet of a node where a pod mounts it (see [`crate::usage`]); none when not
    /// mounted or not asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRow {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub volume: String,
    pub class: String,
    pub driver: String,
    pub backend: String,
    /// Bound capacity, or the request while not bound.
    pub capacity: String,
    pub access_modes: Vec<String>,
    pub age_seconds: i64,
    /// As [`VolumeRow::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}

/// One stuck item, with what the cluster says about it and a next step.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Pending, Released, Failed, AttachError, DetachError.
    pub state: &'static str,
    pub age_seconds: i64,
    pub reason: String,
    pub hint: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    pub volumes: Vec<VolumeRow>,
    pub claims: Vec<ClaimRow>,
    pub problems: Vec<Problem>,
    /// What could not be read (a kubelet that did not answer for usage), said under the tables.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn age(now: Timestamp, t: Option<Timestamp>) -> i64 {
    t.map(|t| now.as_second() - t.as_second())
        .unwrap_or(0)
        .max(0)
}

/// Ages the way kubectl prints them (45s, 12m, 5h, 3d).
pub fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 180 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn storage(
    q: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> String {
    q.and_then(|m| m.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

fn claim_class(c: &PersistentVolumeClaim) -> String {
    c.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .or_else(|| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_BETA_STORAGE_CLASS).cloned())
        })
        .unwrap_or_default()
}

fn ann<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The latest event about an object (by kind, namespace and name; and UID when it has one, so
/// a claim made again under the same name does not show its predecessor's events).
fn last_event<'a>(
    events: &'a [Event],
    kind: &str,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Option<&'a Event> {
    events
        .iter()
        .filter(|e| {
            let o = &e.involved_object;
            o.kind.as_deref() == Some(kind)
                && o.name.as_deref() == Some(name)
                && (kind == "PersistentVolume" || o.namespace.as_deref().unwrap_or("") == namespace)
                && match (uid, o.uid.as_deref()) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
        .max_by_key(|e| event_time(e).map(|t| t.as_second()).unwrap_or(0))
}

fn event_time(e: &Event) -> Option<Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn describe_event(e: &Event) -> String {
    format!(
        "last event: {} {}: {}",
        e.type_.as_deref().unwrap_or("Normal"),
        e.reason.as_deref().unwrap_or("?"),
        e.message.as_deref().unwrap_or("").trim()
    )
}

pub fn explain(i: &Inputs) -> Report {
    let classes: BTreeMap<&str, &StorageClass> = i
        .classes
        .iter()
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c)))
        .collect();
    let stowage_pvs: BTreeMap<&str, &PersistentVolume> = i
        .pvs
        .iter()
        .filter(|pv| pv_driver(pv).is_some_and(is_stowage_driver))
        .filter_map(|pv| Some((pv.metadata.name.as_deref()?, pv)))
        .collect();
    let mut r = Report::default();

    for (name, pv) in &stowage_pvs {
        let spec = pv.spec.clone().unwrap_or_default();
        let driver = pv_driver(pv).unwrap_or_default().to_owned();
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into());
        let claim = spec
            .claim_ref
            .as_ref()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.namespace.as_deref().unwrap_or(""),
                    c.name.as_deref().unwrap_or("")
                )
            })
            .unwrap_or_default();
        let va = i.attachments.iter().find(|va| {
            va.spec.source.persistent_volume_name.as_deref() == Some(*name)
                && is_stowage_driver(&va.spec.attacher)
        });
        let (attach, node) = match va {
            None => ("-".to_owned(), String::new()),
            Some(va) => {
                let st = va.status.as_ref();
                let state = if st.and_then(|s| s.attach_error.as_ref()).is_some() {
                    "error"
                } else if st.is_some_and(|s| s.attached) {
                    "attached"
                } else {
                    "attaching"
                };
                (state.to_owned(), va.spec.node_name.clone())
            }
        };
        let pv_age = age(i.now, pv.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let reclaim = spec
            .persistent_volume_reclaim_policy
            .clone()
            .unwrap_or_else(|| "Retain".into());
        r.volumes.push(VolumeRow {
            name: name.to_string(),
            phase: phase.clone(),
            backend: backend_of(&driver).to_owned(),
            driver: driver.clone(),
            class: spec.storage_class_name.clone().unwrap_or_default(),
            capacity: storage(spec.capacity.as_ref()),
            access_modes: spec.access_modes.clone().unwrap_or_default(),
            reclaim_policy: reclaim.clone(),
            claim: claim.clone(),
            volume_handle: spec
                .csi
                .as_ref()
                .map(|c| c.volume_handle.clone())
                .unwrap_or_default(),
            attach,
            node,
            age_seconds: pv_age,
            usage: None,
        });
        let ev = last_event(
            i.events,
            "PersistentVolume",
            "",
            name,
            pv.metadata.uid.as_deref(),
        );
        let with_event = |s: String| match ev {
            Some(e) => format!("{s}; {}", describe_event(e)),
            None => s,
        };
        match phase.as_str() {
            "Released" => {
                let (reason, hint) = match reclaim.as_str() {
                    "Retain" => (
                        format!(
                            "claim {claim} is gone; reclaimPolicy Retain keeps the volume and its data"
                        ),
                        format!(
                            "copy what you need, then `kubectl delete pv {name}` (the backend volume stays) or remove spec.claimRef to let a new claim bind it"
                        ),
                    ),
                    "Delete" => (
                        with_event(format!(
                            "claim {claim} is gone; waiting for {driver}'s provisioner to delete the backend volume"
                        )),
                        format!(
                            "check that stowage-provisioner serves {driver} and that the backend is reachable (`stowage doctor --backend {}`)",
                            backend_of(&driver)
                        ),
                    ),
                    other => (
                        with_event(format!(
                            "claim {claim} is gone; waiting for reclaim ({other}) by {driver}'s provisioner"
                        )),
                        format!("check stowage-provisioner's log for {name}"),
                    ),
                };
                r.problems.push(Problem {
                    kind: "PersistentVolume",
                    namespace: String::new(),
                    name: name.to_string(),
                    state: "Released",
                    age_seconds: pv_age,
                    reason,
                    hint,
                });
            }
            "Failed" => {
                let msg = pv
                    .status
                    .as_ref()
                    .and_then(|s| s.message.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "no message".into());
                r.problems.push(Problem {
                    kind: "PersistentVolume",
                    namespace: String::new(),
                    name: name.to_string(),
                    state: "Failed",
                    age_seconds: pv_age,
                    reason: with_event(format!("Failed: {msg}")),
                    hint: format!(
                        "fix the cause, then set the PV's reclaim policy again or delete it (`kubectl describe pv {name}`)"
                    ),
                });
            }
            _ => {}
        }
    }

    for va in i
        .attachments
        .iter()
        .filter(|va| is_stowage_driver(&va.spec.attacher))
    {
        let Some(st) = va.status.as_ref() else {
            continue;
        };
        let pv = va
            .spec
            .source
            .persistent_volume_name
            .clone()
            .unwrap_or_default();
        let node = &va.spec.node_name;
        let va_name = va.metadata.name.clone().unwrap_or_default();
        let va_age = age(i.now, va.metadata.creation_timestamp.as_ref().map(|t| t.0));
        for (state, err) in [
            ("AttachError", &st.attach_error),
            ("DetachError", &st.detach_error),
        ] {
            if let Some(e) = err {
                r.problems.push(Problem {
                    kind: "VolumeAttachment",
                    namespace: String::new(),
                    name: va_name.clone(),
                    state,
                    age_seconds: va_age,
                    reason: format!(
                        "PV {pv} on node {node}: {}",
                        e.message.as_deref().unwrap_or("no message")
                    ),
                    hint: format!(
                        "see `kubectl describe volumeattachment {va_name}`; a volume held by another node is freed when that node's pod is gone"
                    ),
                });
            }
        }
    }

    for c in i.claims {
        let (Some(ns), Some(name)) = (c.metadata.namespace.as_deref(), c.metadata.name.as_deref())
        else {
            continue;
        };
        let spec = c.spec.clone().unwrap_or_default();
        let class = claim_class(c);
        let volume = spec.volume_name.clone().unwrap_or_default();
        let class_obj = classes.get(class.as_str());
        let driver = stowage_pvs
            .get(volume.as_str())
            .and_then(|pv| pv_driver(pv))
            .map(str::to_owned)
            .or_else(|| {
                ann(&c.metadata, ANN_STORAGE_PROVISIONER)
                    .or_else(|| ann(&c.metadata, ANN_BETA_STORAGE_PROVISIONER))
                    .map(str::to_owned)
            })
            .or_else(|| class_obj.map(|sc| sc.provisioner.clone()))
            .unwrap_or_default();
        if !is_stowage_driver(&driver) {
            continue;
        }
        let phase = c
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into());
        let capacity = {
            let bound = storage(c.status.as_ref().and_then(|s| s.capacity.as_ref()));
            if bound.is_empty() {
                storage(spec.resources.as_ref().and_then(|r| r.requests.as_ref()))
            } else {
                bound
            }
        };
        let c_age = age(i.now, c.metadata.creation_timestamp.as_ref().map(|t| t.0));
        r.claims.push(ClaimRow {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            phase: phase.clone(),
            volume: volume.clone(),
            class: class.clone(),
            backend: backend_of(&driver).to_owned(),
            driver: driver.clone(),
            capacity,
            access_modes: spec.access_modes.clone().unwrap_or_default(),
            age_seconds: c_age,
            usage: None,
        });
        if phase == "Pending" && c_age >= i.pending_after_secs {
            let ev = last_event(
                i.events,
                "PersistentVolumeClaim",
                ns,
                name,
                c.metadata.uid.as_deref(),
            );
            let wffc = class_obj
                .and_then(|sc| sc.volume_binding_mode.as_deref())
                .is_some_and(|m| m == "WaitForFirstConsumer");
            let (reason, hint) = if !class.is_empty() && class_obj.is_none() && volume.is_empty() {
                (
                    format!("StorageClass {class} does not exist"),
                    format!(
                        "create StorageClass {class} (provisioner {driver}) or change the claim's storageClassName"
                    ),
                )
            } else if wffc && ann(&c.metadata, ANN_SELECTED_NODE).is_none() && volume.is_empty() {
                (
                    format!("class {class} is WaitForFirstConsumer and no pod using the claim has been scheduled yet"),
                    "start a pod that uses the claim; if one exists, see why it is not scheduled (`kubectl describe pod`)".to_owned(),
                )
            } else if let Some(e) = ev {
                (
                    describe_event(e),
                    format!(
                        "`kubectl describe pvc -n {ns} {name}`; the provisioner retries by itself once the cause is fixed"
                    ),
                )
            } else {
                (
                    "no event about the claim yet".to_owned(),
                    format!(
                        "check that stowage-provisioner runs and serves {driver} (`stowage doctor`)"
                    ),
                )
            };
            r.problems.push(Problem {
                kind: "PersistentVolumeClaim",
                namespace: ns.to_owned(),
                name: name.to_owned(),
                state: "Pending",
                age_seconds: c_age,
                reason,
                hint,
            });
        }
    }
    r
}

fn pv_driver(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.csi.as_ref().map(|c| c.driver.as_str())
}

#[cfg(test)]
#[path = "explain_tests.rs"]
mod tests;
