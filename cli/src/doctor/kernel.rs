//! Kernel checks of `stowage doctor --node`: the filesystems and modules the configured
//! backends mount or attach with (NFS client, FUSE, krbd, nbd, loop, ext4). A mount helper
//! being installed says nothing about the kernel under it: `mount.nfs` on a kernel without an
//! NFS client fails every NodeStage with "unknown filesystem type".
//!
//! What the kernel has is read from `/proc/filesystems`, `/sys/module` (loaded or built in)
//! and `/lib/modules/<release>/modules.{dep,builtin}` (could be loaded on first use).
//! [`needs`] and [`judge`] are pure, for the table tests.

use std::collections::BTreeSet;

use stowage_backends::Config;
use stowage_backends::rbd::Attach;

use super::Check;

const S: &str = "node";

/// One thing a backend needs from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Need {
    /// Module name (`nfs`, `rbd`, `nbd`, `loop`, `fuse`, `ext4`).
    pub module: &'static str,
    /// Filesystem names that show it is there (`/proc/filesystems`); empty for drivers.
    pub filesystems: &'static [&'static str],
    /// Who needs it, for the message ("nfs.stowage.io", "rbd/main (krbd)").
    pub by: String,
}

/// What the kernel of this machine offers.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub release: String,
    /// `/proc/filesystems`.
    pub filesystems: String,
    /// Names under `/sys/module`: loaded modules and built-in ones with parameters.
    pub loaded: BTreeSet<String>,
    /// False when `/proc/modules` is missing: the kernel cannot load modules at all.
    pub loadable: bool,
    /// Module names in `modules.dep` / `modules.builtin`; None when not readable here.
    pub available: Option<BTreeSet<String>>,
}

/// Everything the configured backends need from the kernel, one entry per module.
pub fn needs(backends: &[Config]) -> Vec<Need> {
    let mut out: Vec<Need> = Vec::new();
    let mut add = |module: &'static str, filesystems: &'static [&'static str], by: String| match out
        .iter_mut()
        .find(|n| n.module == module)
    {
        Some(n) => {
            if !n.by.split(", ").any(|b| b == by) {
                n.by = format!("{}, {by}", n.by);
            }
        }
        None => out.push(Need {
            module,
            filesystems,
            by,
        }),
    };
    for c in backends {
        let driver = c.driver_name().to_string();
        match c {
            Config::Nfs(_) => add("nfs", &["nfs", "nfs4"], driver),
            Config::Glusterfs(_) | Config::S3(_) => add("fuse", &["fuse"], driver),
            Config::Local(i) => {
                // Raw block volumes and `capacity: image` volumes sit on loop devices.
                if i.instances.values().any(|x| x.block) {
                    add("loop", &[], format!("{driver} (raw block)"));
                }
                if i.instances
                    .values()
                    .any(|x| x.capacity.as_deref() == Some("image"))
                {
                    add("loop", &[], format!("{driver} (capacity: image)"));
                    add("ext4", &["ext4"], format!("{driver} (capacity: image)"));
                }
            }
            Config::Rbd(i) => {
                for (name, inst) in &i.instances {
                    let by = format!("rbd/{name} ({})", inst.attach);
                    match Attach::parse("attach", &inst.attach) {
                        Ok(Attach::Krbd) => add("rbd", &[], by),
                        Ok(Attach::Nbd) => add("nbd", &[], by),
                        Ok(Attach::Fuse) => {
                            add("fuse", &["fuse"], by.clone());
                            add("loop", &[], by);
                        }
                        // The config check reports a bad value; nothing to look for here.
                        Err(_) => {}
                    }
                }
            }
        }
    }
    out
}

/// One check per need: OK when the kernel has it now, OK when it can load it on first use,
/// FAIL when it cannot have it, WARN when this machine cannot tell (no `/lib/modules` here,
/// as in a container that does not mount it).
pub fn judge(need: &Need, k: &Facts) -> Check {
    let name = format!("kernel: {}", need.module);
    let fs_listed = need.filesystems.iter().any(|f| {
        k.filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(f))
    });
    if fs_listed || k.loaded.contains(need.module) {
        return Check::ok(
            S,
            name,
            format!("in the running kernel {} (for {})", k.release, need.by),
        );
    }
    let missing_hint = match need.module {
        "nfs" => {
            "use a kernel with the NFS client (CONFIG_NFS_FS) on this node, or keep NFS volumes off it"
        }
        "rbd" => "use a kernel with krbd (CONFIG_BLK_DEV_RBD), or attach: rbd-nbd / rbd-fuse",
        "nbd" => "use a kernel with nbd (CONFIG_BLK_DEV_NBD), or attach: krbd / rbd-fuse",
        "fuse" => "use a kernel with FUSE (CONFIG_FUSE_FS)",
        "loop" => "use a kernel with loop devices (CONFIG_BLK_DEV_LOOP)",
        _ => "use a kernel that has it",
    };
    if !k.loadable {
        return Check::fail(
            S,
            name,
            format!(
                "not in the running kernel {}, which cannot load modules (no /proc/modules); needed by {}",
                k.release, need.by
            ),
            missing_hint,
        );
    }
    match &k.available {
        Some(mods) if mods.contains(need.module) => Check::ok(
            S,
            name,
            format!(
                "module available for {}, loaded on first use (for {})",
                k.release, need.by
            ),
        ),
        Some(_) => Check::fail(
            S,
            name,
            format!(
                "not loaded and not among the modules of {}; needed by {}",
                k.release, need.by
            ),
            missing_hint,
        ),
        None => Check::warn(
            S,
            name,
            format!(
                "not loaded, and /lib/modules/{} is not readable here to tell whether it can be; needed by {}",
                k.release, need.by
            ),
            format!(
                "run `modprobe {}` on the host, or mount /lib/modules into the node plugin",
                need.module
            ),
        ),
    }
}

