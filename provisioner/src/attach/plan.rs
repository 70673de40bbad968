//! What to do with a VolumeAttachment, as pure functions: the next step of attaching or
//! detaching it, given the attachment, its PV and the node's CSINode. The controller applies
//! one step, updates its copies and asks again, so every crash point resumes from what the API
//! shows (finalizers first, then the CSI call, then the status).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeSpec};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use stowage_csi::v1;

use crate::objects as o;
use crate::plan::{self, DriverCaps, SecretRef};

/// Where the attach controller records the node ID it publishes to, before it publishes:
/// detaching needs that ID even after the Node or its CSINode are gone (or re-registered).
pub const ANN_NODE_ID: &str = "attacher.stowage.io/node-id";

/// The finalizer Kubernetes' external-attacher puts on attachments and PVs of `driver`, so a
/// cluster can switch between it and Stowage without orphaned attachments.
pub fn finalizer(driver: &str) -> String {
    format!("external-attacher/{}", driver.replace('/', "-"))
}

pub struct AttachInput<'a> {
    pub driver: &'a str,
    pub caps: DriverCaps,
    pub va: &'a VolumeAttachment,
    /// The PV `spec.source.persistentVolumeName` names; None when it does not exist (or the
    /// source is an inline spec).
    pub pv: Option<&'a PersistentVolume>,
    /// The CSINode of `spec.nodeName`; None when there is none.
    pub csinode: Option<&'a CSINode>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PublishCall {
    pub volume_id: String,
    pub node_id: String,
    pub capability: v1::VolumeCapability,
    pub readonly: bool,
    pub secret: Option<SecretRef>,
    pub context: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnpublishCall {
    pub volume_id: String,
    pub node_id: String,
    pub secret: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not ours, or nothing left to do.
    Done,
    /// Cannot attach as things stand: `status.attachError` with this message, an event, and a
    /// retry with backoff (the node may register, the PV may appear).
    AttachError(String),
    /// Cannot detach as things stand: `status.detachError`, an event, a retry.
    DetachError(String),
    /// Protect the PV, so it cannot go while it may be attached.
    AddVolumeFinalizer,
    /// Protect the attachment and record the node ID the volume is published to.
    AddFinalizer { node_id: String },
    /// ControllerPublishVolume, then `status.attached` with the publish context.
    Publish(PublishCall),
    /// ControllerUnpublishVolume, then the finalizer goes.
    Unpublish(UnpublishCall),
    /// Nothing was ever published for this attachment: only the finalizer goes.
    RemoveFinalizer,
}

fn secret_of(r: Option<&k8s_openapi::api::core::v1::SecretReference>) -> Option<SecretRef> {
    let r = r?;
    Some(SecretRef {
        name: r.name.clone()?,
        namespace: r.namespace.clone().unwrap_or_else(|| "default".into()),
    })
}

/// The node ID the CSINode lists for `driver`.
pub fn node_id<'a>(csinode: Option<&'a CSINode>, driver: &str) -> Option<&'a str> {
    csinode?
        .spec
        .drivers
        .iter()
        .find(|d| d.name == driver)
        .map(|d| d.node_id.as_str())
        .filter(|id| !id.is_empty())
}

/// The one capability a PV is published (or expanded) with, picked from its access modes the
/// way Kubernetes' sidecars do: the widest mode wins (RWX, then ROX, then RWO, then RWOP).
pub fn volume_capability(
    spec: &PersistentVolumeSpec,
    caps: DriverCaps,
    driver: &str,
) -> Result<v1::VolumeCapability, String> {
    let modes: BTreeSet<&str> = spec
        .access_modes
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mode = [o::RWX, o::ROX, o::RWO, o::RWOP]
        .into_iter()
        .find(|m| modes.contains(m))
        .ok_or_else(|| "the PersistentVolume has no access modes".to_owned())?;
    // A driver that cannot tell RWOP from RWO still serves RWOP volumes as single-node.
    let mode = if mode == o::RWOP && !caps.single_node_multi_writer {
        o::RWO
    } else {
        mode
    };
    let block = spec.volume_mode.as_deref() == Some(o::MODE_BLOCK);
    let fs_type = spec
        .csi
        .as_ref()
        .and_then(|c| c.fs_type.clone())
        .unwrap_or_default();
    let flags = spec.mount_options.clone().unwrap_or_default();
    plan::capability(mode, block, &fs_type, &flags, caps, driver).map_err(|e| e.to_string())
}

/// Read-only attach: the PV's CSI source says so, or ReadOnlyMany is its only mode (as
/// external-attacher); only passed on to drivers that honour it (PUBLISH_READONLY).
fn readonly(spec: &PersistentVolumeSpec, caps: DriverCaps) -> bool {
    let ro_source = spec.csi.as_ref().and_then(|c| c.read_only) == Some(true);
    let modes = spec.access_modes.as_deref().unwrap_or(&[]);
    let rox_only = !modes.is_empty() && modes.iter().all(|m| m == o::ROX);
    caps.publish_readonly && (ro_source || rox_only)
}

fn pv_name(va: &VolumeAttachment) -> Option<&str> {
    va.spec.source.persistent_volume_name.as_deref()
}

