//! What a VolumeSnapshot or VolumeSnapshotContent needs next, as pure functions of what the
//! API shows; the controllers in [`super`] only execute the step and sync again.
//!
//! Two duties, as upstream splits them:
//! * the common controller's ([`next_snapshot`], [`next_orphan`]): a snapshot gets its content
//!   (made for a dynamic snapshot, bound for a pre-provisioned one), both finalizers and a
//!   status that mirrors the content's; a deleted snapshot takes its content along when the
//!   policy says Delete, and stays while a claim is being restored from it;
//! * the driver's ([`next_content`]): a content of this driver gets CreateSnapshot (named
//!   `snapshot-<VolumeSnapshot UID>`, so a restart mid-create finds the same snapshot) and,
//!   once deleted with policy Delete, DeleteSnapshot before its finalizer goes.
//!
//! A snapshot belongs to this driver when its source volume (the bound PV of the claim) or
//! its pre-provisioned content is this driver's, so several drivers' provisioners, each with
//! the common duty on, never act on the same snapshot.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::types::{
    DeletionPolicy, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent,
    VolumeSnapshotContentSource, VolumeSnapshotContentSpec, VolumeSnapshotContentStatus,
    VolumeSnapshotStatus,
};
use crate::objects as o;
use crate::plan::SecretRef;
use crate::quantity;

/// On a snapshot: it is not deleted while a claim is being provisioned from it.
pub const FIN_SOURCE: &str = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
/// On a bound snapshot: it is not deleted before its content has been dealt with.
pub const FIN_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
/// On a content: it does not go before its physical snapshot (policy Delete).
pub const FIN_CONTENT: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
pub const ANN_DEFAULT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";
/// On a content, set by the common controller from its class, so DeleteSnapshot has the
/// secret after the class is gone (upstream's names).
pub const ANN_SECRET_NAME: &str = "snapshot.storage.kubernetes.io/deletion-secret-name";
pub const ANN_SECRET_NAMESPACE: &str = "snapshot.storage.kubernetes.io/deletion-secret-namespace";
/// On a content whose snapshot is being deleted (upstream's marker for the sidecar).
pub const ANN_BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";

const CSI_PREFIX: &str = "csi.storage.k8s.io/";
const SECRET_NAME: &str = "csi.storage.k8s.io/snapshotter-secret-name";
const SECRET_NAMESPACE: &str = "csi.storage.k8s.io/snapshotter-secret-namespace";
/// Upstream's keys for ListSnapshots secrets: accepted (a class written for upstream works)
/// and not needed here.
const LIST_SECRET_NAME: &str = "csi.storage.k8s.io/snapshotter-list-secret-name";
const LIST_SECRET_NAMESPACE: &str = "csi.storage.k8s.io/snapshotter-list-secret-namespace";

/// The content a dynamic snapshot gets: upstream's name, so either controller finds it.
pub fn content_name(snapshot: &VolumeSnapshot) -> String {
    format!("snapcontent-{}", o::uid(&snapshot.metadata))
}

/// The name sent to CreateSnapshot: derived from the VolumeSnapshot's UID (upstream's rule),
/// so a retry after a crash asks for the same snapshot and the driver answers with it.
pub fn snapshot_name(content: &VolumeSnapshotContent) -> Option<String> {
    let uid = content.spec.volume_snapshot_ref.uid.as_deref()?;
    (!uid.is_empty()).then(|| format!("snapshot-{uid}"))
}

/// The snapshot a content points to, as `namespace/name`.
pub fn snapshot_key_of(content: &VolumeSnapshotContent) -> Option<(String, String)> {
    let r = &content.spec.volume_snapshot_ref;
    Some((r.namespace.clone()?, r.name.clone()?))
}

