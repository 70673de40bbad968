//! Names Kubernetes gives to annotations, phases and fields of PVs and claims, and small
//! accessors that read them the way kube-controller-manager does (defaults included), so the
//! binder and the provisioner never disagree with it about what an object says.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, PersistentVolume, PersistentVolumeClaim,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::quantity::{self, QuantityError};

pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const ANN_BETA_STORAGE_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
pub const ANN_BETA_DEFAULT_CLASS: &str = "storageclass.beta.kubernetes.io/is-default-class";
/// Where the provisioner secret of a volume is recorded, so DeleteVolume gets the same secret
/// even after the StorageClass changed or went away (external-provisioner's names).
pub const ANN_DELETION_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
pub const ANN_DELETION_SECRET_NAMESPACE: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-namespace";
/// Keeps a PV with reclaim policy Delete until its backend volume is deleted.
pub const FINALIZER: &str = "provisioner.stowage.io/finalizer";

pub const RECLAIM_DELETE: &str = "Delete";
pub const RECLAIM_RETAIN: &str = "Retain";
pub const RECLAIM_RECYCLE: &str = "Recycle";

pub const BINDING_WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";

pub const MODE_FILESYSTEM: &str = "Filesystem";
pub const MODE_BLOCK: &str = "Block";

pub const RWO: &str = "ReadWriteOnce";
pub const ROX: &str = "ReadOnlyMany";
pub const RWX: &str = "ReadWriteMany";
pub const RWOP: &str = "ReadWriteOncePod";

/// PV phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumePhase {
    Pending,
    Available,
    Bound,
    Released,
    Failed,
}

impl VolumePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumePhase::Pending => "Pending",
            VolumePhase::Available => "Available",
            VolumePhase::Bound => "Bound",
            VolumePhase::Released => "Released",
            VolumePhase::Failed => "Failed",
        }
    }
    pub fn of(pv: &PersistentVolume) -> Option<Self> {
        match pv.status.as_ref()?.phase.as_deref()? {
            "Pending" => Some(VolumePhase::Pending),
            "Available" => Some(VolumePhase::Available),
            "Bound" => Some(VolumePhase::Bound),
            "Released" => Some(VolumePhase::Released),
            "Failed" => Some(VolumePhase::Failed),
            _ => None,
        }
    }
}

/// Claim phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimPhase {
    Pending,
    Bound,
    Lost,
}

impl ClaimPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimPhase::Pending => "Pending",
            ClaimPhase::Bound => "Bound",
            ClaimPhase::Lost => "Lost",
        }
    }
    pub fn of(pvc: &PersistentVolumeClaim) -> Option<Self> {
        match pvc.status.as_ref()?.phase.as_deref()? {
            "Pending" => Some(ClaimPhase::Pending),
            "Bound" => Some(ClaimPhase::Bound),
            "Lost" => Some(ClaimPhase::Lost),
            _ => None,
        }
    }
}

/// Forgets an object's managedFields before it goes into a watch cache: nothing here reads
/// them, and they are often the bulk of a cached object. Writes of such a copy leave the
/// server's managedFields as they are (an absent field is not a reset).
pub fn drop_managed_fields<K: kube::Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

pub fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

pub fn has_annotation(meta: &ObjectMeta, key: &str) -> bool {
    annotation(meta, key).is_some()
}

pub fn set_annotation(meta: &mut ObjectMeta, key: &str, value: &str) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.to_owned(), value.to_owned());
}

pub fn remove_annotation(meta: &mut ObjectMeta, key: &str) {
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(key);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

pub fn has_finalizer(meta: &ObjectMeta, f: &str) -> bool {
    meta.finalizers
        .as_ref()
        .is_some_and(|v| v.iter().any(|x| x == f))
}

pub fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

pub fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("")
}

pub fn uid(meta: &ObjectMeta) -> &str {
    meta.uid.as_deref().unwrap_or("")
}

