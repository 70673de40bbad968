//! Driver options (`docker volume create -o key=value`, Swarm `volume-opt=key=value`).
//!
//! A few keys belong to the driver itself and mirror what a PVC and its StorageClass say in
//! Kubernetes (size, fsType, mountOptions, access mode, reclaim policy); every other key is a
//! StorageClass parameter handed to the backend unchanged (`instance`, `onDelete`, `subDir`,
//! a pool or bucket...), so the backend refuses the ones it does not know, exactly as it does
//! for a StorageClass. `volumeId` adopts an existing backend volume (static provisioning).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stowage_backends::types::{AccessMode, AccessType, Capability};

use crate::error::DriverError;

pub const SIZE: &str = "size";
pub const FS_TYPE: &str = "fsType";
pub const MOUNT_OPTIONS: &str = "mountOptions";
pub const RECLAIM: &str = "reclaim";
pub const ACCESS_MODE: &str = "accessMode";
pub const VOLUME_ID: &str = "volumeId";

/// The driver's own keys, in the order error messages list them.
pub const DRIVER_KEYS: &[&str] = &[
    SIZE,
    FS_TYPE,
    MOUNT_OPTIONS,
    RECLAIM,
    ACCESS_MODE,
    VOLUME_ID,
];

/// What `docker volume rm` does to the backend volume, as a PV's reclaim policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reclaim {
    /// Delete the backend volume and its data.
    Delete,
    /// Keep the backend volume and its data; forget the name. Creating the name again
    /// finds the same volume (the backends' CreateVolume is idempotent by name).
    Retain,
    /// Scrub the data, keep the empty volume for the next Create with the same name.
    Recycle,
}

impl Reclaim {
    pub fn as_str(self) -> &'static str {
        match self {
            Reclaim::Delete => "delete",
            Reclaim::Retain => "retain",
            Reclaim::Recycle => "recycle",
        }
    }
}

/// Parsed driver options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Requested capacity in bytes; 0 = the backend's default.
    pub size: u64,
    pub fs_type: String,
    pub mount_options: Vec<String>,
    /// None = the default for how the volume came to be (delete when created, retain when
    /// adopted with volumeId: data the driver did not create is not its to delete).
    pub reclaim: Option<Reclaim>,
    pub access_mode: AccessMode,
    pub volume_id: Option<String>,
    /// Everything else: StorageClass parameters for the backend.
    pub parameters: BTreeMap<String, String>,
}

impl VolumeOptions {
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<Self, DriverError> {
        let mut out = VolumeOptions {
            size: 0,
            fs_type: String::new(),
            mount_options: Vec::new(),
            reclaim: None,
            access_mode: AccessMode::SingleNodeWriter,
            volume_id: None,
            parameters: BTreeMap::new(),
        };
        for (key, value) in opts {
            match key.as_str() {
                SIZE => out.size = parse_size(value).map_err(|r| invalid(key, r))?,
                FS_TYPE => {
                    if value.is_empty()
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
                    {
                        return Err(invalid(
                            key,
                            format!("{value:?} is not a filesystem type such as ext4 or xfs"),
                        ));
                    }
                    out.fs_type = value.clone();
                }
                MOUNT_OPTIONS => out.mount_options = parse_mount_options(value)?,
                RECLAIM => out.reclaim = Some(parse_reclaim(value)?),
                ACCESS_MODE => out.access_mode = parse_access_mode(value)?,
                VOLUME_ID => {
                    if value.is_empty() {
                        return Err(invalid(key, "must not be empty"));
                    }
                    out.volume_id = Some(value.clone());
                }
                other => {
                    // A driver key in the wrong case would otherwise reach the backend and be
                    // refused there with a list that does not mention the driver's keys.
                    if let Some(k) = DRIVER_KEYS.iter().find(|k| k.eq_ignore_ascii_case(other)) {
                        return Err(invalid(other, format!("unknown option; did you mean {k}?")));
                    }
                    out.parameters.insert(other.to_owned(), value.clone());
                }
            }
        }
        if out.volume_id.is_some() {
            // The volume exists: what it is made of was decided when it was created.
            if let Some(k) = opts.keys().find(|k| {
                ![VOLUME_ID, FS_TYPE, MOUNT_OPTIONS, RECLAIM, ACCESS_MODE].contains(&k.as_str())
            }) {
                return Err(invalid(
                    k,
                    "cannot be combined with volumeId: an adopted volume already exists \
                     (volumeId takes only fsType, mountOptions, reclaim, accessMode)",
                ));
            }
        }
        Ok(out)
    }

    /// The capability the volume is created, staged and published with.
    pub fn capability(&self) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: self.fs_type.clone(),
                mount_flags: self.mount_options.clone(),
                volume_mount_group: String::new(),
            },
            access_mode: self.access_mode,
        }
    }
}