fn deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// The class a snapshot uses: the one it names, else the single default class of the
/// driver.
pub fn class_for<'a>(
    snapshot: &VolumeSnapshot,
    driver: &str,
    classes: &'a [VolumeSnapshotClass],
) -> Result<&'a VolumeSnapshotClass, String> {
    if let Some(n) = snapshot.spec.volume_snapshot_class_name.as_deref() {
        return classes
            .iter()
            .find(|c| o::name(&c.metadata) == n)
            .ok_or_else(|| {
                format!("spec.volumeSnapshotClassName: volumesnapshotclass {n:?} not found")
            });
    }
    let defaults: Vec<&VolumeSnapshotClass> = classes
        .iter()
        .filter(|c| c.spec.driver == driver)
        .filter(|c| o::annotation(&c.metadata, ANN_DEFAULT_CLASS) == Some("true"))
        .collect();
    match defaults.as_slice() {
        [c] => Ok(c),
        [] => Err(format!(
            "spec.volumeSnapshotClassName is not set and there is no default VolumeSnapshotClass for driver {driver}"
        )),
        many => Err(format!(
            "spec.volumeSnapshotClassName is not set and driver {driver} has {} default VolumeSnapshotClasses ({}); name one",
            many.len(),
            many.iter()
                .map(|c| o::name(&c.metadata))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Substitutes upstream's `${volumesnapshotcontent.name}`, `${volumesnapshot.name}` and
/// `${volumesnapshot.namespace}` in a snapshotter secret name or namespace.
fn expand(
    key: &str,
    template: &str,
    content: &str,
    snapshot: (&str, &str),
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("VolumeSnapshotClass parameter {key:?}: unclosed ${{"))?;
        out.push_str(match &after[..end] {
            "volumesnapshotcontent.name" => content,
            "volumesnapshot.namespace" => snapshot.0,
            "volumesnapshot.name" => snapshot.1,
            other => {
                return Err(format!(
                    "VolumeSnapshotClass parameter {key:?}: ${{{other}}} cannot be used here"
                ));
            }
        });
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(format!(
            "VolumeSnapshotClass parameter {key:?}: expands to an empty string"
        ));
    }
    Ok(out)
}

/// A class's parameters split into what the driver gets and the snapshotter secret; an
/// unknown `csi.storage.k8s.io/` key is refused, naming it (a typo must not pass silently).
pub fn class_parameters(
    class: &VolumeSnapshotClass,
    content: &str,
    snapshot: (&str, &str),
) -> Result<(BTreeMap<String, String>, Option<SecretRef>), String> {
    let mut params = BTreeMap::new();
    let empty = BTreeMap::new();
    let all = class.spec.parameters.as_ref().unwrap_or(&empty);
    for (k, v) in all {
        if k.starts_with(CSI_PREFIX) {
            if ![
                SECRET_NAME,
                SECRET_NAMESPACE,
                LIST_SECRET_NAME,
                LIST_SECRET_NAMESPACE,
            ]
            .contains(&k.as_str())
            {
                return Err(format!(
                    "VolumeSnapshotClass {:?} parameter {k:?}: unknown csi.storage.k8s.io/ key (known: snapshotter-secret-name/-namespace)",
                    o::name(&class.metadata)
                ));
            }
            continue;
        }
        params.insert(k.clone(), v.clone());
    }
    let secret = match (all.get(SECRET_NAME), all.get(SECRET_NAMESPACE)) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(format!(
                "VolumeSnapshotClass parameter {SECRET_NAME:?} needs {SECRET_NAMESPACE} too"
            ));
        }
        (None, Some(_)) => {
            return Err(format!(
                "VolumeSnapshotClass parameter {SECRET_NAMESPACE:?} needs {SECRET_NAME} too"
            ));
        }
        (Some(n), Some(ns)) => Some(SecretRef {
            name: expand(SECRET_NAME, n, content, snapshot)?,
            namespace: expand(SECRET_NAMESPACE, ns, content, snapshot)?,
        }),
    };
    Ok((params, secret))
}

/// The snapshotter secret a content records (set from its class when it was made).
pub fn content_secret(content: &VolumeSnapshotContent) -> Option<SecretRef> {
    Some(SecretRef {
        name: o::annotation(&content.metadata, ANN_SECRET_NAME)?.to_owned(),
        namespace: o::annotation(&content.metadata, ANN_SECRET_NAMESPACE)?.to_owned(),
    })
}

