//! What provisioning a claim means, as pure functions: the CreateVolume request a claim and its
//! StorageClass make (parameters with the `csi.storage.k8s.io/*` keys resolved, capabilities,
//! capacity, topology), and the PV that records the created volume.
//!
//! Everything a person can get wrong in a StorageClass or claim is refused here with a message
//! naming the field, before anything is created.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, SecretReference,
    VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;

use crate::binder::claim_reference;
use crate::objects::{
    self as o, ANN_DELETION_SECRET_NAME, ANN_DELETION_SECRET_NAMESPACE, ANN_PROVISIONED_BY,
    FINALIZER, RECLAIM_DELETE, RECLAIM_RECYCLE, RECLAIM_RETAIN,
};
use crate::quantity;
use crate::snapshot::plan::RestoreSource;
use crate::snapshot::types::GROUP as SNAPSHOT_GROUP;

/// StorageClass parameter choosing the PV's reclaim policy beyond what the StorageClass API
/// allows (its reclaimPolicy accepts only Delete and Retain): `recycle`, `delete`, `retain`.
pub const PARAM_RECLAIM: &str = "stowage.io/reclaim";

const CSI_PREFIX: &str = "csi.storage.k8s.io/";
const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const PV_NAME: &str = "csi.storage.k8s.io/pv/name";
const FSTYPE: &str = "fstype";

/// What the driver can do, from its plugin and controller capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverCaps {
    /// CSI SINGLE_NODE_MULTI_WRITER: ReadWriteOncePod can be told apart from ReadWriteOnce.
    pub single_node_multi_writer: bool,
    /// VOLUME_ACCESSIBILITY_CONSTRAINTS: volumes have topology.
    pub topology: bool,
    /// CLONE_VOLUME.
    pub clone: bool,
    /// PUBLISH_UNPUBLISH_VOLUME: volumes are attached to nodes (the attach controller runs).
    pub publish_unpublish: bool,
    /// PUBLISH_READONLY: ControllerPublish honours readonly.
    pub publish_readonly: bool,
    /// EXPAND_VOLUME: ControllerExpandVolume (the resize controller runs).
    pub expand: bool,
    /// CREATE_DELETE_SNAPSHOT: the snapshot controller runs; claims restore from snapshots.
    pub snapshot: bool,
    /// LIST_SNAPSHOTS: pre-provisioned snapshots are checked with the driver.
    pub list_snapshots: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub namespace: String,
}

impl SecretRef {
    fn to_k8s(&self) -> SecretReference {
        SecretReference {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
        }
    }
}

/// Secrets the PV records for the node and controller calls Kubernetes makes later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PvSecrets {
    pub controller_publish: Option<SecretRef>,
    pub node_stage: Option<SecretRef>,
    pub node_publish: Option<SecretRef>,
    pub controller_expand: Option<SecretRef>,
    pub node_expand: Option<SecretRef>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub pv_name: String,
    /// The request, without secrets (the controller adds the provisioner secret's data).
    pub request: v1::CreateVolumeRequest,
    pub provisioner_secret: Option<SecretRef>,
    pub pv_secrets: PvSecrets,
    pub reclaim_policy: String,
    pub fs_type: String,
    pub requested_bytes: u64,
}

/// Why a claim cannot be provisioned as it stands; the message goes into a
/// ProvisioningFailed event on the claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("StorageClass parameter {key:?}: {reason}")]
    Parameter { key: String, reason: String },
    #[error("spec.accessModes: {0}")]
    AccessModes(String),
    #[error("spec.resources: {0}")]
    Capacity(String),
    #[error("spec.dataSource: {0}")]
    DataSource(String),
    /// The source exists but cannot be used yet (a snapshot not ready, a claim not bound):
    /// the claim waits and is retried.
    #[error("spec.dataSource: waiting for the source: {0}")]
    SourceNotReady(String),
}

