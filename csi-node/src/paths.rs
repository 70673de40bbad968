//! Which paths a node call may touch: the kubelet (or Docker plugin) directory the node was
//! given, and nothing else.
//!
//! Every target and staging path of a node call is mounted over, created or removed by the
//! node plugin, which runs as root. A path outside the kubelet directory, or one that reaches
//! through a symbolic link planted below it, could make the plugin mount over or delete
//! something it does not own, so such paths are refused before any backend code runs.
//! Symlinks at or above the root (a distribution that moves `/var/lib/kubelet` with a link)
//! are the admin's choice and are left alone: the root is compared as given, not resolved.

use std::path::{Component, Path, PathBuf};

use tonic::Status;

/// The directory node paths must lie in.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    root: PathBuf,
}

impl PathPolicy {
    /// `root` must be absolute; `.` components and trailing slashes are dropped so the prefix
    /// comparison is on components.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, String> {
        let root = root.as_ref();
        if !root.is_absolute() {
            return Err(format!("{} is not an absolute path", root.display()));
        }
        if root.components().any(|c| c == Component::ParentDir) {
            return Err(format!("{} must not contain '..'", root.display()));
        }
        Ok(PathPolicy {
            root: root.components().collect(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` (already checked absolute, free of `..` and NUL) lies strictly below the root and
    /// no existing component below the root is a symbolic link. `field` names the request
    /// field in the error.
    pub fn confine(&self, field: &'static str, path: &Path) -> Result<(), Status> {
        let rest = self.below_root(path).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field} {} is outside the node's volume directory {}",
                path.display(),
                self.root.display()
            ))
        })?;
        let mut walk = self.root.clone();
        for c in rest.components() {
            walk.push(c);
            match std::fs::symlink_metadata(&walk) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(Status::invalid_argument(format!(
                        "{field} {} goes through the symbolic link {}; refusing to follow it",
                        path.display(),
                        walk.display()
                    )));
                }
                Ok(_) => {}
                // Nothing further exists, so nothing further can be a link (yet: the backend
                // creates mount points with O_NOFOLLOW-style calls from here on).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(Status::internal(format!(
                        "{field}: cannot inspect {}: {e}",
                        walk.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether `path` is strictly below the root, for fields where a path elsewhere simply
    /// names no volume of this node (NodeGetVolumeStats: NOT_FOUND rather than refused).
    pub fn contains(&self, path: &Path) -> bool {
        self.below_root(path).is_some()
    }

    fn below_root(&self, path: &Path) -> Option<PathBuf> {
        let normal: PathBuf = path.components().collect();
        let rest = normal.strip_prefix(&self.root).ok()?;
        (!rest.as_os_str().is_empty()).then(|| rest.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn prefix_rules() {
        let p = PathPolicy::new("/var/lib/kubelet/").unwrap();
        let cases: &[(&str, bool)] = &[
            ("/var/lib/kubelet/pods/u/volumes/x/mount", true),
            (
                "/var/lib/kubelet/plugins/kubernetes.io/csi/d/h/globalmount",
                true,
            ),
            ("/var/lib/kubelet/./pods/x", true),
            ("/var/lib/kubelet", false),
            ("/var/lib/kubelet/", false),
            ("/var/lib/kubeletX/pods", false),
            ("/var/lib", false),
            ("/etc/passwd", false),
            ("/", false),
        ];
        for (path, ok) in cases {
            let got = p.confine("target_path", Path::new(path));
            assert_eq!(got.is_ok(), *ok, "{path}: {got:?}");
            if let Err(s) = got {
                assert_eq!(s.code(), Code::InvalidArgument, "{path}");
                assert!(s.message().starts_with("target_path "), "{s:?}");
            }
        }
    }

    #[test]
    fn root_must_be_absolute() {
        assert!(PathPolicy::new("var/lib/kubelet").is_err());
        assert!(PathPolicy::new("/var/../etc").is_err());
    }

    #[test]
    fn symlinks_below_the_root_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("kubelet");
        std::fs::create_dir_all(root.join("pods/real")).unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("pods/link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("pods/real/final")).unwrap();
        let p = PathPolicy::new(&root).unwrap();
        assert!(p.confine("f", &root.join("pods/real/new/mount")).is_ok());
        for bad in ["pods/link/mount", "pods/link", "pods/real/final"] {
            let e = p
                .confine("staging_target_path", &root.join(bad))
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("symbolic link"), "{e:?}");
        }
    }

    #[test]
    fn a_linked_root_is_the_admins_choice() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir_all(real.join("pods")).unwrap();
        let link = d.path().join("kubelet");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = PathPolicy::new(&link).unwrap();
        assert!(p.confine("f", &link.join("pods/x")).is_ok());
        assert!(p.confine("f", &real.join("pods/x")).is_err());
    }
}
