//! S3 backend under faults and bad input, against a real Ceph RADOS Gateway: wrong
//! credentials, the gateway going away in the middle of CreateVolume (through a TCP proxy that
//! cuts it off), a gateway that refuses DeleteObjects, and a table of malformed requests.

#[path = "s3_common.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_tests::wire;
use tonic::Code;

#[tokio::test]
async fn wrong_credentials_give_a_clear_error_and_create_nothing() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("cred"));
    let mut p = start(&env.endpoint, &format!("    bucketPrefix: {bp}\n")).await;
    let mut req = create_req(&env, "pvc-cred", 1 << 20, &[]);
    req.secrets = env.bad_secrets();
    let st = p.c.controller.create_volume(req).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("secrets") && st.message().contains("rejected the credentials"),
        "{st:?}"
    );
    assert!(
        !st.message().contains("wrong-secret"),
        "secret in the message: {st:?}"
    );
    assert!(!bucket_exists(&env.client(), &format!("{bp}pvc-cred")).await);

    // The volume made with good credentials, staged with bad ones: refused, nothing mounted.
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-cred", 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let staging = p.dir.path().join("staging");
    let mut stage = stage_req(&env, &vol, &staging);
    stage.secrets = env.bad_secrets();
    let st = p.n.node_stage_volume(stage).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("rejected the credentials"), "{st:?}");
    assert!(!is_mounted(&staging));
    // Nothing written into the plain directory either.
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0
    );
    let mut stage = stage_req(&env, &vol, &staging);
    stage.secrets = HashMap::new();
    let st = p.n.node_stage_volume(stage).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(
        st.message()
            .contains("accessKeyID is missing from the node-stage secret"),
        "{st:?}"
    );

    let log = std::fs::read_to_string(p.dir.path().join("stowage-controller.log")).unwrap()
        + &std::fs::read_to_string(p.dir.path().join("stowage-node.log")).unwrap();
    assert!(
        !log.contains(&env.secret_key) && !log.contains("wrong-secret"),
        "a secret reached a log"
    );
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            secrets: env.secrets(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn gateway_down_mid_create_then_retry_succeeds() {
    let Some(env) = s3_env() else { return };
    let proxy = Proxy::start(&env.endpoint).await;
    let bp = format!("{}-", unique("down"));
    let mut p = start(&proxy.url, &format!("    bucketPrefix: {bp}\n")).await;
    let s3 = env.client();
    let bucket = format!("{bp}pvc-down");

    // The gateway disappears right when the volume record is being written: the bucket
    // exists, the record does not.
    proxy.poison_on(&format!("PUT /{bucket}/?tagging"));
    let t = Instant::now();
    let st =
        p.c.controller
            .create_volume(create_req(&env, "pvc-down", 1 << 20, &[]))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(
        st.message().contains("cannot reach S3 endpoint")
            || st.message().contains("did not answer"),
        "{st:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        bucket_exists(&s3, &bucket).await,
        "the cut should have come after CreateBucket"
    );
    // While it is down, retries fail the same clear way.
    let st =
        p.c.controller
            .create_volume(create_req(&env, "pvc-down", 1 << 20, &[]))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");

    // Back: the retry adopts the half-made bucket and completes the volume.
    proxy.poison_on("\u{0}never\u{0}");
    proxy.set_down(false);
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-down", 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(vol.volume_context["bucket"], bucket);
    let tags = s3
        .get_bucket_tagging()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == "stowage.io/capacity" && t.value() == "1048576")
    );

    // Down during delete: clear error, the volume is still there; back: delete completes.
    proxy.set_down(true);
    let st =
        p.c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                secrets: env.secrets(),
            })
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    proxy.set_down(false);
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    assert!(!bucket_exists(&s3, &bucket).await);
}

