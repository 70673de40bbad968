//! Backend-neutral request and result types. The CSI services translate protobuf messages into
//! these, so backends never see wire types and the Docker plugin can reuse them as they are.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

/// CSI access modes (spec names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
        volume_mount_group: String,
    },
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
    pub fn mount_flags(&self) -> &[String] {
        match &self.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags,
            AccessType::Block => &[],
        }
    }
    pub fn fs_type(&self) -> &str {
        match &self.access_type {
            AccessType::Mount { fs_type, .. } => fs_type,
            AccessType::Block => "",
        }
    }
}

/// Secrets from CSI requests. Debug never prints values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, String>);

impl Secrets {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    /// 0 = no minimum given.
    pub required: u64,
    /// None = no limit.
    pub limit: Option<u64>,
}

impl CapacityRange {
    /// The size to allocate: the minimum asked for, else `default`, clamped to the limit.
    pub fn choose(&self, default: u64) -> u64 {
        let want = if self.required > 0 {
            self.required
        } else {
            default
        };
        match self.limit {
            Some(l) if l > 0 && want > l => l,
            _ => want,
        }
    }
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && self.limit.is_none_or(|l| l == 0 || size <= l)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone, Default)]
pub struct CreateVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    /// VolumeAttributesClass parameters; validated by `check_mutable_parameters`.
    pub mutable_parameters: BTreeMap<String, String>,
    pub secrets: Secrets,
    pub source: Option<ContentSource>,
    /// Preferred/required topology segments, most preferred first.
    pub topology: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub capacity_bytes: u64,
    /// Passed back by Kubernetes on every node call (the PV's volumeAttributes).
    pub context: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    pub topology: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created: SystemTime,
    pub ready: bool,
}

/// A page of results plus the token for the next page (None at the end).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    pub snapshot_id: Option<String>,
    pub source_volume_id: Option<String>,
}

/// Volume usage as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeStats {
    pub usage: Usage,
    /// `Some(message)` when the volume is not healthy (mount gone, transport dead...).
    pub abnormal: Option<String>,
    pub is_block: bool,
}

/// What a node plugin tells the controller side about itself at start (NodeGetInfo's data),
/// so ControllerPublish can refuse unknown nodes and enforce the node's volume limit.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub node_id: String,
    /// 0 = no limit.
    pub max_volumes: i64,
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
}

/// What NodeStageVolume asks of a backend.
#[derive(Debug, Clone)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    pub context: BTreeMap<String, String>,
    pub publish_context: BTreeMap<String, String>,
    pub secrets: Secrets,
}

/// What NodePublishVolume asks of a backend.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub readonly: bool,
    pub context: BTreeMap<String, String>,
}