pub struct SnapshotInput<'a> {
    pub driver: &'a str,
    pub snapshot: &'a VolumeSnapshot,
    /// The source claim of a dynamic snapshot and its bound PV, when they exist.
    pub claim: Option<&'a PersistentVolumeClaim>,
    pub volume: Option<&'a PersistentVolume>,
    pub classes: &'a [VolumeSnapshotClass],
    /// The content the snapshot is or will be bound to (status, source, or the dynamic name).
    pub content: Option<&'a VolumeSnapshotContent>,
    /// A claim that is not bound yet names this snapshot as its data source.
    pub restoring: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotStep {
    /// Another driver's snapshot (or one that cannot be told yet): leave it alone.
    Ignore,
    AddFinalizer(&'static str),
    /// A snapshot naming no class gets the driver's default class written into its spec
    /// before its content is made, as the upstream snapshot-controller does: backup tools and
    /// `kubectl get volumesnapshot` read the class from there.
    SetClass(String),
    CreateContent(Box<VolumeSnapshotContent>),
    /// A pre-provisioned content gets the snapshot's UID in its reference (the binding).
    BindContent(Box<VolumeSnapshotContent>),
    Status(Box<VolumeSnapshotStatus>),
    /// Recorded in status.error and as an event; retried with backoff.
    Error(String),
    DeleteContent(String),
    RemoveFinalizers,
    /// Nothing to do until something changes (e.g. the restore that holds it finishes).
    Wait(String),
    Done,
}

/// The source volume of a dynamic snapshot: the handle, after checking the claim is bound to
/// a volume of this driver.
fn source_volume<'a>(
    i: &SnapshotInput<'a>,
    claim_name: &str,
) -> Result<&'a PersistentVolume, String> {
    let claim = i.claim.ok_or_else(|| {
        format!(
            "spec.source.persistentVolumeClaimName: persistentvolumeclaim {claim_name:?} not found"
        )
    })?;
    let vn = o::claim_volume_name(claim);
    if vn.is_empty() {
        return Err(format!(
            "spec.source.persistentVolumeClaimName: claim {claim_name:?} is not bound yet"
        ));
    }
    i.volume
        .filter(|pv| o::name(&pv.metadata) == vn)
        .ok_or_else(|| format!("spec.source.persistentVolumeClaimName: volume {vn:?} of claim {claim_name:?} not found"))
}

fn s_class_driver<'a>(i: &SnapshotInput<'a>) -> Option<&'a str> {
    let n = i.snapshot.spec.volume_snapshot_class_name.as_deref()?;
    i.classes
        .iter()
        .find(|c| o::name(&c.metadata) == n)
        .map(|c| c.spec.driver.as_str())
}

/// Whether this driver's common duty handles the snapshot.
fn owned(i: &SnapshotInput<'_>) -> bool {
    if let Some(c) = i.content {
        return c.spec.driver == i.driver;
    }
    if i.snapshot
        .spec
        .source
        .persistent_volume_claim_name
        .is_some()
    {
        if let Some(pv) = i.volume {
            return o::csi_driver(pv) == Some(i.driver);
        }
        // No volume to tell by: a class named explicitly for this driver makes it ours (so
        // that a missing claim is reported instead of ignored).
        return s_class_driver(i) == Some(i.driver);
    }
    false
}

/// The content the common controller makes for a dynamic snapshot.
pub fn build_content(
    driver: &str,
    snapshot: &VolumeSnapshot,
    class: &VolumeSnapshotClass,
    volume: &PersistentVolume,
) -> Result<VolumeSnapshotContent, String> {
    let name = content_name(snapshot);
    let ns = o::namespace(&snapshot.metadata);
    let sname = o::name(&snapshot.metadata);
    let (_, secret) = class_parameters(class, &name, (ns, sname))?;
    let handle = o::volume_handle(volume).ok_or_else(|| {
        format!(
            "volume {:?} has no CSI volume handle",
            o::name(&volume.metadata)
        )
    })?;
    let mut meta = ObjectMeta {
        name: Some(name.clone()),
        ..Default::default()
    };
    if let Some(s) = secret {
        o::set_annotation(&mut meta, ANN_SECRET_NAME, &s.name);
        o::set_annotation(&mut meta, ANN_SECRET_NAMESPACE, &s.namespace);
    }
    let mut c = VolumeSnapshotContent::new(
        &name,
        VolumeSnapshotContentSpec {
            volume_snapshot_ref: snapshot_reference(snapshot),
            deletion_policy: class.spec.deletion_policy,
            driver: driver.to_owned(),
            volume_snapshot_class_name: class.metadata.name.clone(),
            source: VolumeSnapshotContentSource {
                volume_handle: Some(handle.to_owned()),
                snapshot_handle: None,
            },
            source_volume_mode: Some(o::volume_mode(volume).to_owned()),
        },
    );
    c.metadata = meta;
    Ok(c)
}

