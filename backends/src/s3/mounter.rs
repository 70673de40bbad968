//! FUSE mounters for S3 volumes: how each one is started (argv, environment, credential files)
//! and how the node knows it is really mounted before answering.
//!
//! A mounter runs in the foreground of its own process group with its output in a log file
//! next to its record. It is never waited on by the plugin and is not killed when the plugin
//! exits, so a node plugin restart leaves every mount working.
//!
//! s3fs started with a bad option exits at once, and one started with bad credentials mounts
//! and then exits when its first S3 check fails: in both cases a write made "after the mount"
//! would land in the directory underneath. So the mount is ready only when the mount table
//! shows a FUSE filesystem at the path, a stat of its root answers, and the mounter is still
//! running after that.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mount::{self, Probe};

/// Which program mounts a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    S3fs,
    Rclone,
}

impl Kind {
    pub fn parse(field: &'static str, s: &str) -> Result<Self> {
        match s {
            "s3fs" => Ok(Kind::S3fs),
            "rclone" => Ok(Kind::Rclone),
            other => Err(Error::invalid(
                field,
                format!("{other:?}: supported mounters are s3fs and rclone"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::S3fs => "s3fs",
            Kind::Rclone => "rclone",
        }
    }

    pub fn program(self) -> &'static str {
        self.as_str()
    }
}

/// Everything a mounter needs besides credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountSpec {
    pub kind: Kind,
    /// None = AWS's regional endpoint.
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub bucket: String,
    pub prefix: Option<String>,
    pub readonly: bool,
    /// Extra mounter options (StorageClass mountOptions), already validated.
    pub options: Vec<String>,
}

/// Options Stowage sets itself: a StorageClass must not override them (credentials, where
/// the endpoint is, staying in the foreground).
const S3FS_RESERVED: &[&str] = &[
    "passwd_file",
    "url",
    "endpoint",
    "bucket",
    "nonempty",
    "f",
    "d",
    "curldbg",
    "ibm_iam_auth",
    "use_session_token",
];
const RCLONE_RESERVED: &[&str] = &[
    "--config",
    "--daemon",
    "--log-file",
    "--s3-access-key-id",
    "--s3-secret-access-key",
    "--s3-session-token",
    "--s3-endpoint",
    "--s3-region",
    "--s3-provider",
    "--s3-env-auth",
    "--s3-force-path-style",
    "--cache-dir",
    "--rc",
    "--rc-addr",
];

/// Splits and validates StorageClass mountOptions for a mounter. s3fs takes `-o` options
/// (comma lists allowed); rclone takes `--flag[=value]` flags.
pub fn parse_options(kind: Kind, flags: &[String]) -> Result<Vec<String>> {
    const FIELD: &str = "volume_capability.mount.mount_flags";
    let mut out = Vec::new();
    for f in flags {
        match kind {
            Kind::S3fs => {
                for o in f.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                    let ok = o.bytes().all(|c| {
                        c.is_ascii_alphanumeric()
                            || matches!(c, b'_' | b'=' | b'.' | b':' | b'/' | b'-')
                    });
                    if !ok || o.starts_with('-') {
                        return Err(Error::invalid(
                            FIELD,
                            format!("{o:?} is not an s3fs option (name or name=value)"),
                        ));
                    }
                    let name = o.split('=').next().unwrap_or(o);
                    if S3FS_RESERVED.contains(&name) {
                        return Err(Error::invalid(
                            FIELD,
                            format!("s3fs option {name} is set by the driver and cannot be given"),
                        ));
                    }
                    out.push(o.to_owned());
                }
            }
            Kind::Rclone => {
                for o in f.split_whitespace() {
                    let name = o.split('=').next().unwrap_or(o);
                    let ok = name.starts_with("--")
                        && name.len() > 2
                        && name[2..]
                            .bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                        && o.bytes().all(|c| c.is_ascii_graphic());
                    if !ok {
                        return Err(Error::invalid(
                            FIELD,
                            format!("{o:?} is not an rclone flag (--name or --name=value)"),
                        ));
                    }
                    if RCLONE_RESERVED.contains(&name) {
                        return Err(Error::invalid(
                            FIELD,
                            format!("rclone flag {name} is set by the driver and cannot be given"),
                        ));
                    }
                    out.push(o.to_owned());
                }
            }
        }
    }
    Ok(out)
}

