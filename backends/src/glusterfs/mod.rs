//! `glusterfs.stowage.io`: a PV is a subdirectory of a configured gluster volume, and its size
//! is a gluster directory quota, so capacity is enforced (writes past it fail with EDQUOT; `df`
//! on the mount shows the size).
//!
//! - Controller: the shared directory-per-volume controller ([`crate::dirstore`]) over the
//!   controller's management mount of the volume ([`mgmt`]); quota limits through the gluster
//!   CLI ([`cli`], `--xml`) as [`crate::dirstore::DirHooks`] ([`quota`]). Expansion raises the
//!   limit online; snapshots and clones are copies through the management mount; Recycle
//!   empties the directory; DeleteVolume honours onDelete (delete | retain | archive).
//! - Node: FUSE mount of `server:/volume/dir` at the staging path, bind publishes, stats from
//!   the mount, and healing of dead FUSE mounts ([`node`]).
//!
//! Privileges. Controller: root (CAP_SYS_ADMIN) and /dev/fuse for the management mount, and
//! glusterd's unix socket (or an SSH key for a gluster server) for quota commands; glusterd
//! accepts management commands only over its unix socket, the CLI over TCP is read-only.
//! Node: root and /dev/fuse, the `glusterfs-client` package (mount.glusterfs).

pub mod cli;
pub mod config;
pub mod mgmt;
pub mod node;
pub mod quota;
pub mod volumes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use config::{GlusterConfig, GlusterInstance};
pub use node::GlusterNode;

use crate::controller::ControllerBackend;
use crate::dirstore::{DirBackend, DirOptions, Instance};
use crate::error::{Error, Result};
use cli::{Cli, Executor};
use mgmt::{MgmtFs, MgmtMount};
use quota::Quota;

pub const DRIVER: &str = "glusterfs.stowage.io";

/// glusterd's socket when the configuration names none (gluster's own default).
pub const DEFAULT_SOCKET: &str = "/var/run/glusterd.socket";

pub type GlusterController = DirBackend<MgmtFs>;

/// The CLI client an instance's configuration describes.
pub fn cli_for(cfg: &GlusterInstance) -> Cli {
    let executor = match (&cfg.glusterd.ssh, &cfg.glusterd.socket) {
        (Some(s), socket) => Executor::Ssh {
            host: s.host.clone(),
            socket: socket.clone(),
            user: s.user.clone(),
            port: s.port,
            identity_file: s.identity_file.clone(),
            known_hosts_file: s.known_hosts_file.clone(),
        },
        (None, sock) => Executor::Local {
            socket: sock.clone().unwrap_or_else(|| DEFAULT_SOCKET.into()),
        },
    };
    let mut cli = Cli::new(
        executor,
        cfg.glusterd.cli.clone(),
        Duration::from_secs(cfg.cli_timeout_secs),
    );
    cli.log_file = Some(cfg.state_dir.join("cli.log"));
    cli
}

/// The volume context nodes mount from.
fn context(cfg: &GlusterInstance) -> crate::dirstore::ContextFn {
    let server = cfg.servers[0].clone();
    let backups = cfg.servers[1..].join(",");
    let volume = cfg.volume.clone();
    let base = cfg.base().to_owned();
    let opts = cfg.mount_options.join(",");
    Arc::new(move |path| {
        let full = if base.is_empty() {
            format!("/{path}")
        } else {
            format!("/{base}/{path}")
        };
        let mut ctx = BTreeMap::from([
            (node::CTX_SERVER.to_string(), server.clone()),
            (node::CTX_VOLUME.to_string(), volume.clone()),
            (node::CTX_PATH.to_string(), full),
        ]);
        if !backups.is_empty() {
            ctx.insert(node::CTX_BACKUP_SERVERS.to_string(), backups.clone());
        }
        if !opts.is_empty() {
            ctx.insert(node::CTX_MOUNT_OPTIONS.to_string(), opts.clone());
        }
        ctx
    })
}

/// Builds the controller of the configured mode (one mode per configuration). Nothing is
/// mounted and glusterd is not asked anything until the first call, so the controller starts
/// (and answers Probe) while gluster is down.
pub async fn controller(c: &GlusterConfig) -> Result<Arc<dyn ControllerBackend>> {
    let modes: std::collections::BTreeSet<_> = c.instances.values().map(|i| i.mode).collect();
    if modes.len() > 1 {
        return Err(Error::invalid(
            "config",
            "all glusterfs instances of one configuration must use the same mode",
        ));
    }
    if modes.contains(&config::Mode::Volume) {
        return Ok(Arc::new(volumes::VolumeBackend::new(c)?));
    }
    Ok(Arc::new(subdir_controller(c).await?))
}

/// The subdirectory-per-PV controller.
pub async fn subdir_controller(c: &GlusterConfig) -> Result<GlusterController> {
    let mut instances = Vec::new();
    let mut hooks = Vec::new();
    for (name, cfg) in &c.instances {
        cfg.validate(name)?;
        let mut opts = cfg.mount_options.clone();
        if cfg.servers.len() > 1
            && !opts
                .iter()
                .any(|o| o.starts_with("backup-volfile-servers="))
        {
            opts.push(format!(
                "backup-volfile-servers={}",
                cfg.servers[1..].join(":")
            ));
        }
        // Beside the mount rather than /var/log/glusterfs/<mount path>.log.
        if !opts.iter().any(|o| o.starts_with("log-file=")) {
            let log = cfg.state_dir.join("mgmt").join(format!("{name}.log"));
            opts.push(format!("log-file={}", log.display()));
        }
        let mount = Arc::new(MgmtMount::new(
            format!("{}:/{}", cfg.servers[0], cfg.volume),
            cfg.state_dir.join("mgmt").join(name),
            opts,
            cfg.base().to_owned(),
        ));
        let settings = cfg.dir_settings();
        instances.push(Instance {
            name: name.clone(),
            fs: MgmtFs::new(mount),
            options: DirOptions {
                attrs: settings.attrs()?,
                block: false,
                max_volume_bytes: settings.max_volume_bytes,
            },
            context: context(cfg),
        });
        let cli = Arc::new(cli_for(cfg));
        hooks.push((
            name.clone(),
            Arc::new(Quota::new(
                cli,
                cfg.volume.clone(),
                cfg.base().to_owned(),
                cfg.manage_quota,
            )),
        ));
    }
    let mut backend = DirBackend::new(DRIVER, instances)?;
    for (name, q) in hooks {
        backend = backend.with_hooks(&name, q)?;
    }
    Ok(backend)
}
