//! `/metrics` of the real binaries on the local backend: real calls (create, stage, publish, a
//! refused call, unpublish, unstage, delete), then scrapes over HTTP checking that counters,
//! histogram counts and the published-volumes gauge moved with the right labels. Needs root
//! (publish is a real bind mount).

use std::path::Path;

use stowage_csi::v1;
use stowage_tests::metrics::{bound_addr, get, sample, scrape};
use stowage_tests::{Plugin, controller_clients, is_root, local_config, node_client, wire};
use tonic::Code;

const DRIVER: &str = "local.stowage.io";

fn ops(method: &str, code: &str) -> String {
    format!(r#"stowage_csi_operations_total{{driver="{DRIVER}",method="{method}",code="{code}"}}"#)
}

fn latency_count(method: &str) -> String {
    format!(
        r#"stowage_csi_operation_duration_seconds_count{{driver="{DRIVER}",method="{method}"}}"#
    )
}

fn published() -> String {
    format!(r#"stowage_node_volumes_published{{driver="{DRIVER}"}}"#)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn counters_histograms_and_gauges_move_with_real_calls() {
    assert!(is_root(), "this test mounts; run it as root");
    let dir = tempfile::tempdir().unwrap();
    let cfg = local_config(dir.path(), &dir.path().join("base")).unwrap();
    let ctl_dir = dir.path().join("ctl");
    std::fs::create_dir_all(&ctl_dir).unwrap();
    let mut ctl = Plugin::spawn(
        "stowage-controller",
        &ctl_dir,
        &format!("unix://{}", ctl_dir.join("c.sock").display()),
        &["--config", &path(&cfg), "--metrics-address", "127.0.0.1:0"],
    )
    .unwrap();
    // The node serves /healthz and /metrics on one port (same address given to both flags).
    let mut node = Plugin::spawn(
        "stowage-node",
        dir.path(),
        &format!("unix://{}", dir.path().join("n.sock").display()),
        &[
            "--config",
            &path(&cfg),
            "--node-id",
            "metrics-node",
            "--kubelet-root",
            &path(dir.path()),
            "--kubelet-registration",
            "false",
            "--health-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap());
    let mut n = node_client(node.ready().await.unwrap());
    let ctl_addr = bound_addr(&ctl, "serving /metrics").await.unwrap();
    let node_addr = bound_addr(&node, "serving /healthz").await.unwrap();
    assert_eq!(get(node_addr, "/healthz").await.unwrap().0, 200);

    let before = scrape(ctl_addr).await.unwrap();
    assert!(
        before.contains("stowage_build_info{version=\"0.1.0\",commit=\""),
        "{before}"
    );

    let vol = c
        .controller
        .create_volume(wire::create("pvc-metrics", 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let st = c
        .controller
        .create_volume(wire::create("", 16 << 20))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    let staging = dir.path().join("staging");
    let target = dir.path().join("pods/a/mount");
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path(&staging),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = v1::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path(&staging),
        target_path: path(&target),
        volume_capability: Some(wire::rwo()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    };
    // Twice: an idempotent repeat is one publication.
    for _ in 0..2 {
        n.node_publish_volume(publish.clone()).await.unwrap();
    }
    let st = n
        .node_publish_volume(v1::NodePublishVolumeRequest {
            target_path: "relative/path".into(),
            ..publish.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    let mid = scrape(node_addr).await.unwrap();
    assert_eq!(sample(&mid, &published()), 1.0, "{mid}");
    assert_eq!(sample(&mid, &ops("NodePublishVolume", "OK")), 2.0, "{mid}");
    assert_eq!(
        sample(&mid, &ops("NodePublishVolume", "InvalidArgument")),
        1.0,
        "{mid}"
    );
    assert_eq!(
        sample(&mid, &latency_count("NodePublishVolume")),
        3.0,
        "{mid}"
    );
    // The publish bind mount was timed as a backend operation.
    let bind_mounts = sample(
        &mid,
        r#"stowage_backend_operation_duration_seconds_count{backend="bind",operation="mount",result="success"}"#,
    );
    assert!(bind_mounts >= 1.0, "{mid}");

    n.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: path(&target),
    })
    .await
    .unwrap();
    n.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path(&staging),
    })
    .await
    .unwrap();
    c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let after = scrape(node_addr).await.unwrap();
    assert_eq!(sample(&after, &published()), 0.0, "{after}");
    assert_eq!(
        sample(&after, &ops("NodeUnpublishVolume", "OK")),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, &ops("NodeUnstageVolume", "OK")),
        1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"stowage_backend_operation_duration_seconds_count{backend="block",operation="unmount",result="success"}"#
        ) + sample(
            &after,
            r#"stowage_backend_operation_duration_seconds_count{backend="other",operation="unmount",result="success"}"#
        ) >= 1.0,
        "{after}"
    );

    let ctl_text = scrape(ctl_addr).await.unwrap();
    assert_eq!(
        sample(&ctl_text, &ops("CreateVolume", "OK")),
        1.0,
        "{ctl_text}"
    );
    assert_eq!(
        sample(&ctl_text, &ops("CreateVolume", "InvalidArgument")),
        1.0,
        "{ctl_text}"
    );
    assert_eq!(
        sample(&ctl_text, &ops("DeleteVolume", "OK")),
        1.0,
        "{ctl_text}"
    );
    assert_eq!(
        sample(&ctl_text, &latency_count("CreateVolume")),
        2.0,
        "{ctl_text}"
    );
    // Probe calls of the readiness wait are counted as well.
    assert!(sample(&ctl_text, &ops("Probe", "OK")) >= 1.0, "{ctl_text}");
    // No volume ID ever appears as a label value.
    assert!(!ctl_text.contains(&vol.volume_id), "{ctl_text}");
    assert!(!after.contains(&vol.volume_id), "{after}");
    // Figures, not asserted.
    let sum = sample(
        &ctl_text,
        &format!(
            r#"stowage_csi_operation_duration_seconds_sum{{driver="{DRIVER}",method="CreateVolume"}}"#
        ),
    );
    println!(
        "CreateVolume mean latency: {:.1} ms over 2 calls",
        sum / 2.0 * 1000.0
    );
    println!(
        "scrape size: controller {} bytes, node {} bytes",
        ctl_text.len(),
        after.len()
    );
    // STOWAGE_METRICS_DUMP=1 prints both scrapes (the README's example comes from one).
    if std::env::var_os("STOWAGE_METRICS_DUMP").is_some() {
        println!("--- controller /metrics\n{ctl_text}--- node /metrics\n{after}");
    }
    assert!(ctl.terminate().await);
    assert!(node.terminate().await);
}

/// `--metrics-address` bad input: a malformed address is refused at start by the flag parser
/// naming the flag; a port another process holds stops the start with an error naming the
/// flag and the address (no half-started plugin serving CSI without its metrics).
#[tokio::test]
async fn a_taken_or_malformed_metrics_address_stops_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = local_config(dir.path(), &dir.path().join("base")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    for (binary, extra) in [
        ("stowage-controller", vec![]),
        (
            "stowage-node",
            vec![
                "--node-id".to_string(),
                "metrics-bad".to_string(),
                "--kubelet-root".to_string(),
                path(dir.path()),
                "--kubelet-registration".to_string(),
                "false".to_string(),
            ],
        ),
    ] {
        for (addr, want) in [
            ("127.0.0.1:notaport", "--metrics-address"),
            ("localhost", "--metrics-address"),
            (taken_addr.as_str(), taken_addr.as_str()),
        ] {
            let run = dir
                .path()
                .join(format!("{binary}-{}", addr.replace([':', '.'], "_")));
            std::fs::create_dir_all(&run).unwrap();
            let mut args = vec![
                "--config".to_string(),
                path(&cfg),
                "--metrics-address".to_string(),
                addr.to_string(),
            ];
            args.extend(extra.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut p = Plugin::spawn(
                binary,
                &run,
                &format!("unix://{}", run.join("s.sock").display()),
                &args,
            )
            .unwrap();
            let err = p
                .ready()
                .await
                .expect_err(&format!("{binary} started with --metrics-address {addr}"));
            let log = p.log_text();
            assert!(
                err.to_string().contains("exited")
                    && log.contains(want)
                    && log.contains("metrics-address"),
                "{binary} --metrics-address {addr}: the error must name the flag and the address:\n{err:#}"
            );
            assert!(
                !run.join("s.sock").exists(),
                "{binary} --metrics-address {addr} left its CSI socket serving"
            );
        }
    }
    drop(taken);
}
