//! The RBD node plugin: attach an image (krbd, rbd-nbd or rbd-fuse + loop), make a filesystem
//! when there is none, mount it at the staging path, or bind the device for raw block volumes.
//!
//! Nothing is remembered in memory: attachments are found again from the system (krbd in
//! /sys/bus/rbd, rbd-nbd through `rbd-nbd list-mapped`, rbd-fuse mounts in mountinfo and their
//! loop devices in /sys/block), so a restarted node plugin picks up where it was. The FUSE and
//! nbd daemons run detached from the plugin and outlive its restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Attach, CTX_ATTACH, CTX_MONITORS, Connections, Creds, DRIVER, RbdInstance, blocking, ceph_err,
    check_pool_name, creds_for, hash_hex,
};
use crate::command::{self, MOUNT_TIMEOUT, SHORT_TIMEOUT};
use crate::error::{Error, Result};
use crate::mount::{self, Probe};
use crate::node::{NodeBackend, NodeFeatures, StageRequest};
use crate::volume_id::VolumeId;

/// Bound for attaching: the map commands wait for the cluster.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(90);
/// mkfs of a large image can take a while even without discard.
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);

pub struct RbdNode {
    instances: BTreeMap<String, RbdInstance>,
    conns: Arc<Connections>,
}

/// The image a volume ID names.
#[derive(Debug, Clone)]
struct Target {
    pool: String,
    image: String,
}

impl RbdNode {
    /// Settings are checked where they are used: a node must start (and say what is wrong
    /// in each call's error) even when one instance is misconfigured.
    pub fn new(instances: &BTreeMap<String, RbdInstance>) -> Self {
        for (n, i) in instances {
            if let Err(e) = super::validate_instance(n, i) {
                tracing::error!(instance = %n, error = %e, "rbd instance misconfigured");
            }
        }
        RbdNode {
            instances: instances.clone(),
            conns: Arc::new(Connections::default()),
        }
    }

    fn target(&self, volume_id: &str) -> Result<(Target, &RbdInstance)> {
        let id = VolumeId::parse("volume_id", volume_id)?;
        let parts: Vec<&str> = id.path.components().collect();
        let [pool, image] = parts[..] else {
            return Err(Error::not_found("volume", volume_id));
        };
        check_pool_name("volume_id", pool)?;
        if image.starts_with('-') || image.contains('@') {
            return Err(Error::invalid(
                "volume_id",
                "the image name must not start with '-' or contain '@'",
            ));
        }
        let inst = self.instances.get(&id.instance).ok_or_else(|| {
            Error::not_found("volume (instance not configured on this node)", volume_id)
        })?;
        Ok((
            Target {
                pool: pool.to_owned(),
                image: image.to_owned(),
            },
            inst,
        ))
    }

    /// Per-attachment directory: client config, keyring (0600) and the rbd-fuse mount point.
    fn attach_dir(inst: &RbdInstance, volume_id: &str) -> PathBuf {
        inst.run_dir.join(hash_hex(volume_id, 24))
    }
}

/// Writes the client config and keyring an attach command reads; the key goes into a 0600
/// file, never onto a command line.
async fn write_client_files(dir: &Path, monitors: &str, creds: &Creds) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    mount::ensure_dir(dir).await?;
    let keyring = dir.join("keyring");
    let conf = dir.join("ceph.conf");
    let kr_text = format!("[client.{}]\n\tkey = {}\n", creds.user, creds.key);
    let conf_text = format!(
        "[global]\n\tmon host = {monitors}\n\tkeyring = {}\n\tlog file = /dev/null\n\tadmin socket = \n\tlog to stderr = false\n",
        keyring.display()
    );
    let (k2, c2) = (keyring.clone(), conf.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&k2)?;
        f.write_all(kr_text.as_bytes())?;
        std::fs::write(&c2, conf_text)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
    .map_err(|e| Error::io(format!("writing client config in {}", dir.display()), e))?;
    Ok(conf)
}

fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// The krbd device mapping `pool/image` (head, not a snapshot), from /sys/bus/rbd.
async fn krbd_device(t: &Target) -> Option<PathBuf> {
    let mut rd = tokio::fs::read_dir("/sys/bus/rbd/devices").await.ok()?;
    while let Ok(Some(e)) = rd.next_entry().await {
        let p = e.path();
        let read = |f: &str| {
            let p = p.join(f);
            async move {
                tokio::fs::read_to_string(p)
                    .await
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            }
        };
        if read("pool").await == t.pool
            && read("name").await == t.image
            && read("current_snap").await == "-"
        {
            return Some(PathBuf::from(format!(
                "/dev/rbd{}",
                e.file_name().to_string_lossy()
            )));
        }
    }
    None
}

#[derive(serde::Deserialize)]
struct NbdMapped {
    pool: String,
    image: String,
    #[serde(default)]
    snap: String,
    device: String,
}

async fn nbd_device(t: &Target) -> Result<Option<PathBuf>> {
    let out = match command::run_status(
        "rbd-nbd",
        &["list-mapped", "--format", "json"],
        SHORT_TIMEOUT,
    )
    .await
    {
        Ok(o) if o.status == 0 => o,
        // No rbd-nbd installed or no nbd module: nothing can be mapped that way.
        _ => return Ok(None),
    };
    let list: Vec<NbdMapped> = serde_json::from_str(out.stdout.trim()).unwrap_or_default();
    Ok(list
        .into_iter()
        .find(|m| m.pool == t.pool && m.image == t.image && (m.snap.is_empty() || m.snap == "-"))
        .map(|m| PathBuf::from(m.device)))
}

/// Loop device backed by `file` (from sysfs; never stat the FUSE file itself, which hangs
/// when its daemon is gone).
async fn loop_for(file: &Path) -> Option<PathBuf> {
    let mut rd = tokio::fs::read_dir("/sys/block").await.ok()?;
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = tokio::fs::read_to_string(e.path().join("loop/backing_file")).await
            && Path::new(b.trim_end()) == file
        {
            return Some(PathBuf::from(format!("/dev/{name}")));
        }
    }
    None
}

/// What holds an image on this node.
#[derive(Debug, Clone)]
enum Attached {
    Krbd(PathBuf),
    Nbd(PathBuf),
    Fuse {
        mnt: PathBuf,
        loop_dev: Option<PathBuf>,
    },
}

impl Attached {
    fn device(&self) -> Option<&Path> {
        match self {
            Attached::Krbd(d) | Attached::Nbd(d) => Some(d),
            Attached::Fuse { loop_dev, .. } => loop_dev.as_deref(),
        }
    }
}

async fn find_attached(
    inst: &RbdInstance,
    volume_id: &str,
    t: &Target,
) -> Result<Option<Attached>> {
    if let Some(d) = krbd_device(t).await {
        return Ok(Some(Attached::Krbd(d)));
    }
    let mnt = RbdNode::attach_dir(inst, volume_id).join("fuse");
    if mount::mounted_at(&mnt).await?.is_some() {
        let loop_dev = loop_for(&mnt.join(&t.image)).await;
        return Ok(Some(Attached::Fuse { mnt, loop_dev }));
    }
    if let Some(d) = nbd_device(t).await? {
        return Ok(Some(Attached::Nbd(d)));
    }
    Ok(None)
}

