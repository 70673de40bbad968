//! Which mount options a caller may ask for.
//!
//! Mount options arrive from StorageClasses and PVs (CSI `mount_flags`) and from Docker volume
//! options, that is from users, and they end up in a root mount helper's `-o` list. Each entry
//! is split on commas the way the helper will split it, so `"ro,suid"` cannot smuggle in an
//! option the entry as a whole seemed not to be. Refused: options that give a volume's files
//! powers over the node (`suid`, `dev`), and helper options that run programs, load code or
//! read or write files of the node's choosing on the caller's behalf.

use crate::error::{Error, Result};

/// Longest single option; real ones are a few dozen bytes.
const MAX_OPTION_LEN: usize = 256;

/// Option names (before any `=`) never passed on, with why.
const FORBIDDEN: &[(&str, &str)] = &[
    (
        "suid",
        "set-user-ID files on a volume would run as their owner on the node",
    ),
    (
        "dev",
        "device files on a volume would open the node's devices",
    ),
    ("helper", "it names a program for mount(8) to run"),
    (
        "setuid",
        "it makes mount.fuse run the mounter as another user",
    ),
    ("credlib", "it loads a shared library into the S3 mounter"),
    (
        "credlib_opts",
        "it configures a library the S3 mounter would load",
    ),
    ("passwd_file", "credentials come only from CSI secrets"),
    ("ssl_client_cert", "it reads a node file as a credential"),
    ("log-file", "it writes to a node path"),
    ("logfile", "it writes to a node path"),
    ("log_file", "it writes to a node path"),
    ("volfile", "it reads a node file as the volume definition"),
];

/// Checks every option in `flags` (`field` names the request field in the error) and returns
/// them split into single options, the form mount helpers are given.
pub fn check(field: &'static str, flags: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in flags {
        for opt in entry.split(',').map(str::trim) {
            if opt.is_empty() {
                continue;
            }
            if opt.len() > MAX_OPTION_LEN {
                return Err(Error::invalid(
                    field,
                    format!("mount option of {} bytes is too long", opt.len()),
                ));
            }
            if opt.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(Error::invalid(
                    field,
                    format!("mount option {opt:?} contains whitespace or control characters"),
                ));
            }
            let name = opt.split('=').next().unwrap_or(opt).to_ascii_lowercase();
            if let Some((_, why)) = FORBIDDEN.iter().find(|(n, _)| *n == name) {
                return Err(Error::invalid(
                    field,
                    format!("mount option {opt:?} is not allowed: {why}"),
                ));
            }
            out.push(opt.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn table() {
        let ok: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (
                &["noatime", "nosuid", "nodev"],
                &["noatime", "nosuid", "nodev"],
            ),
            (&["vers=4.1,hard"], &["vers=4.1", "hard"]),
            (&["ro", ""], &["ro"]),
            (&["exec"], &["exec"]),
            (&["uid=1000", "gid=1000"], &["uid=1000", "gid=1000"]),
        ];
        for (input, want) in ok {
            assert_eq!(
                check("mount_flags", &v(input)).unwrap(),
                v(want),
                "{input:?}"
            );
        }
        let bad: &[(&[&str], &str)] = &[
            (&["suid"], "suid"),
            (&["ro,suid"], "suid"),
            (&["DEV"], "DEV"),
            (&["helper=/bin/sh"], "helper"),
            (&["setuid=root"], "setuid"),
            (&["credlib=/tmp/x.so"], "credlib"),
            (&["passwd_file=/etc/shadow"], "passwd_file"),
            (&["log-file=/etc/cron.d/x"], "log-file"),
            (&["a b"], "whitespace"),
            (&["a\nb"], "control"),
        ];
        for (input, needle) in bad {
            let e = check("volume_capability.mount_flags", &v(input)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("volume_capability.mount_flags"), "{msg}");
            assert!(msg.contains(needle), "{input:?}: {msg}");
            assert!(matches!(e, Error::InvalidArgument { .. }));
        }
        assert!(check("f", &[format!("x={}", "a".repeat(300))]).is_err());
    }
}
