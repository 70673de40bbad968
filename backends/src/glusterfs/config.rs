//! `backend: glusterfs` configuration: the gluster volume that holds the PVs, how nodes reach
//! it, and how the controller reaches glusterd.
//!
//! ```yaml
//! backend: glusterfs
//! instances:
//!   main:
//!     servers: [gluster-1, gluster-2]  # nodes mount from the first, the rest are backups
//!     volume: pvs                      # an existing, started gluster volume
//!     baseDir: stowage                 # directory inside it holding the PV directories
//!     glusterd:
//!       socket: /var/run/glusterd.socket   # controller runs beside glusterd (default)
//!       # ssh: {host: gluster-1, user: stowage, identityFile: /etc/stowage/ssh/id_ed25519}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::fs::DirSettings;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlusterConfig {
    pub instances: BTreeMap<String, GlusterInstance>,
}

impl GlusterConfig {
    /// Every instance is in subdir mode (which offers snapshots; volume mode does not).
    pub fn subdir_mode(&self) -> bool {
        self.instances.values().all(|i| i.mode == Mode::Subdir)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlusterInstance {
    /// Gluster servers as nodes (and the controller's management mount) reach them. The first
    /// serves the volume file; the others become `backup-volfile-servers`.
    pub servers: Vec<String>,
    /// `subdir` (default): a PV is a subdirectory of `volume`, sized by a directory quota.
    /// `volume`: a PV is a gluster volume of its own on `bricks`, sized by a quota on its root.
    #[serde(default)]
    pub mode: Mode,
    /// Subdir mode: the gluster volume holding one subdirectory per PV. It must exist and be
    /// started.
    #[serde(default)]
    pub volume: String,
    /// Volume mode: where each PV's bricks go (`<host>:<dir>/<volume>`; `<dir>` must exist
    /// on each host).
    #[serde(default)]
    pub bricks: Vec<BrickSpec>,
    /// Volume mode: replica count (the number of bricks must be a multiple of it).
    pub replica: Option<u32>,
    /// Volume mode: prefix of the gluster volumes Stowage makes (and the only ones it lists).
    #[serde(default = "default_prefix")]
    pub volume_prefix: String,
    /// Directory inside the volume that holds the PV directories ("" = the volume root).
    #[serde(default)]
    pub base_dir: String,
    /// How the controller reaches glusterd (the CLI over TCP is read-only).
    #[serde(default)]
    pub glusterd: GlusterdAccess,
    /// Seconds before one gluster CLI call is given up (and killed).
    #[serde(default = "default_cli_timeout")]
    pub cli_timeout_secs: u64,
    /// Controller: management mounts (`<stateDir>/mgmt/<instance>`) and the CLI log.
    /// Node: records of staged mounts (`<stateDir>/node/`), used to heal dead FUSE mounts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// FUSE mount options nodes use when the StorageClass gives no mountOptions; also used by
    /// the controller's management mount.
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// Enable quota on the volume and set features.soft-timeout/hard-timeout to 0 (without
    /// which gluster lets writes run far past a limit). Default true.
    #[serde(default = "yes")]
    pub manage_quota: bool,
    /// Mode of new volume directories, octal text as in chmod ("0775"). Default 0777.
    pub dir_mode: Option<String>,
    pub dir_uid: Option<u32>,
    pub dir_gid: Option<u32>,
    /// Largest volume handed out, in bytes (0 or absent = no limit).
    #[serde(default)]
    pub max_volume_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Subdir,
    Volume,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrickSpec {
    /// Brick host as glusterd knows its peers (not localhost/127.0.0.1: the CLI refuses them).
    pub host: String,
    /// Absolute directory on that host under which each PV gets a brick `<volume>`.
    pub dir: String,
}

fn default_prefix() -> String {
    "pv-".into()
}

/// Where the gluster CLI runs: on this machine against `socket` (default), or on `ssh.host`
/// (against `socket` there, when given).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlusterdAccess {
    /// glusterd's unix socket (default /var/run/glusterd.socket): on this machine, or with
    /// `ssh` on the SSH host.
    pub socket: Option<PathBuf>,
    /// Run the CLI on a gluster server over SSH (key authentication, BatchMode).
    pub ssh: Option<SshTarget>,
    /// The CLI program (default `gluster`).
    pub cli: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SshTarget {
    pub host: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_file: Option<PathBuf>,
    /// Pinned host keys; absent = the ssh client's defaults (StrictHostKeyChecking stays on).
    pub known_hosts_file: Option<PathBuf>,
}

fn default_cli_timeout() -> u64 {
    60
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/stowage/glusterfs")
}

fn yes() -> bool {
    true
}

/// Gluster volume names: letters, digits, '-' and '_' (what `gluster volume create` accepts).
pub fn valid_volume_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Host names or IP literals: nothing a mount source, an option list or a shell could misread.
pub fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('-')
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        })
}