async fn attach(
    how: Attach,
    inst: &RbdInstance,
    volume_id: &str,
    t: &Target,
    monitors: &str,
    creds: &Creds,
    readonly: bool,
) -> Result<Attached> {
    let dir = RbdNode::attach_dir(inst, volume_id);
    let conf = write_client_files(&dir, monitors, creds).await?;
    let conf_s = mount::path_str(&conf)?.to_owned();
    let spec = format!("{}/{}", t.pool, t.image);
    match how {
        Attach::Krbd => {
            let mut opts = inst.map_options.clone();
            if !udev_running() {
                // Without udev (minimal hosts, the test VM) rbd would wait for a udev event
                // that never comes.
                opts.push("noudev".into());
            }
            let mut args = vec![
                "device".to_string(),
                "map".into(),
                "-t".into(),
                "krbd".into(),
                "-c".into(),
                conf_s,
                "--id".into(),
                creds.user.clone(),
            ];
            if readonly {
                args.push("--read-only".into());
            }
            if !opts.is_empty() {
                args.extend(["--options".into(), opts.join(",")]);
            }
            args.extend(["--".into(), spec]);
            let out = command::run("rbd", &args, ATTACH_TIMEOUT).await?;
            Ok(Attached::Krbd(PathBuf::from(out.stdout.trim())))
        }
        Attach::Nbd => {
            let mut args = vec![
                "map".to_string(),
                "-c".into(),
                conf_s,
                "--id".into(),
                creds.user.clone(),
            ];
            if readonly {
                args.push("--read-only".into());
            }
            // rbd-nbd takes no `--`; target() made sure the spec cannot start with '-'.
            args.push(spec);
            let out = command::run("rbd-nbd", &args, ATTACH_TIMEOUT).await?;
            Ok(Attached::Nbd(PathBuf::from(out.stdout.trim())))
        }
        Attach::Fuse => {
            let mnt = dir.join("fuse");
            mount::ensure_dir(&mnt).await?;
            if mount::mounted_at(&mnt).await?.is_none() {
                // One rbd-fuse per image (-r): a pool-wide one would hold a watch on every
                // image and keep `rbd rm` from removing any of them.
                command::run(
                    "rbd-fuse",
                    &[
                        "-c",
                        &conf_s,
                        "--id",
                        &creds.user,
                        "-p",
                        &t.pool,
                        "-r",
                        &t.image,
                        mount::path_str(&mnt)?,
                    ],
                    ATTACH_TIMEOUT,
                )
                .await?;
            }
            let file = mnt.join(&t.image);
            let loop_dev = match loop_for(&file).await {
                Some(d) => d,
                None => {
                    let mut args = vec!["--find", "--show", "--direct-io=on"];
                    if readonly {
                        args.push("--read-only");
                    }
                    args.extend(["--", mount::path_str(&file)?]);
                    let out = command::run("losetup", &args, SHORT_TIMEOUT).await?;
                    PathBuf::from(out.stdout.trim())
                }
            };
            Ok(Attached::Fuse {
                mnt,
                loop_dev: Some(loop_dev),
            })
        }
    }
}

async fn detach(inst: &RbdInstance, volume_id: &str, a: &Attached) -> Result<()> {
    match a {
        Attached::Krbd(dev) => {
            let mut args = vec!["device", "unmap", "-t", "krbd"];
            if !udev_running() {
                args.extend(["--options", "noudev"]);
            }
            args.push(mount::path_str(dev)?);
            command::run("rbd", &args, ATTACH_TIMEOUT).await?;
        }
        Attached::Nbd(dev) => {
            command::run("rbd-nbd", &["unmap", mount::path_str(dev)?], ATTACH_TIMEOUT).await?;
        }
        Attached::Fuse { mnt, loop_dev } => {
            if let Some(d) = loop_dev {
                command::run("losetup", &["-d", mount::path_str(d)?], SHORT_TIMEOUT).await?;
            }
            // rbd-fuse exits when unmounted, closing the image (watch and lock released).
            mount::unmount(mnt).await?;
        }
    }
    // File by file, never recursively: a recursive removal that met a live rbd-fuse mount
    // would unlink the image file there, which rbd-fuse turns into removing the image.
    let dir = RbdNode::attach_dir(inst, volume_id);
    for f in ["keyring", "ceph.conf"] {
        match tokio::fs::remove_file(dir.join(f)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", dir.join(f).display()), e)),
        }
    }
    for d in [dir.join("fuse"), dir] {
        if mount::mounted_at(&d).await?.is_none() {
            let _ = tokio::fs::remove_dir(&d).await;
        }
    }
    Ok(())
}

/// The filesystem type on a device, or None when blkid finds nothing.
async fn fs_on(dev: &Path) -> Result<Option<String>> {
    let out = command::run_status(
        "blkid",
        &["-p", "-o", "value", "-s", "TYPE", mount::path_str(dev)?],
        SHORT_TIMEOUT,
    )
    .await?;
    match out.status {
        0 => Ok(Some(out.stdout.trim().to_owned()).filter(|s| !s.is_empty())),
        2 => Ok(None),
        s => Err(Error::Internal(format!(
            "blkid {} exited with {s}: {}",
            dev.display(),
            out.stderr.trim()
        ))),
    }
}

