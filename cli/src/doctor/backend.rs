//! Backend checks: each configured instance probed with the backends' own code, so doctor
//! reaches the server exactly the way stowage-controller would. NFS: the controller's NFSv3
//! client (portmapper, MOUNT of the export, a READDIR of the base directory, FSSTAT through
//! GetCapacity); local: the base directory; S3 (with --secrets-file): ListBuckets and
//! HeadBucket with the CSI secret's keys. GlusterFS and RBD are reported as not probed: their
//! controllers mount or need cephx keys from CSI secrets, which a read-only check should not
//! take on silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use stowage_backends::config::{Config, Instances, S3Config};
use stowage_backends::s3::client::{self as s3c, Creds, Endpoint};
use stowage_backends::types::Secrets;

use super::{Check, Level};

const S: &str = "backend";
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// One instance of one backend, as a configuration of its own.
fn split(c: &Config) -> Vec<(String, Config)> {
    fn each<T: Clone>(
        i: &Instances<T>,
        f: impl Fn(Instances<T>) -> Config,
    ) -> Vec<(String, Config)> {
        i.instances
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    f(Instances {
                        instances: BTreeMap::from([(n.clone(), v.clone())]),
                    }),
                )
            })
            .collect()
    }
    match c {
        Config::Local(i) => each(i, Config::Local),
        Config::Nfs(i) => each(i, Config::Nfs),
        Config::Rbd(i) => each(i, Config::Rbd),
        Config::S3(s) => s
            .instances
            .keys()
            .map(|n| {
                let mut one: S3Config = s.clone();
                one.instances.retain(|k, _| k == n);
                (n.clone(), Config::S3(one))
            })
            .collect(),
        Config::Glusterfs(g) => g
            .instances
            .keys()
            .map(|n| {
                let mut one = g.clone();
                one.instances.retain(|k, _| k == n);
                (n.clone(), Config::Glusterfs(one))
            })
            .collect(),
    }
}

pub fn kind(c: &Config) -> &'static str {
    stowage_backends::config::KINDS
        .iter()
        .copied()
        .find(|k| c.driver_name().starts_with(&format!("{k}.")))
        .unwrap_or("?")
}

/// `backend`: only that kind (`nfs`) or instance (`nfs/main`).
pub async fn checks(
    backends: &[Config],
    only: Option<&str>,
    secrets: Option<&Secrets>,
) -> Vec<Check> {
    let mut out = Vec::new();
    for c in backends {
        for (inst, one) in split(c) {
            let name = format!("{}/{inst}", kind(c));
            if only.is_some_and(|o| o != kind(c) && o != name) {
                continue;
            }
            out.push(match &one {
                Config::Local(i) => local(&name, &i.instances[&inst].base_dir),
                Config::Nfs(i) => nfs(&name, &one, &i.instances[&inst]).await,
                Config::S3(s) => s3(&name, &s.instances[&inst], secrets).await,
                Config::Glusterfs(g) => gluster(&name, &one, &g.instances[&inst]).await,
                Config::Rbd(r) => rbd(&name, &one, &r.instances[&inst]).await,
            });
        }
    }
    if let Some(o) = only
        && out.is_empty()
    {
        out.push(Check::fail(
            S,
            o.to_owned(),
            "no such backend or instance in the configuration",
            "name a backend kind (nfs) or kind/instance (nfs/main) from --config",
        ));
    }
    out
}

fn local(name: &str, base: &Path) -> Check {
    match std::fs::metadata(base) {
        Ok(m) if m.is_dir() => {
            match rustix::fs::access(
                base,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            ) {
                Ok(()) => Check::ok(
                    S,
                    name,
                    format!("baseDir {} is a writable directory", base.display()),
                ),
                Err(e) => Check::fail(
                    S,
                    name,
                    format!("baseDir {} is not writable: {e}", base.display()),
                    "run the controller as a user that may write there, or fix the directory's mode",
                ),
            }
        }
        Ok(_) => Check::fail(
            S,
            name,
            format!("baseDir {} is not a directory", base.display()),
            "point baseDir at a directory",
        ),
        Err(e) => Check::warn(
            S,
            name,
            format!("baseDir {}: {e}", base.display()),
            "the controller creates it at start; check the path if that is not expected",
        ),
    }
}