/// `namespace/name` of a claim, for logs and messages.
pub fn claim_key(pvc: &PersistentVolumeClaim) -> String {
    format!("{}/{}", namespace(&pvc.metadata), name(&pvc.metadata))
}

/// The class a claim asks for: the beta annotation wins over the field (as in
/// kube-controller-manager); "" means "no class".
pub fn claim_class(pvc: &PersistentVolumeClaim) -> &str {
    if let Some(c) = annotation(&pvc.metadata, ANN_BETA_STORAGE_CLASS) {
        return c;
    }
    pvc.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

/// Did the claim ask for a class at all? `storageClassName: ""` is an answer ("none"); a
/// missing field is not, and may later be filled with the default class.
pub fn claim_has_class(pvc: &PersistentVolumeClaim) -> bool {
    annotation(&pvc.metadata, ANN_BETA_STORAGE_CLASS).is_some()
        || pvc
            .spec
            .as_ref()
            .is_some_and(|s| s.storage_class_name.is_some())
}

pub fn volume_class(pv: &PersistentVolume) -> &str {
    if let Some(c) = annotation(&pv.metadata, ANN_BETA_STORAGE_CLASS) {
        return c;
    }
    pv.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

/// Bytes the claim requests (0 when it names none).
pub fn claim_request(pvc: &PersistentVolumeClaim) -> Result<u64, QuantityError> {
    claim_storage(pvc, false)
}

/// Bytes the claim allows at most, if it sets a limit.
pub fn claim_limit(pvc: &PersistentVolumeClaim) -> Result<Option<u64>, QuantityError> {
    let has = pvc
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key("storage"));
    if has {
        claim_storage(pvc, true).map(Some)
    } else {
        Ok(None)
    }
}

fn claim_storage(pvc: &PersistentVolumeClaim, limit: bool) -> Result<u64, QuantityError> {
    let res = pvc.spec.as_ref().and_then(|s| s.resources.as_ref());
    let map = if limit {
        res.and_then(|r| r.limits.as_ref())
    } else {
        res.and_then(|r| r.requests.as_ref())
    };
    match map.and_then(|m| m.get("storage")) {
        Some(q) => quantity::parse_bytes(&q.0),
        None => Ok(0),
    }
}

pub fn volume_capacity(pv: &PersistentVolume) -> Result<u64, QuantityError> {
    match pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
    {
        Some(q) => quantity::parse_bytes(&q.0),
        None => Ok(0),
    }
}

pub fn claim_volume_mode(pvc: &PersistentVolumeClaim) -> &str {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or(MODE_FILESYSTEM)
}

pub fn volume_mode(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or(MODE_FILESYSTEM)
}

pub fn claim_access_modes(pvc: &PersistentVolumeClaim) -> BTreeSet<&str> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .map(|m| m.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

pub fn volume_access_modes(pv: &PersistentVolume) -> BTreeSet<&str> {
    pv.spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .map(|m| m.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

pub fn claim_volume_name(pvc: &PersistentVolumeClaim) -> &str {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .unwrap_or("")
}

pub fn reclaim_policy(pv: &PersistentVolume) -> &str {
    // The API server defaults it to Retain for PVs created without one.
    pv.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or(RECLAIM_RETAIN)
}

/// The CSI driver of a PV, if it is a CSI volume.
pub fn csi_driver(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.csi.as_ref().map(|c| c.driver.as_str())
}

pub fn volume_handle(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .csi
        .as_ref()
        .map(|c| c.volume_handle.as_str())
}

/// The PV name the provisioner gives a claim's volume.
pub fn pv_name_for(pvc: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", uid(&pvc.metadata))
}

/// Does the label selector select these labels? Unknown operators are an error (the API server
/// validates selectors, so this only happens with objects from a newer API).
pub fn selector_matches(
    sel: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    if let Some(ml) = &sel.match_labels {
        for (k, v) in ml {
            if labels.get(k) != Some(v) {
                return Ok(false);
            }
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or(&[]);
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => return Err(format!("unknown label selector operator {other:?}")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Does a node with these labels and this name satisfy the selector? Terms are ORed,
/// requirements within a term ANDed; an empty term matches nothing (as in Kubernetes).
pub fn node_selector_matches(
    sel: &NodeSelector,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    sel.node_selector_terms.iter().any(|t| {
        let exprs = t.match_expressions.as_deref().unwrap_or(&[]);
        let fields = t.match_fields.as_deref().unwrap_or(&[]);
        if exprs.is_empty() && fields.is_empty() {
            return false;
        }
        exprs
            .iter()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields
                .iter()
                .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node_name)))
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, have: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    let contains = |v: &str| values.iter().any(|x| x == v);
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => have.is_some_and(contains),
        "NotIn" => have.is_none_or(|v| !contains(v)),
        "Exists" => have.is_some(),
        "DoesNotExist" => have.is_none(),
        "Gt" | "Lt" => {
            let (Some(h), Some(bound)) = (have.and_then(num), values.first().and_then(|v| num(v)))
            else {
                return false;
            };
            if r.operator == "Gt" {
                h > bound
            } else {
                h < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSelectorTerm;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("tier", "fast"), ("zone", "a")]);
        let sel = |ml: &[(&str, &str)], ex: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(labels(ml)),
            match_expressions: Some(ex),
        };
        let ex = |k: &str, op: &str, v: &[&str]| LabelSelectorRequirement {
            key: k.into(),
            operator: op.into(),
            values: Some(v.iter().map(|s| s.to_string()).collect()),
        };
        let table = [
            (sel(&[("tier", "fast")], vec![]), true),
            (sel(&[("tier", "slow")], vec![]), false),
            (sel(&[], vec![ex("zone", "In", &["a", "b"])]), true),
            (sel(&[], vec![ex("zone", "NotIn", &["a"])]), false),
            (sel(&[], vec![ex("missing", "NotIn", &["a"])]), true),
            (sel(&[], vec![ex("tier", "Exists", &[])]), true),
            (sel(&[], vec![ex("tier", "DoesNotExist", &[])]), false),
            (sel(&[], vec![]), true),
        ];
        for (i, (s, want)) in table.iter().enumerate() {
            assert_eq!(selector_matches(s, &l), Ok(*want), "case {i}");
        }
        assert!(selector_matches(&sel(&[], vec![ex("a", "Near", &[])]), &l).is_err());
    }

    #[test]
    fn node_selectors() {
        let l = labels(&[("topology.stowage.io/node", "n1"), ("cores", "8")]);
        let term =
            |e: Vec<NodeSelectorRequirement>, f: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
                match_expressions: Some(e),
                match_fields: Some(f),
            };
        let ns = |terms: Vec<NodeSelectorTerm>| NodeSelector {
            node_selector_terms: terms,
        };
        let k = "topology.stowage.io/node";
        assert!(node_selector_matches(
            &ns(vec![term(vec![req(k, "In", &["n1"])], vec![])]),
            "n1",
            &l
        ));
        assert!(!node_selector_matches(
            &ns(vec![term(vec![req(k, "In", &["n2"])], vec![])]),
            "n1",
            &l
        ));
        // ORed terms.
        assert!(node_selector_matches(
            &ns(vec![
                term(vec![req(k, "In", &["n2"])], vec![]),
                term(vec![req("cores", "Gt", &["4"])], vec![])
            ]),
            "n1",
            &l
        ));
        assert!(!node_selector_matches(
            &ns(vec![term(vec![req("cores", "Lt", &["4"])], vec![])]),
            "n1",
            &l
        ));
        assert!(node_selector_matches(
            &ns(vec![term(
                vec![],
                vec![req("metadata.name", "In", &["n1"])]
            )]),
            "n1",
            &l
        ));
        // An empty term selects nothing; no terms select nothing.
        assert!(!node_selector_matches(
            &ns(vec![term(vec![], vec![])]),
            "n1",
            &l
        ));
        assert!(!node_selector_matches(&ns(vec![]), "n1", &l));
    }
}