async fn mkfs(dev: &Path, fs_type: &str) -> Result<()> {
    let d = mount::path_str(dev)?;
    // No discard: on a fresh thin image it only costs time (minutes over rbd-fuse + loop).
    match fs_type {
        "ext4" => {
            command::run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                    d,
                ],
                MKFS_TIMEOUT,
            )
            .await?
        }
        "xfs" => command::run("mkfs.xfs", &["-q", "-K", d], MKFS_TIMEOUT).await?,
        other => {
            return Err(Error::invalid(
                "volume_capability.mount.fs_type",
                format!("{other:?}: ext4 or xfs"),
            ));
        }
    };
    Ok(())
}

/// ext4 whose filesystem is smaller than its device (an online grow that the kernel refused):
/// check and grow it offline before mounting.
async fn grow_ext4_offline(dev: &Path) -> Result<()> {
    let d = mount::path_str(dev)?;
    let out = command::run_status("dumpe2fs", &["-h", d], SHORT_TIMEOUT).await?;
    let field = |name: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(blocks), Some(bsize)) = (field("Block count:"), field("Block size:")) else {
        return Ok(());
    };
    let dev_size = mount::block_device_size(dev).await?;
    if blocks.saturating_mul(bsize) + bsize * 1024 > dev_size {
        return Ok(());
    }
    tracing::info!(device = %dev.display(), "growing ext4 offline before mounting");
    let fsck = command::run_status("e2fsck", &["-f", "-p", d], MKFS_TIMEOUT).await?;
    // 0 = clean, 1 = errors corrected; anything else needs a human.
    if fsck.status > 1 {
        return Err(Error::FailedPrecondition(format!(
            "e2fsck {d} exited with {}: {}",
            fsck.status,
            fsck.stderr.trim()
        )));
    }
    command::run("resize2fs", &[d], MKFS_TIMEOUT)
        .await
        .map(|_| ())
}

#[async_trait]
impl NodeBackend for RbdNode {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn features(&self) -> NodeFeatures {
        NodeFeatures {
            expand: true,
            single_node_multi_writer: true,
            volume_mount_group: false,
        }
    }