/// Files in a mount's record directory.
pub const PASSWD_FILE: &str = "passwd";
pub const CREDENTIALS_FILE: &str = "credentials";
pub const LOG_FILE: &str = "mounter.log";

fn aws_url(region: &str) -> String {
    format!("https://s3.{region}.amazonaws.com")
}

/// A mounter's argv (program first) and the environment it needs besides ours.
pub type CommandLine = (Vec<String>, Vec<(String, String)>);

/// The command line for mounting `spec` at `target`, with the credential files in `dir`.
pub fn command_line(spec: &MountSpec, target: &Path, dir: &Path) -> Result<CommandLine> {
    let target = mount::path_str(target)?.to_owned();
    let dir_s = mount::path_str(dir)?.to_owned();
    let url = spec
        .endpoint
        .clone()
        .unwrap_or_else(|| aws_url(&spec.region));
    match spec.kind {
        Kind::S3fs => {
            let source = match &spec.prefix {
                Some(p) => format!("{}:/{p}", spec.bucket),
                None => spec.bucket.clone(),
            };
            let mut opts = vec![
                format!("url={url}"),
                format!("endpoint={}", spec.region),
                format!("passwd_file={dir_s}/{PASSWD_FILE}"),
                // Pods run as any user: let them in; permissions are the pod's business.
                "allow_other".into(),
            ];
            if spec.path_style {
                opts.push("use_path_request_style".into());
            }
            if spec.readonly {
                opts.push("ro".into());
            }
            opts.extend(spec.options.iter().cloned());
            Ok((
                vec![
                    "s3fs".into(),
                    source,
                    target,
                    "-f".into(),
                    "-o".into(),
                    opts.join(","),
                ],
                Vec::new(),
            ))
        }
        Kind::Rclone => {
            let mut remote = format!(":s3:{}", spec.bucket);
            if let Some(p) = &spec.prefix {
                remote.push('/');
                remote.push_str(p);
            }
            let mut argv = vec![
                "rclone".into(),
                "mount".into(),
                remote,
                target,
                format!("--config={dir_s}/rclone.conf"),
                "--s3-provider=Other".into(),
                format!("--s3-endpoint={url}"),
                format!("--s3-region={}", spec.region),
                format!("--s3-force-path-style={}", spec.path_style),
                "--s3-env-auth=true".into(),
                format!("--cache-dir={dir_s}/cache"),
                "--allow-other".into(),
                // Whole-file writes through a local cache (random writes, appends, renames of
                // open files), uploaded as soon as the file is closed.
                "--vfs-cache-mode=writes".into(),
                "--vfs-write-back=0s".into(),
                "--dir-cache-time=5s".into(),
            ];
            if spec.readonly {
                argv.push("--read-only".into());
            }
            argv.extend(spec.options.iter().cloned());
            Ok((
                argv,
                vec![
                    (
                        "AWS_SHARED_CREDENTIALS_FILE".into(),
                        format!("{dir_s}/{CREDENTIALS_FILE}"),
                    ),
                    ("AWS_PROFILE".into(), "default".into()),
                ],
            ))
        }
    }
}

