//! GlusterFS benchmark against a real glusterd (tests/infra/gluster.sh; reads its
//! STOWAGE_GLUSTER_* variables). Prints rates and the ratio against a raw baseline measured in
//! the same run on the same volume:
//!   - CreateVolume+DeleteVolume through stowage-controller vs the raw CLI sequence
//!     (mkdir on a FUSE mount + `quota limit-usage`, then `quota remove` + rmdir);
//!   - NodeStage+NodePublish through stowage-node vs a raw `mount -t glusterfs` of the same
//!     subdirectory.
//!
//! Not a test: nothing is asserted about time. `BENCH_N` sets the number of rounds (20).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, node_client, wire};

fn var(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| {
        format!("{k} not set: run tests/infra/gluster.sh start, then `set -a; . STATE/env`")
    })
}

fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .arg("120")
        .arg(prog)
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{prog} {args:?}: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// A gluster CLI call that must succeed (reads opRet, since --xml exits 0 on failure).
fn gluster(sock: &str, args: &[&str]) -> Result<()> {
    let mut a = vec![
        "--mode=script".to_string(),
        format!("--glusterd-sock={sock}"),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push("--xml".into());
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    loop {
        let out = run("gluster", &refs)?;
        let r = stowage_backends::glusterfs::cli::parse_reply(&out).map_err(anyhow::Error::msg)?;
        if r.op_ret == 0 {
            return Ok(());
        }
        if r.op_errstr.contains("Another transaction") {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        bail!("gluster {args:?}: {}", r.op_errstr);
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let host = var("STOWAGE_GLUSTER_HOST")?;
    let volume = var("STOWAGE_GLUSTER_VOLUME")?;
    let sock = var("STOWAGE_GLUSTER_SOCK")?;
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let base = format!("bench-{}", std::process::id());
    let cfg = dir.path().join("gluster.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: glusterfs\ninstances:\n  main:\n    servers: [{host}]\n    volume: {volume}\n    baseDir: {base}\n    glusterd:\n      socket: {sock}\n    stateDir: {}\n",
            dir.path().join("state").display()
        ),
    )?;
    let mut ctl = Plugin::controller(dir.path(), &cfg)?;
    let mut node = Plugin::node(dir.path(), &cfg, "bench-node")?;
    let mut c = controller_clients(ctl.ready().await?).controller;
    let mut nc = node_client(node.ready().await?);
    let raw_mnt = dir.path().join("raw");
    std::fs::create_dir_all(&raw_mnt)?;
    run(
        "mount",
        &[
            "-t",
            "glusterfs",
            &format!("{host}:/{volume}"),
            raw_mnt.to_str().unwrap_or_default(),
        ],
    )?;
    let res = bench(
        &mut c,
        &mut nc,
        &raw_mnt,
        &host,
        &volume,
        &sock,
        &base,
        dir.path(),
        n,
    )
    .await;
    let _ = run("umount", &[raw_mnt.to_str().unwrap_or_default()]);
    let mps: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.starts_with(&*dir.path().to_string_lossy()))
        .collect();
    for m in mps.iter().rev() {
        let _ = run("umount", &["-l", m]);
    }
    res
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    c: &mut v1::controller_client::ControllerClient<tonic::transport::Channel>,
    nc: &mut v1::node_client::NodeClient<tonic::transport::Channel>,
    raw_mnt: &Path,
    host: &str,
    volume: &str,
    sock: &str,
    base: &str,
    work: &Path,
    n: usize,
) -> Result<()> {
    // Warm-up: the controller's management mount and quota set-up happen on first use.
    let v = c
        .create_volume(wire::create("bench-warm", 4 << 20))
        .await?
        .into_inner()
        .volume
        .unwrap_or_default();
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await?;
    std::fs::create_dir_all(raw_mnt.join(base))?;

    let t = Instant::now();
    for i in 0..n {
        let v = c
            .create_volume(wire::create(&format!("bench-{i}"), 4 << 20))
            .await?
            .into_inner()
            .volume
            .unwrap_or_default();
        c.delete_volume(v1::DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await?;
    }
    let ours = t.elapsed();

    let t = Instant::now();
    for i in 0..n {
        let rel = format!("{base}/raw-{i}");
        std::fs::create_dir(raw_mnt.join(&rel))?;
        gluster(
            sock,
            &[
                "volume",
                "quota",
                volume,
                "limit-usage",
                &format!("/{rel}"),
                "4194304",
            ],
        )?;
        gluster(
            sock,
            &["volume", "quota", volume, "remove", &format!("/{rel}")],
        )?;
        std::fs::remove_dir(raw_mnt.join(&rel))?;
    }
    let raw = t.elapsed();
    println!(
        "CreateVolume+DeleteVolume: stowage {:.2}/s ({:.0} ms each), raw CLI mkdir+quota {:.2}/s ({:.0} ms each), ratio stowage/raw {:.2}",
        rate(n, ours),
        ours.as_secs_f64() * 1000.0 / n as f64,
        rate(n, raw),
        raw.as_secs_f64() * 1000.0 / n as f64,
        rate(n, ours) / rate(n, raw)
    );

    let v = c
        .create_volume(wire::create("bench-mount", 64 << 20))
        .await?
        .into_inner()
        .volume
        .unwrap_or_default();
    let staging = work.join("staging");
    let target = work.join("target");
    let raw_target = work.join("raw-target");
    std::fs::create_dir_all(&raw_target)?;
    let (mut ours, mut raw) = (Duration::ZERO, Duration::ZERO);
    let path = v.volume_context.get("path").cloned().unwrap_or_default();
    for _ in 0..n {
        let t = Instant::now();
        nc.node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(wire::rwo()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await?;
        nc.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(wire::rwo()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await?;
        ours += t.elapsed();
        nc.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: target.to_string_lossy().into(),
        })
        .await?;
        nc.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await?;

        let t = Instant::now();
        run(
            "mount",
            &[
                "-t",
                "glusterfs",
                &format!("{host}:/{volume}{path}"),
                raw_target.to_str().unwrap_or_default(),
            ],
        )?;
        raw += t.elapsed();
        run("umount", &[raw_target.to_str().unwrap_or_default()])?;
    }
    println!(
        "NodeStage+NodePublish: stowage {:.0} ms each, raw mount -t glusterfs {:.0} ms each, ratio stowage/raw time {:.2}",
        ours.as_secs_f64() * 1000.0 / n as f64,
        raw.as_secs_f64() * 1000.0 / n as f64,
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await?;
    let _ = std::fs::remove_dir(raw_mnt.join(base).join(".stowage"));
    Ok(())
}
