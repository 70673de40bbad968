//! The YAML configuration file: the backends a process serves and their named instances.
//!
//! Two forms. One backend, as every file before multi-backend support was written:
//!
//! ```yaml
//! backend: nfs
//! instances:
//!   main:
//!     server: 10.0.0.5
//!     export: /export
//!     baseDir: stowage
//! ```
//!
//! Or a `backends:` list whose entries are exactly such documents, at most one per backend
//! kind, so that one stowage-controller and one stowage-node serve every driver (one socket
//! per driver, since CSIDriver settings such as attachRequired differ per driver):
//!
//! ```yaml
//! backends:
//!   - backend: local
//!     instances:
//!       default: { baseDir: /var/lib/stowage/local }
//!   - backend: nfs
//!     instances:
//!       main: { server: 10.0.0.5, export: /export, baseDir: stowage }
//! ```
//!
//! Several instances of a backend (NFS servers, base directories) live in its one entry;
//! StorageClass parameter `instance` picks one. Secrets never go here: they come in CSI
//! requests.
//!
//! Each backend module owns its instance type (`local::config`, `nfs::config`, ...); this
//! module only assembles them, so nothing below it depends on it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};

pub use crate::fs::DirSettings;
pub use crate::glusterfs::GlusterConfig;
pub use crate::local::LocalInstance;
pub use crate::nfs::NfsInstance;
pub use crate::rbd::RbdInstance;
pub use crate::s3::{S3Config, S3Instance};

/// The values of `backend:`, in the order error messages list them.
pub const KINDS: &[&str] = &["local", "nfs", "glusterfs", "s3", "rbd"];

/// The placeholder in per-driver flags (`--endpoint`, `--kubelet-registration-path`).
pub const DRIVER_PLACEHOLDER: &str = "{driver}";

/// One backend and its instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum Config {
    Local(Instances<LocalInstance>),
    Nfs(Instances<NfsInstance>),
    S3(S3Config),
    Glusterfs(GlusterConfig),
    Rbd(Instances<RbdInstance>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instances<T> {
    pub instances: BTreeMap<String, T>,
}

/// A whole configuration file: the backends one process serves, at most one of each kind,
/// in the order the file gives them.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub backends: Vec<Config>,
}