    async fn stage(&self, req: &StageRequest) -> Result<()> {
        let (t, inst) = self.target(&req.volume_id)?;
        let monitors = req
            .context
            .get(CTX_MONITORS)
            .filter(|m| !m.is_empty())
            .cloned()
            .unwrap_or_else(|| inst.monitors.clone());
        if monitors.contains(['\n', '\0']) {
            return Err(Error::invalid(
                "volume_context",
                "monitors contains a newline or NUL",
            ));
        }
        let how = Attach::parse(
            "volume_context.attach",
            req.context.get(CTX_ATTACH).unwrap_or(&inst.attach),
        )?;
        let block = req.capability.is_block();
        let readonly = req.capability.access_mode.is_read_only();
        let fs_type = match req.capability.fs_type() {
            "" => "ext4",
            f => f,
        }
        .to_owned();
        if !block && !matches!(fs_type.as_str(), "ext4" | "xfs") {
            return Err(Error::invalid(
                "volume_capability.mount.fs_type",
                format!("{fs_type:?}: ext4 or xfs"),
            ));
        }
        let device_file = mount::staged_device(&req.staging_path);
        // Repeated call: already staged.
        if block {
            if mount::mounted_at(&device_file).await?.is_some() {
                return Ok(());
            }
        } else if mount::mounted_at(&req.staging_path).await?.is_some() {
            match mount::probe(&req.staging_path).await {
                Probe::Alive => return Ok(()),
                _ => mount::unmount(&req.staging_path).await?,
            }
        }
        let creds = creds_for(inst, &req.secrets)?.ok_or_else(|| {
            Error::invalid(
                "secrets",
                "userID and userKey are required (node-stage secret), or keyringFile on the node",
            )
        })?;
        let existing = find_attached(inst, &req.volume_id, &t).await?;
        let attached = match existing {
            Some(a) if a.device().is_some() => a,
            other => {
                // Fence: an image whose exclusive lock another client holds is in use by
                // another node; attaching it here too would corrupt a single-node volume.
                let pool = self
                    .conns
                    .pool(
                        &monitors,
                        Some(creds.clone()),
                        &t.pool,
                        inst.op_timeout_secs,
                    )
                    .await?;
                let (image, vid) = (t.image.clone(), req.volume_id.clone());
                let multi = req.capability.access_mode.is_multi_node();
                blocking(move || {
                    let img = pool.pool.open(&image).map_err(|e| {
                        if e.is(libc::ENOENT) {
                            Error::not_found("volume", &vid)
                        } else {
                            ceph_err(e, "opening")
                        }
                    })?;
                    if multi {
                        return Ok(());
                    }
                    fence(&img, &vid)
                })
                .await?;
                if let Some(half) = other {
                    // An rbd-fuse mount without its loop device: finish it below.
                    tracing::info!(volume_id = %req.volume_id, "completing a half-done attachment");
                    let _ = half;
                }
                attach(how, inst, &req.volume_id, &t, &monitors, &creds, readonly).await?
            }
        };
        let Some(dev) = attached.device().map(Path::to_path_buf) else {
            return Err(Error::Internal("attached without a device".into()));
        };
        tracing::info!(volume_id = %req.volume_id, device = %dev.display(), how = how.as_str(), "image attached");
        let res = async {
            if block {
                mount::ensure_file(&device_file).await?;
                return mount::bind(&dev, &device_file, false, &[]).await;
            }
            match fs_on(&dev).await? {
                None => {
                    if readonly {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {} has no filesystem and is staged read-only",
                            req.volume_id
                        )));
                    }
                    mkfs(&dev, &fs_type).await?;
                }
                Some(found) if found == "ext4" && !readonly => grow_ext4_offline(&dev).await?,
                Some(_) => {}
            }
            let actual = fs_on(&dev).await?.unwrap_or_else(|| fs_type.clone());
            mount::ensure_dir(&req.staging_path).await?;
            let mut opts: Vec<String> = req
                .capability
                .mount_flags()
                .iter()
                .flat_map(|f| f.split(','))
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect();
            if readonly {
                opts.push("ro".into());
                if actual == "ext4" {
                    // No journal replay on a read-only mount.
                    opts.push("noload".into());
                }
            }
            if actual == "xfs" && !opts.iter().any(|o| o == "nouuid") {
                // Snapshots and clones carry their source's XFS UUID, and XFS refuses to mount
                // a second filesystem with a UUID already mounted on this node.
                opts.push("nouuid".into());
            }
            if let Some(bad) = opts.iter().find(|o| o.contains([' ', '\n', '\0'])) {
                return Err(Error::invalid(
                    "volume_capability.mount.mount_flags",
                    format!("{bad:?} is not a mount option"),
                ));
            }
            mount::mount(
                mount::path_str(&dev)?,
                &req.staging_path,
                &actual,
                &opts,
                MOUNT_TIMEOUT,
            )
            .await
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(volume_id = %req.volume_id, error = %e, "staging failed; detaching");
            if let Err(d) = detach(inst, &req.volume_id, &attached).await {
                tracing::warn!(volume_id = %req.volume_id, error = %d, "detach after failed stage failed");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let device_file = mount::staged_device(staging_path);
        if tokio::fs::symlink_metadata(&device_file).await.is_ok() {
            mount::unmount(&device_file).await?;
            mount::remove_mount_point(&device_file).await?;
        }
        mount::unmount(staging_path).await?;
        let Ok((t, inst)) = self.target(volume_id) else {
            return Ok(());
        };
        if let Some(a) = find_attached(inst, volume_id, &t).await? {
            detach(inst, volume_id, &a).await?;
            tracing::info!(volume_id, "image detached");
        }
        Ok(())
    }

    async fn expand(&self, volume_id: &str, path: &Path, capacity_bytes: u64) -> Result<u64> {
        let (t, inst) = self.target(volume_id)?;
        let a = find_attached(inst, volume_id, &t)
            .await?
            .ok_or_else(|| Error::not_found("volume attachment on this node", volume_id))?;
        let dev = a.device().map(Path::to_path_buf).ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {volume_id} is half attached"))
        })?;
        if let Attached::Fuse { .. } = a {
            // rbd-fuse sees the new image size; the loop device must be told.
            command::run("losetup", &["-c", mount::path_str(&dev)?], SHORT_TIMEOUT).await?;
        }
        let size = mount::block_device_size(&dev).await?;
        if size < capacity_bytes {
            return Err(Error::FailedPrecondition(format!(
                "device {} is {size} bytes, less than the {capacity_bytes} asked for: ControllerExpandVolume first",
                dev.display()
            )));
        }
        let md = tokio::fs::metadata(path)
            .await
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_block_device() {
            return Ok(size);
        }
        let entry = mount::mounted_at(path).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!("{} is not a mount point", path.display()))
        })?;
        match entry.fs_type.as_str() {
            "xfs" => {
                command::run("xfs_growfs", &[mount::path_str(path)?], MKFS_TIMEOUT).await?;
            }
            "ext4" => {
                let out = command::run_status("resize2fs", &[mount::path_str(&dev)?], MKFS_TIMEOUT)
                    .await?;
                if out.status != 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "ext4 on {} could not be grown online on this node ({}); it is grown \
                         offline the next time the volume is staged",
                        dev.display(),
                        out.stderr
                            .trim()
                            .lines()
                            .last()
                            .unwrap_or("resize2fs failed")
                    )));
                }
            }
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot grow a {other} filesystem"
                )));
            }
        }
        tracing::info!(volume_id, size, "filesystem grown");
        Ok(size)
    }
}

