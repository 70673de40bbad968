//! `stowage-bench-idle`: the idle footprint of stowage-controller and stowage-node. Each starts
//! on the local backend, answers one Probe, and after a short settle its VmRSS is read from
//! /proc (median of `--runs` starts, default 3). Not a test: it prints figures.
//!
//!   STOWAGE_BIN_DIR=$CARGO_TARGET_DIR/release stowage-bench-idle [--runs 3]

use std::time::Duration;

use anyhow::{Context, Result};
use stowage_csi::v1;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_tests::{Plugin, local_config};

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// (VmRSS, threads) of a freshly started plugin after one Probe.
async fn once(node: bool) -> Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let cfg = local_config(dir.path(), &dir.path().join("base"))?;
    let mut p = if node {
        Plugin::node(dir.path(), &cfg, "bench-idle")?
    } else {
        Plugin::controller(dir.path(), &cfg)?
    };
    let ch = p.ready().await?;
    IdentityClient::new(ch)
        .probe(v1::ProbeRequest {})
        .await
        .context("Probe")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = p.child.id();
    let rss = status_kib(pid, "VmRSS:")?;
    let threads = status_kib(pid, "Threads:")?;
    p.terminate().await;
    Ok((rss, threads))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3)
        .max(1);
    println!(
        "idle RSS after start + one Probe, local backend, median of {runs} starts ({})",
        stowage_tests::bin_dir().display()
    );
    for (name, node) in [("stowage-controller", false), ("stowage-node", true)] {
        let mut rss = Vec::new();
        let mut threads = 0;
        for _ in 0..runs {
            let (r, t) = once(node).await?;
            rss.push(r);
            threads = t;
        }
        rss.sort_unstable();
        let med = rss[rss.len() / 2];
        println!(
            "  {name:<19} VmRSS {:.1} MiB ({med} KiB; runs {rss:?}), {threads} threads",
            med as f64 / 1024.0
        );
    }
    Ok(())
}