fn snapshot_reference(s: &VolumeSnapshot) -> ObjectReference {
    ObjectReference {
        api_version: Some("snapshot.storage.k8s.io/v1".into()),
        kind: Some("VolumeSnapshot".into()),
        name: s.metadata.name.clone(),
        namespace: s.metadata.namespace.clone(),
        uid: s.metadata.uid.clone(),
        resource_version: s.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// The snapshot's status as its bound content's status says (times and sizes converted).
pub fn status_from(
    current: Option<&VolumeSnapshotStatus>,
    content: &VolumeSnapshotContent,
) -> VolumeSnapshotStatus {
    let cs = content.status.clone().unwrap_or_default();
    VolumeSnapshotStatus {
        bound_volume_snapshot_content_name: content.metadata.name.clone(),
        creation_time: cs
            .creation_time
            .and_then(|n| Timestamp::from_nanosecond(i128::from(n)).ok())
            .map(Time),
        ready_to_use: Some(cs.ready_to_use.unwrap_or(false)),
        restore_size: cs
            .restore_size
            .and_then(|b| u64::try_from(b).ok())
            .map(|b| Quantity(quantity::format_bytes(b))),
        error: cs.error,
        volume_group_snapshot_name: current.and_then(|s| s.volume_group_snapshot_name.clone()),
    }
}

/// The common controller's next step for a snapshot.
pub fn next_snapshot(i: &SnapshotInput<'_>) -> SnapshotStep {
    if !owned(i) {
        return SnapshotStep::Ignore;
    }
    let s = i.snapshot;
    let uid = o::uid(&s.metadata);
    // The content is bound to this snapshot when its reference carries our UID.
    let bound_content = i
        .content
        .filter(|c| c.spec.volume_snapshot_ref.uid.as_deref() == Some(uid));

    if deleting(&s.metadata) {
        if let Some(claim) = &i.restoring
            && o::has_finalizer(&s.metadata, FIN_SOURCE)
        {
            return SnapshotStep::Wait(format!(
                "claim {claim} is being restored from this snapshot"
            ));
        }
        if let Some(c) = bound_content
            && c.spec.deletion_policy == DeletionPolicy::Delete
            && !deleting(&c.metadata)
        {
            return SnapshotStep::DeleteContent(o::name(&c.metadata).to_owned());
        }
        if o::has_finalizer(&s.metadata, FIN_SOURCE) || o::has_finalizer(&s.metadata, FIN_BOUND) {
            return SnapshotStep::RemoveFinalizers;
        }
        return SnapshotStep::Done;
    }

    if !o::has_finalizer(&s.metadata, FIN_SOURCE) {
        return SnapshotStep::AddFinalizer(FIN_SOURCE);
    }

    let content = match (
        &s.spec.source.persistent_volume_claim_name,
        &s.spec.source.volume_snapshot_content_name,
    ) {
        (Some(claim), _) => match i.content {
            Some(c) => c,
            None => {
                let volume = match source_volume(i, claim) {
                    Ok(v) => v,
                    Err(e) => return SnapshotStep::Error(e),
                };
                let class = match class_for(s, i.driver, i.classes) {
                    Ok(c) => c,
                    Err(e) => return SnapshotStep::Error(e),
                };
                if s.spec.volume_snapshot_class_name.is_none() {
                    return SnapshotStep::SetClass(o::name(&class.metadata).to_owned());
                }
                if class.spec.driver != i.driver {
                    return SnapshotStep::Error(format!(
                        "VolumeSnapshotClass {:?} is for driver {:?}, but the source volume {:?} is of driver {}",
                        o::name(&class.metadata),
                        class.spec.driver,
                        o::name(&volume.metadata),
                        i.driver
                    ));
                }
                return match build_content(i.driver, s, class, volume) {
                    Ok(c) => SnapshotStep::CreateContent(Box::new(c)),
                    Err(e) => SnapshotStep::Error(e),
                };
            }
        },
        (None, Some(name)) => {
            let Some(c) = i.content else {
                return SnapshotStep::Error(format!(
                    "spec.source.volumeSnapshotContentName: volumesnapshotcontent {name:?} not found"
                ));
            };
            let r = &c.spec.volume_snapshot_ref;
            if r.name.as_deref() != s.metadata.name.as_deref()
                || r.namespace.as_deref() != s.metadata.namespace.as_deref()
            {
                return SnapshotStep::Error(format!(
                    "volumesnapshotcontent {name:?} refers to snapshot {}/{}, not to this one",
                    r.namespace.as_deref().unwrap_or(""),
                    r.name.as_deref().unwrap_or("")
                ));
            }
            match r.uid.as_deref() {
                None | Some("") => {
                    let mut c = c.clone();
                    c.spec.volume_snapshot_ref.uid = Some(uid.to_owned());
                    return SnapshotStep::BindContent(Box::new(c));
                }
                Some(u) if u != uid => {
                    return SnapshotStep::Error(format!(
                        "volumesnapshotcontent {name:?} is bound to another snapshot (UID {u})"
                    ));
                }
                Some(_) => c,
            }
        }
        (None, None) => {
            return SnapshotStep::Error(
                "spec.source: one of persistentVolumeClaimName and volumeSnapshotContentName is required"
                    .into(),
            );
        }
    };
    if content.spec.volume_snapshot_ref.uid.as_deref() != Some(uid) {
        return SnapshotStep::Error(format!(
            "volumesnapshotcontent {:?} belongs to another snapshot",
            o::name(&content.metadata)
        ));
    }
    let want = status_from(s.status.as_ref(), content);
    if s.status.as_ref() != Some(&want) {
        return SnapshotStep::Status(Box::new(want));
    }
    if !o::has_finalizer(&s.metadata, FIN_BOUND) {
        return SnapshotStep::AddFinalizer(FIN_BOUND);
    }
    SnapshotStep::Done
}

/// The common controller's step for a content whose snapshot is gone: with policy Delete
/// the content goes too (and with it, through the driver, the physical snapshot); Retain
/// keeps both.
pub fn next_orphan(
    driver: &str,
    content: &VolumeSnapshotContent,
    snapshot: Option<&VolumeSnapshot>,
) -> bool {
    let Some(uid) = content.spec.volume_snapshot_ref.uid.as_deref() else {
        return false;
    };
    content.spec.driver == driver
        && !deleting(&content.metadata)
        && content.spec.deletion_policy == DeletionPolicy::Delete
        && snapshot.is_none_or(|s| o::uid(&s.metadata) != uid)
}

pub struct ContentInput<'a> {
    pub driver: &'a str,
    pub content: &'a VolumeSnapshotContent,
    /// The content's class (for the CreateSnapshot parameters); None when it has none or it
    /// is gone.
    pub class: Option<&'a VolumeSnapshotClass>,
    /// The snapshot the content is bound to still exists and is not being deleted.
    pub snapshot_live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateCall {
    pub name: String,
    pub source_volume_id: String,
    pub parameters: BTreeMap<String, String>,
    pub secret: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentStep {
    Ignore,
    AddFinalizer,
    Create(CreateCall),
    /// A pre-provisioned snapshot: ask the driver about it (ListSnapshots by ID).
    Check(String),
    Delete {
        snapshot_id: String,
        secret: Option<SecretRef>,
    },
    RemoveFinalizer,
    Error(String),
    /// Not bound to a snapshot yet, or a live snapshot holds a deleted content.
    Wait,
    Done,
}

fn handle_of(c: &VolumeSnapshotContent) -> Option<String> {
    c.status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
        .or_else(|| c.spec.source.snapshot_handle.clone())
        .filter(|h| !h.is_empty())
}

/// The driver's next step for a content.
pub fn next_content(i: &ContentInput<'_>) -> ContentStep {
    let c = i.content;
    if c.spec.driver != i.driver {
        return ContentStep::Ignore;
    }
    if deleting(&c.metadata) {
        if !o::has_finalizer(&c.metadata, FIN_CONTENT) {
            return ContentStep::Done;
        }
        // Deleting the physical snapshot of a snapshot someone still uses would lose data
        // behind their back: wait for the snapshot to go (upstream waits the same way).
        if i.snapshot_live {
            return ContentStep::Wait;
        }
        if c.spec.deletion_policy == DeletionPolicy::Delete
            && let Some(id) = handle_of(c)
        {
            return ContentStep::Delete {
                snapshot_id: id,
                secret: content_secret(c),
            };
        }
        return ContentStep::RemoveFinalizer;
    }
    if !o::has_finalizer(&c.metadata, FIN_CONTENT) {
        return ContentStep::AddFinalizer;
    }
    let status = c.status.clone().unwrap_or_default();
    if let Some(volume) = c.spec.source.volume_handle.as_deref() {
        if status.ready_to_use == Some(true) && handle_of(c).is_some() {
            return ContentStep::Done;
        }
        let Some(name) = snapshot_name(c) else {
            return ContentStep::Wait;
        };
        let parameters = match (&c.spec.volume_snapshot_class_name, i.class) {
            (None, _) => (BTreeMap::new(), None),
            (Some(n), None) => {
                return ContentStep::Error(format!(
                    "spec.volumeSnapshotClassName: volumesnapshotclass {n:?} not found"
                ));
            }
            (Some(_), Some(class)) => {
                let (ns, sn) = snapshot_key_of(c).unwrap_or_default();
                match class_parameters(class, o::name(&c.metadata), (&ns, &sn)) {
                    Ok(p) => p,
                    Err(e) => return ContentStep::Error(e),
                }
            }
        };
        // The secret the content records wins: it is what DeleteSnapshot will use too.
        let secret = content_secret(c).or(parameters.1);
        return ContentStep::Create(CreateCall {
            name,
            source_volume_id: volume.to_owned(),
            parameters: parameters.0,
            secret,
        });
    }
    match &c.spec.source.snapshot_handle {
        Some(h) if status.snapshot_handle.is_none() || status.ready_to_use != Some(true) => {
            ContentStep::Check(h.clone())
        }
        Some(_) => ContentStep::Done,
        None => ContentStep::Error(
            "spec.source: one of volumeHandle and snapshotHandle is required".into(),
        ),
    }
}

/// The content's status after CreateSnapshot or ListSnapshots answered.
pub fn content_status(
    current: Option<&VolumeSnapshotContentStatus>,
    snapshot_id: &str,
    size_bytes: i64,
    created_nanos: Option<i64>,
    ready: bool,
) -> VolumeSnapshotContentStatus {
    VolumeSnapshotContentStatus {
        snapshot_handle: Some(snapshot_id.to_owned()),
        creation_time: created_nanos,
        restore_size: (size_bytes > 0).then_some(size_bytes),
        ready_to_use: Some(ready),
        error: None,
        volume_group_snapshot_handle: current.and_then(|s| s.volume_group_snapshot_handle.clone()),
    }
}

/// What a claim restored from a snapshot gets, or why it cannot be provisioned (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreSource {
    Snapshot {
        id: String,
        size_bytes: u64,
    },
    /// The claim waits: retried with backoff, the reason in an event.
    NotReady(String),
    /// Nothing this driver can create the claim from.
    Refused(String),
}

/// A claim's VolumeSnapshot data source, judged by this driver.
pub fn restore_source(
    driver: &str,
    name: &str,
    snapshot: Option<&VolumeSnapshot>,
    content: Option<&VolumeSnapshotContent>,
) -> RestoreSource {
    let Some(s) = snapshot else {
        return RestoreSource::NotReady(format!("volumesnapshot {name:?} not found"));
    };
    if deleting(&s.metadata) {
        return RestoreSource::Refused(format!("volumesnapshot {name:?} is being deleted"));
    }
    let st = s.status.clone().unwrap_or_default();
    let Some(bound) = st.bound_volume_snapshot_content_name.as_deref() else {
        return RestoreSource::NotReady(format!(
            "volumesnapshot {name:?} is not bound to a content yet"
        ));
    };
    let Some(c) = content.filter(|c| o::name(&c.metadata) == bound) else {
        return RestoreSource::NotReady(format!("volumesnapshotcontent {bound:?} not found"));
    };
    if c.spec.driver != driver {
        return RestoreSource::Refused(format!(
            "volumesnapshot {name:?} is a snapshot of driver {}, not {driver}",
            c.spec.driver
        ));
    }
    if c.spec.volume_snapshot_ref.uid.as_deref() != Some(o::uid(&s.metadata)) {
        return RestoreSource::Refused(format!(
            "volumesnapshotcontent {bound:?} is not bound to volumesnapshot {name:?}"
        ));
    }
    let cs = c.status.clone().unwrap_or_default();
    match (cs.ready_to_use, handle_of(c)) {
        (Some(true), Some(id)) => RestoreSource::Snapshot {
            id,
            size_bytes: cs
                .restore_size
                .and_then(|b| u64::try_from(b).ok())
                .unwrap_or(0),
        },
        _ => RestoreSource::NotReady(format!("volumesnapshot {name:?} is not ready to use yet")),
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