/// Module names listed in a `modules.dep` or `modules.builtin` text (`kernel/fs/nfs/nfs.ko.xz:`
/// gives `nfs`; `-` and `_` are the same to the kernel).
pub fn module_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split(':').next())
        .filter_map(|p| p.rsplit('/').next())
        .filter_map(|f| f.split(".ko").next())
        .filter(|m| !m.is_empty())
        .map(|m| m.replace('-', "_"))
        .collect()
}

/// Reads this machine's facts.
pub fn facts() -> Facts {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let loaded = std::fs::read_dir("/sys/module")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let dir = std::path::Path::new("/lib/modules").join(&release);
    let mut available: Option<BTreeSet<String>> = None;
    for f in ["modules.dep", "modules.builtin"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
            available
                .get_or_insert_with(BTreeSet::new)
                .extend(module_names(&text));
        }
    }
    Facts {
        release,
        filesystems: std::fs::read_to_string("/proc/filesystems").unwrap_or_default(),
        loaded,
        loadable: std::path::Path::new("/proc/modules").exists(),
        available,
    }
}

/// The kernel checks for `backends` on this machine.
pub fn checks(backends: &[Config]) -> Vec<Check> {
    let k = facts();
    needs(backends).iter().map(|n| judge(n, &k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    fn need(module: &'static str, filesystems: &'static [&'static str]) -> Need {
        Need {
            module,
            filesystems,
            by: "test".into(),
        }
    }

    #[test]
    fn judged_from_what_the_kernel_has() {
        let fs = "nodev\tsysfs\n\text4\nnodev\tfuse\n\txfs\n";
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let with_modules = Facts {
            release: "6.1.0".into(),
            filesystems: fs.into(),
            loaded: set(&["loop", "fuse"]),
            loadable: true,
            available: Some(set(&["nfs", "rbd"])),
        };
        let no_modules = Facts {
            loadable: false,
            available: None,
            ..with_modules.clone()
        };
        let unreadable = Facts {
            available: None,
            ..with_modules.clone()
        };
        for (n, k, want, says) in [
            (
                need("fuse", &["fuse"]),
                &with_modules,
                Level::Ok,
                "in the running kernel",
            ),
            (
                need("loop", &[]),
                &with_modules,
                Level::Ok,
                "in the running kernel",
            ),
            (
                need("nfs", &["nfs", "nfs4"]),
                &with_modules,
                Level::Ok,
                "loaded on first use",
            ),
            (
                need("nbd", &[]),
                &with_modules,
                Level::Fail,
                "not among the modules",
            ),
            (
                need("nfs", &["nfs", "nfs4"]),
                &no_modules,
                Level::Fail,
                "cannot load modules",
            ),
            (
                need("ext4", &["ext4"]),
                &no_modules,
                Level::Ok,
                "in the running kernel",
            ),
            (
                need("rbd", &[]),
                &unreadable,
                Level::Warn,
                "not readable here",
            ),
        ] {
            let c = judge(&n, k);
            assert_eq!(c.level, want, "{n:?}: {c:?}");
            assert!(c.detail.contains(says), "{n:?}: {c:?}");
            assert_eq!(c.hint.is_empty(), want == Level::Ok, "{c:?}");
        }
    }

    #[test]
    fn module_names_from_modules_dep_and_builtin() {
        let dep = "kernel/fs/nfs/nfs.ko.xz: kernel/net/sunrpc/sunrpc.ko.xz\nkernel/drivers/block/rbd.ko:\nkernel/drivers/block/nbd.ko.zst: x\n";
        let builtin =
            "kernel/drivers/block/loop.ko\nkernel/fs/fuse/fuse.ko\nkernel/fs/nls/nls-utf8.ko\n";
        let got: Vec<String> = module_names(&format!("{dep}{builtin}"))
            .into_iter()
            .collect();
        assert_eq!(got, ["fuse", "loop", "nbd", "nfs", "nls_utf8", "rbd"]);
    }

    #[test]
    fn needs_follow_the_configured_backends() {
        let cfg = stowage_backends::ConfigFile::parse(
            "backends:\n- backend: nfs\n  instances:\n    a: {server: s, export: /e}\n- backend: local\n  instances:\n    d: {baseDir: /x, capacity: image}\n",
        )
        .unwrap();
        let got: Vec<(&str, String)> = needs(&cfg.backends)
            .into_iter()
            .map(|n| (n.module, n.by))
            .collect();
        assert_eq!(
            got,
            [
                ("nfs", "nfs.stowage.io".to_string()),
                (
                    "loop",
                    "local.stowage.io (raw block), local.stowage.io (capacity: image)".to_string()
                ),
                ("ext4", "local.stowage.io (capacity: image)".to_string()),
            ]
        );
    }
}