fn param_err(key: &str, reason: impl Into<String>) -> PlanError {
    PlanError::Parameter {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

pub struct PlanInput<'a> {
    pub driver: &'a str,
    pub caps: DriverCaps,
    pub claim: &'a PersistentVolumeClaim,
    pub class: &'a StorageClass,
    /// The selected node's topology segments for this driver (CSINode keys, node labels).
    pub node_topology: Option<BTreeMap<String, String>>,
    /// For a clone: the volume handle of the source claim's PV.
    pub clone_source: Option<String>,
    /// For a restore: what the claim's VolumeSnapshot amounts to (see
    /// [`crate::snapshot::restore::lookup`]).
    pub snapshot_source: Option<RestoreSource>,
}

/// The secret kinds a StorageClass can name, as `csi.storage.k8s.io/<kind>-secret-name`.
const SECRET_KINDS: [&str; 6] = [
    "provisioner",
    "controller-publish",
    "node-stage",
    "node-publish",
    "controller-expand",
    "node-expand",
];

/// Substitutes `${pv.name}`, `${pvc.name}`, `${pvc.namespace}` and (where allowed)
/// `${pvc.annotations['key']}` in a secret name or namespace template.
fn expand(
    key: &str,
    template: &str,
    claim: &PersistentVolumeClaim,
    pv_name: &str,
    allow_pvc_name: bool,
    allow_annotations: bool,
) -> Result<String, PlanError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| param_err(key, format!("unclosed ${{ in {template:?}")))?;
        let var = &after[..end];
        let value = match var {
            "pv.name" => pv_name.to_owned(),
            "pvc.namespace" => o::namespace(&claim.metadata).to_owned(),
            "pvc.name" if allow_pvc_name => o::name(&claim.metadata).to_owned(),
            v if allow_annotations && v.starts_with("pvc.annotations['") && v.ends_with("']") => {
                let ann = &v["pvc.annotations['".len()..v.len() - 2];
                o::annotation(&claim.metadata, ann)
                    .ok_or_else(|| param_err(key, format!("the claim has no annotation {ann:?}")))?
                    .to_owned()
            }
            other => {
                return Err(param_err(key, format!("${{{other}}} cannot be used here")));
            }
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(param_err(key, "expands to an empty string"));
    }
    Ok(out)
}

fn secret_ref(
    kind: &str,
    params: &BTreeMap<String, String>,
    claim: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Option<SecretRef>, PlanError> {
    let name_key = format!("{CSI_PREFIX}{kind}-secret-name");
    let ns_key = format!("{CSI_PREFIX}{kind}-secret-namespace");
    // The provisioner secret is read before the PV exists, so it cannot depend on claim
    // annotations (same rule as external-provisioner).
    let annotations = kind != "provisioner";
    match (params.get(&name_key), params.get(&ns_key)) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(param_err(&name_key, format!("needs {ns_key} too"))),
        (None, Some(_)) => Err(param_err(&ns_key, format!("needs {name_key} too"))),
        (Some(n), Some(ns)) => Ok(Some(SecretRef {
            name: expand(&name_key, n, claim, pv_name, true, annotations)?,
            namespace: expand(&ns_key, ns, claim, pv_name, false, false)?,
        })),
    }
}

pub(crate) fn capability(
    mode: &str,
    block: bool,
    fs_type: &str,
    mount_flags: &[String],
    caps: DriverCaps,
    driver: &str,
) -> Result<v1::VolumeCapability, PlanError> {
    let m = match mode {
        o::RWO if caps.single_node_multi_writer => Mode::SingleNodeMultiWriter,
        o::RWO => Mode::SingleNodeWriter,
        o::RWOP if caps.single_node_multi_writer => Mode::SingleNodeSingleWriter,
        o::RWOP => {
            return Err(PlanError::AccessModes(format!(
                "ReadWriteOncePod needs a driver with SINGLE_NODE_MULTI_WRITER; {driver} does not offer it"
            )));
        }
        o::ROX => Mode::MultiNodeReaderOnly,
        o::RWX => Mode::MultiNodeMultiWriter,
        other => {
            return Err(PlanError::AccessModes(format!(
                "unknown access mode {other:?}"
            )));
        }
    };
    let access_type = if block {
        v1::volume_capability::AccessType::Block(Default::default())
    } else {
        v1::volume_capability::AccessType::Mount(v1::volume_capability::MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: mount_flags.to_vec(),
            volume_mount_group: String::new(),
        })
    };
    Ok(v1::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(v1::volume_capability::AccessMode { mode: m as i32 }),
    })
}

