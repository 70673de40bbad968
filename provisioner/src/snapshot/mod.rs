//! VolumeSnapshots: the duties of the upstream snapshot-controller (the common controller:
//! snapshot ↔ content binding, finalizers, status) and of the external-snapshotter sidecar
//! (the driver's side: CreateSnapshot / DeleteSnapshot for contents of this driver).

pub mod plan;
pub mod types;
