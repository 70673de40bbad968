//! Binding, phases and reclaim as pure functions: (claim, class, volumes) → actions and
//! (volume, claim) → actions. No I/O happens here; the controller executes the actions against
//! the API server and the CSI driver, then the next sync starts again from what the API says.
//!
//! The rules follow kube-controller-manager's PV controller (syncClaim / syncVolume in
//! pkg/controller/volume/persistentvolume), so that `--binder=builtin` behaves like a cluster
//! whose own binder runs, and `--binder=kcm` only adds what KCM leaves to external
//! provisioners: provisioning, Delete, and Recycle of CSI volumes.
//!
//! Every action is emitted only when the object does not already say what it asks for, so a
//! world that has converged yields no mutating actions (property-tested below).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimStatus,
};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::objects::{
    self as o, ANN_BETA_DEFAULT_CLASS, ANN_BETA_STORAGE_PROVISIONER, ANN_BIND_COMPLETED,
    ANN_BOUND_BY_CONTROLLER, ANN_DEFAULT_CLASS, ANN_PROVISIONED_BY, ANN_SELECTED_NODE,
    ANN_STORAGE_PROVISIONER, ClaimPhase, FINALIZER, RECLAIM_DELETE, RECLAIM_RECYCLE,
    RECLAIM_RETAIN, VolumePhase,
};

/// Who binds claims to volumes and keeps phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinderMode {
    /// kube-controller-manager binds and sets phases; Stowage provisions, deletes, recycles.
    Kcm,
    /// Stowage binds and sets phases itself (KCM's binder is off or absent).
    Builtin,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub mode: BinderMode,
    /// The CSI driver this provisioner serves.
    pub driver: &'a str,
}

/// An event to publish on the object being synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Note {
            warning: false,
            reason,
            message: message.into(),
        }
    }
    pub fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Note {
            warning: true,
            reason,
            message: message.into(),
        }
    }
}

/// What a claim sync asks for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAction {
    /// Point `volume`'s spec.claimRef at the claim (see [`bind_volume`]).
    BindVolume {
        volume: String,
    },
    /// Set `volume`'s phase.
    VolumePhase {
        volume: String,
        phase: VolumePhase,
    },
    /// Set the claim's spec.volumeName and binding annotations (see [`bind_claim`]).
    BindClaim {
        volume: String,
    },
    /// Set the claim's phase; `volume` (when Bound) gives its capacity and access modes.
    ClaimPhase {
        phase: ClaimPhase,
        volume: Option<String>,
    },
    /// Give a claim that names no class the cluster's default one (KCM's retroactive
    /// default StorageClass assignment).
    AssignClass {
        class: String,
    },
    /// Mark the claim for an external provisioner, as KCM does.
    AnnotateProvisioner {
        provisioner: String,
    },
    /// Create a volume for the claim (the provisioner's job).
    Provision {
        selected_node: Option<String>,
    },
    Event(Note),
}

/// What a volume sync asks for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAction {
    Phase {
        phase: VolumePhase,
        message: Option<String>,
    },
    /// Release the volume from its claim (see [`unbind_volume`]).
    Unbind,
    AddFinalizer,
    RemoveFinalizer,
    /// DeleteVolume on the driver.
    DeleteBackend,
    /// Delete the PV object.
    DeleteObject,
    /// RecycleVolume on the driver (scrub the data).
    Recycle,
    Event(Note),
}

impl VolumeAction {
    pub fn is_event(&self) -> bool {
        matches!(self, VolumeAction::Event(_))
    }
}

impl ClaimAction {
    pub fn is_event(&self) -> bool {
        matches!(self, ClaimAction::Event(_))
    }
}

/// Is `pv` reserved for or bound to `claim` (a claimRef without a UID counts: pre-bound by
/// a user or a provisioner)?
pub fn is_volume_bound_to_claim(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    if r.name.as_deref() != claim.metadata.name.as_deref()
        || r.namespace.as_deref() != claim.metadata.namespace.as_deref()
    {
        return false;
    }
    let ref_uid = r.uid.as_deref().unwrap_or("");
    ref_uid.is_empty() || ref_uid == o::uid(&claim.metadata)
}

