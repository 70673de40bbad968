//! Shared pieces of the S3 tests: the endpoint from the environment (the suite starts a real
//! Ceph RADOS Gateway), a plugin pair on an S3 config, CSI request builders, a direct S3 client
//! to check objects on the server, and a TCP proxy that can cut the gateway off mid-call.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stowage_backends::s3::aws_sdk_s3;
use stowage_backends::s3::client::{self as s3client, Creds, Endpoint};
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::{Clients, Plugin, controller_clients, is_root, node_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

pub struct S3Env {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

/// The gateway the suite started, or None (test skipped) when no suite runs one. With
/// STOWAGE_REQUIRE_S3=1 a missing gateway fails the test instead.
pub fn s3_env() -> Option<S3Env> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("STOWAGE_S3_ENDPOINT"),
        get("STOWAGE_S3_ACCESS_KEY"),
        get("STOWAGE_S3_SECRET_KEY"),
    ) {
        (Some(endpoint), Some(access_key), Some(secret_key)) => Some(S3Env {
            endpoint,
            access_key,
            secret_key,
        }),
        _ => {
            assert!(
                std::env::var("STOWAGE_REQUIRE_S3").as_deref() != Ok("1"),
                "STOWAGE_REQUIRE_S3=1 but STOWAGE_S3_ENDPOINT/_ACCESS_KEY/_SECRET_KEY are not set"
            );
            eprintln!("skipped: no S3 endpoint (run tests/run 50-s3)");
            None
        }
    }
}

impl S3Env {
    pub fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("accessKeyID".to_string(), self.access_key.clone()),
            ("secretAccessKey".to_string(), self.secret_key.clone()),
        ])
    }

    pub fn bad_secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("accessKeyID".to_string(), self.access_key.clone()),
            (
                "secretAccessKey".to_string(),
                "wrong-secret-key-000000000000000000000000".to_string(),
            ),
        ])
    }

    /// A direct client, to check what is on the server.
    pub fn client(&self) -> aws_sdk_s3::Client {
        s3client::build(
            &Endpoint {
                url: Some(self.endpoint.clone()),
                region: "us-east-1".into(),
                path_style: true,
                timeout: Duration::from_secs(30),
            },
            &Creds {
                access_key: self.access_key.clone(),
                secret_key: self.secret_key.clone(),
                session_token: None,
            },
        )
    }
}

/// A unique lowercase tag per test, for bucket names that do not collide across runs.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid_like()[..8])
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let pid = std::process::id() as u128;
    format!(
        "{:016x}",
        (n ^ (pid << 64)).wrapping_mul(0x9E3779B97F4A7C15) >> 32
    )
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub cfg: PathBuf,
    pub state: PathBuf,
    pub ctl: Plugin,
    pub node: Plugin,
    pub c: Clients,
    pub n: v1::node_client::NodeClient<Channel>,
}

/// Writes an S3 config with one instance `rgw` (endpoint given, so tests can point it at a
/// proxy) and starts controller and node.
pub async fn start(endpoint: &str, extra: &str) -> Pair {
    assert!(is_root(), "these tests mount; run them as root");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("node-state");
    let cfg = dir.path().join("s3.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: s3\nnodeStateDir: {}\ninstances:\n  rgw:\n    endpoint: {endpoint}\n    pathStyle: true\n    timeoutSecs: 10\n{extra}",
            state.display()
        ),
    )
    .unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut node = node_plugin(dir.path(), &cfg);
    let c = controller_clients(ctl.ready().await.unwrap());
    let n = node_client(node.ready().await.unwrap());
    Pair {
        dir,
        cfg,
        state,
        ctl,
        node,
        c,
        n,
    }
}

/// The node plugin, with /metrics on a port of its choosing (read from its log: see
/// [`Pair::node_metrics`]).
fn node_plugin(dir: &std::path::Path, cfg: &std::path::Path) -> Plugin {
    Plugin::node_with_args(
        dir,
        dir,
        cfg,
        "node-1",
        &["--metrics-address", "127.0.0.1:0"],
    )
    .unwrap()
}

impl Pair {
    /// The node plugin's current `/metrics` text. The log is appended to across restarts, so
    /// the `starts`-th (1-based) start line of the metrics server names the running one.
    pub async fn node_metrics(&self, starts: usize) -> String {
        let addr = stowage_tests::metrics::bound_addr_nth(&self.node, "serving /metrics", starts)
            .await
            .unwrap();
        stowage_tests::metrics::scrape(addr).await.unwrap()
    }

    /// Restarts the node plugin (SIGKILL, like a crashed or upgraded pod).
    pub async fn restart_node(&mut self) {
        self.node.kill();
        let mut node = node_plugin(self.dir.path(), &self.cfg);
        self.n = node_client(node.ready().await.unwrap());
        self.node = node;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Leave no FUSE mount or mounter behind, whatever the test did.
        let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let base = self.dir.path().to_string_lossy().to_string();
        let mut mps: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&base))
            .collect();
        mps.sort();
        for m in mps.iter().rev() {
            let _ = std::process::Command::new("umount")
                .args(["-l", m])
                .status();
        }
        for pid in mounter_pids(self.dir.path()) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Pids of mounter processes whose command line names a path under `base`.
