//! Volume-per-PV mode (`mode: volume`): each PV is its own gluster volume, for users who need
//! isolation (own bricks, own volume options, own auth). Bricks are
//! `<host>:<dir>/<volume>` on the configured brick hosts (`replica` copies); the size is
//! a quota on the volume root, strict like in subdir mode.
//!
//! State lives in glusterd, nowhere else: the CSI name, capacity and delete policy are
//! `user.stowage.*` options of the volume, and `user.stowage.ready=yes` is set last, so a
//! volume that a failure or a crash left half made is invisible to Get/List and finished (or
//! cleaned up) by the next CreateVolume/DeleteVolume of the same name.
//!
//! Delete: `volume stop`, `volume delete`, then the brick directories are removed (gluster
//! leaves them behind): on this machine with the socket executor (controller beside glusterd,
//! bricks there too), or on each brick host over SSH with the SSH executor.
//! No snapshots or clones here: gluster's own snapshots need thinly provisioned LVM bricks.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::cli::{Cli, Executor, Node, op_error};
use super::config::{GlusterConfig, GlusterInstance};
use super::quota::STRICT_OPTIONS;
use crate::controller::{ControllerBackend, ControllerFeatures, Expanded};
use crate::dirstore::DEFAULT_CAPACITY;
use crate::error::{Error, Result};
use crate::locks::KeyLocks;
use crate::params::{self, OnDelete};
use crate::relpath::RelPath;
use crate::types::{AccessType, Capability, CapacityRange, CreateVolume, Page, Secrets, Volume};
use crate::volume_id::VolumeId;

const OPT_NAME: &str = "user.stowage.name-hex";
const OPT_CAPACITY: &str = "user.stowage.capacity";
const OPT_ON_DELETE: &str = "user.stowage.ondelete";
const OPT_READY: &str = "user.stowage.ready";

struct VolInstance {
    cfg: GlusterInstance,
    cli: Arc<Cli>,
}

pub struct VolumeBackend {
    instances: BTreeMap<String, VolInstance>,
    locks: KeyLocks,
}

/// A gluster volume as `volume info` describes it.
#[derive(Debug, Clone)]
struct Info {
    name: String,
    started: bool,
    options: BTreeMap<String, String>,
}

impl Info {
    fn from_node(v: &Node) -> Info {
        let mut options = BTreeMap::new();
        if let Some(opts) = v.child("options") {
            for o in opts.children.iter().filter(|o| o.name == "option") {
                if let (Some(k), Some(val)) = (o.text_at("name"), o.text_at("value")) {
                    options.insert(k.to_owned(), val.to_owned());
                }
            }
        }
        Info {
            name: v.text_at("name").unwrap_or_default().to_owned(),
            started: v.text_at("statusStr") == Some("Started"),
            options,
        }
    }
    fn ready(&self) -> bool {
        self.options.get(OPT_READY).map(String::as_str) == Some("yes")
    }
    fn capacity(&self) -> u64 {
        self.options
            .get(OPT_CAPACITY)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
    fn csi_name(&self) -> Option<String> {
        let h = self.options.get(OPT_NAME)?;
        hex::decode(h).ok().and_then(|b| String::from_utf8(b).ok())
    }
}

/// The gluster volume name for a CSI name: readable when the name allows, else a hash.
pub fn volume_name_for(prefix: &str, name: &str) -> String {
    let safe = !name.is_empty()
        && name.len() + prefix.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if safe {
        format!("{prefix}{name}")
    } else {
        use sha2::Digest;
        let mut h = hex::encode(sha2::Sha256::digest(name.as_bytes()));
        h.truncate(32);
        format!("{prefix}{h}")
    }
}

fn ignore_if(r: &super::cli::Reply, args: &[&str], harmless: &[&str]) -> Result<()> {
    if r.op_ret == 0 || harmless.iter().any(|h| r.op_errstr.contains(h)) {
        Ok(())
    } else {
        Err(op_error(args, r))
    }
}

impl VolumeBackend {
    pub fn new(c: &GlusterConfig) -> Result<Self> {
        let mut instances = BTreeMap::new();
        for (name, cfg) in &c.instances {
            cfg.validate(name)?;
            crate::volume_id::validate_instance_name(name)?;
            let mut cli = super::cli_for(cfg);
            cli.log_file = Some(cfg.state_dir.join("cli.log"));
            instances.insert(
                name.clone(),
                VolInstance {
                    cfg: cfg.clone(),
                    cli: Arc::new(cli),
                },
            );
        }
        if instances.is_empty() {
            return Err(Error::invalid("instances", "at least one is required"));
        }
        Ok(VolumeBackend {
            instances,
            locks: KeyLocks::default(),
        })
    }

