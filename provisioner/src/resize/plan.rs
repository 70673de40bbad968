//! What resizing a claim means, as pure functions: whether a bound claim of the driver needs
//! ControllerExpandVolume and to what size (external-resizer's rules with recovery from
//! failed expansion, GA in Kubernetes 1.34), and the claim status before and after the call:
//! `allocatedResources`, `allocatedResourceStatuses` and the Resizing,
//! FileSystemResizePending and ControllerResizeError conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition,
    PersistentVolumeClaimStatus,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use stowage_csi::v1;

use crate::attach::plan::volume_capability;
use crate::objects::{self as o, ClaimPhase};
use crate::plan::{DriverCaps, SecretRef};
use crate::quantity;

pub const STORAGE: &str = "storage";

/// `status.allocatedResourceStatuses` values (core/v1 ClaimResourceStatus).
pub const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const CONTROLLER_RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";
pub const NODE_RESIZE_PENDING: &str = "NodeResizePending";
pub const NODE_RESIZE_IN_PROGRESS: &str = "NodeResizeInProgress";
pub const NODE_RESIZE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// Claim condition types.
pub const COND_RESIZING: &str = "Resizing";
pub const COND_FS_RESIZE_PENDING: &str = "FileSystemResizePending";
pub const COND_CONTROLLER_RESIZE_ERROR: &str = "ControllerResizeError";

pub struct ResizeInput<'a> {
    pub driver: &'a str,
    pub caps: DriverCaps,
    pub claim: &'a PersistentVolumeClaim,
    /// The claim's bound PV (None: not found).
    pub pv: Option<&'a PersistentVolume>,
    /// The claim's StorageClass (None: no class or not found).
    pub class: Option<&'a StorageClass>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpandCall {
    pub volume_id: String,
    /// The size asked of the driver, recorded as `status.allocatedResources` first.
    pub bytes: u64,
    pub capability: Option<v1::VolumeCapability>,
    pub secret: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to resize (or not ours).
    Done,
    /// A resize is asked for but cannot be done here; the reason is logged, not retried.
    Skip(String),
    Expand(ExpandCall),
}

fn storage(map: Option<&BTreeMap<String, Quantity>>) -> Option<u64> {
    map?.get(STORAGE)
        .and_then(|q| quantity::parse_bytes(&q.0).ok())
}

/// The claim's `status.allocatedResourceStatuses["storage"]`, if any.
pub fn resize_status(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim
        .status
        .as_ref()?
        .allocated_resource_statuses
        .as_ref()?
        .get(STORAGE)
        .map(String::as_str)
}

fn status_capacity(claim: &PersistentVolumeClaim) -> Option<u64> {
    storage(claim.status.as_ref()?.capacity.as_ref())
}

fn allocated(claim: &PersistentVolumeClaim) -> Option<u64> {
    storage(claim.status.as_ref()?.allocated_resources.as_ref())
}

/// A bound claim that asks for more than its status shows: worth looking at its PV and
/// class. Cheap, so the controller asks it before reading anything.
pub fn wants_more(claim: &PersistentVolumeClaim) -> bool {
    if ClaimPhase::of(claim) != Some(ClaimPhase::Bound) || o::claim_volume_name(claim).is_empty() {
        return false;
    }
    match (o::claim_request(claim), status_capacity(claim)) {
        (Ok(request), Some(capacity)) => request > capacity,
        // No capacity reported yet: the binder has not finished; nothing to compare with.
        _ => false,
    }
}

/// The next resize step for a claim.
pub fn next(input: &ResizeInput<'_>) -> Step {
    let claim = input.claim;
    if !wants_more(claim) {
        return Step::Done;
    }
    let Some(pv) = input.pv else {
        return Step::Done;
    };
    if o::csi_driver(pv) != Some(input.driver) || !input.caps.expand {
        return Step::Done;
    }
    let Ok(request) = o::claim_request(claim) else {
        return Step::Done;
    };
    let status = resize_status(claim);
    let pv_size = o::volume_capacity(pv).unwrap_or(0);
    let bytes = if pv_size < request {
        match (status, allocated(claim)) {
            // An expansion in flight finishes at the size it started with before a new one
            // starts (the backend may already be there).
            (
                Some(
                    CONTROLLER_RESIZE_IN_PROGRESS
                    | NODE_RESIZE_PENDING
                    | NODE_RESIZE_IN_PROGRESS
                    | NODE_RESIZE_INFEASIBLE,
                ),
                Some(a),
            ) => a,
            // The driver refused this very size: only a new request (recovery) is worth a
            // call, and repeating the refusal would rewrite the claim in a loop.
            (Some(CONTROLLER_RESIZE_INFEASIBLE), Some(a)) if a == request => return Step::Done,
            // After an infeasible size the user's new request is tried (recovery), as is
            // any first request.
            _ => request,
        }
    } else {
        match status {
            // The controller's part is done; the kubelet grows the filesystem.
            Some(NODE_RESIZE_PENDING | NODE_RESIZE_IN_PROGRESS | NODE_RESIZE_INFEASIBLE) => {
                return Step::Done;
            }
            // The volume grew but the claim does not show it (a crash after the PV write):
            // asking again is idempotent and says whether the node must act.
            _ => request,
        }
    };
    let allowed = input
        .class
        .and_then(|c| c.allow_volume_expansion)
        .unwrap_or(false);
    if !allowed {
        return Step::Skip(match input.class {
            None => "the claim has no StorageClass that allows expansion".into(),
            Some(c) => format!(
                "StorageClass {:?} does not set allowVolumeExpansion",
                o::name(&c.metadata)
            ),
        });
    }
    let Some(spec) = pv.spec.as_ref() else {
        return Step::Done;
    };
    let csi = spec.csi.as_ref();
    Step::Expand(ExpandCall {
        volume_id: o::volume_handle(pv).unwrap_or("").to_owned(),
        bytes,
        capability: volume_capability(spec, input.caps, input.driver).ok(),
        secret: csi
            .and_then(|c| c.controller_expand_secret_ref.as_ref())
            .and_then(|r| {
                Some(SecretRef {
                    name: r.name.clone()?,
                    namespace: r.namespace.clone().unwrap_or_else(|| "default".into()),
                })
            }),
    })
}