/// Environment variables a mounter must not inherit from the plugin: credentials or config
/// that would override the volume's own.
/// The plugin's environment variables a mounter inherits; everything else is dropped.
const KEPT_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// Starts the mounter and waits (bounded) until the mount is live. Returns the mounter's pid.
pub async fn start(spec: &MountSpec, target: &Path, dir: &Path, timeout: Duration) -> Result<u32> {
    let (argv, env) = command_line(spec, target, dir)?;
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&log_path)
        .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Not killed with the plugin: the mount must survive a plugin restart.
        .kill_on_drop(false)
        // Its own process group: no terminal or group signals aimed at the plugin reach it.
        .process_group(0)
        .current_dir(dir);
    // A clean environment, not the plugin's: whatever credentials or settings the plugin's
    // own environment holds (AWS_*, RCLONE_*, a proxy) must not change what the mounter does
    // or be readable in its /proc/<pid>/environ. Only what a program needs to run is kept.
    cmd.env_clear();
    for k in KEPT_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.env("HOME", dir);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::FailedPrecondition(format!("mounter {} is not installed on this node", argv[0]))
        }
        _ => Error::io(format!("starting {}", argv[0]), e),
    })?;
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    let what = format!(
        "{} mount of {} at {}",
        argv[0],
        spec_source(spec),
        target.display()
    );
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::io(format!("waiting for {}", argv[0]), e))?
        {
            // It may have mounted before it gave up: never leave that behind.
            let _ = mount::unmount(target).await;
            return Err(failed(&what, &format!("exited with {status}"), &log_path).await);
        }
        if let Some(m) = mount::mounted_at(target).await?
            && m.fs_type.starts_with("fuse")
        {
            match probe_live(target).await {
                Probe::Alive => {
                    // The first stat waits for the mounter's own start-up checks; it must
                    // still be running after them.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if child.try_wait().ok().flatten().is_none()
                        && mount::mounted_at(target).await?.is_some()
                    {
                        return Ok(pid);
                    }
                }
                Probe::Dead(_) | Probe::Missing => {}
            }
        }
        if started.elapsed() > timeout {
            let _ = child.start_kill();
            let _ = mount::unmount(target).await;
            return Err(Error::Unavailable(format!(
                "{what}: not ready within {}s; log: {}",
                timeout.as_secs(),
                log_tail(&log_path).await
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spec_source(spec: &MountSpec) -> String {
    match &spec.prefix {
        Some(p) => format!("s3://{}/{p}/", spec.bucket),
        None => format!("s3://{}", spec.bucket),
    }
}

async fn failed(what: &str, how: &str, log: &Path) -> Error {
    let tail = log_tail(log).await;
    let lower = tail.to_ascii_lowercase();
    if lower.contains("invalid credentials")
        || lower.contains("invalidaccesskeyid")
        || lower.contains("signaturedoesnotmatch")
    {
        return Error::invalid(
            "secrets",
            format!("{what}: the S3 endpoint rejected the node-stage secret's credentials: {tail}"),
        );
    }
    if lower.contains("unknown option")
        || lower.contains("unknown flag")
        || lower.contains("invalid option")
    {
        return Error::invalid(
            "volume_capability.mount.mount_flags",
            format!("{what}: {how}: {tail}"),
        );
    }
    Error::Internal(format!("{what}: {how}: {tail}"))
}

/// The last lines of a mounter's log, for error messages.
pub async fn log_tail(p: &Path) -> String {
    let text = tokio::fs::read_to_string(p).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(4);
    let s = lines[start..].join(" | ");
    if s.is_empty() {
        "(no output)".into()
    } else {
        s
    }
}

/// Whether a FUSE mount answers. A stat is not enough: the kernel answers it from its
/// attribute cache for a while after the mounter died. statfs always goes to the mounter.
pub async fn probe_live(path: &Path) -> Probe {
    let p = path.to_path_buf();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || rustix::fs::statvfs(&p)),
    )
    .await;
    match res {
        Err(_) => Probe::Dead("statfs timed out after 10s".into()),
        Ok(Err(e)) => Probe::Dead(e.to_string()),
        Ok(Ok(Ok(_))) => Probe::Alive,
        Ok(Ok(Err(e))) if e == rustix::io::Errno::NOENT => Probe::Missing,
        Ok(Ok(Err(e))) => Probe::Dead(std::io::Error::from(e).to_string()),
    }
}

/// Whether `pid` is still the mounter of `target` (guards against pid reuse).
pub fn is_mounter_of(pid: u32, target: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = target.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

/// The pid of a running mounter started with exactly the command line [`start`] uses for
/// `spec` at `target` with its files in `dir`. That command line names the volume's bucket
/// and prefix, the staging path and the record directory (private to the plugin, one per
/// staging path), so a match is this volume's mounter, started by this plugin, even without a
/// recorded pid (the plugin died before it could write it).
pub fn find(spec: &MountSpec, target: &Path, dir: &Path) -> Option<u32> {
    let (argv, _) = command_line(spec, target, dir).ok()?;
    let want: Vec<&[u8]> = argv.iter().map(|a| a.as_bytes()).collect();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd
            .strip_suffix(&[0])
            .unwrap_or(&cmd)
            .split(|b| *b == 0)
            .collect();
        if args == want && is_mounter_of(pid, target) {
            return Some(pid);
        }
    }
    None
}

/// Stops a mounter that is still running after its mount went away: SIGTERM, then SIGKILL.
pub async fn stop(pid: u32, target: &Path) {
    if !is_mounter_of(pid, target) {
        return;
    }
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !is_mounter_of(pid, target) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
}

/// The directory of a mount's record and credential files.
pub fn record_dir(state_dir: &Path, staging: &Path) -> PathBuf {
    state_dir.join(super::hash_hex(&staging.to_string_lossy(), 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind) -> MountSpec {
        MountSpec {
            kind,
            endpoint: Some("http://127.0.0.1:7480".into()),
            region: "us-east-1".into(),
            path_style: true,
            bucket: "shared".into(),
            prefix: Some("pvc-1".into()),
            readonly: true,
            options: vec!["uid=1000".into()],
        }
    }

    #[test]
    fn s3fs_argv_has_no_secrets_and_stays_in_foreground() {
        let (argv, env) =
            command_line(&spec(Kind::S3fs), Path::new("/st"), Path::new("/var/x")).unwrap();
        assert_eq!(&argv[..4], &["s3fs", "shared:/pvc-1", "/st", "-f"]);
        let o = &argv[5];
        for want in [
            "url=http://127.0.0.1:7480",
            "passwd_file=/var/x/passwd",
            "use_path_request_style",
            "ro",
            "uid=1000",
            "allow_other",
        ] {
            assert!(o.split(',').any(|x| x == want), "{want} in {o}");
        }
        assert!(env.is_empty());
    }

    #[test]
    fn rclone_argv_uses_a_credentials_file() {
        let (argv, env) =
            command_line(&spec(Kind::Rclone), Path::new("/st"), Path::new("/var/x")).unwrap();
        assert_eq!(&argv[..4], &["rclone", "mount", ":s3:shared/pvc-1", "/st"]);
        assert!(argv.contains(&"--read-only".to_string()));
        assert!(
            env.iter()
                .any(|(k, v)| k == "AWS_SHARED_CREDENTIALS_FILE" && v == "/var/x/credentials")
        );
    }

    #[test]
    fn options_are_validated() {
        assert_eq!(
            parse_options(
                Kind::S3fs,
                &["uid=1000,gid=1000".into(), "umask=0022".into()]
            )
            .unwrap(),
            vec!["uid=1000", "gid=1000", "umask=0022"]
        );
        for bad in [
            "passwd_file=/etc/shadow",
            "url=http://evil",
            "a b",
            "-f",
            "x;rm",
        ] {
            let e = parse_options(Kind::S3fs, &[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("mount_flags"), "{bad}: {e}");
        }
        assert!(parse_options(Kind::Rclone, &["--vfs-cache-mode=full".into()]).is_ok());
        for bad in ["--config=/x", "vfs", "--s3-secret-access-key=x", "--Bad"] {
            assert!(parse_options(Kind::Rclone, &[bad.into()]).is_err(), "{bad}");
        }
    }
}