    fn choose(&self, parameters: &BTreeMap<String, String>) -> Result<(&String, &VolInstance)> {
        if let Some(n) = parameters.get(params::INSTANCE) {
            return self.instances.get_key_value(n).ok_or_else(|| {
                Error::invalid("parameters.instance", format!("{n:?} is not configured"))
            });
        }
        if self.instances.len() == 1 {
            return self
                .instances
                .iter()
                .next()
                .ok_or_else(|| Error::Internal("no instance".into()));
        }
        self.instances
            .get_key_value("default")
            .ok_or_else(|| Error::invalid("parameters.instance", "required: several instances"))
    }

    fn parse_id(&self, s: &str) -> Result<Option<(&VolInstance, String)>> {
        let id = VolumeId::parse("volume_id", s)?;
        if id.path.components().count() != 1 || !super::config::valid_volume_name(id.path.as_str())
        {
            return Ok(None);
        }
        Ok(self
            .instances
            .get(&id.instance)
            .map(|i| (i, id.path.as_str().to_owned())))
    }

    async fn info(inst: &VolInstance, vol: &str) -> Result<Option<Info>> {
        let args = ["volume", "info", vol];
        let r = inst.cli.call(&args).await?;
        if r.op_ret != 0 {
            if r.op_errstr.contains("does not exist") {
                return Ok(None);
            }
            return Err(op_error(&args, &r));
        }
        let mut vols = Vec::new();
        r.root.find_all("volume", &mut vols);
        Ok(vols.first().map(|v| Info::from_node(v)))
    }

    fn to_volume(inst_name: &str, inst: &VolInstance, info: &Info) -> Result<Volume> {
        let id = VolumeId::new(inst_name, RelPath::component("volume", &info.name)?)?;
        let mut context = BTreeMap::from([
            (
                super::node::CTX_SERVER.to_string(),
                inst.cfg.servers[0].clone(),
            ),
            (super::node::CTX_VOLUME.to_string(), info.name.clone()),
            (super::node::CTX_PATH.to_string(), "/".to_string()),
        ]);
        if inst.cfg.servers.len() > 1 {
            context.insert(
                super::node::CTX_BACKUP_SERVERS.to_string(),
                inst.cfg.servers[1..].join(","),
            );
        }
        if !inst.cfg.mount_options.is_empty() {
            context.insert(
                super::node::CTX_MOUNT_OPTIONS.to_string(),
                inst.cfg.mount_options.join(","),
            );
        }
        Ok(Volume {
            id: id.to_string(),
            capacity_bytes: info.capacity(),
            context,
            source: None,
            topology: Vec::new(),
        })
    }

    async fn set(inst: &VolInstance, vol: &str, key: &str, value: &str) -> Result<()> {
        let args = ["volume", "set", vol, key, value];
        let r = inst.cli.volume_call(vol, &args).await?;
        ignore_if(&r, &args, &[])
    }