fn q(bytes: u64) -> Quantity {
    Quantity(quantity::format_bytes(bytes))
}

fn set_storage(map: &mut Option<BTreeMap<String, Quantity>>, bytes: u64) {
    map.get_or_insert_with(BTreeMap::new)
        .insert(STORAGE.into(), q(bytes));
}

fn set_resize_status(st: &mut PersistentVolumeClaimStatus, value: Option<&str>) {
    match value {
        Some(v) => {
            st.allocated_resource_statuses
                .get_or_insert_with(BTreeMap::new)
                .insert(STORAGE.into(), v.into());
        }
        None => {
            if let Some(m) = st.allocated_resource_statuses.as_mut() {
                m.remove(STORAGE);
                if m.is_empty() {
                    st.allocated_resource_statuses = None;
                }
            }
        }
    }
}

/// Sets (or, with None, removes) a condition; an unchanged condition keeps its time, so a
/// status computed twice is the same status.
fn set_condition(st: &mut PersistentVolumeClaimStatus, type_: &str, message: Option<&str>) {
    let conds = st.conditions.get_or_insert_with(Vec::new);
    match message {
        None => conds.retain(|c| c.type_ != type_),
        Some(m) => {
            let m = (!m.is_empty()).then(|| m.to_owned());
            if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
                if c.message != m || c.status != "True" {
                    c.message = m;
                    c.status = "True".into();
                    c.last_transition_time = Some(Time(Timestamp::now()));
                }
            } else {
                conds.push(PersistentVolumeClaimCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    message: m,
                    last_transition_time: Some(Time(Timestamp::now())),
                    ..Default::default()
                });
            }
        }
    }
    if conds.is_empty() {
        st.conditions = None;
    }
}

/// Before the call: the size being allocated, in progress, condition Resizing.
pub fn in_progress(claim: &PersistentVolumeClaim, bytes: u64) -> PersistentVolumeClaimStatus {
    let mut st = claim.status.clone().unwrap_or_default();
    set_storage(&mut st.allocated_resources, bytes);
    set_resize_status(&mut st, Some(CONTROLLER_RESIZE_IN_PROGRESS));
    set_condition(&mut st, COND_RESIZING, Some(""));
    st
}

/// After a successful call. When the node must grow the filesystem, the capacity stays as it
/// is (the kubelet sets it once the filesystem is grown) and FileSystemResizePending says
/// so; otherwise the capacity is the new size and the resize is over.
pub fn finished(
    claim: &PersistentVolumeClaim,
    bytes: u64,
    node_expansion_required: bool,
) -> PersistentVolumeClaimStatus {
    let mut st = claim.status.clone().unwrap_or_default();
    set_condition(&mut st, COND_RESIZING, None);
    set_condition(&mut st, COND_CONTROLLER_RESIZE_ERROR, None);
    if node_expansion_required {
        set_resize_status(&mut st, Some(NODE_RESIZE_PENDING));
        set_condition(
            &mut st,
            COND_FS_RESIZE_PENDING,
            Some(
                "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
            ),
        );
    } else {
        set_storage(&mut st.capacity, bytes);
        set_storage(&mut st.allocated_resources, bytes);
        set_resize_status(&mut st, None);
        set_condition(&mut st, COND_FS_RESIZE_PENDING, None);
    }
    st
}

/// After a failed call: an infeasible size waits for the user to change the request; any
/// other failure stays in progress and is retried.
pub fn failed(
    claim: &PersistentVolumeClaim,
    message: &str,
    infeasible: bool,
) -> PersistentVolumeClaimStatus {
    let mut st = claim.status.clone().unwrap_or_default();
    if infeasible {
        set_resize_status(&mut st, Some(CONTROLLER_RESIZE_INFEASIBLE));
        set_condition(&mut st, COND_RESIZING, None);
    }
    set_condition(&mut st, COND_CONTROLLER_RESIZE_ERROR, Some(message));
    st
}

/// The PV with its capacity raised to `bytes` (None when it already is that big).
pub fn grown_volume(pv: &PersistentVolume, bytes: u64) -> Option<PersistentVolume> {
    if o::volume_capacity(pv).unwrap_or(0) >= bytes {
        return None;
    }
    let mut pv = pv.clone();
    let spec = pv.spec.get_or_insert_with(Default::default);
    set_storage(&mut spec.capacity, bytes);
    Some(pv)
}

/// CSI codes that mean "this size cannot be had" (the user must change the request), not
/// "try again later".
pub fn is_infeasible(code: Option<tonic::Code>) -> bool {
    matches!(
        code,
        Some(tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::Unimplemented)
    )
}

// The table tests live next to this file (attach/tests.rs), not in a plan/ directory.
#[cfg(test)]
#[path = "tests.rs"]
mod tests;