fn invalid(key: &str, reason: impl std::fmt::Display) -> DriverError {
    DriverError::InvalidOption {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}

/// Sizes as in a PVC (`10Gi`, `500M`, `1073741824`), plus the `GB`/`GiB` spellings Docker
/// users type. Decimal suffixes are powers of 1000, `i` suffixes powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("{s:?} is not a size such as 10Gi, 500M or 1073741824");
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    let suffix = suffix.strip_suffix('B').unwrap_or(suffix);
    let mult: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "P" => 1000u64.pow(5),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return Err(err()),
    };
    if n == 0 {
        return Err(format!("{s:?}: a volume needs a size above 0"));
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is more bytes than fit in 64 bits"))
}

fn parse_reclaim(s: &str) -> Result<Reclaim, DriverError> {
    match s {
        "delete" | "Delete" => Ok(Reclaim::Delete),
        "retain" | "Retain" => Ok(Reclaim::Retain),
        "recycle" | "Recycle" => Ok(Reclaim::Recycle),
        other => Err(invalid(
            RECLAIM,
            format!("{other:?}: expected delete, retain or recycle"),
        )),
    }
}

/// Kubernetes access mode names, since that is what the rest of Stowage speaks.
fn parse_access_mode(s: &str) -> Result<AccessMode, DriverError> {
    match s {
        "ReadWriteOnce" => Ok(AccessMode::SingleNodeWriter),
        "ReadWriteOncePod" => Ok(AccessMode::SingleNodeSingleWriter),
        "ReadOnlyMany" => Ok(AccessMode::MultiNodeReaderOnly),
        "ReadWriteMany" => Ok(AccessMode::MultiNodeMultiWriter),
        other => Err(invalid(
            ACCESS_MODE,
            format!(
                "{other:?}: expected ReadWriteOnce, ReadWriteOncePod, ReadOnlyMany or ReadWriteMany"
            ),
        )),
    }
}

fn parse_mount_options(s: &str) -> Result<Vec<String>, DriverError> {
    let opts: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(String::from)
        .collect();
    if let Some(bad) = opts
        .iter()
        .find(|o| o.chars().any(|c| c.is_control() || c == ' '))
    {
        return Err(invalid(
            MOUNT_OPTIONS,
            format!("{bad:?} is not a mount option"),
        ));
    }
    // The same options are refused here as over CSI (suid, dev, helpers that run programs).
    stowage_backends::mount::options::check(MOUNT_OPTIONS, &opts).map_err(|e| match e {
        stowage_backends::Error::InvalidArgument { reason, .. } => invalid(MOUNT_OPTIONS, reason),
        other => invalid(MOUNT_OPTIONS, other.to_string()),
    })
}

pub fn access_mode_name(m: AccessMode) -> &'static str {
    match m {
        AccessMode::SingleNodeWriter => "ReadWriteOnce",
        AccessMode::SingleNodeSingleWriter => "ReadWriteOncePod",
        AccessMode::MultiNodeReaderOnly => "ReadOnlyMany",
        AccessMode::MultiNodeMultiWriter => "ReadWriteMany",
        AccessMode::SingleNodeReaderOnly => "ReadOnlyOnce",
        AccessMode::MultiNodeSingleWriter => "MultiNodeSingleWriter",
        AccessMode::SingleNodeMultiWriter => "SingleNodeMultiWriter",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        for bad in ["", "G", "1.5G", "12Q", "-1", "0", "1 G", "99999999999Pi"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn splits_driver_keys_from_backend_parameters() {
        let v = VolumeOptions::parse(&o(&[
            ("size", "64Mi"),
            ("fsType", "xfs"),
            ("mountOptions", "noatime, nodev"),
            ("reclaim", "recycle"),
            ("accessMode", "ReadWriteMany"),
            ("onDelete", "archive"),
            ("instance", "fast"),
        ]))
        .unwrap();
        assert_eq!(v.size, 64 << 20);
        assert_eq!(v.mount_options, vec!["noatime", "nodev"]);
        assert_eq!(v.reclaim, Some(Reclaim::Recycle));
        assert_eq!(v.access_mode, AccessMode::MultiNodeMultiWriter);
        assert_eq!(
            v.parameters,
            o(&[("onDelete", "archive"), ("instance", "fast")])
        );
        assert_eq!(v.capability().fs_type(), "xfs");
    }

    #[test]
    fn errors_name_the_option() {
        for (kv, key) in [
            (("size", "lots"), "size"),
            (("reclaim", "keep"), "reclaim"),
            (("accessMode", "RWX"), "accessMode"),
            (("fstype", "ext4"), "fstype"),
            (("fsType", "ext4 -o x"), "fsType"),
            (("mountOptions", "a,b c"), "mountOptions"),
        ] {
            let e = VolumeOptions::parse(&o(&[kv])).unwrap_err().to_string();
            assert!(e.contains(key), "{kv:?}: {e}");
        }
        let e = VolumeOptions::parse(&o(&[("fstype", "ext4")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean fsType"), "{e}");
        let e = VolumeOptions::parse(&o(&[("volumeId", "default/x"), ("size", "1G")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("size") && e.contains("volumeId"), "{e}");
    }
}