pub fn claim_ref(pv: &PersistentVolume) -> Option<&ObjectReference> {
    pv.spec.as_ref()?.claim_ref.as_ref()
}

pub fn claim_reference(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        name: claim.metadata.name.clone(),
        namespace: claim.metadata.namespace.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        field_path: None,
    }
}

fn volume_mode_mismatch(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    o::volume_mode(pv) != o::claim_volume_mode(claim)
}

fn access_modes_cover(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let have = o::volume_access_modes(pv);
    o::claim_access_modes(claim)
        .iter()
        .all(|m| have.contains(m))
}

fn claim_vac(claim: &PersistentVolumeClaim) -> &str {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_attributes_class_name.as_deref())
        .unwrap_or("")
}

fn volume_vac(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.volume_attributes_class_name.as_deref())
        .unwrap_or("")
}

fn node_affinity_allows(pv: &PersistentVolume, node: &Node) -> bool {
    let Some(sel) = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    else {
        return true;
    };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    o::node_selector_matches(sel, o::name(&node.metadata), labels)
}

fn is_delay_binding(class: Option<&StorageClass>) -> bool {
    class
        .and_then(|c| c.volume_binding_mode.as_deref())
        .is_some_and(|m| m == o::BINDING_WAIT_FOR_FIRST_CONSUMER)
}

/// Why a volume cannot serve a claim that asked for it by name (KCM's checkVolumeSatisfyClaim).
pub fn check_volume_satisfies_claim(
    pv: &PersistentVolume,
    claim: &PersistentVolumeClaim,
) -> Result<(), String> {
    if pv.metadata.deletion_timestamp.is_some() {
        return Err(format!(
            "the volume is marked for deletion {:?}",
            o::name(&pv.metadata)
        ));
    }
    let want = o::claim_request(claim).map_err(|e| format!("invalid storage request: {e}"))?;
    let have = o::volume_capacity(pv).map_err(|e| format!("invalid volume capacity: {e}"))?;
    if have < want {
        return Err("requested PV is too small".into());
    }
    if o::volume_class(pv) != o::claim_class(claim) {
        return Err("storageClassName does not match".into());
    }
    if volume_vac(pv) != claim_vac(claim) {
        return Err("volumeAttributesClassName does not match".into());
    }
    if volume_mode_mismatch(pv, claim) {
        return Err("incompatible volumeMode".into());
    }
    if !access_modes_cover(pv, claim) {
        return Err("incompatible accessMode".into());
    }
    Ok(())
}

