//! Where a secret value can leak on a node: files (credential files a mount helper needs, and
//! any others), process command lines and environments. Shared by the secret scans of the S3
//! and RBD tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Every file below `dir` whose bytes contain `needle`, with its permission bits. Symlinks are
/// not followed.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && std::fs::read(&p).is_ok_and(|b| contains(&b, needle)) {
                out.push((p, md.permissions().mode() & 0o7777));
            }
        }
    }
    out
}

/// Which of `pids` hold `needle` in their command line or environment.
pub fn processes_exposing(pids: &[u32], needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for pid in pids {
        for what in ["cmdline", "environ"] {
            if std::fs::read(format!("/proc/{pid}/{what}")).is_ok_and(|b| contains(&b, needle)) {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                out.push(format!(
                    "pid {pid} {what}: {}",
                    String::from_utf8_lossy(&cmd)
                ));
            }
        }
    }
    out
}

/// Processes whose command line contains every one of `words` (a mount helper started for a
/// test's directory, say).
pub fn pids_with(words: &[&str]) -> Vec<u32> {
    crate::processes()
        .into_iter()
        .filter(|p| words.iter().all(|w| p.args.iter().any(|a| a.contains(w))))
        .map(|p| p.pid)
        .collect()
}

/// Removes from this process's environment every variable (but `keep`) whose value is
/// `secret`, so that plugins started afterwards can only learn it the way a CO hands it over.
/// Call before any plugin or thread that reads the environment starts.
pub fn scrub_env(secret: &str, keep: &str) {
    for (k, v) in std::env::vars() {
        if !secret.is_empty() && v == secret && k != keep {
            // SAFETY: called by single-test binaries before they start plugins or threads
            // that read the environment.
            unsafe { std::env::remove_var(k) };
        }
    }
}

/// Whether `hay` contains `needle` (an empty needle is never found).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
