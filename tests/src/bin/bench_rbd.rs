//! CreateVolume + DeleteVolume rate of the RBD backend (the real stowage-controller over its
//! unix socket) against the same librbd calls made directly (rbd_create4 + rbd_remove through
//! one librados connection), in the same run on the same cluster. Prints both rates and the
//! ratio. Not a test: nothing is asserted about time.
//!
//! ```sh
//! tests/infra/ceph.sh start --state /tmp/bench-ceph
//! stowage-bench-rbd --env /tmp/bench-ceph/env --count 50
//! ```

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use stowage_backends::rbd::ffi;
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<()> {
    let env_file = arg("--env")
        .or_else(|| std::env::var("STOWAGE_CEPH_ENV").ok())
        .context("--env FILE (tests/infra/ceph.sh's env file) is required")?;
    let count: usize = arg("--count").map_or(Ok(50), |c| c.parse())?;
    let size: u64 = 64 << 20;
    let env: HashMap<String, String> = std::fs::read_to_string(&env_file)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect();
    let (mons, key) = (env["CEPH_MON_HOST"].clone(), env["CEPH_ADMIN_KEY"].clone());
    let tag = std::process::id();

    // Baseline: the librbd calls CreateVolume and DeleteVolume boil down to, made directly.
    let (m2, k2) = (mons.clone(), key.clone());
    let direct = tokio::task::spawn_blocking(move || -> Result<f64> {
        let cluster = ffi::Cluster::connect(&ffi::ConnectOptions {
            monitors: &m2,
            user: "admin",
            key: &k2,
            op_timeout_secs: 30,
        })?;
        let pool = cluster.pool("rbd")?;
        let opts = ffi::ImageOptions {
            features: ffi::FEATURE_LAYERING | ffi::FEATURE_EXCLUSIVE_LOCK,
            order: 22,
        };
        let t = Instant::now();
        for i in 0..count {
            let name = format!("bench-direct-{tag}-{i}");
            pool.create_image(&name, size, &opts)?;
            pool.remove_image(&name)?;
        }
        Ok(count as f64 / t.elapsed().as_secs_f64())
    })
    .await??;

    // Stowage: the real controller binary, CSI over its unix socket.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("rbd.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: rbd\ninstances:\n  default:\n    monitors: \"{mons}\"\n    pool: rbd\n    keyringFile: {}\n",
            env["CEPH_KEYRING"]
        ),
    )?;
    let mut ctl = Plugin::controller(dir.path(), &cfg)?;
    let mut c = controller_clients(ctl.ready().await?);
    let secrets: HashMap<String, String> =
        [("userID".into(), "admin".into()), ("userKey".into(), key)].into();
    let req = |name: String| v1::CreateVolumeRequest {
        name,
        capacity_range: Some(v1::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![stowage_tests::wire::rwo()],
        secrets: secrets.clone(),
        ..Default::default()
    };
    // One call outside the timing: it opens the cluster connection the rest reuse.
    let warm = c
        .controller
        .create_volume(req(format!("bench-warm-{tag}")))
        .await?;
    let warm_id = warm.into_inner().volume.context("no volume")?.volume_id;
    let t = Instant::now();
    for i in 0..count {
        let v = c
            .controller
            .create_volume(req(format!("bench-csi-{tag}-{i}")))
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: v.volume_id,
                secrets: secrets.clone(),
            })
            .await?;
    }
    let stowage = count as f64 / t.elapsed().as_secs_f64();
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: warm_id,
            secrets: secrets.clone(),
        })
        .await?;
    if stowage <= 0.0 || direct <= 0.0 {
        bail!("no measurement");
    }
    println!(
        "RBD CreateVolume+DeleteVolume, {count} pairs of {} MiB images, sequential:",
        size >> 20
    );
    println!("  librbd direct (rbd_create4 + rbd_remove): {direct:8.1} pairs/s");
    println!("  stowage-controller over CSI (gRPC/UDS):   {stowage:8.1} pairs/s");
    println!("  ratio stowage/direct: {:.2}", stowage / direct);
    Ok(())
}
