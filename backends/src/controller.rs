//! The controller-side backend trait: everything a CSI controller (or the Docker plugin) asks of
//! a storage system without touching a node.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::types::{
    Capability, CapacityRange, CreateVolume, NodeInfo, Page, Secrets, Snapshot, SnapshotFilter,
    Volume,
};

/// Optional controller features, advertised through ControllerGetCapabilities.
#[derive(Debug, Clone, Copy, Default)]
pub struct ControllerFeatures {
    pub snapshots: bool,
    pub clone: bool,
    pub expand: bool,
    /// ControllerPublish/Unpublish are needed (attachRequired).
    pub publish: bool,
    pub capacity: bool,
    pub single_node_multi_writer: bool,
    /// ControllerModifyVolume with mutable parameters (VolumeAttributesClass).
    pub modify: bool,
}

/// What a ControllerExpandVolume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    pub capacity_bytes: u64,
    /// The node must grow a filesystem too (NodeExpandVolume).
    pub node_expansion_required: bool,
}

#[async_trait]
pub trait ControllerBackend: Send + Sync + 'static {
    /// The CSI driver name, `<backend>.stowage.io`.
    fn driver_name(&self) -> &'static str;

    fn features(&self) -> ControllerFeatures;

    /// Refuses capabilities the backend cannot serve, with a message saying which and why.
    fn check_capabilities(&self, caps: &[Capability]) -> Result<()>;

    /// Creates a volume, or returns the existing one with the same name when compatible
    /// (ALREADY_EXISTS otherwise).
    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume>;

    /// Deletes a volume; an unknown ID is success.
    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()>;

    /// NotFound when it does not exist.
    async fn get_volume(&self, volume_id: &str) -> Result<Volume>;

    /// `start` is an opaque token from a previous page; a bad token is Aborted (CSI).
    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>>;

    /// Bytes available for new volumes with these parameters.
    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64>;

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let _ = (volume_id, range, secrets);
        Err(Error::Unsupported("volume expansion".into()))
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        let _ = (name, source_volume_id, parameters, secrets);
        Err(Error::Unsupported("snapshots".into()))
    }

    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        let _ = (snapshot_id, secrets);
        Err(Error::Unsupported("snapshots".into()))
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let _ = (filter, start, max);
        Err(Error::Unsupported("snapshots".into()))
    }

    /// Refuses mutable parameters the backend cannot change (CreateVolume and ModifyVolume).
    fn check_mutable_parameters(&self, mutable: &BTreeMap<String, String>) -> Result<()> {
        match mutable.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::invalid(
                "mutable_parameters",
                format!("{k:?} cannot be changed on this backend"),
            )),
        }
    }

    /// Changes mutable parameters of an existing volume.
    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        let _ = (volume_id, mutable, secrets);
        Err(Error::Unsupported("volume modification".into()))
    }

    /// Scrubs a volume's contents so it can be handed to a new claim (Stowage's Recycle).
    async fn recycle_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let _ = (volume_id, secrets);
        Err(Error::Unsupported("recycling".into()))
    }

    /// Makes the volume available to `node_id`; returns the publish context.
    async fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
    ) -> Result<BTreeMap<String, String>> {
        let _ = (volume_id, node_id, capability, readonly);
        Err(Error::Unsupported("controller publish".into()))
    }

    async fn controller_unpublish(&self, volume_id: &str, node_id: &str) -> Result<()> {
        let _ = (volume_id, node_id);
        Err(Error::Unsupported("controller unpublish".into()))
    }

    /// Nodes the volume is published to (ControllerGetVolume).
    async fn published_nodes(&self, volume_id: &str) -> Result<Vec<String>> {
        let _ = volume_id;
        Ok(Vec::new())
    }

    /// Records a node plugin (called by the node plugin at start, through the backend's own
    /// storage, since it has no channel to the controller). Backends that do not track nodes
    /// accept and ignore it.
    async fn register_node(&self, node: &NodeInfo) -> Result<()> {
        let _ = node;
        Ok(())
    }
}