impl ConfigFile {
    pub fn parse(text: &str) -> Result<Self> {
        let outline: Outline =
            serde_saphyr::from_str(text).map_err(|e| Error::invalid("config", e))?;
        let Some(entries) = outline.backends else {
            // Today's single-backend form, parsed exactly as before.
            let cfg: Config =
                serde_saphyr::from_str(text).map_err(|e| Error::invalid("config", e))?;
            cfg.validate().map_err(|e| Error::invalid("config", e))?;
            return Ok(ConfigFile {
                backends: vec![cfg],
            });
        };
        if let Some(other) = outline.keys.iter().find(|k| *k != "backends") {
            return Err(Error::invalid(
                "config",
                format!(
                    "{other}: a file with a backends: list has no other top-level keys \
                     (move {other} into an entry of backends)"
                ),
            ));
        }
        check_kinds(&entries.0).map_err(|e| Error::invalid("config", e))?;
        // Without the source snippet: it would show the start of the list, not the entry the
        // message names.
        let list: List = serde_saphyr::from_str(text)
            .map_err(|e| Error::invalid("config", e.without_snippet()))?;
        for (i, cfg) in list.backends.0.iter().enumerate() {
            cfg.validate()
                .map_err(|e| Error::invalid("config", format!("backends[{i}].{e}")))?;
        }
        Ok(ConfigFile {
            backends: list.backends.0,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => {
                Error::invalid("config", format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// The driver names, in file order.
    pub fn drivers(&self) -> Vec<&'static str> {
        self.backends.iter().map(Config::driver_name).collect()
    }

    /// The one backend of a single-backend file; programs that serve one driver use it.
    pub fn into_single(self) -> Result<Config> {
        let drivers = self.drivers().join(", ");
        let mut backends = self.backends;
        match backends.len() {
            1 => Ok(backends.remove(0)),
            n => Err(Error::invalid(
                "config",
                format!(
                    "backends: this program serves one backend; the file lists {n} ({drivers})"
                ),
            )),
        }
    }

    /// Checks a per-driver setting such as `--endpoint`: with more than one backend it must
    /// contain `{driver}`, or every driver would claim the same socket.
    pub fn check_per_driver(&self, flag: &str, value: &str) -> std::result::Result<(), String> {
        if self.backends.len() > 1 && !value.contains(DRIVER_PLACEHOLDER) {
            return Err(format!(
                "{flag} {value:?} must contain {DRIVER_PLACEHOLDER} when the configuration \
                 names several backends ({}), e.g. unix:///csi/{DRIVER_PLACEHOLDER}.sock",
                self.drivers().join(", ")
            ));
        }
        Ok(())
    }
}

/// `value` with `{driver}` replaced by the driver name.
pub fn per_driver(value: &str, driver: &str) -> String {
    value.replace(DRIVER_PLACEHOLDER, driver)
}

impl Config {
    /// Parses a single-backend file (or a `backends:` list of exactly one).
    pub fn parse(text: &str) -> Result<Self> {
        ConfigFile::parse(text)?.into_single()
    }

    /// Loads a single-backend file (or a `backends:` list of exactly one).
    pub fn load(path: &Path) -> Result<Self> {
        ConfigFile::load(path)?.into_single()
    }

    /// What serde cannot check: at least one instance, and instance names that fit in a
    /// volume ID. The error starts with the field it names.
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.built_in() {
            let kind = self.kind();
            return Err(format!(
                "backend: {kind}: this build of Stowage has no {kind} support (built without \
                 cargo feature {kind:?}; the default build has every backend)"
            ));
        }
        let names: Vec<&String> = match self {
            Config::Local(i) => i.instances.keys().collect(),
            Config::Nfs(i) => i.instances.keys().collect(),
            Config::S3(i) => i.instances.keys().collect(),
            Config::Glusterfs(i) => i.instances.keys().collect(),
            Config::Rbd(i) => i.instances.keys().collect(),
        };
        if names.is_empty() {
            return Err("instances: at least one instance is required".into());
        }
        for n in names {
            crate::volume_id::validate_instance_name(n).map_err(|_| {
                format!("instances: instance name {n:?} must be 1-32 of [a-z0-9-_]")
            })?;
        }
        Ok(())
    }

    /// Whether the backend's controller offers snapshots (and so group snapshots). Node
    /// plugins need it too: plugin capabilities describe the driver, whichever endpoint is asked.
    pub fn offers_snapshots(&self) -> bool {
        match self {
            Config::Local(_) | Config::Nfs(_) => true,
            // Subdir mode only: copies through the management mount.
            Config::Glusterfs(c) => c.subdir_mode(),
            // Server-side copies of the bucket or prefix.
            Config::S3(_) => true,
            // RBD snapshots.
            Config::Rbd(_) => true,
        }
    }

    /// The `backend:` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Config::Local(_) => "local",
            Config::Nfs(_) => "nfs",
            Config::S3(_) => "s3",
            Config::Glusterfs(_) => "glusterfs",
            Config::Rbd(_) => "rbd",
        }
    }

    /// Whether this binary was built with the backend (its cargo feature, all on by default).
    pub fn built_in(&self) -> bool {
        match self {
            Config::Local(_) => cfg!(feature = "local"),
            Config::Nfs(_) => cfg!(feature = "nfs"),
            Config::S3(_) => cfg!(feature = "s3"),
            Config::Glusterfs(_) => cfg!(feature = "glusterfs"),
            Config::Rbd(_) => cfg!(feature = "rbd"),
        }
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            Config::Local(_) => crate::local::DRIVER,
            Config::Nfs(_) => crate::nfs::DRIVER,
            Config::S3(_) => crate::s3::DRIVER,
            Config::Glusterfs(_) => crate::glusterfs::DRIVER,
            Config::Rbd(_) => crate::rbd::DRIVER,
        }
    }
}

/// Entry `i` of `backends:` names a kind, a known one, and one no earlier entry named.
fn check_kinds(entries: &[EntryOutline]) -> std::result::Result<(), String> {
    if entries.is_empty() {
        return Err("backends: the list is empty; name at least one backend".into());
    }
    let known = KINDS.join(", ");
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(kind) = e.backend.as_deref() else {
            return Err(format!("backends[{i}].backend: missing (one of {known})"));
        };
        if !KINDS.contains(&kind) {
            return Err(format!(
                "backends[{i}].backend: unknown backend {kind:?} (one of {known})"
            ));
        }
        if let Some(first) = seen.insert(kind, i) {
            return Err(format!(
                "backends[{i}].backend: {kind} is already configured by backends[{first}]; \
                 list each backend once, with all its instances in that entry"
            ));
        }
    }
    Ok(())
}

