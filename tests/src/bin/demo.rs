//! `stowage-demo`: Stowage on its embedded default (the local backend), one volume walked
//! through its whole life over the real CSI sockets, each step timed.
//!
//! Needs root: staging and publishing are real bind mounts.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, is_root, local_config, node_client, wire};

struct Steps {
    started: Instant,
    n: u32,
}

impl Steps {
    async fn run<T, F: std::future::Future<Output = Result<T>>>(
        &mut self,
        what: &str,
        f: F,
    ) -> Result<T> {
        self.n += 1;
        let t = Instant::now();
        let out = f
            .await
            .with_context(|| format!("step {}: {what}", self.n))?;
        println!(
            "{:>2}. {what:<52} {:>8.2} ms",
            self.n,
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(out)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if !is_root() {
        bail!("stowage-demo mounts volumes (bind mounts) and must run as root: sudo ./demo.sh");
    }
    let work = tempfile::Builder::new().prefix("stowage-demo-").tempdir()?;
    let base = work.path().join("volumes");
    let cfg = local_config(work.path(), &base)?;
    println!(
        "Stowage demo: local backend, volumes under {}",
        base.display()
    );
    let mut s = Steps {
        started: Instant::now(),
        n: 0,
    };

    let mut ctl = Plugin::controller(work.path(), &cfg)?;
    let mut node = Plugin::node(work.path(), &cfg, "demo-node")?;
    let ch = s
        .run("start stowage-controller", async { ctl.ready().await })
        .await?;
    let nch = s
        .run("start stowage-node", async { node.ready().await })
        .await?;
    let mut c = controller_clients(ch);
    let mut n = node_client(nch);

    let vol = s
        .run("CreateVolume demo-volume (64 MiB)", async {
            c.controller
                .create_volume(wire::create("demo-volume", 64 << 20))
                .await?
                .into_inner()
                .volume
                .context("no volume")
        })
        .await?;
    let staging = work.path().join("staging");
    let target = work.path().join("pod/mount");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(target.parent().context("parent")?)?;
    s.run("NodeStageVolume", async {
        n.node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(wire::rwo()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await?;
        Ok(())
    })
    .await?;
    s.run("NodePublishVolume", async {
        n.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(wire::rwo()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await?;
        Ok(())
    })
    .await?;
    let file: PathBuf = target.join("hello.txt");
    let text = "written through the published mount\n";
    s.run("write hello.txt in the pod's mount", async {
        Ok(std::fs::write(&file, text)?)
    })
    .await?;
    let back = s
        .run("read it back", async {
            Ok(std::fs::read_to_string(&file)?)
        })
        .await?;
    if back != text {
        bail!("read back {back:?}, wrote {text:?}");
    }
    let on_backend = base
        .join(vol.volume_id.split_once('/').map_or("", |(_, p)| p))
        .join("hello.txt");
    s.run("check the bytes on the backend directory", async {
        let b = std::fs::read_to_string(&on_backend)
            .with_context(|| format!("reading {}", on_backend.display()))?;
        if b != text {
            bail!("backend has {b:?}");
        }
        Ok(())
    })
    .await?;
    s.run("NodeUnpublishVolume", async {
        n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.to_string_lossy().into(),
        })
        .await?;
        Ok(())
    })
    .await?;
    s.run("NodeUnstageVolume", async {
        n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await?;
        Ok(())
    })
    .await?;
    let snap = s
        .run("CreateSnapshot demo-snapshot", async {
            c.controller
                .create_snapshot(v1::CreateSnapshotRequest {
                    source_volume_id: vol.volume_id.clone(),
                    name: "demo-snapshot".into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .context("no snapshot")
        })
        .await?;
    s.run("DeleteSnapshot", async {
        c.controller
            .delete_snapshot(v1::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    })
    .await?;
    s.run("DeleteVolume", async {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    })
    .await?;
    if on_backend.exists() {
        bail!("volume data still on the backend after DeleteVolume");
    }
    ctl.terminate().await;
    node.terminate().await;
    println!(
        "done in {:.1} ms: volume {} created, mounted, written, read, snapshotted and deleted",
        s.started.elapsed().as_secs_f64() * 1e3,
        vol.volume_id
    );
    Ok(())
}
