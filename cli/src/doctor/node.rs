//! Node checks: the FUSE device, the kernel's filesystems and modules ([`super::kernel`]), the
//! mount helpers the configured backends need (and their versions), mount propagation of the kubelet directory, each driver's registration socket
//! and the node's CSINode entry.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::storage::v1::CSINode;
use kube::{Api, Client};
use stowage_backends::Config;

use super::Check;

const S: &str = "node";

pub struct NodeOptions {
    pub kubelet_root: PathBuf,
    /// The Node (and CSINode) name; None: skip the CSINode check.
    pub node_name: Option<String>,
    /// Drivers expected on this node.
    pub drivers: Vec<String>,
    /// Backends configured (decides which helpers are required).
    pub backends: Vec<Config>,
}

/// A tool a backend's node side runs, and the argument that makes it print its version.
struct Helper {
    program: &'static str,
    version_arg: &'static str,
}

/// The helpers one backend needs: any one of each inner list.
fn helpers(c: &Config) -> (&'static str, Vec<Vec<Helper>>) {
    let h = |program, version_arg| Helper {
        program,
        version_arg,
    };
    match c {
        Config::Local(_) => (
            "local",
            vec![vec![h("losetup", "--version")], vec![h("mkfs.ext4", "-V")]],
        ),
        Config::Nfs(_) => ("nfs", vec![vec![h("mount.nfs", "-V")]]),
        Config::Glusterfs(_) => ("glusterfs", vec![vec![h("glusterfs", "--version")]]),
        Config::S3(_) => (
            "s3",
            vec![vec![h("s3fs", "--version"), h("rclone", "version")]],
        ),
        Config::Rbd(_) => (
            "rbd",
            vec![vec![
                h("rbd", "--version"),
                h("rbd-nbd", "--version"),
                h("rbd-fuse", "--version"),
            ]],
        ),
    }
}

fn needs_fuse(c: &Config) -> bool {
    matches!(c, Config::Glusterfs(_) | Config::S3(_) | Config::Rbd(_))
}

pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    // mount(8) finds its helpers in /sbin and /usr/sbin whatever PATH says.
    let extra = ["/sbin", "/usr/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The first non-empty line a tool prints for its version (stdout or stderr), within 5 s.
async fn version_of(path: &Path, arg: &str) -> String {
    let run = tokio::process::Command::new(path)
        .arg(arg)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(o)) => {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no version printed")
                .chars()
                .take(100)
                .collect()
        }
        Ok(Err(e)) => format!("cannot run: {e}"),
        Err(_) => "no answer to its version flag within 5 s".into(),
    }
}

/// The mount that holds `path` in a mountinfo text, and its propagation ("shared:N",
/// "master:N" or "private"). Pure, for the table test.
pub fn propagation_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, _)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        if f.len() < 6 {
            continue;
        }
        let mp = PathBuf::from(f[4].replace("\\040", " "));
        if !path.starts_with(&mp) {
            continue;
        }
        let opt: Vec<&str> = f[6..]
            .iter()
            .copied()
            .filter(|o| o.starts_with("shared:") || o.starts_with("master:"))
            .collect();
        let prop = if opt.is_empty() {
            "private".to_owned()
        } else {
            opt.join(" ")
        };
        // Later lines of the same mount point are mounts on top: the last longest one wins.
        if best
            .as_ref()
            .is_none_or(|(b, _)| mp.as_os_str().len() >= b.as_os_str().len())
        {
            best = Some((mp, prop));
        }
    }
    best
}

pub async fn checks(client: Option<&Client>, o: &NodeOptions) -> Vec<Check> {
    let mut out = Vec::new();
    // FUSE: gluster, s3fs/rclone and rbd-fuse mount through it.
    let fuse_needed: Vec<&str> = o
        .backends
        .iter()
        .filter(|c| needs_fuse(c))
        .map(|c| c.driver_name())
        .collect();
    match std::fs::metadata("/dev/fuse") {
        Ok(m) if m.file_type().is_char_device() => {
            out.push(Check::ok(S, "/dev/fuse", "character device present"))
        }
        other => {
            let seen = match other {
                Ok(_) => "exists but is not a character device".to_owned(),
                Err(e) => format!("missing ({e})"),
            };
            let hint = "load the fuse module (modprobe fuse) and give the node plugin /dev (hostPath /dev in the DaemonSet)";
            if fuse_needed.is_empty() {
                out.push(Check::warn(
                    S,
                    "/dev/fuse",
                    format!("{seen}; no configured backend needs it"),
                    hint,
                ));
            } else {
                out.push(Check::fail(
                    S,
                    "/dev/fuse",
                    format!("{seen}; needed by {}", fuse_needed.join(", ")),
                    hint,
                ));
            }
        }
    }
    out.extend(super::kernel::checks(&o.backends));
    for c in &o.backends {
        let (kind, groups) = helpers(c);
        for group in groups {
            let names: Vec<&str> = group.iter().map(|h| h.program).collect();
            let mut found = Vec::new();
            for h in &group {
                if let Some(p) = find_in_path(h.program) {
                    found.push(format!(
                        "{} ({})",
                        p.display(),
                        version_of(&p, h.version_arg).await
                    ));
                }
            }
            let name = format!("{kind}: {}", names.join(" | "));
            if found.is_empty() {
                out.push(Check::fail(
                    S,
                    name,
                    "not found in PATH, /sbin or /usr/sbin",
                    format!("install it on the node (Debian: {})", package_hint(&names)),
                ));
            } else {
                out.push(Check::ok(S, name, found.join("; ")));
            }
        }
    }
    // The kubelet directory must be a shared mount, else mounts the plugin makes inside its
    // container never reach the kubelet and pods see empty directories.
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => match propagation_of(&text, &o.kubelet_root) {
            Some((mp, p)) if p.contains("shared:") => out.push(Check::ok(
                S,
                format!("mount propagation of {}", o.kubelet_root.display()),
                format!("{p} (mount {})", mp.display()),
            )),
            Some((mp, p)) => out.push(Check::fail(
                S,
                format!("mount propagation of {}", o.kubelet_root.display()),
                format!("{p} (mount {}): mounts made by the plugin would not reach the kubelet", mp.display()),
                format!(
                    "mount --make-rshared {} on the host (systemd does it for /) and mount it into the plugin with mountPropagation: Bidirectional",
                    mp.display()
                ),
            )),
            None => out.push(Check::fail(
                S,
                format!("mount propagation of {}", o.kubelet_root.display()),
                "no mount holds this path",
                "check --kubelet-root",
            )),
        },
        Err(e) => out.push(Check::warn(S, "mount propagation", format!("reading /proc/self/mountinfo: {e}"), "")),
    }
    for d in &o.drivers {
        out.push(registration(&o.kubelet_root, d).await);
    }
    if let (Some(client), Some(node)) = (client, o.node_name.as_deref()) {
        out.extend(csinode(client, node, &o.drivers).await);
    }
    out
}

