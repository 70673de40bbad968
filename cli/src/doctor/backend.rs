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

use super::Check;

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
                Config::Glusterfs(_) | Config::Rbd(_) => Check::warn(
                    S,
                    name,
                    "not probed by this version of doctor",
                    "check it with the backend's own CLI (gluster volume info / ceph -s)",
                ),
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
    let ctl = match stowage_backends::build_controller(one).await {
        Ok(c) => c,
        Err(e) => return Check::fail(S, name, format!("{target}: {e}"), hint),
    };
    let probe = async {
        let page = ctl.list_volumes(None, 1000).await?;
        let params = BTreeMap::from([(
            "instance".to_owned(),
            name.split('/').nth(1).unwrap_or("").to_owned(),
        )]);
        let free = ctl.capacity(&params).await?;
        Ok::<_, stowage_backends::Error>((page.items.len(), page.next_token.is_some(), free))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok((n, more, free))) => Check::ok(
            S,
            name,
            format!(
                "{target}: export mounted, baseDir {:?} listed ({n}{} volumes), {} free",
                i.base_dir,
                if more { "+" } else { "" },
                stowage_provisioner::quantity::format_bytes(free)
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
