//! The `snapshot.storage.k8s.io/v1` kinds as Rust types, field for field the upstream API
//! (kubernetes-csi/external-snapshotter `client/apis/volumesnapshot/v1/types.go`), so objects
//! kubectl, backup tools or an upstream snapshot-controller write read back unchanged, and the
//! CRDs generated from them ([`crds`]) accept what upstream's accept. The CEL rules are
//! upstream's own (immutable sources, exactly one source, both parts of the snapshot reference).

// `printcolumn(name = .., type_ = ..)` repeated is kube's syntax for several columns, which
// clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "snapshot.storage.k8s.io";

/// A user's request for either creating a point-in-time snapshot of a persistent volume, or
/// binding to a pre-existing snapshot.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus",
    shortname = "vs",
    derive = "PartialEq",
    doc = "VolumeSnapshot is a user's request for either creating a point-in-time snapshot of a persistent volume, or binding to a pre-existing snapshot.",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes-csi/external-snapshotter/pull/814"
    ),
    printcolumn(
        name = "ReadyToUse",
        type_ = "boolean",
        json_path = ".status.readyToUse",
        description = "Indicates if the snapshot is ready to be used to restore a volume."
    ),
    printcolumn(
        name = "SourcePVC",
        type_ = "string",
        json_path = ".spec.source.persistentVolumeClaimName",
        description = "If a new snapshot needs to be created, this contains the name of the source PVC from which this snapshot was (or will be) created."
    ),
    printcolumn(
        name = "SourceSnapshotContent",
        type_ = "string",
        json_path = ".spec.source.volumeSnapshotContentName",
        description = "If a snapshot already exists, this contains the name of the existing VolumeSnapshotContent object representing the existing snapshot."
    ),
    printcolumn(
        name = "RestoreSize",
        type_ = "string",
        json_path = ".status.restoreSize",
        description = "Represents the minimum size of volume required to rehydrate from this snapshot."
    ),
    printcolumn(
        name = "SnapshotClass",
        type_ = "string",
        json_path = ".spec.volumeSnapshotClassName",
        description = "The name of the VolumeSnapshotClass requested by the VolumeSnapshot."
    ),
    printcolumn(
        name = "SnapshotContent",
        type_ = "string",
        json_path = ".status.boundVolumeSnapshotContentName",
        description = "Name of the VolumeSnapshotContent object to which the VolumeSnapshot object intends to bind to. Please note that verification of binding actually requires checking both VolumeSnapshot and VolumeSnapshotContent to ensure both are pointing at each other. Binding MUST be verified prior to usage of this object."
    ),
    printcolumn(
        name = "CreationTime",
        type_ = "date",
        json_path = ".status.creationTime",
        description = "Timestamp when the point-in-time snapshot was taken by the underlying storage system."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// source specifies where a snapshot will be created from. This field is immutable after
    /// creation. Required.
    pub source: VolumeSnapshotSource,
    /// VolumeSnapshotClassName is the name of the VolumeSnapshotClass requested by the
    /// VolumeSnapshot. It may be left nil to indicate that the default SnapshotClass should be
    /// used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0").message("volumeSnapshotClassName must not be the empty string when set"))]
    pub volume_snapshot_class_name: Option<String>,
}

/// Where a snapshot comes from: exactly one of its fields must be set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(oldSelf.persistentVolumeClaimName) || has(self.persistentVolumeClaimName)").message("persistentVolumeClaimName is required once set"),
    validation = Rule::new("!has(oldSelf.volumeSnapshotContentName) || has(self.volumeSnapshotContentName)").message("volumeSnapshotContentName is required once set"),
    validation = Rule::new("(has(self.volumeSnapshotContentName) && !has(self.persistentVolumeClaimName)) || (!has(self.volumeSnapshotContentName) && has(self.persistentVolumeClaimName))").message("exactly one of volumeSnapshotContentName and persistentVolumeClaimName must be set")
)]
pub struct VolumeSnapshotSource {
    /// persistentVolumeClaimName specifies the name of the PersistentVolumeClaim object
    /// representing the volume from which a snapshot should be created. This PVC is assumed to
    /// be in the same namespace as the VolumeSnapshot object. This field is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("persistentVolumeClaimName is immutable"))]
    pub persistent_volume_claim_name: Option<String>,
    /// volumeSnapshotContentName specifies the name of a pre-existing VolumeSnapshotContent
    /// object representing an existing volume snapshot. This field is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeSnapshotContentName is immutable"))]
    pub volume_snapshot_content_name: Option<String>,
}