/// The volume a claim should bind to: one pre-bound to it, else the smallest Available volume
/// that satisfies class, access modes (a superset; fewest extra modes first), capacity,
/// volumeMode, label selector, attributes class and, when the claim's node is known, node
/// affinity. Delay-binding claims only take pre-bound volumes: for those the scheduler picks
/// static volumes (and writes claimRef) because only it knows the node.
pub fn find_best_match<'a>(
    claim: &PersistentVolumeClaim,
    volumes: &[&'a PersistentVolume],
    delay_binding: bool,
    node: Option<&Node>,
) -> Result<Option<&'a PersistentVolume>, String> {
    let request = o::claim_request(claim).map_err(|e| format!("invalid storage request: {e}"))?;
    let fits = |pv: &PersistentVolume| {
        o::volume_capacity(pv).is_ok_and(|c| c >= request)
            && !volume_mode_mismatch(pv, claim)
            && pv.metadata.deletion_timestamp.is_none()
    };
    // A volume reserved for this claim wins, whatever else is available.
    let mut prebound: Vec<&PersistentVolume> = volumes
        .iter()
        .copied()
        .filter(|pv| is_volume_bound_to_claim(pv, claim) && fits(pv))
        .collect();
    prebound.sort_by(|a, b| o::name(&a.metadata).cmp(o::name(&b.metadata)));
    if let Some(pv) = prebound.first() {
        return Ok(Some(pv));
    }
    if delay_binding {
        return Ok(None);
    }
    let selector = claim.spec.as_ref().and_then(|s| s.selector.as_ref());
    let class = o::claim_class(claim);
    let empty = BTreeMap::new();
    let mut best: Option<(usize, String, u64, &str, &PersistentVolume)> = None;
    for pv in volumes.iter().copied() {
        if claim_ref(pv).is_some() || !fits(pv) {
            continue;
        }
        if VolumePhase::of(pv) != Some(VolumePhase::Available) {
            continue;
        }
        if let Some(sel) = selector
            && !o::selector_matches(sel, pv.metadata.labels.as_ref().unwrap_or(&empty))?
        {
            continue;
        }
        if o::volume_class(pv) != class || volume_vac(pv) != claim_vac(claim) {
            continue;
        }
        if node.is_some_and(|n| !node_affinity_allows(pv, n)) {
            continue;
        }
        if !access_modes_cover(pv, claim) {
            continue;
        }
        let modes = o::volume_access_modes(pv);
        let key = (
            modes.len(),
            modes.into_iter().collect::<Vec<_>>().join(","),
            o::volume_capacity(pv).unwrap_or(u64::MAX),
            o::name(&pv.metadata),
            pv,
        );
        if best
            .as_ref()
            .is_none_or(|b| (key.0, &key.1, key.2, key.3) < (b.0, &b.1, b.2, b.3))
        {
            best = Some(key);
        }
    }
    Ok(best.map(|b| b.4))
}

/// Inputs of a claim sync.
pub struct ClaimInput<'a> {
    pub claim: &'a PersistentVolumeClaim,
    /// The claim's StorageClass, if it names one that exists.
    pub class: Option<&'a StorageClass>,
    pub volumes: &'a [&'a PersistentVolume],
    /// The node named by the claim's selected-node annotation, when known.
    pub node: Option<&'a Node>,
    /// The cluster's default StorageClass ([`default_class`]), for claims that name none.
    pub default_class: Option<&'a StorageClass>,
}

/// The default StorageClass as KCM picks it: among the classes annotated as default, the
/// newest, then the first by name (the admission plugin and KCM agree on this order).
pub fn default_class<'a>(
    classes: impl IntoIterator<Item = &'a StorageClass>,
) -> Option<&'a StorageClass> {
    let is_default = |c: &StorageClass| {
        o::annotation(&c.metadata, ANN_DEFAULT_CLASS) == Some("true")
            || o::annotation(&c.metadata, ANN_BETA_DEFAULT_CLASS) == Some("true")
    };
    classes
        .into_iter()
        .filter(|c| is_default(c))
        .min_by(|a, b| {
            let created = |c: &StorageClass| c.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(b)
                .cmp(&created(a))
                .then_with(|| o::name(&a.metadata).cmp(o::name(&b.metadata)))
        })
}

pub fn sync_claim(p: Policy<'_>, input: &ClaimInput<'_>) -> Vec<ClaimAction> {
    match p.mode {
        BinderMode::Kcm => kcm_claim(p, input),
        BinderMode::Builtin => {
            if o::has_annotation(&input.claim.metadata, ANN_BIND_COMPLETED) {
                bound_claim(input)
            } else {
                unbound_claim(p, input)
            }
        }
    }
}

fn storage_provisioner(claim: &PersistentVolumeClaim) -> Option<&str> {
    o::annotation(&claim.metadata, ANN_STORAGE_PROVISIONER)
        .or_else(|| o::annotation(&claim.metadata, ANN_BETA_STORAGE_PROVISIONER))
}

