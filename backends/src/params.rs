//! CreateVolume parameters (StorageClass parameters) shared by the directory backends, and the
//! rules for which keys are accepted: a typo in a StorageClass must fail loudly, not be ignored.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Which configured backend instance a volume goes to.
pub const INSTANCE: &str = "instance";
/// delete | retain | archive: what DeleteVolume does with the data.
pub const ON_DELETE: &str = "onDelete";
/// Directory name template, e.g. `${pvc.metadata.namespace}-${pvc.metadata.name}`.
pub const SUB_DIR: &str = "subDir";

/// Keys Kubernetes sidecars (and Stowage's provisioner) add; always accepted.
const PASSTHROUGH_PREFIXES: &[&str] = &["csi.storage.k8s.io/", "stowage.io/"];
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDelete {
    #[default]
    Delete,
    Retain,
    Archive,
}

impl OnDelete {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "delete" => Ok(OnDelete::Delete),
            "retain" => Ok(OnDelete::Retain),
            "archive" => Ok(OnDelete::Archive),
            other => Err(Error::invalid(
                "parameters.onDelete",
                format!("{other:?}: expected delete, retain or archive"),
            )),
        }
    }
}

/// Refuses any key that is neither in `known` nor a passthrough key.
pub fn check_known(parameters: &BTreeMap<String, String>, known: &[&str]) -> Result<()> {
    for k in parameters.keys() {
        if !known.contains(&k.as_str()) && !PASSTHROUGH_PREFIXES.iter().any(|p| k.starts_with(p)) {
            return Err(Error::InvalidArgument {
                field: "parameters",
                reason: format!("unknown parameter {k:?} (known: {})", known.join(", ")),
            });
        }
    }
    Ok(())
}

/// Parameters of the directory-per-volume backends.
#[derive(Debug, Clone, Default)]
pub struct DirParams {
    pub on_delete: OnDelete,
    pub sub_dir: Option<String>,
}

impl DirParams {
    pub const KNOWN: &'static [&'static str] = &[INSTANCE, ON_DELETE, SUB_DIR];

    pub fn parse(parameters: &BTreeMap<String, String>) -> Result<Self> {
        check_known(parameters, Self::KNOWN)?;
        Ok(DirParams {
            on_delete: parameters
                .get(ON_DELETE)
                .map(|s| OnDelete::parse(s))
                .transpose()?
                .unwrap_or_default(),
            sub_dir: parameters.get(SUB_DIR).filter(|s| !s.is_empty()).cloned(),
        })
    }
}

/// Mutable parameters of the directory backends: only the delete policy can change.
pub const MUTABLE: &[&str] = &[ON_DELETE];

pub fn check_mutable(mutable: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in mutable {
        if !MUTABLE.contains(&k.as_str()) {
            return Err(Error::invalid(
                "mutable_parameters",
                format!("{k:?} is not mutable (mutable: {})", MUTABLE.join(", ")),
            ));
        }
        if k == ON_DELETE {
            OnDelete::parse(v)?;
        }
    }
    Ok(())
}

/// Keys kept with a volume's metadata (so DeleteVolume knows onDelete): all but secret refs.
pub fn is_stored(key: &str) -> bool {
    !key.contains("secret")
}

/// Expands `${pvc.metadata.name}`, `${pvc.metadata.namespace}` and `${pv.metadata.name}` from
/// the claim metadata the provisioner passes along.
pub fn expand_template(template: &str, parameters: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            Error::invalid("parameters.subDir", format!("unclosed ${{ in {template:?}"))
        })?;
        let var = &after[..end];
        let key = match var {
            "pvc.metadata.name" => PVC_NAME,
            "pvc.metadata.namespace" => PVC_NAMESPACE,
            "pv.metadata.name" => PV_NAME,
            other => {
                return Err(Error::invalid(
                    "parameters.subDir",
                    format!("unknown variable ${{{other}}}"),
                ));
            }
        };
        let value = parameters
            .get(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Error::invalid(
                    "parameters.subDir",
                    format!("${{{var}}} needs parameter {key}, which the request lacks"),
                )
            })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_templates() {
        let params = p(&[(PVC_NAME, "data"), (PVC_NAMESPACE, "db")]);
        assert_eq!(
            expand_template("${pvc.metadata.namespace}-${pvc.metadata.name}", &params).unwrap(),
            "db-data"
        );
        assert!(
            expand_template("${pv.metadata.name}", &params)
                .unwrap_err()
                .to_string()
                .contains(PV_NAME)
        );
        assert!(expand_template("${nope}", &params).is_err());
        assert!(expand_template("${pvc.metadata.name", &params).is_err());
    }

    #[test]
    fn refuses_unknown_and_bad_values() {
        assert!(
            DirParams::parse(&p(&[
                ("onDelete", "archive"),
                ("csi.storage.k8s.io/pvc/name", "x")
            ]))
            .is_ok()
        );
        let e = DirParams::parse(&p(&[("ondelete", "retain")])).unwrap_err();
        assert!(e.to_string().contains("ondelete"));
        let e = DirParams::parse(&p(&[("onDelete", "keep")])).unwrap_err();
        assert!(e.to_string().contains("onDelete"));
    }
}