/// status represents the current information of a snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// boundVolumeSnapshotContentName is the name of the VolumeSnapshotContent object to which
    /// this VolumeSnapshot object intends to bind to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// creationTime is the timestamp when the point-in-time snapshot is taken by the underlying
    /// storage system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// readyToUse indicates if the snapshot is ready to be used to restore a volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// restoreSize represents the minimum size of volume required to create a volume from this
    /// snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// error is the last observed error during snapshot creation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// VolumeGroupSnapshotName is the name of the VolumeGroupSnapshot of which this
    /// VolumeSnapshot is a part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// Describes an error encountered during snapshot creation.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    /// time is the timestamp when the error was encountered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// message is a string detailing the encountered error during snapshot creation if
    /// specified. NOTE: message may be logged, and it should not contain sensitive information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether a VolumeSnapshotContent and its physical snapshot go when the VolumeSnapshot bound
/// to it is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// The actual "on-disk" snapshot object in the underlying storage system.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    status = "VolumeSnapshotContentStatus",
    shortname = "vsc",
    shortname = "vscs",
    derive = "PartialEq",
    doc = "VolumeSnapshotContent represents the actual \"on-disk\" snapshot object in the underlying storage system",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes-csi/external-snapshotter/pull/955"
    ),
    printcolumn(
        name = "ReadyToUse",
        type_ = "boolean",
        json_path = ".status.readyToUse",
        description = "Indicates if the snapshot is ready to be used to restore a volume."
    ),
    printcolumn(
        name = "RestoreSize",
        type_ = "integer",
        json_path = ".status.restoreSize",
        description = "Represents the complete size of the snapshot in bytes"
    ),
    printcolumn(
        name = "DeletionPolicy",
        type_ = "string",
        json_path = ".spec.deletionPolicy",
        description = "Determines whether this VolumeSnapshotContent and its physical snapshot on the underlying storage system should be deleted when its bound VolumeSnapshot is deleted."
    ),
    printcolumn(
        name = "Driver",
        type_ = "string",
        json_path = ".spec.driver",
        description = "Name of the CSI driver used to create the physical snapshot on the underlying storage system."
    ),
    printcolumn(
        name = "VolumeSnapshotClass",
        type_ = "string",
        json_path = ".spec.volumeSnapshotClassName",
        description = "Name of the VolumeSnapshotClass to which this snapshot belongs."
    ),
    printcolumn(
        name = "VolumeSnapshot",
        type_ = "string",
        json_path = ".spec.volumeSnapshotRef.name",
        description = "Name of the VolumeSnapshot object to which this VolumeSnapshotContent object is bound."
    ),
    printcolumn(
        name = "VolumeSnapshotNamespace",
        type_ = "string",
        json_path = ".spec.volumeSnapshotRef.namespace",
        description = "Namespace of the VolumeSnapshot object to which this VolumeSnapshotContent object is bound."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.sourceVolumeMode) || has(self.sourceVolumeMode)").message("sourceVolumeMode is required once set"))]
pub struct VolumeSnapshotContentSpec {
    /// volumeSnapshotRef specifies the VolumeSnapshot object to which this VolumeSnapshotContent
    /// object is bound. Required.
    #[x_kube(validation = Rule::new("has(self.name) && has(self.__namespace__)").message("both spec.volumeSnapshotRef.name and spec.volumeSnapshotRef.namespace must be set"))]
    pub volume_snapshot_ref: ObjectReference,
    /// deletionPolicy determines whether this VolumeSnapshotContent and its physical snapshot
    /// on the underlying storage system should be deleted when its bound VolumeSnapshot is
    /// deleted. Required.
    pub deletion_policy: DeletionPolicy,
    /// driver is the name of the CSI driver used to create the physical snapshot on the
    /// underlying storage system. Required.
    pub driver: String,
    /// name of the VolumeSnapshotClass from which this snapshot was (or will be) created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// source specifies whether the snapshot is (or should be) dynamically provisioned or
    /// already exists, and just requires a Kubernetes object representation. This field is
    /// immutable after creation. Required.
    pub source: VolumeSnapshotContentSource,
    /// SourceVolumeMode is the mode of the volume whose snapshot is taken. Can be either
    /// "Filesystem" or "Block". This field is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("sourceVolumeMode is immutable"))]
    pub source_volume_mode: Option<String>,
}