async fn nfs(name: &str, one: &Config, i: &stowage_backends::config::NfsInstance) -> Check {
    let target = format!("{}:{}", i.server, i.export);
    let hint = format!(
        "check that {} serves NFSv3 (rpcbind, mountd, nfsd{}) and exports {} to this host",
        i.server,
        i.nfs_port
            .map(|p| format!(" on port {p}"))
            .unwrap_or_default(),
        i.export
    );
    let what = format!("export mounted, baseDir {:?} listed", i.base_dir);
    through_controller(name, one, &target, &what, hint).await
}

/// GlusterFS: the controller's own start (its management mount of the volume in subdir
/// mode, glusterd through the configured CLI access), then a listing of its volumes and the
/// free space: what every CreateVolume needs.
async fn gluster(
    name: &str,
    one: &Config,
    i: &stowage_backends::glusterfs::config::GlusterInstance,
) -> Check {
    use stowage_backends::glusterfs::config::Mode;
    let servers = i.servers.join(",");
    let (target, what) = match i.mode {
        Mode::Subdir => (
            format!("gluster volume {} on {servers}", i.volume),
            format!("volume mounted, baseDir {:?} listed", i.base_dir),
        ),
        Mode::Volume => (
            format!("glusterd on {servers} (a gluster volume per PV)"),
            format!("volumes {}* listed", i.volume_prefix),
        ),
    };
    let hint = match i.mode {
        Mode::Subdir => format!(
            "check that glusterd answers on {servers} (`gluster volume info {}`), that the volume exists and is started, and that this host has the GlusterFS FUSE client (mount.glusterfs)",
            i.volume
        ),
        Mode::Volume => format!(
            "check that glusterd answers on {servers} (`gluster pool list`) through the configured access (glusterd.socket, glusterd.ssh or glusterd.cli)"
        ),
    };
    // The controller mounts the volume for management on first use; a mount this probe made
    // (none was there, e.g. doctor run away from the controller) is undone, so doctor leaves
    // no FUSE client behind. One the controller made stays.
    let mgmt = i
        .state_dir
        .join("mgmt")
        .join(name.split('/').nth(1).unwrap_or(""));
    let mounted_before = stowage_backends::mount::mounted_at(&mgmt)
        .await
        .ok()
        .flatten()
        .is_some();
    let mut check = through_controller(name, one, &target, &what, hint.clone()).await;
    if check.level == Level::Ok {
        // Quotas (subdir mode) and every volume (volume mode) go through glusterd's CLI, which
        // the listing above does not touch: ask it too, through the configured access.
        let cli = stowage_backends::glusterfs::cli_for(i);
        let args: Vec<&str> = match i.mode {
            Mode::Subdir => vec!["volume", "info", i.volume.as_str()],
            Mode::Volume => vec!["pool", "list"],
        };
        match tokio::time::timeout(PROBE_TIMEOUT, cli.ok(&args)).await {
            Ok(Ok(_)) => {
                check.detail = format!(
                    "{}; glusterd answers `gluster {}` via {}",
                    check.detail,
                    args.join(" "),
                    cli.target()
                );
            }
            Ok(Err(e)) => {
                check = Check::fail(
                    S,
                    name,
                    format!("{target}: glusterd via {}: {e}", cli.target()),
                    hint,
                );
            }
            Err(_) => {
                check = Check::fail(
                    S,
                    name,
                    format!(
                        "{target}: glusterd via {} gave no answer within {}s",
                        cli.target(),
                        PROBE_TIMEOUT.as_secs()
                    ),
                    hint,
                );
            }
        }
    }
    if !mounted_before
        && let Ok(Some(_)) = stowage_backends::mount::mounted_at(&mgmt).await
        && let Err(e) = stowage_backends::mount::unmount(&mgmt).await
    {
        eprintln!("doctor: unmounting {}: {e}", mgmt.display());
    }
    check
}

/// RBD: the monitors reached with the instance's cephx user (`keyringFile`), the pool opened,
/// its Stowage images listed and its free space read.
async fn rbd(name: &str, one: &Config, i: &stowage_backends::rbd::RbdInstance) -> Check {
    let target = format!("pool {} via mons {}", i.pool, i.monitors);
    let what = format!(
        "cluster reached as client.{}, pool opened, images {}* listed",
        i.user_id, i.image_prefix
    );
    let hint = if i.keyring_file.is_none() {
        format!(
            "this instance has no keyringFile, so only calls carrying CSI secrets can reach the cluster: give it a keyringFile for client.{} to check it here, or check with `ceph -s` and `ceph osd pool ls`",
            i.user_id
        )
    } else {
        format!(
            "check that the monitors {} answer (`ceph -s`), that pool {} exists (`ceph osd pool ls`) and that the key in {} is client.{}'s",
            i.monitors,
            i.pool,
            i.keyring_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            i.user_id
        )
    };
    through_controller(name, one, &target, &what, hint).await
}