pub fn mounter_pids(base: &Path) -> Vec<u32> {
    let want = base.to_string_lossy().to_string();
    stowage_tests::processes()
        .into_iter()
        .filter(|p| {
            matches!(p.prog.as_str(), "s3fs" | "rclone")
                && p.args.iter().any(|a| a.starts_with(&want))
        })
        .map(|p| p.pid)
        .collect()
}

pub fn cap(mode: Mode) -> v1::VolumeCapability {
    stowage_tests::wire::mount_cap(mode)
}

pub fn rwx() -> v1::VolumeCapability {
    cap(Mode::MultiNodeMultiWriter)
}

pub fn create_req(
    env: &S3Env,
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
) -> v1::CreateVolumeRequest {
    v1::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwx()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: env.secrets(),
        ..Default::default()
    }
}

pub fn stage_req(env: &S3Env, vol: &v1::Volume, staging: &Path) -> v1::NodeStageVolumeRequest {
    v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(rwx()),
        volume_context: vol.volume_context.clone(),
        secrets: env.secrets(),
        ..Default::default()
    }
}

pub fn publish_req(
    vol: &v1::Volume,
    staging: &Path,
    target: &Path,
    ro: bool,
) -> v1::NodePublishVolumeRequest {
    v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(rwx()),
        readonly: ro,
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

pub fn stats_req(vol: &v1::Volume, path: &Path) -> v1::NodeGetVolumeStatsRequest {
    v1::NodeGetVolumeStatsRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: String::new(),
    }
}

pub fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// Keys under a prefix, straight from the server.
pub async fn keys(c: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        out.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return out;
        }
    }
}

pub async fn get(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    c.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET s3://{bucket}/{key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

pub async fn bucket_exists(c: &aws_sdk_s3::Client, bucket: &str) -> bool {
    match c.head_bucket().bucket(bucket).send().await {
        Ok(_) => true,
        Err(e) => {
            let status = match &e {
                aws_sdk_s3::error::SdkError::ServiceError(s) => s.raw().status().as_u16(),
                _ => panic!("HeadBucket {bucket}: {e:?}"),
            };
            assert_eq!(status, 404, "HeadBucket {bucket}");
            false
        }
    }
}

/// A TCP proxy in front of the gateway. `down` refuses and cuts connections; a poison
/// string seen in a request cuts that connection and takes the proxy down (the gateway
/// "dies" in the middle of a call); a refusal string answers that request with an S3 error.
pub struct Proxy {
    pub url: String,
    pub down: Arc<AtomicBool>,
    poison: Arc<std::sync::Mutex<Option<String>>>,
    refuse: Arc<std::sync::Mutex<Option<(String, String)>>>,
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let down = Arc::new(AtomicBool::new(false));
        let poison: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let refuse: Arc<std::sync::Mutex<Option<(String, String)>>> = Arc::default();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (d, p, r, n) = (
            down.clone(),
            poison.clone(),
            refuse.clone(),
            refused.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let (d, p, r, n, up) =
                    (d.clone(), p.clone(), r.clone(), n.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = pipe(client, &up, d, p, r, n).await;
                });
            }
        });
        Proxy {
            url,
            down,
            poison,
            refuse,
            refused,
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn poison_on(&self, needle: &str) {
        *self.poison.lock().unwrap() = Some(needle.to_string());
    }

    /// Answers every request containing `needle` with `501 <code>`.
    pub fn refuse_with(&self, needle: &str, code: &str) {
        *self.refuse.lock().unwrap() = Some((needle.to_string(), code.to_string()));
    }
}

async fn pipe(
    mut client: TcpStream,
    upstream: &str,
    down: Arc<AtomicBool>,
    poison: Arc<std::sync::Mutex<Option<String>>>,
    refuse: Arc<std::sync::Mutex<Option<(String, String)>>>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (mut sr, mut sw) = server.into_split();
    let (mut cr, mut cw) = client.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail = Vec::new();
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 || down.load(Ordering::SeqCst) {
                return Ok::<Option<String>, std::io::Error>(None);
            }
            tail.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&tail).to_string();
            if let Some(p) = poison.lock().unwrap().clone()
                && text.contains(&p)
            {
                down.store(true, Ordering::SeqCst);
                return Ok(None);
            }
            if let Some((needle, code)) = refuse.lock().unwrap().clone()
                && text.contains(&needle)
            {
                refused.fetch_add(1, Ordering::SeqCst);
                return Ok(Some(code));
            }
            if tail.len() > 512 {
                tail.drain(..tail.len() - 512);
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let mut answer: Option<String> = None;
    tokio::select! {
        r = up => { answer = r.ok().flatten(); }
        _ = tokio::io::copy(&mut sr, &mut cw) => {}
    }
    if let Some(code) = answer {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>refused by the test proxy</Message></Error>"
        );
        let resp = format!(
            "HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = cw.write_all(resp.as_bytes()).await;
    }
    let _ = cw.shutdown().await;
    Ok(())
}