/// The claim's data source as (API group, kind, name): `dataSource`, else `dataSourceRef`
/// (which may name another namespace: refused, cross-namespace sources need a
/// ReferenceGrant Stowage does not read).
fn data_source(
    claim: &PersistentVolumeClaim,
) -> Result<Option<(String, String, String)>, PlanError> {
    let Some(spec) = claim.spec.as_ref() else {
        return Ok(None);
    };
    if let Some(ds) = &spec.data_source {
        let group = ds.api_group.clone().unwrap_or_default();
        return Ok(Some((group, ds.kind.clone(), ds.name.clone())));
    }
    let Some(r) = &spec.data_source_ref else {
        return Ok(None);
    };
    if let Some(ns) = r
        .namespace
        .as_deref()
        .filter(|ns| *ns != o::namespace(&claim.metadata))
    {
        return Err(PlanError::DataSource(format!(
            "spec.dataSourceRef.namespace {ns:?}: sources in other namespaces are not supported"
        )));
    }
    let group = r.api_group.clone().unwrap_or_default();
    Ok(Some((group, r.kind.clone(), r.name.clone())))
}

/// What the volume is created from: another claim's volume (a clone) or a snapshot.
fn content_source(
    input: &PlanInput<'_>,
    requested: u64,
) -> Result<Option<v1::VolumeContentSource>, PlanError> {
    let Some((group, kind, name)) = data_source(input.claim)? else {
        return Ok(None);
    };
    use v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = |t: Type| Some(v1::VolumeContentSource { r#type: Some(t) });
    match (group.as_str(), kind.as_str()) {
        ("", "PersistentVolumeClaim") => {
            if !input.caps.clone {
                return Err(PlanError::DataSource(format!(
                    "{} cannot clone volumes",
                    input.driver
                )));
            }
            let src = input.clone_source.clone().ok_or_else(|| {
                PlanError::DataSource(format!(
                    "claim {name:?} has no bound volume of {} to clone",
                    input.driver
                ))
            })?;
            Ok(source(Type::Volume(VolumeSource { volume_id: src })))
        }
        (SNAPSHOT_GROUP, "VolumeSnapshot") => {
            if !input.caps.snapshot {
                return Err(PlanError::DataSource(format!(
                    "{} cannot restore snapshots (no CREATE_DELETE_SNAPSHOT)",
                    input.driver
                )));
            }
            match &input.snapshot_source {
                Some(RestoreSource::Snapshot { id, size_bytes }) => {
                    // Upstream's rule: a volume smaller than the snapshot cannot hold it.
                    if *size_bytes > 0 && requested > 0 && requested < *size_bytes {
                        return Err(PlanError::Capacity(format!(
                            "requests.storage ({}) is smaller than the restoreSize ({}) of volumesnapshot {name:?}",
                            quantity::Bytes(requested),
                            quantity::Bytes(*size_bytes)
                        )));
                    }
                    Ok(source(Type::Snapshot(SnapshotSource {
                        snapshot_id: id.clone(),
                    })))
                }
                Some(RestoreSource::NotReady(m)) => Err(PlanError::SourceNotReady(m.clone())),
                Some(RestoreSource::Refused(m)) => Err(PlanError::DataSource(m.clone())),
                None => Err(PlanError::SourceNotReady(format!(
                    "volumesnapshot {name:?} not looked up yet"
                ))),
            }
        }
        _ => Err(PlanError::DataSource(format!(
            "{}{kind} {name:?} is not a source stowage-provisioner can create volumes from (PersistentVolumeClaim or {SNAPSHOT_GROUP}/VolumeSnapshot)",
            if group.is_empty() {
                String::new()
            } else {
                format!("{group}/")
            },
        ))),
    }
}

/// Segments the StorageClass allows: the cross product of each term's keys and values.
fn allowed_topologies(class: &StorageClass) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for term in class.allowed_topologies.iter().flatten() {
        let mut segs = vec![BTreeMap::new()];
        for e in term.match_label_expressions.iter().flatten() {
            let mut next = Vec::new();
            for s in &segs {
                for v in &e.values {
                    let mut s = s.clone();
                    s.insert(e.key.clone(), v.clone());
                    next.push(s);
                }
            }
            segs = next;
        }
        out.extend(segs.into_iter().filter(|s| !s.is_empty()));
    }
    out
}

pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let claim = input.claim;
    let class = input.class;
    let pv_name = o::pv_name_for(claim);
    let empty = BTreeMap::new();
    let class_params = class.parameters.as_ref().unwrap_or(&empty);

    let mut parameters = BTreeMap::new();
    let mut fs_type = String::new();
    let mut reclaim_policy = class
        .reclaim_policy
        .clone()
        .unwrap_or_else(|| RECLAIM_DELETE.to_owned());
    for (k, v) in class_params {
        if let Some(rest) = k.strip_prefix(CSI_PREFIX) {
            let known = rest == FSTYPE
                || SECRET_KINDS.iter().any(|kind| {
                    rest == format!("{kind}-secret-name")
                        || rest == format!("{kind}-secret-namespace")
                });
            if !known {
                return Err(param_err(
                    k,
                    "unknown csi.storage.k8s.io/ key (known: fstype and <kind>-secret-name/-namespace)",
                ));
            }
            if rest == FSTYPE {
                fs_type = v.clone();
            }
            continue;
        }
        if k == PARAM_RECLAIM {
            reclaim_policy = match v.as_str() {
                "recycle" => RECLAIM_RECYCLE,
                "delete" => RECLAIM_DELETE,
                "retain" => RECLAIM_RETAIN,
                other => {
                    return Err(param_err(
                        k,
                        format!("{other:?}: expected recycle, delete or retain"),
                    ));
                }
            }
            .to_owned();
            continue;
        }
        parameters.insert(k.clone(), v.clone());
    }
    // Claim metadata for the backends' directory-name templates.
    parameters.insert(PVC_NAME.into(), o::name(&claim.metadata).into());
    parameters.insert(PVC_NAMESPACE.into(), o::namespace(&claim.metadata).into());
    parameters.insert(PV_NAME.into(), pv_name.clone());

    let provisioner_secret = secret_ref("provisioner", class_params, claim, &pv_name)?;
    let pv_secrets = PvSecrets {
        controller_publish: secret_ref("controller-publish", class_params, claim, &pv_name)?,
        node_stage: secret_ref("node-stage", class_params, claim, &pv_name)?,
        node_publish: secret_ref("node-publish", class_params, claim, &pv_name)?,
        controller_expand: secret_ref("controller-expand", class_params, claim, &pv_name)?,
        node_expand: secret_ref("node-expand", class_params, claim, &pv_name)?,
    };

    let block = o::claim_volume_mode(claim) == o::MODE_BLOCK;
    if block && !fs_type.is_empty() {
        // A raw block volume has no filesystem; the fstype is simply not used (as upstream).
        fs_type.clear();
    }
    let mount_flags = class.mount_options.clone().unwrap_or_default();
    let modes = o::claim_access_modes(claim);
    if modes.is_empty() {
        return Err(PlanError::AccessModes(
            "at least one access mode is required".into(),
        ));
    }
    let capabilities = modes
        .iter()
        .map(|m| capability(m, block, &fs_type, &mount_flags, input.caps, input.driver))
        .collect::<Result<Vec<_>, _>>()?;

    let requested = o::claim_request(claim)
        .map_err(|e| PlanError::Capacity(format!("requests.storage: {e}")))?;
    let limit =
        o::claim_limit(claim).map_err(|e| PlanError::Capacity(format!("limits.storage: {e}")))?;
    if let Some(l) = limit.filter(|l| *l > 0 && *l < requested) {
        return Err(PlanError::Capacity(format!(
            "limits.storage ({}) is below requests.storage ({})",
            quantity::Bytes(l),
            quantity::Bytes(requested)
        )));
    }
    let to_i64 = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    let capacity_range = (requested > 0 || limit.is_some()).then(|| v1::CapacityRange {
        required_bytes: to_i64(requested),
        limit_bytes: to_i64(limit.unwrap_or(0)),
    });

    let volume_content_source = content_source(input, requested)?;

    let accessibility_requirements = if input.caps.topology {
        let segs = match &input.node_topology {
            Some(seg) if !seg.is_empty() => vec![seg.clone()],
            _ => allowed_topologies(class),
        };
        (!segs.is_empty()).then(|| {
            let topo: Vec<v1::Topology> = segs
                .into_iter()
                .map(|s| v1::Topology {
                    segments: s.into_iter().collect(),
                })
                .collect();
            v1::TopologyRequirement {
                requisite: topo.clone(),
                preferred: topo,
            }
        })
    } else {
        None
    };

    Ok(Plan {
        request: v1::CreateVolumeRequest {
            name: pv_name.clone(),
            capacity_range,
            volume_capabilities: capabilities,
            parameters: parameters.into_iter().collect(),
            secrets: Default::default(),
            volume_content_source,
            accessibility_requirements,
            mutable_parameters: Default::default(),
        },
        pv_name,
        provisioner_secret,
        pv_secrets,
        reclaim_policy,
        fs_type,
        requested_bytes: requested,
    })
}

