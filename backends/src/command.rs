//! Running external programs (mount, losetup, mkfs...) with argv only and a hard timeout.
//!
//! A hung `mount -t nfs` must not poison later calls (a known csi-driver-nfs failure): the
//! child is killed when its time is up and the call returns Unavailable.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

/// Default bound for mount-type commands.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

static MOUNT_TIMEOUT_OVERRIDE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets the bound for mount-type commands once, at start (the node's `--mount-timeout-secs`).
pub fn set_mount_timeout(d: Duration) {
    let _ = MOUNT_TIMEOUT_OVERRIDE.set(d);
}

/// The bound for mount-type commands: configured, else [`MOUNT_TIMEOUT`].
pub fn mount_timeout() -> Duration {
    MOUNT_TIMEOUT_OVERRIDE
        .get()
        .copied()
        .unwrap_or(MOUNT_TIMEOUT)
}

/// Default bound for quick local commands (losetup, blkid...).
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args...`, returning its output whatever the exit status; Err only when it
/// could not run or timed out.
pub async fn run_status<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output> {
    run_inner(program, args, timeout, false).await
}

/// Like [`run`], but the child is also killed if the plugin dies (SIGKILL included), for work
/// that must not outlive the call that asked for it: a copy left running by a killed controller
/// would keep writing into a tree the retry is cleaning up. Not for mount helpers, whose FUSE
/// daemons must survive a plugin restart.
pub async fn run_tied<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output> {
    check(program, run_inner(program, args, timeout, true).await?)
}

async fn run_inner<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
    tied: bool,
) -> Result<Output> {
    let mut cmd = Command::new(program);
    if tied {
        // SAFETY: prctl is async-signal-safe and only changes the child being set up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A new process group so that helpers a command forks (mount.nfs, FUSE daemons started in
    // the foreground) are not tied to our terminal signals.
    cmd.process_group(0);
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::FailedPrecondition(format!("{program} is not installed on this node"))
        }
        _ => Error::io(format!("spawning {program}"), e),
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(Error::io(format!("waiting for {program}"), e)),
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => Err(Error::Unavailable(format!(
            "{program} did not finish within {}s and was killed",
            timeout.as_secs()
        ))),
    }
}

/// Runs a command that must succeed; a non-zero exit becomes an error carrying its stderr.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S], timeout: Duration) -> Result<Output> {
    check(program, run_status(program, args, timeout).await?)
}

fn check(program: &str, out: Output) -> Result<Output> {
    if out.status != 0 {
        let msg = out.stderr.trim();
        let msg = if msg.is_empty() {
            out.stdout.trim()
        } else {
            msg
        };
        return Err(Error::Internal(format!(
            "{program} exited with {}: {msg}",
            out.status
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kills_on_timeout() {
        let t = std::time::Instant::now();
        let err = run("sleep", &["30"], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn reports_failure_and_missing_programs() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], SHORT_TIMEOUT)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let err = run("/nonexistent/prog", &[] as &[&str], SHORT_TIMEOUT)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not installed"), "{err}");
    }
}