fn selected_node(claim: &PersistentVolumeClaim) -> Option<String> {
    o::annotation(&claim.metadata, ANN_SELECTED_NODE)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// With KCM binding: provision exactly the claims KCM handed to this driver (it annotates a
/// claim only after finding no existing volume for it).
fn kcm_claim(p: Policy<'_>, input: &ClaimInput<'_>) -> Vec<ClaimAction> {
    let claim = input.claim;
    if !o::claim_volume_name(claim).is_empty()
        || matches!(
            ClaimPhase::of(claim),
            Some(ClaimPhase::Bound | ClaimPhase::Lost)
        )
        || claim.metadata.deletion_timestamp.is_some()
    {
        return vec![];
    }
    let Some(class) = input.class else {
        return vec![];
    };
    if class.provisioner != p.driver || storage_provisioner(claim) != Some(p.driver) {
        return vec![];
    }
    let node = selected_node(claim);
    if is_delay_binding(Some(class)) && node.is_none() {
        return vec![];
    }
    vec![ClaimAction::Provision {
        selected_node: node,
    }]
}

/// After a Provision action failed: the claim shows Pending (the API server creates claims
/// with no phase), as it would have without the provisioning attempt.
pub fn pending_after_failed_provision(claim: &PersistentVolumeClaim) -> Vec<ClaimAction> {
    claim_phase(claim, ClaimPhase::Pending)
}

fn claim_phase(claim: &PersistentVolumeClaim, phase: ClaimPhase) -> Vec<ClaimAction> {
    let status = claim.status.as_ref();
    let dirty = ClaimPhase::of(claim) != Some(phase)
        || status.is_some_and(|s| s.access_modes.is_some() || s.capacity.is_some());
    if dirty {
        vec![ClaimAction::ClaimPhase {
            phase,
            volume: None,
        }]
    } else {
        vec![]
    }
}

/// A phase change with an event, the event only when the phase changes (as KCM does).
fn claim_phase_with_event(
    claim: &PersistentVolumeClaim,
    phase: ClaimPhase,
    note: Note,
) -> Vec<ClaimAction> {
    if ClaimPhase::of(claim) == Some(phase) {
        return claim_phase(claim, phase);
    }
    let mut out = claim_phase(claim, phase);
    out.push(ClaimAction::Event(note));
    out
}

fn unbound_claim(p: Policy<'_>, input: &ClaimInput<'_>) -> Vec<ClaimAction> {
    let claim = input.claim;
    let wanted = o::claim_volume_name(claim);
    if wanted.is_empty() {
        let delay = is_delay_binding(input.class);
        let found = match find_best_match(claim, input.volumes, delay, input.node) {
            Ok(v) => v,
            Err(e) => {
                let mut out = vec![ClaimAction::Event(Note::warning("FailedBinding", e))];
                out.extend(claim_phase(claim, ClaimPhase::Pending));
                return out;
            }
        };
        if let Some(pv) = found {
            return bind(claim, pv);
        }
        // KCM assigns the default class only once no volume matched the class-less claim,
        // then starts over with the updated claim.
        if !o::claim_has_class(claim)
            && let Some(default) = input.default_class
        {
            return vec![ClaimAction::AssignClass {
                class: o::name(&default.metadata).to_owned(),
            }];
        }
        let class_name = o::claim_class(claim);
        let mut out = Vec::new();
        if delay && selected_node(claim).is_none() {
            out.push(ClaimAction::Event(Note::normal(
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )));
        } else if !class_name.is_empty() {
            match input.class {
                None => out.push(ClaimAction::Event(Note::warning(
                    "ProvisioningFailed",
                    format!("storageclass.storage.k8s.io {class_name:?} not found"),
                ))),
                Some(class) => {
                    // Another provisioner learns from this annotation that the claim is its
                    // job. Our own claims get it with the bind write instead ([`bind_claim`]),
                    // which saves a write per claim on the provisioning path.
                    let ours = class.provisioner == p.driver;
                    if !ours && storage_provisioner(claim) != Some(class.provisioner.as_str()) {
                        out.push(ClaimAction::AnnotateProvisioner {
                            provisioner: class.provisioner.clone(),
                        });
                    }
                    if ours {
                        if claim.metadata.deletion_timestamp.is_none() {
                            out.push(ClaimAction::Provision {
                                selected_node: selected_node(claim),
                            });
                        }
                    } else {
                        out.push(ClaimAction::Event(Note::normal(
                            "ExternalProvisioning",
                            format!(
                                "Waiting for a volume to be created either by the external provisioner '{}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered.",
                                class.provisioner
                            ),
                        )));
                    }
                }
            }
        } else {
            out.push(ClaimAction::Event(Note::normal(
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
            )));
        }
        // A claim we provision now is bound in the same sync (the controller binds the new
        // volume right away), so writing Pending first would be a write for nothing; a failed
        // provisioning writes it then ([`pending_after_failed_provision`]).
        if !out
            .iter()
            .any(|a| matches!(a, ClaimAction::Provision { .. }))
        {
            out.extend(claim_phase(claim, ClaimPhase::Pending));
        }
        return out;
    }
    // The user asked for a specific volume.
    let Some(pv) = input
        .volumes
        .iter()
        .copied()
        .find(|v| o::name(&v.metadata) == wanted)
    else {
        return claim_phase(claim, ClaimPhase::Pending);
    };
    if claim_ref(pv).is_none() {
        return match check_volume_satisfies_claim(pv, claim) {
            Ok(()) => bind(claim, pv),
            Err(e) => {
                let mut out = vec![ClaimAction::Event(Note::warning(
                    "VolumeMismatch",
                    format!("Cannot bind to requested volume {wanted:?}: {e}"),
                ))];
                out.extend(claim_phase(claim, ClaimPhase::Pending));
                out
            }
        };
    }
    if is_volume_bound_to_claim(pv, claim) {
        return bind(claim, pv);
    }
    let mut out = Vec::new();
    if o::has_annotation(&claim.metadata, ANN_BOUND_BY_CONTROLLER) {
        // Someone removed bind-completed from a claim the binder bound; only a person can
        // sort out which claim the volume belongs to.
        out.push(ClaimAction::Event(Note::warning(
            "FailedBinding",
            format!("volume {wanted:?} is already bound to a different claim"),
        )));
    }
    out.extend(claim_phase(claim, ClaimPhase::Pending));
    out
}

fn bound_claim(input: &ClaimInput<'_>) -> Vec<ClaimAction> {
    let claim = input.claim;
    let wanted = o::claim_volume_name(claim);
    if wanted.is_empty() {
        return claim_phase_with_event(
            claim,
            ClaimPhase::Lost,
            Note::warning(
                "ClaimLost",
                "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!",
            ),
        );
    }
    let Some(pv) = input
        .volumes
        .iter()
        .copied()
        .find(|v| o::name(&v.metadata) == wanted)
    else {
        return claim_phase_with_event(
            claim,
            ClaimPhase::Lost,
            Note::warning(
                "ClaimLost",
                "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
            ),
        );
    };
    match claim_ref(pv) {
        None => bind(claim, pv),
        Some(r) if r.uid.as_deref().unwrap_or("") == o::uid(&claim.metadata) => bind(claim, pv),
        Some(_) => claim_phase_with_event(
            claim,
            ClaimPhase::Lost,
            Note::warning(
                "ClaimMisbound",
                "Two claims are bound to the same volume, this one is bound incorrectly",
            ),
        ),
    }
}

/// The claimRef and annotation changes that bind `pv` to `claim`; false when none are needed.
pub fn bind_volume(pv: &mut PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let set_by_controller = !is_volume_bound_to_claim(pv, claim);
    let mut dirty = false;
    let spec = pv.spec.get_or_insert_with(Default::default);
    let same = spec.claim_ref.as_ref().is_some_and(|r| {
        r.name.as_deref() == claim.metadata.name.as_deref()
            && r.namespace.as_deref() == claim.metadata.namespace.as_deref()
            && r.uid.as_deref() == claim.metadata.uid.as_deref()
    });
    if !same {
        spec.claim_ref = Some(claim_reference(claim));
        dirty = true;
    }
    if set_by_controller && !o::has_annotation(&pv.metadata, ANN_BOUND_BY_CONTROLLER) {
        o::set_annotation(&mut pv.metadata, ANN_BOUND_BY_CONTROLLER, "yes");
        dirty = true;
    }
    dirty
}

/// The volumeName and annotation changes that bind `claim` to `pv`; false when none are needed.
pub fn bind_claim(claim: &mut PersistentVolumeClaim, pv: &PersistentVolume) -> bool {
    let pv_name = o::name(&pv.metadata).to_owned();
    let set_by_controller = o::claim_volume_name(claim) != pv_name;
    let mut dirty = false;
    if set_by_controller {
        claim.spec.get_or_insert_with(Default::default).volume_name = Some(pv_name);
        dirty = true;
    }
    if set_by_controller && !o::has_annotation(&claim.metadata, ANN_BOUND_BY_CONTROLLER) {
        o::set_annotation(&mut claim.metadata, ANN_BOUND_BY_CONTROLLER, "yes");
        dirty = true;
    }
    if !o::has_annotation(&claim.metadata, ANN_BIND_COMPLETED) {
        o::set_annotation(&mut claim.metadata, ANN_BIND_COMPLETED, "yes");
        dirty = true;
    }
    // A volume provisioned for this very claim (named after its UID): the claim carries the
    // provisioner annotations KCM would have written before provisioning (see unbound_claim).
    if let Some(by) = provisioned_for(pv, claim)
        && storage_provisioner(claim) != Some(by)
    {
        o::set_annotation(&mut claim.metadata, ANN_STORAGE_PROVISIONER, by);
        o::set_annotation(&mut claim.metadata, ANN_BETA_STORAGE_PROVISIONER, by);
        dirty = true;
    }
    dirty
}

/// The provisioner that made `pv` for `claim` (dynamically, named `pvc-<claim uid>`).
fn provisioned_for<'a>(pv: &'a PersistentVolume, claim: &PersistentVolumeClaim) -> Option<&'a str> {
    let by = o::annotation(&pv.metadata, ANN_PROVISIONED_BY)?;
    let for_claim = o::name(&pv.metadata) == o::pv_name_for(claim)
        && claim_ref(pv).and_then(|r| r.uid.as_deref()) == claim.metadata.uid.as_deref();
    for_claim.then_some(by)
}