impl std::fmt::Debug for RbdNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdNode")
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The single-node fence of NodeStage: refuses an image whose exclusive lock a live client
/// holds (another node has it attached and writes), breaks the lock of a dead one.
///
/// A lock owner counts as alive only while it still watches the image header: librbd opens
/// the header watch before it takes the lock, and a killed client (a controller SIGKILLed
/// while writing a metadata record, which takes the lock) keeps its lock on the header for
/// ever but loses its watch after the OSD's `osd_client_watch_timeout`. That is the test
/// librbd itself makes before it breaks a lock. Breaking it (with the owner blocklisted)
/// rather than ignoring it: a client that was only cut off from the cluster cannot come back
/// and write beside this node, and the next stage does not ask again.
fn fence(img: &super::ffi::Image, vid: &str) -> Result<()> {
    // A few rounds: the lock may change hands between reading it and breaking it.
    for _ in 0..3 {
        let owners = img
            .lock_owners()
            .map_err(|e| ceph_err(e, "reading lock of"))?;
        if owners.is_empty() {
            return Ok(());
        }
        let watchers = img
            .watchers()
            .map_err(|e| ceph_err(e, "listing watchers of"))?;
        let (live, dead): (Vec<String>, Vec<String>) =
            owners.into_iter().partition(|o| watchers.contains(o));
        if !live.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vid} is in use elsewhere: its exclusive lock is held by {}",
                live.join(", ")
            )));
        }
        for owner in dead {
            match img.lock_break(&owner) {
                Ok(()) => tracing::warn!(
                    volume_id = vid,
                    owner,
                    "broke the exclusive lock of a client that no longer watches the image (dead); it is blocklisted"
                ),
                // Gone or taken by someone else meanwhile: the next round looks again.
                Err(e) if e.is(libc::ENOENT) || e.is(libc::EBUSY) => {}
                Err(e) => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {vid}: its exclusive lock is held by {owner}, a client that no longer watches the image (dead), and breaking that lock failed: {e} (the cephx user needs the mon caps of `profile rbd` to blocklist it)"
                    )));
                }
            }
        }
    }
    Err(Error::Unavailable(format!(
        "volume {vid}: its exclusive lock kept changing hands while NodeStage checked it; retry"
    )))
}