impl GlusterInstance {
    pub fn dir_settings(&self) -> DirSettings {
        DirSettings {
            dir_mode: self.dir_mode.clone(),
            dir_uid: self.dir_uid,
            dir_gid: self.dir_gid,
            max_volume_bytes: self.max_volume_bytes,
        }
    }

    /// Refuses configurations that cannot work, naming the field.
    pub fn validate(&self, name: &str) -> Result<()> {
        let bad = |field: &str, why: String| {
            Error::invalid("config", format!("instances.{name}.{field}: {why}"))
        };
        if self.servers.is_empty() {
            return Err(bad("servers", "at least one server is required".into()));
        }
        for s in &self.servers {
            if !valid_host(s) {
                return Err(bad(
                    "servers",
                    format!("{s:?} is not a host name or IP address"),
                ));
            }
        }
        match self.mode {
            Mode::Subdir => {
                if !valid_volume_name(&self.volume) {
                    return Err(bad(
                        "volume",
                        format!("{:?} is not a gluster volume name", self.volume),
                    ));
                }
                if !self.bricks.is_empty() || self.replica.is_some() {
                    return Err(bad(
                        "bricks",
                        "bricks and replica belong to mode: volume".into(),
                    ));
                }
            }
            Mode::Volume => {
                if self.bricks.is_empty() {
                    return Err(bad(
                        "bricks",
                        "mode: volume needs at least one brick".into(),
                    ));
                }
                for b in &self.bricks {
                    if !valid_host(&b.host) || matches!(b.host.as_str(), "localhost" | "127.0.0.1")
                    {
                        return Err(bad("bricks", format!("{:?} is not a brick host", b.host)));
                    }
                    let d = b.dir.trim_end_matches('/');
                    if !d.starts_with('/')
                        || d.split('/').any(|c| c == ".." || c == ".")
                        || d.chars().any(|c| c.is_control() || c == ' ' || c == ':')
                        || d.len() < 2
                    {
                        return Err(bad(
                            "bricks",
                            format!("{:?} is not an absolute brick directory", b.dir),
                        ));
                    }
                }
                if let Some(r) = self.replica
                    && (r == 0 || !self.bricks.len().is_multiple_of(r as usize))
                {
                    return Err(bad(
                        "replica",
                        format!(
                            "{} bricks are not a multiple of replica {r}",
                            self.bricks.len()
                        ),
                    ));
                }
                if self.volume_prefix.is_empty()
                    || self.volume_prefix.len() > 16
                    || !valid_volume_name(&self.volume_prefix)
                {
                    return Err(bad(
                        "volumePrefix",
                        format!("{:?} must be 1-16 of [A-Za-z0-9_-]", self.volume_prefix),
                    ));
                }
                if !self.base().is_empty() {
                    return Err(bad("baseDir", "not used in mode: volume".into()));
                }
            }
        }
        let base = self.base_dir.trim_matches('/');
        if !base.is_empty() {
            crate::relpath::RelPath::parse("baseDir", base)
                .map_err(|e| bad("baseDir", e.to_string()))?;
        }
        if let Some(sock) = &self.glusterd.socket
            && (!sock.is_absolute() || sock.to_string_lossy().contains(['\n', '\0']))
        {
            return Err(bad(
                "glusterd.socket",
                format!("{} is not an absolute path", sock.display()),
            ));
        }
        if let Some(ssh) = &self.glusterd.ssh {
            if !valid_host(&ssh.host) {
                return Err(bad(
                    "glusterd.ssh.host",
                    format!("{:?} is not a host", ssh.host),
                ));
            }
            if let Some(u) = &ssh.user
                && (u.is_empty()
                    || u.starts_with('-')
                    || !u
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'))
            {
                return Err(bad(
                    "glusterd.ssh.user",
                    format!("{u:?} is not a user name"),
                ));
            }
        }
        let sd = self.state_dir.to_string_lossy();
        if !self.state_dir.is_absolute() || sd.contains([',', ' ', '\t', '\n']) {
            return Err(bad(
                "stateDir",
                format!(
                    "{sd:?} must be an absolute path without commas or spaces (it goes into mount options)"
                ),
            ));
        }
        if self.cli_timeout_secs == 0 {
            return Err(bad("cliTimeoutSecs", "must be at least 1".into()));
        }
        for o in &self.mount_options {
            super::node::check_option(o).map_err(|e| bad("mountOptions", e.to_string()))?;
        }
        self.dir_settings().attrs()?;
        Ok(())
    }

    /// The base directory inside the volume, without slashes ("" = root).
    pub fn base(&self) -> &str {
        self.base_dir.trim_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn parses_and_validates() {
        let c = Config::parse(
            "backend: glusterfs\ninstances:\n  main:\n    servers: [g1, 10.0.0.2]\n    volume: pvs\n    baseDir: /k8s/\n",
        )
        .unwrap();
        let Config::Glusterfs(g) = &c else {
            panic!("not glusterfs")
        };
        let i = &g.instances["main"];
        i.validate("main").unwrap();
        assert_eq!(i.base(), "k8s");
        assert!(i.manage_quota);
        assert_eq!(c.driver_name(), "glusterfs.stowage.io");
    }

    #[test]
    fn the_example_is_valid() {
        let c = Config::parse(include_str!("../../../examples/glusterfs.yaml")).unwrap();
        let Config::Glusterfs(g) = c else {
            panic!("not glusterfs")
        };
        for (name, i) in &g.instances {
            i.validate(name).unwrap();
        }
    }

    #[test]
    fn refuses_bad_instances() {
        for (bad, field) in [
            ("servers: []\n    volume: v", "servers"),
            ("servers: ['-oops']\n    volume: v", "servers"),
            ("servers: [g]\n    volume: 'a b'", "volume"),
            (
                "servers: [g]\n    volume: v\n    baseDir: a/../b",
                "baseDir",
            ),
            (
                "servers: [g]\n    volume: v\n    cliTimeoutSecs: 0",
                "cliTimeoutSecs",
            ),
            (
                "servers: [g]\n    volume: v\n    stateDir: rel/dir",
                "stateDir",
            ),
            ("servers: [g]\n    mode: volume", "bricks"),
            (
                "servers: [g]\n    mode: volume\n    bricks: [{host: localhost, dir: /b}]",
                "bricks",
            ),
            (
                "servers: [g]\n    mode: volume\n    bricks: [{host: g, dir: rel}]",
                "bricks",
            ),
            (
                "servers: [g]\n    mode: volume\n    bricks: [{host: g, dir: /b}]\n    replica: 2",
                "replica",
            ),
            ("servers: [g]\n    volume: v\n    replica: 2", "bricks"),
            (
                "servers: [g]\n    volume: v\n    mountOptions: ['a b']",
                "mountOptions",
            ),
            (
                "servers: [g]\n    volume: v\n    glusterd: {socket: rel, ssh: {host: h}}",
                "glusterd.socket",
            ),
            (
                "servers: [g]\n    volume: v\n    glusterd: {ssh: {host: 'h;rm'}}",
                "glusterd.ssh.host",
            ),
        ] {
            let text = format!("backend: glusterfs\ninstances:\n  m:\n    {bad}\n");
            let err = match Config::parse(&text) {
                Err(e) => e,
                Ok(Config::Glusterfs(g)) => g.instances["m"].validate("m").unwrap_err(),
                Ok(_) => panic!("wrong backend"),
            };
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }
}