/// The status a claim gets in `phase`; Bound carries the volume's access modes (and its
/// capacity when the claim becomes Bound, never later, so a resize in progress survives).
pub fn claim_status(
    claim: &PersistentVolumeClaim,
    phase: ClaimPhase,
    pv: Option<&PersistentVolume>,
) -> PersistentVolumeClaimStatus {
    let mut st = claim.status.clone().unwrap_or_default();
    let becoming = ClaimPhase::of(claim) != Some(phase);
    st.phase = Some(phase.as_str().to_owned());
    match pv {
        None => {
            st.access_modes = None;
            st.capacity = None;
        }
        Some(pv) => {
            let spec = pv.spec.as_ref();
            st.access_modes = spec.and_then(|s| s.access_modes.clone());
            if becoming {
                st.capacity = spec.and_then(|s| s.capacity.clone());
            }
        }
    }
    st
}

fn claim_bound_status_dirty(claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> bool {
    ClaimPhase::of(claim) != Some(ClaimPhase::Bound)
        || claim.status.as_ref().and_then(|s| s.access_modes.as_ref())
            != pv.spec.as_ref().and_then(|s| s.access_modes.as_ref())
}

fn bind(claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Vec<ClaimAction> {
    let name = o::name(&pv.metadata).to_owned();
    let mut out = Vec::new();
    if bind_volume(&mut pv.clone(), claim) {
        out.push(ClaimAction::BindVolume {
            volume: name.clone(),
        });
    }
    if VolumePhase::of(pv) != Some(VolumePhase::Bound) {
        out.push(ClaimAction::VolumePhase {
            volume: name.clone(),
            phase: VolumePhase::Bound,
        });
    }
    if bind_claim(&mut claim.clone(), pv) {
        out.push(ClaimAction::BindClaim {
            volume: name.clone(),
        });
    }
    if claim_bound_status_dirty(claim, pv) {
        out.push(ClaimAction::ClaimPhase {
            phase: ClaimPhase::Bound,
            volume: Some(name),
        });
    }
    out
}

/// How a volume relates to its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// No claimRef.
    Unclaimed,
    /// claimRef without UID: reserved for a claim that has not bound yet.
    Reserved,
    /// The claim it was bound to is gone (deleted, or re-created with a new UID).
    Released,
    /// The claim exists and has not (yet) set volumeName.
    ClaimUnbound,
    Bound,
    /// The claim exists but is bound to another volume.
    ClaimElsewhere,
}

pub fn relation(pv: &PersistentVolume, claim: Option<&PersistentVolumeClaim>) -> Relation {
    let Some(r) = claim_ref(pv) else {
        return Relation::Unclaimed;
    };
    let ref_uid = r.uid.as_deref().unwrap_or("");
    if ref_uid.is_empty() {
        return Relation::Reserved;
    }
    let Some(claim) = claim.filter(|c| {
        o::uid(&c.metadata) == ref_uid
            && c.metadata.name.as_deref() == r.name.as_deref()
            && c.metadata.namespace.as_deref() == r.namespace.as_deref()
    }) else {
        return Relation::Released;
    };
    match o::claim_volume_name(claim) {
        "" => Relation::ClaimUnbound,
        v if v == o::name(&pv.metadata) => Relation::Bound,
        _ => Relation::ClaimElsewhere,
    }
}

/// The claimRef a volume keeps after unbinding: none if the binder or a provisioner set it,
/// else the user's reservation without the old claim's UID. (KCM keeps a provisioner's
/// claimRef too, which would tie a recycled volume to the old claim's name forever.)
pub fn unbind_volume(pv: &mut PersistentVolume) {
    if o::has_annotation(&pv.metadata, ANN_BOUND_BY_CONTROLLER)
        || o::has_annotation(&pv.metadata, ANN_PROVISIONED_BY)
    {
        if let Some(s) = pv.spec.as_mut() {
            s.claim_ref = None;
        }
        o::remove_annotation(&mut pv.metadata, ANN_BOUND_BY_CONTROLLER);
    } else if let Some(r) = pv.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
        r.uid = None;
        r.resource_version = None;
    }
}

