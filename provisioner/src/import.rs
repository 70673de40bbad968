//! `stowage-provisioner import`: static provisioning for volumes that exist on a backend but
//! not in Kubernetes (made before Stowage, kept by onDelete=retain, moved from another
//! cluster). Lists the driver's volumes that no PV points at and creates PVs for the chosen
//! ones, Retain by default so deleting the PV never deletes data nobody meant to hand over.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use stowage_csi::v1;

use crate::driver::{Driver, DriverError};
use crate::objects::{self as o, ANN_PROVISIONED_BY, FINALIZER, RECLAIM_DELETE};
use crate::plan;
use crate::quantity::format_bytes;

/// Annotation naming the volume an imported PV was made for.
pub const ANN_IMPORTED: &str = "stowage.io/imported";

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub all: bool,
    pub volumes: Vec<String>,
    pub storage_class: String,
    pub access_modes: Vec<String>,
    pub volume_mode: String,
    pub reclaim_policy: String,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("{what}: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0} volume(s) could not be imported (see above)")]
    Failed(usize),
}

/// A PV name for a volume ID: readable where the ID allows, unique through a hash of it.
pub fn pv_name_for_volume(volume_id: &str) -> String {
    let mut readable: String = volume_id
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    readable.truncate(40);
    let readable = readable.trim_matches('-');
    // FNV-1a: stable across versions and machines, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in volume_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    if readable.is_empty() {
        format!("stowage-{:016x}", h)
    } else {
        format!("stowage-{readable}-{:08x}", h as u32)
    }
}

fn check_options(o: &ImportOptions) -> Result<(), ImportError> {
    if !matches!(o.reclaim_policy.as_str(), "Retain" | "Delete" | "Recycle") {
        return Err(ImportError::Invalid(format!(
            "--reclaim-policy {:?}: expected Retain, Delete or Recycle",
            o.reclaim_policy
        )));
    }
    if !matches!(o.volume_mode.as_str(), "Filesystem" | "Block") {
        return Err(ImportError::Invalid(format!(
            "--volume-mode {:?}: expected Filesystem or Block",
            o.volume_mode
        )));
    }
    if o.access_modes.is_empty() {
        return Err(ImportError::Invalid(
            "--access-mode: at least one is required".into(),
        ));
    }
    Ok(())
}

