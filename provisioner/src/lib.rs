//! Stowage's Kubernetes provisioner: the Kubernetes side of a Stowage driver. It watches
//! claims, volumes and classes, talks to `stowage-controller` over its CSI socket the way the
//! external-provisioner sidecar does (which it replaces), and adds what that sidecar cannot:
//! Recycle of CSI volumes, its own binder for clusters without kube-controller-manager's, and
//! an import command for volumes that exist on a backend but not in Kubernetes.
//!
//! * [`binder`]: binding, phases and reclaim as pure functions, tested on their own.
//! * [`plan`]: what a claim's CreateVolume and PV look like, also pure.
//! * [`controller`]: the thin kube-runtime controllers that execute those decisions.
//! * [`attach`]: external-attacher's duty (VolumeAttachments → ControllerPublish/Unpublish).
//! * [`resize`]: external-resizer's duty (claims that grew → ControllerExpandVolume).
//! * [`duties`]: which of those run, side by side in one process.
//! * [`import`]: PVs for volumes that have none.

pub mod attach;
pub mod binder;
pub mod client;
pub mod controller;
pub mod driver;
pub mod duties;
pub mod events;
pub mod fresh;
pub mod import;
pub mod metrics;
pub mod objects;
pub mod plan;
pub mod quantity;
pub mod resize;
pub mod snapshot;
