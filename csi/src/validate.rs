//! Request checks shared by the controller and node services.
//!
//! Every failure is `INVALID_ARGUMENT` with a message naming the field, which
//! is what the spec's error scheme asks for and what csi-sanity checks. Size
//! limits come from the spec's "Size Limits" section.

use std::collections::HashMap;

use tonic::Status;

use crate::v1::{CapacityRange, VolumeCapability, volume_capability};

/// General limit on CSI string fields, in bytes.
pub const MAX_STRING_BYTES: usize = 128;
/// General limit on a CSI `map<string, string>`, keys plus values, in bytes.
pub const MAX_MAP_BYTES: usize = 4096;
/// `NodeGetInfoResponse.node_id` may be longer than other strings.
pub const MAX_NODE_ID_BYTES: usize = 256;

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// `value` must be non-empty. Returns it for `let id = require(...)?`.
pub fn require<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(value)
}

/// A REQUIRED message field must be set.
pub fn require_some<T>(field: &str, value: Option<T>) -> Result<T, Status> {
    value.ok_or_else(|| invalid(format!("{field} is required")))
}

/// `value` must be at most `max` bytes long.
pub fn max_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes long; the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

/// A map's keys and values together must stay within `max` bytes.
pub fn max_map_size(field: &str, map: &HashMap<String, String>, max: usize) -> Result<(), Status> {
    let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > max {
        return Err(invalid(format!(
            "{field} holds {size} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

/// A CO-chosen name (`CreateVolumeRequest.name`, `CreateSnapshotRequest.name`):
/// required, within the string limit, and free of the control characters
/// the spec bans (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F).
pub fn name<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    require(field, value)?;
    max_len(field, value, MAX_STRING_BYTES)?;
    if let Some(c) = value.chars().find(|&c| is_banned_name_char(c)) {
        return Err(invalid(format!(
            "{field} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(value)
}

fn is_banned_name_char(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{7F}'..='\u{9F}')
}

/// A node-side path (target_path, staging_target_path, volume_path):
/// required and absolute. Paths are exempt from the 128-byte limit.
pub fn absolute_path<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    require(field, value)?;
    if !value.starts_with('/') {
        return Err(invalid(format!("{field} must be an absolute path")));
    }
    Ok(value)
}

/// `volume_capabilities` must be non-empty and every entry well formed.
pub fn volume_capabilities_present(capabilities: &[VolumeCapability]) -> Result<(), Status> {
    if capabilities.is_empty() {
        return Err(invalid("volume_capabilities is required".to_owned()));
    }
    for (i, capability) in capabilities.iter().enumerate() {
        check_capability(&format!("volume_capabilities[{i}]"), capability)?;
    }
    Ok(())
}

/// A singular REQUIRED `volume_capability` (publish, stage): present and
/// well formed. Returns it.
pub fn volume_capability<'a>(
    field: &str,
    capability: Option<&'a VolumeCapability>,
) -> Result<&'a VolumeCapability, Status> {
    let capability = require_some(field, capability)?;
    check_capability(field, capability)?;
    Ok(capability)
}

/// One of `block`/`mount` set, and an access mode other than UNKNOWN.
fn check_capability(field: &str, capability: &VolumeCapability) -> Result<(), Status> {
    if capability.access_type.is_none() {
        return Err(invalid(format!(
            "{field}.access_type is required (block or mount)"
        )));
    }
    let mode = capability
        .access_mode
        .as_ref()
        .ok_or_else(|| invalid(format!("{field}.access_mode is required")))?;
    match volume_capability::access_mode::Mode::try_from(mode.mode) {
        Ok(volume_capability::access_mode::Mode::Unknown) => {
            Err(invalid(format!("{field}.access_mode.mode is required")))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(invalid(format!(
            "{field}.access_mode.mode has unknown value {}",
            mode.mode
        ))),
    }
}

/// The access mode of a capability already checked by
/// [`volume_capabilities_present`] or [`volume_capability()`].
pub fn access_mode(capability: &VolumeCapability) -> volume_capability::access_mode::Mode {
    capability
        .access_mode
        .as_ref()
        .and_then(|m| volume_capability::access_mode::Mode::try_from(m.mode).ok())
        .unwrap_or(volume_capability::access_mode::Mode::Unknown)
}

/// `(required_bytes, limit_bytes)` from an optional range, where 0 means
/// unspecified: an absent range is `(0, None)`, a zero limit is `None`.
/// Negative values, and a limit below the requirement, are INVALID_ARGUMENT;
/// whether the backend can satisfy the range (OUT_OF_RANGE) is the caller's
/// call.
pub fn capacity_range(range: Option<&CapacityRange>) -> Result<(u64, Option<u64>), Status> {
    let Some(range) = range else {
        return Ok((0, None));
    };
    let required = u64::try_from(range.required_bytes).map_err(|_| {
        invalid(format!(
            "capacity_range.required_bytes must not be negative (got {})",
            range.required_bytes
        ))
    })?;
    let limit = u64::try_from(range.limit_bytes).map_err(|_| {
        invalid(format!(
            "capacity_range.limit_bytes must not be negative (got {})",
            range.limit_bytes
        ))
    })?;
    let limit = (limit != 0).then_some(limit);
    if let Some(limit) = limit
        && limit < required
    {
        return Err(invalid(format!(
            "capacity_range: limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    Ok((required, limit))
}

/// `max_entries` of the List RPCs: negative is invalid, 0 means no limit.
pub fn max_entries(field: &str, value: i32) -> Result<Option<usize>, Status> {
    match usize::try_from(value) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(invalid(format!(
            "{field} must not be negative (got {value})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    use tonic::Code;

    fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, mentions: &str) {
        let status = result.expect_err("expected INVALID_ARGUMENT");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(mentions),
            "{:?} should mention {mentions}",
            status.message()
        );
    }

    fn mount_cap(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn require_and_require_some() {
        assert_eq!(require("volume_id", "v1").unwrap(), "v1");
        assert_invalid(require("volume_id", ""), "volume_id");
        assert_eq!(require_some("x", Some(3)).unwrap(), 3);
        assert_invalid(require_some::<u8>("capacity_range", None), "capacity_range");
    }

    #[test]
    fn lengths() {
        assert!(max_len("name", &"a".repeat(128), MAX_STRING_BYTES).is_ok());
        assert_invalid(max_len("name", &"a".repeat(129), MAX_STRING_BYTES), "name");
        // Bytes, not characters.
        assert_invalid(
            max_len("name", &"é".repeat(65), MAX_STRING_BYTES),
            "130 bytes",
        );
        let big = HashMap::from([("k".to_owned(), "v".repeat(MAX_MAP_BYTES))]);
        assert_invalid(
            max_map_size("parameters", &big, MAX_MAP_BYTES),
            "parameters",
        );
        assert!(max_map_size("parameters", &HashMap::new(), MAX_MAP_BYTES).is_ok());
    }

    #[test]
    fn names() {
        assert!(name("name", "pvc-1234 with space\tand tab").is_ok());
        assert_invalid(name("name", ""), "name is required");
        assert_invalid(name("name", "bad\u{1}name"), "U+0001");
        assert_invalid(name("name", "bad\u{85}name"), "U+0085");
        assert_invalid(name("name", &"n".repeat(129)), "limit");
    }

    #[test]
    fn paths() {
        assert!(absolute_path("target_path", "/var/lib/x").is_ok());
        assert_invalid(absolute_path("target_path", ""), "target_path");
        assert_invalid(absolute_path("target_path", "var/lib"), "absolute");
    }

    #[test]
    fn capabilities() {
        assert!(volume_capabilities_present(&[mount_cap(Mode::SingleNodeWriter)]).is_ok());
        assert_invalid(volume_capabilities_present(&[]), "volume_capabilities");
        assert_invalid(
            volume_capabilities_present(&[
                mount_cap(Mode::SingleNodeWriter),
                mount_cap(Mode::Unknown),
            ]),
            "volume_capabilities[1].access_mode.mode",
        );
        let no_type = VolumeCapability {
            access_type: None,
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_invalid(volume_capabilities_present(&[no_type]), "access_type");
        let no_mode = VolumeCapability {
            access_mode: None,
            ..mount_cap(Mode::SingleNodeWriter)
        };
        assert_invalid(
            volume_capability("volume_capability", Some(&no_mode)),
            "access_mode",
        );
        assert_invalid(
            volume_capability("volume_capability", None),
            "volume_capability",
        );
        let bogus = VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            ..mount_cap(Mode::SingleNodeWriter)
        };
        assert_invalid(volume_capability("volume_capability", Some(&bogus)), "99");
        assert_eq!(
            access_mode(&mount_cap(Mode::MultiNodeMultiWriter)),
            Mode::MultiNodeMultiWriter
        );
    }

    #[test]
    fn capacity() {
        assert_eq!(capacity_range(None).unwrap(), (0, None));
        let range = |required_bytes, limit_bytes| CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert_eq!(capacity_range(Some(&range(10, 0))).unwrap(), (10, None));
        assert_eq!(
            capacity_range(Some(&range(10, 10))).unwrap(),
            (10, Some(10))
        );
        assert_eq!(capacity_range(Some(&range(0, 5))).unwrap(), (0, Some(5)));
        assert_invalid(capacity_range(Some(&range(-1, 0))), "required_bytes");
        assert_invalid(capacity_range(Some(&range(0, -1))), "limit_bytes");
        assert_invalid(capacity_range(Some(&range(10, 5))), "capacity_range");
    }

    #[test]
    fn list_limits() {
        assert_eq!(max_entries("max_entries", 0).unwrap(), None);
        assert_eq!(max_entries("max_entries", 7).unwrap(), Some(7));
        assert_invalid(max_entries("max_entries", -1), "max_entries");
    }
}
