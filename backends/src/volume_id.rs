//! Self-describing volume and snapshot IDs: `<instance>/<path inside the instance>`.
//!
//! Every call is stateless because the ID alone says which configured backend instance holds
//! the volume and where. IDs are validated on every call so that none reaches outside its
//! instance's base: the instance must be configured and the rest must be a [`RelPath`] whose
//! components do not start with a dot (dot-names are Stowage's own bookkeeping).

use std::fmt;

use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// The CSI spec bounds IDs at 128 bytes (csi-sanity sends exactly that much).
pub const MAX_ID_LEN: usize = 128;
pub const MAX_INSTANCE_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    pub instance: String,
    pub path: RelPath,
}

impl VolumeId {
    pub fn new(instance: &str, path: RelPath) -> Result<Self> {
        check_instance("instance", instance)?;
        let id = VolumeId {
            instance: instance.to_owned(),
            path,
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(Error::invalid(
                "volume_id",
                format!("longer than {MAX_ID_LEN} bytes"),
            ));
        }
        Ok(id)
    }

    /// Parses an ID from a request; `field` names the request field in errors.
    pub fn parse(field: &'static str, s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if s.len() > MAX_ID_LEN {
            return Err(Error::invalid(
                field,
                format!("longer than {MAX_ID_LEN} bytes"),
            ));
        }
        // Without the separator it is not an ID Stowage made: it names nothing (NOT_FOUND, which
        // makes DeleteVolume of it succeed), rather than a malformed request.
        let Some((instance, rest)) = s.split_once('/') else {
            return Err(Error::not_found(field, s));
        };
        check_instance(field, instance)?;
        let path = RelPath::parse(field, rest)?;
        if path.components().any(|c| c.starts_with('.')) {
            return Err(Error::invalid(
                field,
                "path components must not start with '.'",
            ));
        }
        Ok(VolumeId {
            instance: instance.to_owned(),
            path,
        })
    }
}

fn check_instance(field: &'static str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= MAX_INSTANCE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("instance name must be 1-{MAX_INSTANCE_LEN} of [a-z0-9-_]"),
        ))
    }
}

/// Instance names in configuration follow the same rule as in IDs.
pub fn validate_instance_name(s: &str) -> Result<()> {
    check_instance("instance", s)
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.instance, self.path)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = VolumeId::parse("volume_id", "main/ns-claim").unwrap();
        assert_eq!(id.instance, "main");
        assert_eq!(id.path.as_str(), "ns-claim");
        assert_eq!(id.to_string(), "main/ns-claim");
        assert!(VolumeId::parse("volume_id", "main/team/a").is_ok());
    }

    #[test]
    fn ids_that_are_not_ours_name_nothing() {
        assert!(matches!(
            VolumeId::parse("volume_id", "some-vol-id"),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn refuses_bad_ids() {
        let long = format!("main/{}", "a".repeat(200));
        for bad in [
            "",
            "/abs",
            "main/../x",
            "main/a/../../b",
            "Main/x",
            "main/.stowage/x",
            "main/a\0b",
            "main/",
            "-x/y",
            long.as_str(),
            "main//x",
        ] {
            let err = VolumeId::parse("volume_id", bad).unwrap_err();
            assert!(err.to_string().contains("volume_id"), "{bad:?}: {err}");
        }
    }
}