fn package_hint(names: &[&str]) -> &'static str {
    match names.first().copied().unwrap_or("") {
        "mount.nfs" => "nfs-common",
        "glusterfs" => "glusterfs-client",
        "s3fs" => "s3fs or rclone",
        "rbd" => "ceph-common, rbd-nbd or rbd-fuse",
        "losetup" => "mount",
        "mkfs.ext4" => "e2fsprogs",
        _ => "the package that ships it",
    }
}

/// The kubelet finds node plugins through `<root>/plugins_registry/<driver>-reg.sock`, which
/// stowage-node serves: the file must exist and answer a connect.
async fn registration(root: &Path, driver: &str) -> Check {
    let sock = root
        .join("plugins_registry")
        .join(format!("{driver}-reg.sock"));
    let name = format!("registration socket {}", sock.display());
    let hint = format!(
        "start stowage-node for {driver} with --kubelet-root {} (registration on), or check its log",
        root.display()
    );
    match std::fs::metadata(&sock) {
        Err(e) => Check::fail(S, name, format!("missing ({e})"), hint),
        Ok(m) if !m.file_type().is_socket() => Check::fail(S, name, "not a socket", hint),
        Ok(_) => match tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::UnixStream::connect(&sock),
        )
        .await
        {
            Ok(Ok(_)) => Check::ok(S, name, "answers"),
            Ok(Err(e)) => Check::fail(
                S,
                name,
                format!("does not answer: {e} (a stale socket: the plugin is gone)"),
                hint,
            ),
            Err(_) => Check::fail(S, name, "no answer within 3 s", hint),
        },
    }
}

async fn csinode(client: &Client, node: &str, drivers: &[String]) -> Vec<Check> {
    let api: Api<CSINode> = Api::all(client.clone());
    let name = format!("CSINode {node}");
    match api.get_opt(node).await {
        Err(e) => vec![Check::fail(
            S,
            name,
            format!("cannot read it: {e}"),
            "check --kubeconfig and RBAC (get csinodes)",
        )],
        Ok(None) => vec![Check::fail(
            S,
            name,
            "no CSINode object for this node",
            "the kubelet makes it when a node plugin registers: is the kubelet running, is --node-name the Node's name?",
        )],
        Ok(Some(n)) => drivers
            .iter()
            .map(|d| {
                let entry = n.spec.drivers.iter().find(|x| x.name == *d);
                match entry {
                    Some(e) => Check::ok(
                        S,
                        format!("{name}: {d}"),
                        format!("registered, node ID {:?}", e.node_id),
                    ),
                    None => Check::fail(
                        S,
                        format!("{name}: {d}"),
                        "driver not listed: the kubelet has not registered it",
                        format!(
                            "check the registration socket above and the kubelet's log for {d}"
                        ),
                    ),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /var/lib/kubelet rw,relatime - tmpfs tmpfs rw
31 22 0:6 / /var/lib/kubelet2 rw,relatime master:3 - tmpfs tmpfs rw
32 22 0:7 / /data rw shared:7 master:2 - tmpfs tmpfs rw
";

    #[test]
    fn propagation_table() {
        let cases = [
            ("/var/lib/kubelet", "/var/lib/kubelet", "private"),
            ("/var/lib/kubelet/pods/x", "/var/lib/kubelet", "private"),
            ("/var/lib/kubelet2", "/var/lib/kubelet2", "master:3"),
            ("/srv/kubelet", "/", "shared:1"),
            ("/data/k", "/data", "shared:7 master:2"),
        ];
        for (path, mp, prop) in cases {
            let got = propagation_of(MI, Path::new(path));
            assert_eq!(got, Some((PathBuf::from(mp), prop.to_owned())), "{path}");
        }
        assert_eq!(propagation_of("", Path::new("/x")), None);
    }
}
