//! `stowage-bench-s3`: the S3 backend's costs next to their baselines, measured in one run
//! against one gateway. Not a test: it prints figures and asserts nothing timed.
//!
//! 1. Mount time: NodeStageVolume + NodePublishVolume through the real stowage-node, against
//!    the same mounter started by hand with the same arguments (no CSI, no checks).
//! 2. Bytes through the mount (per mounter: s3fs, rclone) against direct S3 PUT/GET of the same
//!    bytes with the same SDK: one large sequential file written and read back (after a
//!    remount, so no page cache helps), and small-file creates per second against PutObject
//!    per second; the mounter's resident memory (idle after mount, peak after the workload).
//!
//! Needs root, STOWAGE_S3_ENDPOINT / _ACCESS_KEY / _SECRET_KEY (tests/bench/s3.sh starts a
//! gateway and sets them), s3fs and (optional) rclone on PATH.
//! Flags: --size-mib N (default 256), --files N (default 200), --rounds N (default 5),
//! --mounters s3fs,rclone.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use stowage_backends::s3::aws_sdk_s3;
use stowage_backends::s3::client::{self as s3client, Creds, Endpoint};
use stowage_backends::s3::mounter::{self, Kind, MountSpec};
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Plugin, controller_clients, node_client, wire};

struct Args {
    size_mib: usize,
    files: usize,
    rounds: usize,
    mounters: Vec<Kind>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        size_mib: 256,
        files: 200,
        rounds: 5,
        mounters: vec![Kind::S3fs, Kind::Rclone],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).context("flag without value")?;
        match argv[i].as_str() {
            "--size-mib" => a.size_mib = v.parse()?,
            "--files" => a.files = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--mounters" => {
                a.mounters = v
                    .split(',')
                    .map(|m| Kind::parse("--mounters", m).map_err(anyhow::Error::from))
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown flag {other}"),
        }
        i += 2;
    }
    Ok(a)
}

fn env(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| format!("{k} is not set (run tests/bench/s3.sh)"))
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mounter_pid(staging: &Path) -> Option<u32> {
    let want = staging.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        cmd.split(|b| *b == 0).any(|a| a == want).then_some(pid)
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mibps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn secrets(ak: &str, sk: &str) -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyID".to_string(), ak.to_string()),
        ("secretAccessKey".to_string(), sk.to_string()),
    ])
}

fn rwx() -> v1::VolumeCapability {
    wire::mount_cap(Mode::MultiNodeMultiWriter)
}

struct Node {
    n: v1::node_client::NodeClient<tonic::transport::Channel>,
    ak: String,
    sk: String,
}