/// The PV that makes `vol` available to claims.
pub fn build_pv(driver: &str, vol: &v1::Volume, opts: &ImportOptions) -> PersistentVolume {
    let mut annotations = BTreeMap::from([(ANN_IMPORTED.to_owned(), vol.volume_id.clone())]);
    let delete = opts.reclaim_policy == RECLAIM_DELETE;
    if delete {
        // Whoever imports with Delete hands the volume's fate to the provisioner.
        annotations.insert(ANN_PROVISIONED_BY.to_owned(), driver.to_owned());
    }
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name_for_volume(&vol.volume_id)),
            annotations: Some(annotations),
            finalizers: delete.then(|| vec![FINALIZER.to_owned()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(opts.access_modes.clone()),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(format_bytes(u64::try_from(vol.capacity_bytes).unwrap_or(0))),
            )])),
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.to_owned(),
                volume_handle: vol.volume_id.clone(),
                volume_attributes: (!vol.volume_context.is_empty())
                    .then(|| vol.volume_context.clone().into_iter().collect()),
                ..Default::default()
            }),
            persistent_volume_reclaim_policy: Some(opts.reclaim_policy.clone()),
            storage_class_name: Some(opts.storage_class.clone()),
            volume_mode: Some(opts.volume_mode.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Told how far an import has come: the admin CLI draws a progress bar from it.
pub trait Progress {
    /// The import of `total` volumes begins.
    fn start(&mut self, _total: usize) {}
    /// The next volume, `volume_id`, is being imported (the ones before it are done).
    fn step(&mut self, _volume_id: &str) {}
    /// All done (also after failures).
    fn finish(&mut self) {}
}

/// No progress reporting.
impl Progress for () {}

pub async fn run(
    client: &Client,
    driver: &Driver,
    opts: &ImportOptions,
    out: &mut impl Write,
) -> Result<(), ImportError> {
    run_with(client, driver, opts, out, &mut ()).await
}

/// [`run`], telling `progress` about each volume.
pub async fn run_with(
    client: &Client,
    driver: &Driver,
    opts: &ImportOptions,
    out: &mut impl Write,
    progress: &mut dyn Progress,
) -> Result<(), ImportError> {
    check_options(opts)?;
    let volumes = driver.list_volumes().await?;
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let pvs = api
        .list(&ListParams::default())
        .await
        .map_err(|source| ImportError::Api {
            what: "listing PersistentVolumes",
            source,
        })?;
    let mut has_pv: BTreeMap<String, String> = BTreeMap::new();
    for pv in &pvs.items {
        if o::csi_driver(pv) == Some(driver.name.as_str())
            && let Some(h) = o::volume_handle(pv)
        {
            has_pv.insert(h.to_owned(), o::name(&pv.metadata).to_owned());
        }
    }

    if !opts.all && opts.volumes.is_empty() {
        writeln!(out, "{:<60} {:>10}  PV", "VOLUME", "CAPACITY")?;
        for v in &volumes {
            let cap = format_bytes(u64::try_from(v.capacity_bytes).unwrap_or(0));
            let pv = has_pv
                .get(&v.volume_id)
                .map(String::as_str)
                .unwrap_or("<none>");
            writeln!(out, "{:<60} {:>10}  {pv}", v.volume_id, cap)?;
        }
        let free = volumes
            .iter()
            .filter(|v| !has_pv.contains_key(&v.volume_id))
            .count();
        writeln!(
            out,
            "{} volume(s) on {}, {free} without a PV; import with --all or by volume ID",
            volumes.len(),
            driver.name
        )?;
        return Ok(());
    }

    let by_id: BTreeMap<&str, &v1::Volume> =
        volumes.iter().map(|v| (v.volume_id.as_str(), v)).collect();
    let wanted: Vec<&str> = if opts.all {
        volumes.iter().map(|v| v.volume_id.as_str()).collect()
    } else {
        let mut seen = BTreeSet::new();
        opts.volumes
            .iter()
            .map(String::as_str)
            .filter(|v| seen.insert(*v))
            .collect()
    };
    let capabilities = opts
        .access_modes
        .iter()
        .map(|m| {
            plan::capability(
                m,
                opts.volume_mode == o::MODE_BLOCK,
                "",
                &[],
                driver.caps,
                &driver.name,
            )
            .map_err(|e| ImportError::Invalid(format!("--access-mode: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let (mut created, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    progress.start(wanted.len());
    for id in wanted {
        progress.step(id);
        if let Some(pv) = has_pv.get(id) {
            if !opts.all {
                writeln!(out, "skipped {id}: already has PV {pv}")?;
            }
            skipped += 1;
            continue;
        }
        let Some(vol) = by_id.get(id) else {
            writeln!(out, "failed  {id}: the driver lists no such volume")?;
            failed += 1;
            continue;
        };
        if vol.capacity_bytes <= 0 {
            writeln!(out, "failed  {id}: the driver reports no capacity for it")?;
            failed += 1;
            continue;
        }
        let context: BTreeMap<String, String> = vol.volume_context.clone().into_iter().collect();
        if let Err(msg) = driver.validate(id, context, capabilities.clone()).await? {
            writeln!(
                out,
                "failed  {id}: the driver cannot serve {} {}: {msg}",
                opts.volume_mode,
                opts.access_modes.join(",")
            )?;
            failed += 1;
            continue;
        }
        let pv = build_pv(&driver.name, vol, opts);
        let name = o::name(&pv.metadata).to_owned();
        let what = format!(
            "PV {name} for volume {id}: {}, {}, {}, reclaim {}, class {:?}",
            format_bytes(u64::try_from(vol.capacity_bytes).unwrap_or(0)),
            opts.access_modes.join(","),
            opts.volume_mode,
            opts.reclaim_policy,
            opts.storage_class
        );
        if opts.dry_run {
            writeln!(out, "would create {what}")?;
            created += 1;
            continue;
        }
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => {
                writeln!(out, "created {what}")?;
                created += 1;
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                writeln!(out, "skipped {id}: PV {name} already exists")?;
                skipped += 1;
            }
            Err(e) => {
                writeln!(out, "failed  {id}: creating PV {name}: {e}")?;
                failed += 1;
            }
        }
    }
    progress.finish();
    writeln!(
        out,
        "{} {created}, skipped {skipped}, failed {failed}",
        if opts.dry_run {
            "would import"
        } else {
            "imported"
        }
    )?;
    if failed > 0 {
        return Err(ImportError::Failed(failed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_names_are_valid_and_stable() {
        let n = pv_name_for_volume("default/db-data");
        assert!(n.starts_with("stowage-default-db-data-"), "{n}");
        assert_eq!(n, pv_name_for_volume("default/db-data"));
        assert_ne!(n, pv_name_for_volume("default/db_data"));
        let long = pv_name_for_volume(&format!("main/{}", "x".repeat(120)));
        assert!(long.len() <= 63, "{long}");
        for id in ["default/db-data", "///", "Main/ÄÖ", "a/b/c"] {
            let n = pv_name_for_volume(id);
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(!n.ends_with('-') && !n.contains("--stowage"), "{n}");
        }
    }

    #[test]
    fn imported_pv_retains_by_default() {
        let vol = v1::Volume {
            capacity_bytes: 5 << 30,
            volume_id: "default/old".into(),
            volume_context: Default::default(),
            content_source: None,
            accessible_topology: vec![],
        };
        let mut opts = ImportOptions {
            all: true,
            volumes: vec![],
            storage_class: "".into(),
            access_modes: vec!["ReadWriteOnce".into()],
            volume_mode: "Filesystem".into(),
            reclaim_policy: "Retain".into(),
            dry_run: false,
        };
        let pv = build_pv("local.stowage.io", &vol, &opts);
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "5Gi");
        assert_eq!(spec.csi.as_ref().unwrap().volume_handle, "default/old");
        assert!(pv.metadata.finalizers.is_none());
        assert!(!o::has_annotation(&pv.metadata, ANN_PROVISIONED_BY));
        opts.reclaim_policy = "Delete".into();
        let pv = build_pv("local.stowage.io", &vol, &opts);
        assert_eq!(
            o::annotation(&pv.metadata, ANN_PROVISIONED_BY),
            Some("local.stowage.io")
        );
        assert!(o::has_finalizer(&pv.metadata, FINALIZER));
        opts.reclaim_policy = "Keep".into();
        assert!(check_options(&opts).is_err());
    }
}