    /// Every step of a create, each skipped when already done: also finishes a half volume.
    async fn build(
        inst: &VolInstance,
        vol: &str,
        name: &str,
        capacity: u64,
        on_delete: &str,
        existing: Option<&Info>,
    ) -> Result<()> {
        let cli = &inst.cli;
        if existing.is_none() {
            let mut args: Vec<String> = vec!["volume".into(), "create".into(), vol.into()];
            if let Some(r) = inst.cfg.replica.filter(|r| *r > 1) {
                args.extend(["replica".into(), r.to_string()]);
            }
            for b in &inst.cfg.bricks {
                args.push(format!("{}:{}/{vol}", b.host, b.dir.trim_end_matches('/')));
            }
            // force: brick directories on a root filesystem are refused without it.
            args.push("force".into());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = cli.volume_call(vol, &refs).await?;
            ignore_if(&r, &refs, &["already exists"])?;
        }
        let info = Self::info(inst, vol)
            .await?
            .ok_or_else(|| Error::Internal(format!("volume {vol} vanished while being created")))?;
        if !info.options.contains_key(OPT_NAME) {
            Self::set(inst, vol, OPT_NAME, &hex::encode(name.as_bytes())).await?;
        }
        Self::set(inst, vol, OPT_ON_DELETE, on_delete).await?;
        if !info.started {
            let args = ["volume", "start", vol];
            let r = cli.volume_call(vol, &args).await?;
            ignore_if(&r, &args, &["already started"])?;
        }
        let args = ["volume", "quota", vol, "enable"];
        let r = cli.volume_call(vol, &args).await?;
        ignore_if(&r, &args, &["already enabled"])?;
        for (k, v) in STRICT_OPTIONS {
            if info.options.get(*k).map(String::as_str) != Some(*v) {
                Self::set(inst, vol, k, v).await?;
            }
        }
        let bytes = capacity.to_string();
        let args = ["volume", "quota", vol, "limit-usage", "/", bytes.as_str()];
        let r = cli.volume_call(vol, &args).await?;
        ignore_if(&r, &args, &[])?;
        Self::set(inst, vol, OPT_CAPACITY, &bytes).await?;
        Self::set(inst, vol, OPT_READY, "yes").await
    }

    /// Stops and deletes the volume, then removes its brick directories.
    async fn destroy(inst: &VolInstance, vol: &str) -> Result<()> {
        let cli = &inst.cli;
        let args = ["volume", "stop", vol, "force"];
        let r = cli.volume_call(vol, &args).await?;
        ignore_if(&r, &args, &["not in the started state", "does not exist"])?;
        let args = ["volume", "delete", vol];
        let r = cli.volume_call(vol, &args).await?;
        ignore_if(&r, &args, &["does not exist"])?;
        for b in &inst.cfg.bricks {
            let dir = format!("{}/{vol}", b.dir.trim_end_matches('/'));
            remove_brick_dir(&inst.cli.executor, &b.host, &dir, inst.cli.timeout).await?;
        }
        Ok(())
    }
}

/// Removes `dir` on the brick host: locally with the socket executor, over SSH otherwise.
async fn remove_brick_dir(
    executor: &Executor,
    host: &str,
    dir: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    match executor {
        Executor::Local { .. } => match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing brick directory {dir}"), e)),
        },
        Executor::Ssh {
            user,
            port,
            identity_file,
            known_hosts_file,
            ..
        } => {
            let mut a: Vec<String> = vec!["-o".into(), "BatchMode=yes".into(), "-T".into()];
            if let Some(p) = port {
                a.extend(["-p".into(), p.to_string()]);
            }
            if let Some(i) = identity_file {
                a.extend(["-i".into(), i.display().to_string()]);
            }
            if let Some(k) = known_hosts_file {
                a.extend(["-o".into(), format!("UserKnownHostsFile={}", k.display())]);
            }
            if let Some(u) = user {
                a.extend(["-l".into(), u.clone()]);
            }
            a.extend([
                "--".into(),
                host.to_owned(),
                format!("rm -rf -- {}", super::cli::shell_quote(dir)),
            ]);
            crate::command::run("ssh", &a, timeout).await.map(|_| ())
        }
    }
}

