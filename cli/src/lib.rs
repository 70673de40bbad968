//! `stowage`, the admin CLI of Stowage's drivers: `status` (what Stowage volumes and claims
//! are doing and which are stuck, [`explain`] decides, [`status`] lists), `doctor` (node,
//! backend and cluster checks) and `import` (static PVs for existing backend volumes);
//! [`usage`] reads mounted volumes' usage from the kubelets for `status`.

pub mod doctor;
pub mod explain;
pub mod kube;
pub mod migrate;
pub mod output;
pub mod progress;
pub mod status;
pub mod usage;