/// Node affinity that pins a PV to the places its volume is accessible from.
fn node_affinity(topology: &[v1::Topology]) -> Option<VolumeNodeAffinity> {
    let terms: Vec<NodeSelectorTerm> = topology
        .iter()
        .filter(|t| !t.segments.is_empty())
        .map(|t| {
            let mut segs: Vec<(&String, &String)> = t.segments.iter().collect();
            segs.sort();
            NodeSelectorTerm {
                match_expressions: Some(
                    segs.into_iter()
                        .map(|(k, v)| NodeSelectorRequirement {
                            key: k.clone(),
                            operator: "In".into(),
                            values: Some(vec![v.clone()]),
                        })
                        .collect(),
                ),
                match_fields: None,
            }
        })
        .collect();
    if terms.is_empty() {
        return None;
    }
    Some(VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: terms,
        }),
    })
}

/// The PV for a volume the driver created for `claim` under `plan`: pre-bound to the claim,
/// with the finalizer when the volume goes with the PV.
pub fn build_pv(
    plan: &Plan,
    driver: &str,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    created: &v1::Volume,
) -> PersistentVolume {
    let mut annotations = BTreeMap::from([(ANN_PROVISIONED_BY.to_owned(), driver.to_owned())]);
    if let Some(s) = &plan.provisioner_secret {
        annotations.insert(ANN_DELETION_SECRET_NAME.into(), s.name.clone());
        annotations.insert(ANN_DELETION_SECRET_NAMESPACE.into(), s.namespace.clone());
    }
    let bytes = u64::try_from(created.capacity_bytes)
        .ok()
        .filter(|b| *b > 0)
        .unwrap_or(plan.requested_bytes);
    let block = o::claim_volume_mode(claim) == o::MODE_BLOCK;
    let s = &plan.pv_secrets;
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(plan.pv_name.clone()),
            annotations: Some(annotations),
            finalizers: (plan.reclaim_policy == RECLAIM_DELETE).then(|| vec![FINALIZER.to_owned()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: claim.spec.as_ref().and_then(|s| s.access_modes.clone()),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(quantity::format_bytes(bytes)),
            )])),
            claim_ref: Some(claim_reference(claim)),
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.to_owned(),
                volume_handle: created.volume_id.clone(),
                fs_type: (!block && !plan.fs_type.is_empty()).then(|| plan.fs_type.clone()),
                volume_attributes: (!created.volume_context.is_empty())
                    .then(|| created.volume_context.clone().into_iter().collect()),
                controller_publish_secret_ref: s.controller_publish.as_ref().map(SecretRef::to_k8s),
                node_stage_secret_ref: s.node_stage.as_ref().map(SecretRef::to_k8s),
                node_publish_secret_ref: s.node_publish.as_ref().map(SecretRef::to_k8s),
                controller_expand_secret_ref: s.controller_expand.as_ref().map(SecretRef::to_k8s),
                node_expand_secret_ref: s.node_expand.as_ref().map(SecretRef::to_k8s),
                read_only: None,
            }),
            mount_options: class.mount_options.clone(),
            node_affinity: node_affinity(&created.accessible_topology),
            persistent_volume_reclaim_policy: Some(plan.reclaim_policy.clone()),
            storage_class_name: class.metadata.name.clone(),
            volume_mode: Some(o::claim_volume_mode(claim).to_owned()),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
