//! Reading /proc/self/mountinfo: the source of truth for every "is it already mounted?"
//! idempotency check on the node.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `major:minor` of the device.
    pub dev: String,
    /// Path inside the mounted filesystem that is visible at the mount point (bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn is_read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes the octal escapes the kernel uses for space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if l.len() < 6 || r.len() < 3 {
        return None;
    }
    Some(MountEntry {
        mount_id: l[0].parse().ok()?,
        parent_id: l[1].parse().ok()?,
        dev: l[2].to_owned(),
        root: PathBuf::from(unescape(l[3])),
        mount_point: PathBuf::from(unescape(l[4])),
        options: l[5].split(',').map(str::to_owned).collect(),
        fs_type: r[0].to_owned(),
        source: unescape(r[1]),
        super_options: r[2].split(',').map(str::to_owned).collect(),
    })
}

pub async fn read() -> Result<Vec<MountEntry>> {
    let text = tokio::fs::read_to_string("/proc/self/mountinfo")
        .await
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse(&text))
}

/// The top-most mount at exactly `path` (later entries shadow earlier ones).
pub async fn find(path: &Path) -> Result<Option<MountEntry>> {
    Ok(read()
        .await?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:50 / /var/lib/k ro shared:2 master:3 - nfs4 10.0.0.1:/export rw,vers=4.1\n\
                    garbage line\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert!(m[1].is_read_only());
        assert_eq!(m[1].source, "10.0.0.1:/export");
        assert_eq!(m[1].fs_type, "nfs4");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
    }
}