/// Volume sync: phases (builtin), reclaim (both modes, for this driver's volumes), the
/// finalizer that keeps a Delete volume's PV until its backend volume is gone.
pub fn sync_volume(
    p: Policy<'_>,
    pv: &PersistentVolume,
    claim: Option<&PersistentVolumeClaim>,
) -> Vec<VolumeAction> {
    use VolumeAction as A;
    let ours = o::csi_driver(pv) == Some(p.driver);
    let provisioned_by_us = o::annotation(&pv.metadata, ANN_PROVISIONED_BY) == Some(p.driver);
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let policy = o::reclaim_policy(pv);
    let phase = VolumePhase::of(pv);
    let has_finalizer = o::has_finalizer(&pv.metadata, FINALIZER);
    let rel = relation(pv, claim);
    // KCM: a dynamically provisioned Delete volume whose claim bound elsewhere is not needed.
    let dynamic_delete =
        o::has_annotation(&pv.metadata, ANN_PROVISIONED_BY) && policy == RECLAIM_DELETE;
    let released = match rel {
        Relation::Released => true,
        Relation::ClaimElsewhere => dynamic_delete,
        _ => false,
    };
    let we_delete = ours && provisioned_by_us && policy == RECLAIM_DELETE;
    let mut out = Vec::new();

    // Finalizers can only be added to objects that are not being deleted.
    if ours && !deleting {
        if we_delete && !has_finalizer {
            out.push(A::AddFinalizer);
        } else if !we_delete && has_finalizer {
            out.push(A::RemoveFinalizer);
        }
    }

    // Phases, also while the PV is being deleted: pv-protection lets go of a PV only once its
    // phase is no longer Bound.
    if p.mode == BinderMode::Builtin {
        match rel {
            Relation::Unclaimed | Relation::Reserved => {
                if phase != Some(VolumePhase::Available) {
                    out.push(A::Phase {
                        phase: VolumePhase::Available,
                        message: None,
                    });
                }
            }
            Relation::ClaimUnbound => {
                if let Some(c) = claim.filter(|c| volume_mode_mismatch(pv, c)) {
                    out.push(A::Event(Note::warning(
                        "VolumeMismatch",
                        format!(
                            "Cannot bind PersistentVolume to requested PersistentVolumeClaim {:?} due to incompatible volumeMode.",
                            o::name(&c.metadata)
                        ),
                    )));
                }
            }
            Relation::Bound => {
                if phase != Some(VolumePhase::Bound) {
                    out.push(A::Phase {
                        phase: VolumePhase::Bound,
                        message: None,
                    });
                }
            }
            Relation::ClaimElsewhere if !released => {
                out.push(A::Unbind);
                out.push(A::Phase {
                    phase: VolumePhase::Available,
                    message: None,
                });
            }
            Relation::Released | Relation::ClaimElsewhere => {
                if !matches!(phase, Some(VolumePhase::Released | VolumePhase::Failed)) {
                    out.push(A::Phase {
                        phase: VolumePhase::Released,
                        message: None,
                    });
                }
            }
        }
    }

    if deleting {
        // Someone deleted the PV object: give the backend volume the same fate first, unless a
        // live claim still uses it (then pv-protection holds the object anyway).
        let in_use = matches!(
            rel,
            Relation::Bound | Relation::ClaimUnbound | Relation::ClaimElsewhere
        ) && !released;
        if has_finalizer && !in_use {
            if we_delete {
                out.push(A::DeleteBackend);
            }
            out.push(A::RemoveFinalizer);
        }
        return out;
    }

    if !released {
        return out;
    }
    // With KCM binding, act once KCM has declared the volume Released (or Failed: what it does
    // to CSI volumes with Recycle), so the two controllers never disagree about a claim.
    if p.mode == BinderMode::Kcm
        && !matches!(phase, Some(VolumePhase::Released | VolumePhase::Failed))
    {
        return out;
    }
    let builtin = p.mode == BinderMode::Builtin;
    let fail = |out: &mut Vec<VolumeAction>, reason: &'static str, msg: String| {
        if builtin && phase != Some(VolumePhase::Failed) {
            out.push(A::Phase {
                phase: VolumePhase::Failed,
                message: Some(msg.clone()),
            });
            out.push(A::Event(Note::warning(reason, msg)));
        }
    };
    match policy {
        RECLAIM_RETAIN => {}
        RECLAIM_DELETE if we_delete => {
            // The finalizer stays until the backend volume is gone; AddFinalizer above is
            // moot once the object is deleted.
            out.retain(|a| *a != A::AddFinalizer);
            out.push(A::DeleteBackend);
            out.push(A::DeleteObject);
            if has_finalizer {
                out.push(A::RemoveFinalizer);
            }
        }
        RECLAIM_DELETE => {
            if ours {
                fail(
                    &mut out,
                    "VolumeFailedDelete",
                    format!(
                        "Volume was not provisioned by {}: set annotation {ANN_PROVISIONED_BY}={} to let it delete the volume, or delete it by hand",
                        p.driver, p.driver
                    ),
                );
            }
            // Another driver's volume: its own provisioner deletes it.
        }
        RECLAIM_RECYCLE if ours => {
            out.push(A::Recycle);
            out.push(A::Unbind);
            if builtin {
                out.push(A::Phase {
                    phase: VolumePhase::Available,
                    message: None,
                });
            }
        }
        RECLAIM_RECYCLE => fail(
            &mut out,
            "VolumeFailedRecycle",
            "No recycler plugin found for the volume!".into(),
        ),
        other => fail(
            &mut out,
            "VolumeUnknownReclaimPolicy",
            format!("Volume has unrecognized PersistentVolumeReclaimPolicy {other:?}"),
        ),
    }
    out
}

#[cfg(test)]
mod tests;
