//! `stowage-bench-nfs`: N CreateVolume+DeleteVolume pairs through the real stowage-controller
//! (NFS backend, against nfs-ganesha) and, in the same run, N raw MKDIR+RMDIR pairs straight
//! through the `nfs3_client` crate: both rates and their ratio, plus the idle RSS of
//! stowage-controller and stowage-node. Not a test: it prints figures, asserts nothing timed.
//!
//! Needs STOWAGE_NFS_SERVER / _EXPORT / _PORT / _MOUNT_PORT (tests/bench/nfs.sh sets them).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nfs3_client::Nfs3ConnectionBuilder;
use nfs3_client::nfs3_types::nfs3::{
    MKDIR3args, Nfs3Result, RMDIR3args, diropargs3, filename3, sattr3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioConnector;
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, local_config, wire};

fn env(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| format!("{k} is not set (run tests/bench/nfs.sh)"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn stowage_pairs(n: usize, c: &mut stowage_tests::Clients) -> Result<Duration> {
    let t = Instant::now();
    for i in 0..n {
        let v = c
            .controller
            .create_volume(wire::create(&format!("bench-{i}"), 1 << 20))
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id,
                ..Default::default()
            })
            .await?;
    }
    Ok(t.elapsed())
}

async fn raw_pairs(
    n: usize,
    server: &str,
    export: &str,
    port: u16,
    mount_port: u16,
    base: &str,
) -> Result<Duration> {
    let cred = opaque_auth::auth_unix(&auth_unix {
        stamp: 0,
        machinename: Opaque::borrowed(b"bench"),
        uid: 0,
        gid: 0,
        gids: vec![0],
    });
    let mut conn = Nfs3ConnectionBuilder::new(TokioConnector, server, export)
        .connect_from_privileged_port(false)
        .nfs3_port(port)
        .mount_port(mount_port)
        .credential(cred)
        .mount()
        .await
        .map_err(|e| anyhow::anyhow!("mounting {server}:{export}: {e:?}"))?;
    let root = conn.root_nfs_fh3();
    // The same parent as Stowage's volumes, looked up once (as a long-lived client would).
    let parent = {
        let args = nfs3_client::nfs3_types::nfs3::LOOKUP3args {
            what: diropargs3 {
                dir: root.clone(),
                name: filename3(Opaque::borrowed(base.as_bytes())),
            },
        };
        match conn
            .lookup(&args)
            .await
            .map_err(|e| anyhow::anyhow!("LOOKUP: {e:?}"))?
        {
            Nfs3Result::Ok(ok) => ok.object,
            Nfs3Result::Err((st, _)) => anyhow::bail!("LOOKUP {base}: {st:?}"),
        }
    };
    let t = Instant::now();
    for i in 0..n {
        let name = format!("raw-{i}");
        let mk = MKDIR3args {
            where_: diropargs3 {
                dir: parent.clone(),
                name: filename3(Opaque::borrowed(name.as_bytes())),
            },
            attributes: sattr3::default(),
        };
        if let Nfs3Result::Err((st, _)) = conn
            .mkdir(&mk)
            .await
            .map_err(|e| anyhow::anyhow!("MKDIR: {e:?}"))?
        {
            anyhow::bail!("MKDIR {name}: {st:?}");
        }
        let rm = RMDIR3args {
            object: diropargs3 {
                dir: parent.clone(),
                name: filename3(Opaque::borrowed(name.as_bytes())),
            },
        };
        if let Nfs3Result::Err((st, _)) = conn
            .rmdir(&rm)
            .await
            .map_err(|e| anyhow::anyhow!("RMDIR: {e:?}"))?
        {
            anyhow::bail!("RMDIR {name}: {st:?}");
        }
    }
    Ok(t.elapsed())
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let (server, export) = (env("STOWAGE_NFS_SERVER")?, env("STOWAGE_NFS_EXPORT")?);
    let port: u16 = env("STOWAGE_NFS_PORT")?.parse()?;
    let mount_port: u16 = env("STOWAGE_NFS_MOUNT_PORT")?.parse()?;
    let work = tempfile::tempdir()?;
    let base = format!("bench-{}", std::process::id());
    let cfg = work.path().join("nfs.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: nfs\ninstances:\n  main:\n    server: {server}\n    export: {export}\n    baseDir: {base}\n    nfsPort: {port}\n    mountPort: {mount_port}\n"
        ),
    )?;
    let mut ctl = Plugin::controller(work.path(), &cfg)?;
    let mut c = controller_clients(ctl.ready().await?);
    // Warm-up: connections, the base directory and Stowage's bookkeeping directories exist.
    stowage_pairs(5, &mut c).await?;
    let idle_ctl = rss_kib(ctl.child.id());

    // Alternate rounds so that server-side drift affects both sides alike.
    let (mut s_total, mut r_total) = (Duration::ZERO, Duration::ZERO);
    let rounds = 4;
    for _ in 0..rounds {
        s_total += stowage_pairs(n / rounds, &mut c).await?;
        r_total += raw_pairs(n / rounds, &server, &export, port, mount_port, &base).await?;
    }
    let done = (n / rounds) * rounds;
    let s_rate = done as f64 / s_total.as_secs_f64();
    let r_rate = done as f64 / r_total.as_secs_f64();
    let busy_ctl = rss_kib(ctl.child.id());

    // The node plugin's idle footprint (local config: the NFS node needs none of the server).
    let node_dir = tempfile::tempdir()?;
    let node_cfg = local_config(node_dir.path(), &node_dir.path().join("base"))?;
    let mut node = Plugin::node(node_dir.path(), &node_cfg, "bench-node")?;
    node.ready().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_node = rss_kib(node.child.id());

    println!("NFS backend against nfs-ganesha, {done} pairs each, {rounds} alternating rounds");
    println!(
        "  stowage CreateVolume+DeleteVolume (gRPC, metadata, atomic rename): {s_rate:8.1} pairs/s  ({:.2} ms/pair)",
        1e3 / s_rate
    );
    println!(
        "  raw nfs3_client MKDIR+RMDIR (one connection, no bookkeeping):      {r_rate:8.1} pairs/s  ({:.2} ms/pair)",
        1e3 / r_rate
    );
    println!("  ratio stowage/raw: {:.3}", s_rate / r_rate);
    println!(
        "  RSS stowage-controller: idle {idle_ctl} KiB, after the run {busy_ctl} KiB; stowage-node idle {idle_node} KiB"
    );
    ctl.terminate().await;
    node.terminate().await;
    Ok(())
}
