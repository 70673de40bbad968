//! Translation between CSI wire messages and the backend-neutral types of `stowage-backends`,
//! with the validation the spec asks for (a message naming the field on every refusal).

use std::collections::BTreeMap;

use stowage_backends::types::{
    AccessMode, AccessType, Capability, CapacityRange, ContentSource, Secrets, Snapshot, Volume,
};
use tonic::Status;

use crate::v1;
use crate::v1::volume_capability::access_mode::Mode;

pub fn to_btree<'a, I: IntoIterator<Item = (&'a String, &'a String)>>(
    m: I,
) -> BTreeMap<String, String> {
    m.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn secrets<'a, I: IntoIterator<Item = (&'a String, &'a String)>>(m: I) -> Secrets {
    Secrets(to_btree(m))
}

/// One capability; `field` names where it came from.
pub fn capability(field: &'static str, c: &v1::VolumeCapability) -> Result<Capability, Status> {
    let access_type = match &c.access_type {
        Some(v1::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(v1::volume_capability::AccessType::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            // Mount flags come from StorageClasses and PVs, i.e. from users: checked once
            // here for every RPC, split into single options.
            mount_flags: stowage_backends::mount::options::check(
                mount_flags_field(field),
                &m.mount_flags,
            )
            .map_err(Status::from)?,
            volume_mount_group: m.volume_mount_group.clone(),
        },
        None => {
            return Err(Status::invalid_argument(format!(
                "{field}: access_type (block or mount) is required"
            )));
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument(format!("{field}: access_mode is required")))?;
    let access_mode = match Mode::try_from(mode.mode).unwrap_or(Mode::Unknown) {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::Unknown => {
            return Err(Status::invalid_argument(format!(
                "{field}: access_mode.mode {} is unknown",
                mode.mode
            )));
        }
    };
    Ok(Capability {
        access_type,
        access_mode,
    })
}

/// The error field for mount flags of the capability named `field` (static strings only).
fn mount_flags_field(field: &'static str) -> &'static str {
    match field {
        "volume_capability" => "volume_capability.mount.mount_flags",
        "volume_capabilities" => "volume_capabilities.mount.mount_flags",
        _ => "mount_flags",
    }
}

/// A non-empty list of capabilities.
pub fn capabilities(
    field: &'static str,
    caps: &[v1::VolumeCapability],
) -> Result<Vec<Capability>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    caps.iter().map(|c| capability(field, c)).collect()
}

pub fn capability_to_wire(c: &Capability) -> v1::VolumeCapability {
    let access_type = match &c.access_type {
        AccessType::Block => v1::volume_capability::AccessType::Block(Default::default()),
        AccessType::Mount {
            fs_type,
            mount_flags,
            volume_mount_group,
        } => v1::volume_capability::AccessType::Mount(v1::volume_capability::MountVolume {
            fs_type: fs_type.clone(),
            mount_flags: mount_flags.clone(),
            volume_mount_group: volume_mount_group.clone(),
        }),
    };
    let mode = match c.access_mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    };
    v1::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(v1::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn capacity_range(r: Option<&v1::CapacityRange>) -> Result<CapacityRange, Status> {
    let Some(r) = r else {
        return Ok(CapacityRange::default());
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: bytes must not be negative",
        ));
    }
    if r.limit_bytes > 0 && r.limit_bytes < r.required_bytes {
        return Err(Status::invalid_argument(
            "capacity_range: limit_bytes is smaller than required_bytes",
        ));
    }
    Ok(CapacityRange {
        required: r.required_bytes as u64,
        limit: if r.limit_bytes > 0 {
            Some(r.limit_bytes as u64)
        } else {
            None
        },
    })
}

pub fn content_source(
    s: Option<&v1::VolumeContentSource>,
) -> Result<Option<ContentSource>, Status> {
    use v1::volume_content_source::Type;
    let Some(s) = s else { return Ok(None) };
    match &s.r#type {
        Some(Type::Snapshot(snap)) if !snap.snapshot_id.is_empty() => {
            Ok(Some(ContentSource::Snapshot(snap.snapshot_id.clone())))
        }
        Some(Type::Volume(vol)) if !vol.volume_id.is_empty() => {
            Ok(Some(ContentSource::Volume(vol.volume_id.clone())))
        }
        Some(Type::Snapshot(_)) => Err(Status::invalid_argument(
            "volume_content_source.snapshot.snapshot_id is required",
        )),
        Some(Type::Volume(_)) => Err(Status::invalid_argument(
            "volume_content_source.volume.volume_id is required",
        )),
        None => Err(Status::invalid_argument(
            "volume_content_source: type (snapshot or volume) is required",
        )),
    }
}

pub fn content_source_to_wire(s: &ContentSource) -> v1::VolumeContentSource {
    use v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
    v1::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

pub fn topology_to_wire(t: &[BTreeMap<String, String>]) -> Vec<v1::Topology> {
    t.iter()
        .map(|seg| v1::Topology {
            segments: seg.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
        .collect()
}

pub fn volume_to_wire(v: &Volume) -> v1::Volume {
    v1::Volume {
        capacity_bytes: i64::try_from(v.capacity_bytes).unwrap_or(i64::MAX),
        volume_id: v.id.clone(),
        volume_context: v
            .context
            .iter()
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect(),
        content_source: v.source.as_ref().map(content_source_to_wire),
        accessible_topology: topology_to_wire(&v.topology),
    }
}

pub fn snapshot_to_wire(s: &Snapshot) -> v1::Snapshot {
    let since = s
        .created
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v1::Snapshot {
        size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: stowage_backends::group::group_of(&s.id).unwrap_or_default(),
    }
}

pub use crate::validate::require;