/// Where a content's snapshot comes from: exactly one of its fields must be set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(oldSelf.volumeHandle) || has(self.volumeHandle)").message("volumeHandle is required once set"),
    validation = Rule::new("!has(oldSelf.snapshotHandle) || has(self.snapshotHandle)").message("snapshotHandle is required once set"),
    validation = Rule::new("(has(self.volumeHandle) && !has(self.snapshotHandle)) || (!has(self.volumeHandle) && has(self.snapshotHandle))").message("exactly one of volumeHandle and snapshotHandle must be set")
)]
pub struct VolumeSnapshotContentSource {
    /// volumeHandle specifies the CSI "volume_id" of the volume from which a snapshot should be
    /// dynamically taken from. This field is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeHandle is immutable"))]
    pub volume_handle: Option<String>,
    /// snapshotHandle specifies the CSI "snapshot_id" of a pre-existing snapshot on the
    /// underlying storage system for which a Kubernetes object representation was (or should
    /// be) created. This field is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("snapshotHandle is immutable"))]
    pub snapshot_handle: Option<String>,
}

/// status represents the current information of a snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// snapshotHandle is the CSI "snapshot_id" of a snapshot on the underlying storage system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// creationTime is the timestamp when the point-in-time snapshot is taken by the underlying
    /// storage system, in nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// restoreSize represents the complete size of the snapshot in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub restore_size: Option<i64>,
    /// readyToUse indicates if a snapshot is ready to be used to restore a volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// error is the last observed error during snapshot creation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// VolumeGroupSnapshotHandle is the CSI "group_snapshot_id" of a group snapshot on the
    /// underlying storage system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// The storage provider-specific parameters for creating snapshots, with no spec: its fields
/// sit at the top of the object, as upstream's do.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotClass",
    no_spec,
    shortname = "vsclass",
    shortname = "vsclasses",
    derive = "PartialEq",
    doc = "VolumeSnapshotClass specifies parameters that a underlying storage system uses when creating a volume snapshot.",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes-csi/external-snapshotter/pull/814"
    ),
    printcolumn(name = "Driver", type_ = "string", json_path = ".driver"),
    printcolumn(
        name = "DeletionPolicy",
        type_ = "string",
        json_path = ".deletionPolicy",
        description = "Determines whether a VolumeSnapshotContent created through the VolumeSnapshotClass should be deleted when its bound VolumeSnapshot is deleted."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClassFields {
    /// driver is the name of the storage driver that handles this VolumeSnapshotClass.
    /// Required.
    pub driver: String,
    /// parameters is a key-value map with storage driver specific parameters for creating
    /// snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
    /// deletionPolicy determines whether a VolumeSnapshotContent created through the
    /// VolumeSnapshotClass should be deleted when its bound VolumeSnapshot is deleted.
    /// Required.
    pub deletion_policy: DeletionPolicy,
}

/// The three CRDs, in the order they are applied.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        VolumeSnapshotClass::crd(),
        VolumeSnapshotContent::crd(),
        VolumeSnapshot::crd(),
    ]
}

/// The CRDs as one multi-document YAML file (what `stowage-provisioner crds` prints and
/// `deploy/crds/snapshot.storage.k8s.io.yaml` holds).
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::from(
        "# Generated by `stowage-provisioner crds` from provisioner/src/snapshot/types.rs; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKED_IN: &str = include_str!("../../deploy/crds/snapshot.storage.k8s.io.yaml");

    /// The file the chart and `kubectl apply` use is what the types generate: a change to the
    /// types without `stowage-provisioner crds > provisioner/deploy/crds/...` fails here.
    #[test]
    fn checked_in_crds_are_generated() {
        assert_eq!(crds_yaml().unwrap(), CHECKED_IN);
    }
}