/// Builds the backend's controller side from the one-instance configuration and asks it what
/// every provisioning needs: a listing of its volumes and the free capacity. Bounded by
/// [`PROBE_TIMEOUT`]: a hung server is a FAIL, not a hung doctor.
async fn through_controller(
    name: &str,
    one: &Config,
    target: &str,
    what: &str,
    hint: String,
) -> Check {
    let probe = async {
        let ctl = stowage_backends::build_controller(one).await?;
        let page = ctl.list_volumes(None, 1000).await?;
        let params = BTreeMap::from([(
            "instance".to_owned(),
            name.split('/').nth(1).unwrap_or("").to_owned(),
        )]);
        // Not every backend reports capacity (Unsupported is no failure).
        let free = match ctl.capacity(&params).await {
            Ok(f) => Some(f),
            Err(stowage_backends::Error::Unsupported(_)) => None,
            Err(e) => return Err(e),
        };
        Ok::<_, stowage_backends::Error>((page.items.len(), page.next_token.is_some(), free))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok((n, more, free))) => Check::ok(
            S,
            name,
            format!(
                "{target}: {what} ({n}{} volumes){}",
                if more { "+" } else { "" },
                free.map(|f| format!(", {} free", stowage_provisioner::quantity::format_bytes(f)))
                    .unwrap_or_default()
            ),
        ),
        Ok(Err(e)) => Check::fail(S, name, format!("{target}: {e}"), hint),
        Err(_) => Check::fail(
            S,
            name,
            format!("{target}: no answer within {}s", PROBE_TIMEOUT.as_secs()),
            hint,
        ),
    }
}

async fn s3(
    name: &str,
    i: &stowage_backends::config::S3Instance,
    secrets: Option<&Secrets>,
) -> Check {
    let ep = Endpoint {
        url: i.endpoint.clone(),
        region: i.region.clone(),
        path_style: i.path_style,
        timeout: Duration::from_secs(i.timeout_secs.max(1)),
    };
    let Some(secrets) = secrets else {
        return Check::warn(
            S,
            name,
            format!(
                "{}: not probed (S3 keys come only in CSI secrets)",
                ep.display()
            ),
            "pass --secrets-file with accessKeyID and secretAccessKey to check them",
        );
    };
    let creds = match Creds::from_secrets("--secrets-file", secrets) {
        Ok(c) => c,
        Err(e) => return Check::fail(S, name, e.to_string(), "fix --secrets-file"),
    };
    let client = s3c::build(&ep, &creds);
    let hint = format!(
        "check the endpoint {} is reachable and the keys in the provisioner secret are valid (a wrong key answers InvalidAccessKeyId or SignatureDoesNotMatch)",
        ep.display()
    );
    let probe = async {
        let buckets = client.list_buckets().send().await.map_err(|e| {
            format!(
                "ListBuckets: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
        let n = buckets.buckets().len();
        if let Some(b) = &i.bucket {
            client.head_bucket().bucket(b).send().await.map_err(|e| {
                format!(
                    "HeadBucket {b}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })?;
            return Ok::<_, String>(format!(
                "credentials accepted ({n} buckets), bucket {b} reachable"
            ));
        }
        Ok(format!("credentials accepted ({n} buckets)"))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(d)) => Check::ok(S, name, format!("{}: {d}", ep.display())),
        Ok(Err(e)) => Check::fail(S, name, format!("{}: {e}", ep.display()), hint),
        Err(_) => Check::fail(
            S,
            name,
            format!(
                "{}: no answer within {}s",
                ep.display(),
                PROBE_TIMEOUT.as_secs()
            ),
            hint,
        ),
    }
}

/// `--secrets-file`: a YAML map of the CSI secret's keys, as stowage-docker reads it.
pub fn read_secrets(path: &Path) -> Result<Secrets, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let map: BTreeMap<String, String> = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{}: expected a map of strings: {e}", path.display()))?;
    Ok(Secrets(map))
}