/// The file's top-level keys and, for the list form, each entry's `backend:`. Read first so
/// the form can be told apart and the list checked with messages that name the entry.
struct Outline {
    keys: Vec<String>,
    backends: Option<Indexed<EntryOutline>>,
}

impl<'de> Deserialize<'de> for Outline {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Outline;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping with `backend:` or `backends:`")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Outline, A::Error> {
                let mut out = Outline {
                    keys: Vec::new(),
                    backends: None,
                };
                while let Some(k) = m.next_key::<String>()? {
                    if k == "backends" {
                        out.backends = Some(m.next_value()?);
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                    out.keys.push(k);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// An entry of `backends:` reduced to its `backend:` value.
struct EntryOutline {
    backend: Option<String>,
}

impl<'de> Deserialize<'de> for EntryOutline {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EntryOutline;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping with `backend:` and `instances:`")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<EntryOutline, A::Error> {
                let mut backend = None;
                while let Some(k) = m.next_key::<String>()? {
                    if k == "backend" {
                        backend = Some(m.next_value::<String>()?);
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(EntryOutline { backend })
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct List {
    backends: Indexed<Config>,
}

/// A sequence whose element errors say which element: `backends[1]: unknown field ...`.
struct Indexed<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Indexed<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Indexed<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of backends")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<Indexed<T>, A::Error> {
                let mut out = Vec::new();
                loop {
                    let i = out.len();
                    match s.next_element::<T>() {
                        Ok(Some(v)) => out.push(v),
                        Ok(None) => return Ok(Indexed(out)),
                        Err(e) => return Err(de::Error::custom(format!("backends[{i}]: {e}"))),
                    }
                }
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_examples() {
        let c = Config::parse(
            "backend: local\ninstances:\n  default:\n    baseDir: /tmp/x\n    dirMode: \"0750\"\n",
        )
        .unwrap();
        let Config::Local(l) = &c else {
            panic!("not local")
        };
        assert_eq!(
            l.instances["default"].dir_settings().attrs().unwrap().mode,
            0o750
        );
        assert!(l.instances["default"].block);
        let c = Config::parse(
            "backend: nfs\ninstances:\n  main:\n    server: 127.0.0.1\n    export: /export\n    mountOptions: [nfsvers=4.1]\n",
        )
        .unwrap();
        assert_eq!(c.driver_name(), "nfs.stowage.io");
    }

    #[test]
    fn refuses_bad_config() {
        for bad in [
            "backend: zfs\ninstances: {}\n",
            "backend: local\ninstances: {}\n",
            "backend: local\ninstances:\n  default:\n    baseDir: /x\n    bogus: 1\n",
            "backend: local\ninstances:\n  Bad_Name:\n    baseDir: /x\n",
            "backend: nfs\ninstances:\n  a:\n    export: /e\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        let e = Config::parse(
            "backend: local\ninstances:\n  d:\n    baseDir: /x\n    dirMode: \"999\"\n",
        )
        .unwrap()
        .clone();
        let Config::Local(l) = e else { panic!() };
        assert!(l.instances["d"].dir_settings().attrs().is_err());
    }

    const TWO: &str = "backends:\n  - backend: local\n    instances:\n      default: { baseDir: /tmp/l }\n  - backend: nfs\n    instances:\n      main: { server: 10.0.0.5, export: /export, baseDir: stowage }\n";

    fn err(text: &str) -> String {
        match ConfigFile::parse(text) {
            Ok(c) => panic!("accepted {text}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_a_backends_list() {
        let f = ConfigFile::parse(TWO).unwrap();
        assert_eq!(f.drivers(), ["local.stowage.io", "nfs.stowage.io"]);
        let Config::Nfs(n) = &f.backends[1] else {
            panic!("second entry is not nfs")
        };
        assert_eq!(n.instances["main"].base_dir, "stowage");
        // A single-backend program refuses a file with two, naming them.
        let e = f.into_single().unwrap_err().to_string();
        assert!(
            e.contains("lists 2 (local.stowage.io, nfs.stowage.io)"),
            "{e}"
        );
        // A list of one is as good as today's form.
        let one = "backends:\n  - backend: local\n    instances:\n      default: { baseDir: /x }\n";
        assert_eq!(
            Config::parse(one).unwrap().driver_name(),
            "local.stowage.io"
        );
        // Today's form is a file of one backend.
        let f =
            ConfigFile::parse("backend: local\ninstances:\n  default: { baseDir: /x }\n").unwrap();
        assert_eq!(f.drivers(), ["local.stowage.io"]);
    }

    #[test]
    fn list_errors_name_the_entry_and_field() {
        let dup = format!(
            "{TWO}  - backend: nfs\n    instances:\n      b: {{ server: 10.0.0.6, export: /e }}\n"
        );
        let e = err(&dup);
        assert!(
            e.contains("backends[2].backend: nfs is already configured by backends[1]"),
            "{e}"
        );
        let e = err(
            "backends:\n  - backend: local\n    instances:\n      d: { baseDir: /x }\n  - backend: zfs\n    instances: {}\n",
        );
        assert!(e.contains("backends[1].backend: unknown backend \"zfs\" (one of local, nfs, glusterfs, s3, rbd)"), "{e}");
        let e = err("backends:\n  - instances:\n      d: { baseDir: /x }\n");
        assert!(e.contains("backends[0].backend: missing"), "{e}");
        let e = err(
            "backends:\n  - backend: local\n    instances:\n      d: { baseDir: /x }\n  - backend: nfs\n    bogus: 1\n    instances:\n      m: { server: a, export: /e }\n",
        );
        assert!(e.contains("backends[1]: unknown field `bogus`"), "{e}");
        let e = err(
            "backends:\n  - backend: local\n    instances:\n      d: { baseDir: /x, bogus: 1 }\n",
        );
        assert!(e.contains("backends[0]: unknown field `bogus`"), "{e}");
        let e =
            err("backends:\n  - backend: local\n    instances:\n      Bad_Name: { baseDir: /x }\n");
        assert!(
            e.contains("backends[0].instances: instance name \"Bad_Name\""),
            "{e}"
        );
        let e = err("backends:\n  - backend: local\n    instances: {}\n");
        assert!(
            e.contains("backends[0].instances: at least one instance"),
            "{e}"
        );
        let e = err("backends: []\n");
        assert!(e.contains("backends: the list is empty"), "{e}");
        let e = err(&format!("backend: local\n{TWO}"));
        assert!(
            e.contains("backend: a file with a backends: list has no other top-level keys"),
            "{e}"
        );
        let e = err("backends:\n  backend: local\n");
        assert!(e.contains("config"), "{e}");
    }

    #[test]
    fn per_driver_settings_need_the_placeholder_with_several_backends() {
        let two = ConfigFile::parse(TWO).unwrap();
        let e = two
            .check_per_driver("--endpoint", "unix:///csi/csi.sock")
            .unwrap_err();
        assert!(
            e.starts_with("--endpoint \"unix:///csi/csi.sock\" must contain {driver}"),
            "{e}"
        );
        assert!(e.contains("local.stowage.io, nfs.stowage.io"), "{e}");
        two.check_per_driver("--endpoint", "unix:///csi/{driver}.sock")
            .unwrap();
        assert_eq!(
            per_driver("unix:///csi/{driver}.sock", "nfs.stowage.io"),
            "unix:///csi/nfs.stowage.io.sock"
        );
        let one =
            ConfigFile::parse("backend: local\ninstances:\n  default: { baseDir: /x }\n").unwrap();
        one.check_per_driver("--endpoint", "unix:///csi/csi.sock")
            .unwrap();
    }

    #[test]
    fn every_example_parses() {
        for (name, text) in [
            ("local", include_str!("../../examples/local.yaml")),
            ("nfs", include_str!("../../examples/nfs.yaml")),
            ("glusterfs", include_str!("../../examples/glusterfs.yaml")),
            ("s3", include_str!("../../examples/s3.yaml")),
            ("rbd", include_str!("../../examples/rbd.yaml")),
        ] {
            let f = ConfigFile::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(f.drivers(), [format!("{name}.stowage.io")]);
        }
        let all = ConfigFile::parse(include_str!("../../examples/all.yaml")).unwrap();
        assert_eq!(
            all.drivers(),
            [
                "local.stowage.io",
                "nfs.stowage.io",
                "glusterfs.stowage.io",
                "s3.stowage.io",
                "rbd.stowage.io"
            ]
        );
    }
}