#[async_trait]
impl ControllerBackend for VolumeBackend {
    fn driver_name(&self) -> &'static str {
        super::DRIVER
    }

    fn features(&self) -> ControllerFeatures {
        ControllerFeatures {
            snapshots: false,
            clone: false,
            expand: true,
            publish: false,
            capacity: false,
            single_node_multi_writer: true,
            modify: false,
        }
    }

    fn check_capabilities(&self, caps: &[Capability]) -> Result<()> {
        if caps
            .iter()
            .any(|c| matches!(c.access_type, AccessType::Block))
        {
            return Err(Error::invalid(
                "volume_capabilities",
                "GlusterFS volumes are filesystems: raw block access is not supported",
            ));
        }
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        let (inst_name, inst) = self.choose(&req.parameters)?;
        params::check_known(&req.parameters, &[params::INSTANCE, params::ON_DELETE])?;
        let on_delete = req
            .parameters
            .get(params::ON_DELETE)
            .map(|s| OnDelete::parse(s))
            .transpose()?
            .unwrap_or_default();
        let on_delete = match on_delete {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        };
        self.check_capabilities(&req.capabilities)?;
        if req.source.is_some() {
            return Err(Error::Unsupported(
                "volume content sources in volume-per-PV mode".into(),
            ));
        }
        let capacity = req.capacity.choose(DEFAULT_CAPACITY);
        let max = inst.cfg.max_volume_bytes;
        if (max > 0 && capacity > max) || !req.capacity.admits(capacity) {
            return Err(Error::OutOfRange(format!(
                "capacity_range {:?} cannot be satisfied (limit {max})",
                req.capacity
            )));
        }
        let vol = volume_name_for(&inst.cfg.volume_prefix, &req.name);
        let _g = self.locks.lock(&format!("{inst_name}/{vol}")).await;
        let existing = Self::info(inst, &vol).await?;
        if let Some(info) = &existing {
            match info.csi_name() {
                Some(n) if n != req.name => {
                    return Err(Error::AlreadyExists(format!(
                        "gluster volume {vol} holds volume {n:?}"
                    )));
                }
                None if !info.options.contains_key(OPT_CAPACITY) && info.ready() => {
                    return Err(Error::AlreadyExists(format!(
                        "gluster volume {vol} exists and is not managed by Stowage"
                    )));
                }
                _ => {}
            }
            if info.ready() {
                if !req.capacity.admits(info.capacity()) {
                    return Err(Error::AlreadyExists(format!(
                        "volume {:?} exists with capacity {}",
                        req.name,
                        info.capacity()
                    )));
                }
                return Self::to_volume(inst_name, inst, info);
            }
            tracing::info!(volume = %vol, "finishing a half-made gluster volume");
        }
        if let Err(e) = Self::build(
            inst,
            &vol,
            &req.name,
            capacity,
            on_delete,
            existing.as_ref(),
        )
        .await
        {
            // Best effort: no half volume left behind when glusterd lets us clean up.
            if Self::destroy(inst, &vol).await.is_ok() {
                tracing::warn!(volume = %vol, error = %e, "create failed; volume removed again");
            }
            return Err(e);
        }
        let info = Self::info(inst, &vol)
            .await?
            .ok_or_else(|| Error::Internal(format!("volume {vol} vanished after create")))?;
        Self::to_volume(inst_name, inst, &info)
    }

    async fn delete_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        let Some((inst, vol)) = self.parse_id(volume_id)? else {
            return Ok(());
        };
        let _g = self.locks.lock(volume_id).await;
        let Some(info) = Self::info(inst, &vol).await? else {
            return Ok(());
        };
        if !info.options.contains_key(OPT_NAME) {
            // Not one Stowage made: never touch it.
            return Ok(());
        }
        match info.options.get(OPT_ON_DELETE).map(String::as_str) {
            Some("retain") if info.ready() => {
                // Released, but kept with its data; it no longer counts as a volume.
                return Self::set(inst, &vol, OPT_READY, "retained").await;
            }
            Some("archive") if info.ready() => {
                let args = ["volume", "stop", vol.as_str(), "force"];
                let r = inst.cli.volume_call(&vol, &args).await?;
                ignore_if(&r, &args, &["not in the started state"])?;
                return Self::set(inst, &vol, OPT_READY, "archived").await;
            }
            _ => {}
        }
        Self::destroy(inst, &vol).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Volume> {
        let Some((inst, vol)) = self.parse_id(volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let inst_name = VolumeId::parse("volume_id", volume_id)?.instance;
        match Self::info(inst, &vol).await? {
            Some(info) if info.ready() => Self::to_volume(&inst_name, inst, &info),
            _ => Err(Error::not_found("volume", volume_id)),
        }
    }

    async fn list_volumes(&self, start: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let mut all = Vec::new();
        for (name, inst) in &self.instances {
            let args = ["volume", "info"];
            let r = inst.cli.call(&args).await?;
            if r.op_ret != 0 {
                if r.op_errstr.contains("No volumes present") {
                    continue;
                }
                return Err(op_error(&args, &r));
            }
            let mut vols = Vec::new();
            r.root.find_all("volume", &mut vols);
            for v in vols {
                let info = Info::from_node(v);
                if info.ready() && info.name.starts_with(&inst.cfg.volume_prefix) {
                    all.push(Self::to_volume(name, inst, &info)?);
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let begin = match start.filter(|s| !s.is_empty()) {
            None => 0,
            Some(t) => {
                VolumeId::parse("starting_token", t)
                    .map_err(|_| Error::Aborted(format!("starting_token {t:?} is not valid")))?;
                all.partition_point(|v| v.id.as_str() <= t)
            }
        };
        let max = if max == 0 { usize::MAX } else { max };
        let end = begin.saturating_add(max).min(all.len());
        let next_token = (end < all.len()).then(|| all[end - 1].id.clone());
        Ok(Page {
            items: all[begin..end].to_vec(),
            next_token,
        })
    }

    async fn capacity(&self, _parameters: &BTreeMap<String, String>) -> Result<u64> {
        Err(Error::Unsupported(
            "GetCapacity in volume-per-PV mode".into(),
        ))
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _secrets: &Secrets,
    ) -> Result<Expanded> {
        let Some((inst, vol)) = self.parse_id(volume_id)? else {
            return Err(Error::not_found("volume", volume_id));
        };
        let _g = self.locks.lock(volume_id).await;
        let info = match Self::info(inst, &vol).await? {
            Some(i) if i.ready() => i,
            _ => return Err(Error::not_found("volume", volume_id)),
        };
        let want = range.choose(info.capacity());
        let max = inst.cfg.max_volume_bytes;
        if max > 0 && want > max {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {want} bytes is more than the limit of {max}"
            )));
        }
        if want > info.capacity() {
            let bytes = want.to_string();
            let args = [
                "volume",
                "quota",
                vol.as_str(),
                "limit-usage",
                "/",
                bytes.as_str(),
            ];
            let r = inst.cli.volume_call(&vol, &args).await?;
            ignore_if(&r, &args, &[])?;
            Self::set(inst, &vol, OPT_CAPACITY, &bytes).await?;
        }
        Ok(Expanded {
            capacity_bytes: want.max(info.capacity()),
            node_expansion_required: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_gluster_volume_names() {
        assert_eq!(volume_name_for("pv-", "pvc-1"), "pv-pvc-1");
        for n in ["a/b", "x.y", &"z".repeat(100), "ünï"] {
            let v = volume_name_for("pv-", n);
            assert!(super::super::config::valid_volume_name(&v), "{v}");
            assert_eq!(v, volume_name_for("pv-", n));
        }
    }
}