/// The PV spec behind the attachment: the named PV, or the inline spec (CSI migration).
fn volume_spec<'a>(input: &AttachInput<'a>) -> Result<&'a PersistentVolumeSpec, String> {
    if let Some(spec) = input.va.spec.source.inline_volume_spec.as_ref() {
        return Ok(spec);
    }
    let Some(name) = pv_name(input.va) else {
        return Err("spec.source names neither a PersistentVolume nor an inline volume".into());
    };
    let pv = input
        .pv
        .ok_or_else(|| format!("PersistentVolume {name:?} not found"))?;
    pv.spec
        .as_ref()
        .ok_or_else(|| format!("PersistentVolume {name:?} has no spec"))
}

fn csi_handle<'a>(spec: &'a PersistentVolumeSpec, driver: &str) -> Result<&'a str, String> {
    let csi = spec
        .csi
        .as_ref()
        .ok_or_else(|| "the volume is not a CSI volume".to_owned())?;
    if csi.driver != driver {
        return Err(format!(
            "the volume belongs to driver {:?}, not {driver:?}",
            csi.driver
        ));
    }
    if csi.volume_handle.is_empty() {
        return Err("the volume has no volumeHandle".into());
    }
    Ok(&csi.volume_handle)
}

/// The next step for an attachment.
pub fn next(input: &AttachInput<'_>) -> Step {
    let va = input.va;
    if va.spec.attacher != input.driver {
        return Step::Done;
    }
    let fin = finalizer(input.driver);
    let has_fin = o::has_finalizer(&va.metadata, &fin);
    let recorded = o::annotation(&va.metadata, ANN_NODE_ID).filter(|n| !n.is_empty());
    let attached = va.status.as_ref().is_some_and(|s| s.attached);

    if va.metadata.deletion_timestamp.is_some() {
        if !has_fin {
            return Step::Done;
        }
        // The recorded ID is what was published to; an attachment made by external-attacher
        // before Stowage took over has none, and the CSINode is the best source left.
        let Some(node_id) = recorded.or_else(|| node_id(input.csinode, input.driver)) else {
            if attached {
                return Step::DetachError(format!(
                    "node {:?} has no node ID for {} (CSINode gone?) and none was recorded; cannot detach",
                    va.spec.node_name, input.driver
                ));
            }
            // Every publish is preceded by recording the node ID: none recorded, none made.
            return Step::RemoveFinalizer;
        };
        let spec = match volume_spec(input) {
            Ok(s) => s,
            Err(_) if !attached && recorded.is_none() => return Step::RemoveFinalizer,
            Err(e) => return Step::DetachError(e),
        };
        let volume_id = match csi_handle(spec, input.driver) {
            Ok(h) => h.to_owned(),
            Err(e) => return Step::DetachError(e),
        };
        return Step::Unpublish(UnpublishCall {
            volume_id,
            node_id: node_id.to_owned(),
            secret: secret_of(
                spec.csi
                    .as_ref()
                    .and_then(|c| c.controller_publish_secret_ref.as_ref()),
            ),
        });
    }

    if attached && has_fin {
        return Step::Done;
    }
    let spec = match volume_spec(input) {
        Ok(s) => s,
        Err(e) => return Step::AttachError(e),
    };
    let volume_id = match csi_handle(spec, input.driver) {
        Ok(h) => h.to_owned(),
        Err(e) => return Step::AttachError(e),
    };
    if let Some(pv) = input.pv
        && va.spec.source.inline_volume_spec.is_none()
        && !o::has_finalizer(&pv.metadata, &fin)
    {
        return Step::AddVolumeFinalizer;
    }
    let node_id = match (recorded, node_id(input.csinode, input.driver)) {
        (Some(r), _) => r.to_owned(),
        (None, Some(n)) => n.to_owned(),
        (None, None) if input.csinode.is_none() => {
            return Step::AttachError(format!(
                "node {:?} has no CSINode object: is the {} node plugin running there?",
                va.spec.node_name, input.driver
            ));
        }
        (None, None) => {
            return Step::AttachError(format!(
                "driver {} is not registered in the CSINode of node {:?}",
                input.driver, va.spec.node_name
            ));
        }
    };
    if !has_fin || recorded.is_none() {
        return Step::AddFinalizer { node_id };
    }
    let capability = match volume_capability(spec, input.caps, input.driver) {
        Ok(c) => c,
        Err(e) => return Step::AttachError(e),
    };
    let csi = spec.csi.as_ref();
    Step::Publish(PublishCall {
        volume_id,
        node_id,
        capability,
        readonly: readonly(spec, input.caps),
        secret: secret_of(csi.and_then(|c| c.controller_publish_secret_ref.as_ref())),
        context: csi
            .and_then(|c| c.volume_attributes.clone())
            .unwrap_or_default(),
    })
}

/// May the attach finalizer leave this PV? Only once it is being deleted and no attachment
/// refers to it any more (external-attacher's rule).
pub fn volume_finalizer_removable<'a>(
    driver: &str,
    pv: &PersistentVolume,
    attachments: impl IntoIterator<Item = &'a VolumeAttachment>,
) -> bool {
    let name = o::name(&pv.metadata);
    pv.metadata.deletion_timestamp.is_some()
        && o::has_finalizer(&pv.metadata, &finalizer(driver))
        && !attachments.into_iter().any(|va| pv_name(va) == Some(name))
}

// The table tests live next to this file (attach/tests.rs), not in a plan/ directory.
#[cfg(test)]
#[path = "tests.rs"]
mod tests;