impl Node {
    async fn stage(&mut self, vol: &v1::Volume, staging: &Path) -> Result<()> {
        self.n
            .node_stage_volume(v1::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(rwx()),
                volume_context: vol.volume_context.clone(),
                secrets: secrets(&self.ak, &self.sk),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn publish(&mut self, vol: &v1::Volume, staging: &Path, target: &Path) -> Result<()> {
        self.n
            .node_publish_volume(v1::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(rwx()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn teardown(&mut self, vol: &v1::Volume, staging: &Path, target: &Path) -> Result<()> {
        self.n
            .node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.to_string_lossy().into(),
            })
            .await?;
        self.n
            .node_unstage_volume(v1::NodeUnstageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await?;
        Ok(())
    }
}

/// The same mounter, same arguments, started by hand: the baseline of the mount time.
async fn raw_mount(spec: &MountSpec, target: &Path, cred_dir: &Path) -> Result<(Duration, u32)> {
    std::fs::create_dir_all(target)?;
    let (argv, envs) = mounter::command_line(spec, target, cred_dir)?;
    let t = Instant::now();
    let child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .envs(envs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let want = target.to_string_lossy().to_string();
    loop {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()));
        if mounted && rustix::fs::statvfs(target).is_ok() {
            return Ok((t.elapsed(), child.id()));
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("raw {} mount not ready in 30s", argv[0]);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn write_file(p: &Path, data: &[u8]) -> Result<Duration> {
    let t = Instant::now();
    let mut f = std::fs::File::create(p)?;
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk)?;
    }
    f.sync_all()?;
    drop(f);
    Ok(t.elapsed())
}

fn read_file(p: &Path, len: usize) -> Result<Duration> {
    let t = Instant::now();
    let mut f = std::fs::File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k;
    }
    if n != len {
        bail!("read {n} bytes of {len}");
    }
    Ok(t.elapsed())
}

/// Waits until every key is on the gateway with `size` bytes.
async fn wait_on_gateway(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    keys: &[String],
    size: i64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for k in keys {
        loop {
            if let Ok(h) = s3.head_object().bucket(bucket).key(k).send().await
                && h.content_length() == Some(size)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{k} not on the gateway after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let endpoint = env("STOWAGE_S3_ENDPOINT")?;
    let ak = env("STOWAGE_S3_ACCESS_KEY")?;
    let sk = env("STOWAGE_S3_SECRET_KEY")?;
    if !rustix::process::geteuid().is_root() {
        bail!("the bench mounts: run it as root");
    }
    let dir = tempfile::tempdir()?;
    let tag = format!("bench{}", std::process::id());
    let cfg = dir.path().join("s3.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: s3\nnodeStateDir: {}/state\ninstances:\n  rgw:\n    endpoint: {endpoint}\n    pathStyle: true\n    bucketPrefix: {tag}-\n",
            dir.path().display()
        ),
    )?;
    let mut ctl = Plugin::controller(dir.path(), &cfg)?;
    let mut node = Plugin::node(dir.path(), &cfg, "bench-node")?;
    let mut c = controller_clients(ctl.ready().await?);
    let mut n = Node {
        n: node_client(node.ready().await?),
        ak: ak.clone(),
        sk: sk.clone(),
    };
    let ep = Endpoint {
        url: Some(endpoint.clone()),
        region: "us-east-1".into(),
        path_style: true,
        timeout: Duration::from_secs(120),
    };
    let s3 = s3client::build(
        &ep,
        &Creds {
            access_key: ak.clone(),
            secret_key: sk.clone(),
            session_token: None,
        },
    );
    println!(
        "stowage-bench-s3: gateway {endpoint}, {} MiB sequential file, {} small files, {} mount rounds",
        a.size_mib, a.files, a.rounds
    );
    let data: Vec<u8> = (0..a.size_mib << 20)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(7) as u8)
        .collect();
    let small = vec![42u8; 4096];
    let mut volumes = Vec::new();

    for kind in &a.mounters {
        let name = format!("pvc-{}", kind.as_str());
        let mut req = wire::create(&name, 1 << 40);
        req.volume_capabilities = vec![rwx()];
        req.parameters = [("mounter".to_string(), kind.as_str().to_string())].into();
        req.secrets = secrets(&ak, &sk);
        let vol = match c.controller.create_volume(req).await {
            Ok(r) => r.into_inner().volume.context("no volume")?,
            Err(e) => bail!("CreateVolume: {e}"),
        };
        volumes.push(vol.clone());
        let bucket = vol.volume_context["bucket"].clone();
        let staging = dir.path().join(format!("{}-staging", kind.as_str()));
        let target = dir.path().join(format!("{}-target", kind.as_str()));

        // 1. Mount time, Stowage against the bare mounter.
        let mut stowage_t = Vec::new();
        let mut raw_t = Vec::new();
        let cred_dir = dir.path().join(format!("{}-raw", kind.as_str()));
        std::fs::create_dir_all(&cred_dir)?;
        std::fs::write(cred_dir.join("passwd"), format!("{ak}:{sk}\n"))?;
        std::fs::write(
            cred_dir.join("credentials"),
            format!("[default]\naws_access_key_id = {ak}\naws_secret_access_key = {sk}\n"),
        )?;
        std::fs::write(cred_dir.join("rclone.conf"), "")?;
        use std::os::unix::fs::PermissionsExt;
        for f in ["passwd", "credentials"] {
            std::fs::set_permissions(cred_dir.join(f), std::fs::Permissions::from_mode(0o600))?;
        }
        let spec = MountSpec {
            kind: *kind,
            endpoint: Some(endpoint.clone()),
            region: "us-east-1".into(),
            path_style: true,
            bucket: bucket.clone(),
            prefix: None,
            readonly: false,
            options: Vec::new(),
        };
        let raw_target = dir.path().join(format!("{}-rawmnt", kind.as_str()));
        for _ in 0..a.rounds {
            let t = Instant::now();
            n.stage(&vol, &staging).await?;
            n.publish(&vol, &staging, &target).await?;
            stowage_t.push(t.elapsed());
            n.teardown(&vol, &staging, &target).await?;
            let (d, pid) = raw_mount(&spec, &raw_target, &cred_dir).await?;
            raw_t.push(d);
            let _ = std::process::Command::new("umount")
                .arg(&raw_target)
                .status();
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (sm, rm) = (median(stowage_t), median(raw_t));
        println!(
            "[{}] mount: NodeStage+NodePublish {:.0} ms, bare {} {:.0} ms (median of {}), ratio {:.2}",
            kind.as_str(),
            ms(sm),
            kind.as_str(),
            ms(rm),
            a.rounds,
            sm.as_secs_f64() / rm.as_secs_f64()
        );

        // 2. Bytes through the mount.
        n.stage(&vol, &staging).await?;
        n.publish(&vol, &staging, &target).await?;
        let pid = mounter_pid(&staging).context("mounter pid")?;
        let idle_rss = status_kib(pid, "VmRSS:");
        // Timed until the bytes are on the gateway: a mounter that caches writes locally
        // (rclone) returns from close() before it has uploaded anything.
        let t = Instant::now();
        write_file(&target.join("big.bin"), &data)?;
        wait_on_gateway(&s3, &bucket, &["big.bin".to_string()], data.len() as i64).await?;
        let wt = t.elapsed();
        // Remount: the read must come from the gateway, not the page cache.
        n.teardown(&vol, &staging, &target).await?;
        n.stage(&vol, &staging).await?;
        n.publish(&vol, &staging, &target).await?;
        let pid = mounter_pid(&staging).context("mounter pid")?;
        let rt = read_file(&target.join("big.bin"), data.len())?;
        let t = Instant::now();
        for i in 0..a.files {
            let mut f = std::fs::File::create(target.join(format!("small-{i}")))?;
            f.write_all(&small)?;
        }
        let names: Vec<String> = (0..a.files).map(|i| format!("small-{i}")).collect();
        wait_on_gateway(&s3, &bucket, &names, small.len() as i64).await?;
        let st = t.elapsed();
        let peak_rss = status_kib(pid, "VmHWM:");
        n.teardown(&vol, &staging, &target).await?;

        // Direct S3 with the same bytes.
        let t = Instant::now();
        s3.put_object()
            .bucket(&bucket)
            .key("direct.bin")
            .body(aws_sdk_s3::primitives::ByteStream::from(data.clone()))
            .send()
            .await?;
        let dwt = t.elapsed();
        let t = Instant::now();
        let got = s3
            .get_object()
            .bucket(&bucket)
            .key("direct.bin")
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes();
        let drt = t.elapsed();
        if got.len() != data.len() {
            bail!("direct GET returned {} bytes", got.len());
        }
        let t = Instant::now();
        for i in 0..a.files {
            s3.put_object()
                .bucket(&bucket)
                .key(format!("direct-small-{i}"))
                .body(aws_sdk_s3::primitives::ByteStream::from(small.clone()))
                .send()
                .await?;
        }
        let dst = t.elapsed();
        let size = data.len();
        println!(
            "[{}] sequential write (until on the gateway): mount {:.1} MiB/s, direct PUT {:.1} MiB/s, ratio {:.2}",
            kind.as_str(),
            mibps(size, wt),
            mibps(size, dwt),
            dwt.as_secs_f64() / wt.as_secs_f64()
        );
        println!(
            "[{}] sequential read:  mount {:.1} MiB/s, direct GET {:.1} MiB/s, ratio {:.2}",
            kind.as_str(),
            mibps(size, rt),
            mibps(size, drt),
            drt.as_secs_f64() / rt.as_secs_f64()
        );
        let (fps, dps) = (
            a.files as f64 / st.as_secs_f64(),
            a.files as f64 / dst.as_secs_f64(),
        );
        println!(
            "[{}] 4 KiB creates (until on the gateway): mount {:.0}/s, direct PUT {:.0}/s, ratio {:.2}",
            kind.as_str(),
            fps,
            dps,
            fps / dps
        );
        println!(
            "[{}] mounter RSS: {} KiB idle after mount, {} KiB peak (after the workload)",
            kind.as_str(),
            idle_rss,
            peak_rss
        );
    }
    println!(
        "plugin RSS: stowage-controller {} KiB, stowage-node {} KiB",
        status_kib(ctl.child.id(), "VmRSS:"),
        status_kib(node.child.id(), "VmRSS:")
    );
    for vol in volumes {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id,
                secrets: secrets(&ak, &sk),
            })
            .await?;
    }
    Ok(())
}