#[tokio::test]
async fn refused_batch_delete_falls_back_to_single_deletes() {
    let Some(env) = s3_env() else { return };
    let proxy = Proxy::start(&env.endpoint).await;
    let bp = format!("{}-", unique("batch"));
    let mut p = start(&proxy.url, &format!("    bucketPrefix: {bp}\n")).await;
    let s3 = env.client();
    let vol =
        p.c.controller
            .create_volume(create_req(&env, "pvc-batch", 1 << 20, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let bucket = vol.volume_context["bucket"].clone();
    for i in 0..25 {
        s3.put_object()
            .bucket(&bucket)
            .key(format!("d/{i}"))
            .body(vec![1u8; 100].into())
            .send()
            .await
            .unwrap();
    }
    proxy.refuse_with("?delete", "NotImplemented");
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    assert!(
        proxy.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "DeleteObjects was never tried"
    );
    assert!(!bucket_exists(&s3, &bucket).await);
}

#[tokio::test]
async fn bad_input_table() {
    let Some(env) = s3_env() else { return };
    let bp = format!("{}-", unique("bad"));
    let mut p = start(
        &env.endpoint,
        &format!("    bucketPrefix: {bp}\n    maxVolumeBytes: 1073741824\n"),
    )
    .await;
    let base = || create_req(&env, "pvc-bad", 1 << 20, &[]);
    type Mutate = Box<dyn Fn(&mut v1::CreateVolumeRequest)>;
    let cases: Vec<(&str, Mutate, Code, &str)> = vec![
        (
            "block access",
            Box::new(|r| r.volume_capabilities = vec![wire::block_cap(Mode::SingleNodeWriter)]),
            Code::InvalidArgument,
            "raw block",
        ),
        (
            "unknown parameter",
            Box::new(|r| {
                r.parameters.insert("buckt".into(), "x".into());
            }),
            Code::InvalidArgument,
            "buckt",
        ),
        (
            "endpoint in the StorageClass",
            Box::new(|r| {
                r.parameters.insert("endpoint".into(), "http://x".into());
            }),
            Code::InvalidArgument,
            "instance",
        ),
        (
            "bad mode",
            Box::new(|r| {
                r.parameters.insert("mode".into(), "object".into());
            }),
            Code::InvalidArgument,
            "parameters.mode",
        ),
        (
            "bad shared bucket",
            Box::new(|r| {
                r.parameters.insert("bucket".into(), "Bad_Bucket".into());
            }),
            Code::InvalidArgument,
            "parameters.bucket",
        ),
        (
            "prefix mode without a bucket",
            Box::new(|r| {
                r.parameters.insert("mode".into(), "prefix".into());
            }),
            Code::InvalidArgument,
            "shared bucket",
        ),
        (
            "unknown mounter",
            Box::new(|r| {
                r.parameters.insert("mounter".into(), "goofys".into());
            }),
            Code::InvalidArgument,
            "parameters.mounter",
        ),
        (
            "bad bucketPrefix",
            Box::new(|r| {
                r.parameters.insert("bucketPrefix".into(), "UP_".into());
            }),
            Code::InvalidArgument,
            "bucketPrefix",
        ),
        (
            "unknown instance",
            Box::new(|r| {
                r.parameters.insert("instance".into(), "nope".into());
            }),
            Code::InvalidArgument,
            "parameters.instance",
        ),
        (
            "bad onDelete",
            Box::new(|r| {
                r.parameters.insert("onDelete".into(), "keep".into());
            }),
            Code::InvalidArgument,
            "onDelete",
        ),
        (
            "unclosed template",
            Box::new(|r| {
                r.parameters
                    .insert("nameTemplate".into(), "${pvc.metadata.name".into());
            }),
            Code::InvalidArgument,
            "nameTemplate",
        ),
        (
            "too big",
            Box::new(|r| {
                r.capacity_range = Some(v1::CapacityRange {
                    required_bytes: 2 << 30,
                    limit_bytes: 0,
                })
            }),
            Code::OutOfRange,
            "limit",
        ),
        (
            "clone source",
            Box::new(|r| {
                r.volume_content_source = Some(v1::VolumeContentSource {
                    r#type: Some(v1::volume_content_source::Type::Volume(
                        v1::volume_content_source::VolumeSource {
                            volume_id: "rgw/no-such-source-vol".into(),
                        },
                    )),
                })
            }),
            Code::NotFound,
            "source volume",
        ),
        (
            "no secrets",
            Box::new(|r| r.secrets.clear()),
            Code::InvalidArgument,
            "accessKeyID is missing from the provisioner secret",
        ),
        (
            "no secret key",
            Box::new(|r| {
                r.secrets.remove("secretAccessKey");
            }),
            Code::InvalidArgument,
            "secretAccessKey",
        ),
        (
            "bad mutable parameter",
            Box::new(|r| {
                r.mutable_parameters.insert("mode".into(), "prefix".into());
            }),
            Code::InvalidArgument,
            "mutable",
        ),
    ];
    for (what, mutate, code, needle) in &cases {
        let mut r = base();
        mutate(&mut r);
        let st = p.c.controller.create_volume(r).await.unwrap_err();
        assert_eq!(st.code(), *code, "{what}: {st:?}");
        assert!(
            st.message().contains(needle),
            "{what}: {needle:?} not in {:?}",
            st.message()
        );
    }
    // None of those made a bucket.
    assert!(!bucket_exists(&env.client(), &format!("{bp}pvc-bad")).await);

    // Same name, incompatible capacity.
    let vol =
        p.c.controller
            .create_volume(base())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let mut r = base();
    r.capacity_range = Some(v1::CapacityRange {
        required_bytes: 2 << 20,
        limit_bytes: 0,
    });
    assert_eq!(
        p.c.controller.create_volume(r).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    // Node side.
    let staging = p.dir.path().join("staging");
    type NMutate = Box<dyn Fn(&mut v1::NodeStageVolumeRequest)>;
    let node_cases: Vec<(&str, NMutate, Code, &str)> = vec![
        (
            "block",
            Box::new(|r| r.volume_capability = Some(wire::block_cap(Mode::SingleNodeWriter))),
            Code::InvalidArgument,
            "raw block",
        ),
        (
            "reserved mount option",
            Box::new(|r| {
                r.volume_capability = Some(v1::VolumeCapability {
                    access_type: Some(v1::volume_capability::AccessType::Mount(
                        v1::volume_capability::MountVolume {
                            mount_flags: vec!["passwd_file=/etc/shadow".into()],
                            ..Default::default()
                        },
                    )),
                    access_mode: Some(v1::volume_capability::AccessMode {
                        mode: Mode::MultiNodeMultiWriter as i32,
                    }),
                })
            }),
            Code::InvalidArgument,
            "passwd_file",
        ),
        (
            "unknown s3fs option",
            Box::new(|r| {
                r.volume_capability = Some(v1::VolumeCapability {
                    access_type: Some(v1::volume_capability::AccessType::Mount(
                        v1::volume_capability::MountVolume {
                            mount_flags: vec!["bogusopt=1".into()],
                            ..Default::default()
                        },
                    )),
                    access_mode: Some(v1::volume_capability::AccessMode {
                        mode: Mode::MultiNodeMultiWriter as i32,
                    }),
                })
            }),
            Code::InvalidArgument,
            "bogusopt",
        ),
        (
            "pathStyle not a bool",
            Box::new(|r| {
                r.volume_context.insert("pathStyle".into(), "yes".into());
            }),
            Code::InvalidArgument,
            "pathStyle",
        ),
        (
            "endpoint not a URL",
            Box::new(|r| {
                r.volume_context
                    .insert("endpoint".into(), "127.0.0.1:1".into());
            }),
            Code::InvalidArgument,
            "endpoint",
        ),
        (
            "bucket not the ID's",
            Box::new(|r| {
                r.volume_context
                    .insert("bucket".into(), "other-bucket".into());
            }),
            Code::InvalidArgument,
            "does not match",
        ),
        (
            "ID with too many parts",
            Box::new(|r| r.volume_id = "rgw/a-b/c/d".into()),
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "bucket that does not exist",
            Box::new(|r| {
                r.volume_id = "rgw/no-such-bucket-stowage".into();
                r.volume_context.remove("bucket");
            }),
            Code::NotFound,
            "no-such-bucket-stowage",
        ),
        (
            "unreachable endpoint",
            Box::new(|r| {
                r.volume_context
                    .insert("endpoint".into(), "http://127.0.0.1:9".into());
            }),
            Code::Unavailable,
            "cannot reach",
        ),
    ];
    for (what, mutate, code, needle) in &node_cases {
        let mut r = stage_req(&env, &vol, &staging);
        mutate(&mut r);
        let st = p.n.node_stage_volume(r).await.unwrap_err();
        assert_eq!(st.code(), *code, "{what}: {st:?}");
        assert!(
            st.message().contains(needle),
            "{what}: {needle:?} not in {:?}",
            st.message()
        );
        assert!(!is_mounted(&staging), "{what}: left a mount");
        assert!(
            mounter_pids(p.dir.path()).is_empty(),
            "{what}: left a mounter"
        );
    }
    // Publish before stage.
    let st =
        p.n.node_publish_volume(publish_req(&vol, &staging, &p.dir.path().join("t"), false))
            .await
            .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    p.c.controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            secrets: env.secrets(),
        })
        .await
        .unwrap();
}
