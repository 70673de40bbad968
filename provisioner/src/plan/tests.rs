use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TopologySelectorLabelRequirement,
    TopologySelectorTerm, TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use stowage_csi::v1;
use stowage_csi::v1::volume_capability::access_mode::Mode;

use super::*;

const DRIVER: &str = "local.stowage.io";

fn claim(modes: &[&str]) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            namespace: Some("db".into()),
            uid: Some("1234".into()),
            annotations: Some(BTreeMap::from([("team".into(), "blue".into())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(modes.iter().map(|s| s.to_string()).collect()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity("2Gi".into()))])),
                ..Default::default()
            }),
            storage_class_name: Some("gold".into()),
            ..Default::default()
        }),
        status: None,
    }
}

fn class(params: &[(&str, &str)]) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some("gold".into()),
            ..Default::default()
        },
        provisioner: DRIVER.into(),
        parameters: Some(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        mount_options: Some(vec!["noatime".into()]),
        reclaim_policy: Some("Delete".into()),
        ..Default::default()
    }
}

fn input<'a>(
    c: &'a PersistentVolumeClaim,
    sc: &'a StorageClass,
    caps: DriverCaps,
) -> PlanInput<'a> {
    PlanInput {
        driver: DRIVER,
        caps,
        claim: c,
        class: sc,
        node_topology: None,
        clone_source: None,
        snapshot_source: None,
    }
}

const ALL: DriverCaps = DriverCaps {
    single_node_multi_writer: true,
    topology: true,
    clone: true,
    publish_unpublish: true,
    publish_readonly: true,
    expand: true,
    snapshot: false,
    list_snapshots: false,
};

fn modes_of(p: &Plan) -> Vec<Mode> {
    p.request
        .volume_capabilities
        .iter()
        .map(|c| Mode::try_from(c.access_mode.as_ref().unwrap().mode).unwrap())
        .collect()
}

#[test]
fn request_from_claim_and_class() {
    let c = claim(&["ReadWriteOnce"]);
    let sc = class(&[
        ("subDir", "${pvc.metadata.namespace}-${pvc.metadata.name}"),
        ("csi.storage.k8s.io/fstype", "xfs"),
        (
            "csi.storage.k8s.io/provisioner-secret-name",
            "${pvc.name}-creds",
        ),
        (
            "csi.storage.k8s.io/provisioner-secret-namespace",
            "${pvc.namespace}",
        ),
        (
            "csi.storage.k8s.io/node-stage-secret-name",
            "${pvc.annotations['team']}-stage",
        ),
        (
            "csi.storage.k8s.io/node-stage-secret-namespace",
            "kube-${pv.name}",
        ),
        ("stowage.io/other", "kept"),
    ]);
    let p = plan(&input(&c, &sc, ALL)).unwrap();
    assert_eq!(p.pv_name, "pvc-1234");
    assert_eq!(p.request.name, "pvc-1234");
    let params: BTreeMap<_, _> = p.request.parameters.clone().into_iter().collect();
    assert_eq!(
        params,
        BTreeMap::from([
            (
                "subDir".to_string(),
                "${pvc.metadata.namespace}-${pvc.metadata.name}".to_string()
            ),
            ("stowage.io/other".into(), "kept".into()),
            ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
            ("csi.storage.k8s.io/pvc/namespace".into(), "db".into()),
            ("csi.storage.k8s.io/pv/name".into(), "pvc-1234".into()),
        ]),
        "csi.storage.k8s.io keys are resolved, never passed"
    );
    assert_eq!(
        p.provisioner_secret,
        Some(SecretRef {
            name: "data-creds".into(),
            namespace: "db".into()
        })
    );
    assert_eq!(
        p.pv_secrets.node_stage,
        Some(SecretRef {
            name: "blue-stage".into(),
            namespace: "kube-pvc-1234".into()
        })
    );
    assert_eq!(p.fs_type, "xfs");
    assert_eq!(
        p.request.capacity_range,
        Some(v1::CapacityRange {
            required_bytes: 2 << 30,
            limit_bytes: 0
        })
    );
    let cap = &p.request.volume_capabilities[0];
    match cap.access_type.as_ref().unwrap() {
        v1::volume_capability::AccessType::Mount(m) => {
            assert_eq!(m.fs_type, "xfs");
            assert_eq!(m.mount_flags, vec!["noatime".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.reclaim_policy, "Delete");
    assert!(p.request.secrets.is_empty());
}

#[test]
fn access_modes_follow_driver_capabilities() {
    type Row<'a> = (&'a [&'a str], bool, Result<Vec<Mode>, ()>);
    let table: &[Row] = &[
        (
            &["ReadWriteOnce"],
            true,
            Ok(vec![Mode::SingleNodeMultiWriter]),
        ),
        (&["ReadWriteOnce"], false, Ok(vec![Mode::SingleNodeWriter])),
        (
            &["ReadWriteOncePod"],
            true,
            Ok(vec![Mode::SingleNodeSingleWriter]),
        ),
        (&["ReadWriteOncePod"], false, Err(())),
        (
            &["ReadOnlyMany"],
            false,
            Ok(vec![Mode::MultiNodeReaderOnly]),
        ),
        (
            &["ReadWriteMany"],
            false,
            Ok(vec![Mode::MultiNodeMultiWriter]),
        ),
        (
            &["ReadWriteOnce", "ReadOnlyMany"],
            false,
            Ok(vec![Mode::MultiNodeReaderOnly, Mode::SingleNodeWriter]),
        ),
        (&["ReadWriteSometimes"], true, Err(())),
        (&[], true, Err(())),
    ];
    for (modes, snmw, want) in table {
        let c = claim(modes);
        let sc = class(&[]);
        let caps = DriverCaps {
            single_node_multi_writer: *snmw,
            ..ALL
        };
        let got = plan(&input(&c, &sc, caps));
        match want {
            Ok(m) => assert_eq!(&modes_of(&got.unwrap()), m, "{modes:?}"),
            Err(()) => assert!(
                matches!(got, Err(PlanError::AccessModes(_))),
                "{modes:?}: {got:?}"
            ),
        }
    }
}

#[test]
fn block_claims_ask_for_block() {
    let mut c = claim(&["ReadWriteOnce"]);
    c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    let p = plan(&input(
        &c,
        &class(&[("csi.storage.k8s.io/fstype", "ext4")]),
        ALL,
    ))
    .unwrap();
    assert!(matches!(
        p.request.volume_capabilities[0].access_type,
        Some(v1::volume_capability::AccessType::Block(_))
    ));
    assert_eq!(p.fs_type, "");
}

#[test]
fn refusals_name_the_field() {
    let c = claim(&["ReadWriteOnce"]);
    let table: &[(&[(&str, &str)], &str)] = &[
        (
            &[("csi.storage.k8s.io/fs-type", "xfs")],
            "csi.storage.k8s.io/fs-type",
        ),
        (
            &[("csi.storage.k8s.io/provisioner-secret-name", "s")],
            "provisioner-secret-name",
        ),
        (
            &[("csi.storage.k8s.io/node-stage-secret-namespace", "ns")],
            "node-stage-secret-namespace",
        ),
        (
            &[
                (
                    "csi.storage.k8s.io/provisioner-secret-name",
                    "${pvc.annotations['team']}",
                ),
                ("csi.storage.k8s.io/provisioner-secret-namespace", "x"),
            ],
            "cannot be used here",
        ),
        (
            &[
                ("csi.storage.k8s.io/node-publish-secret-name", "x"),
                (
                    "csi.storage.k8s.io/node-publish-secret-namespace",
                    "${pvc.name}",
                ),
            ],
            "cannot be used here",
        ),
        (
            &[
                (
                    "csi.storage.k8s.io/node-publish-secret-name",
                    "${pvc.annotations['nope']}",
                ),
                ("csi.storage.k8s.io/node-publish-secret-namespace", "x"),
            ],
            "no annotation \"nope\"",
        ),
        (
            &[
                (
                    "csi.storage.k8s.io/controller-expand-secret-name",
                    "${pv.name",
                ),
                ("csi.storage.k8s.io/controller-expand-secret-namespace", "x"),
            ],
            "unclosed",
        ),
        (&[("stowage.io/reclaim", "shred")], "stowage.io/reclaim"),
    ];
    for (params, want) in table {
        let err = plan(&input(&c, &class(params), ALL))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{params:?}: {err}");
    }
}

#[test]
fn reclaim_policy_parameter() {
    let c = claim(&["ReadWriteOnce"]);
    for (v, want) in [
        ("recycle", "Recycle"),
        ("retain", "Retain"),
        ("delete", "Delete"),
    ] {
        let p = plan(&input(&c, &class(&[("stowage.io/reclaim", v)]), ALL)).unwrap();
        assert_eq!(p.reclaim_policy, want);
        assert!(!p.request.parameters.contains_key("stowage.io/reclaim"));
    }
    let mut sc = class(&[]);
    sc.reclaim_policy = Some("Retain".into());
    assert_eq!(plan(&input(&c, &sc, ALL)).unwrap().reclaim_policy, "Retain");
    sc.reclaim_policy = None;
    assert_eq!(plan(&input(&c, &sc, ALL)).unwrap().reclaim_policy, "Delete");
}

#[test]
fn capacity_limits() {
    let mut c = claim(&["ReadWriteOnce"]);
    c.spec.as_mut().unwrap().resources.as_mut().unwrap().limits =
        Some(BTreeMap::from([("storage".into(), Quantity("4Gi".into()))]));
    let p = plan(&input(&c, &class(&[]), ALL)).unwrap();
    assert_eq!(
        p.request.capacity_range,
        Some(v1::CapacityRange {
            required_bytes: 2 << 30,
            limit_bytes: 4 << 30
        })
    );
    c.spec.as_mut().unwrap().resources.as_mut().unwrap().limits =
        Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))]));
    assert!(matches!(
        plan(&input(&c, &class(&[]), ALL)),
        Err(PlanError::Capacity(_))
    ));
    c.spec.as_mut().unwrap().resources = None;
    assert_eq!(
        plan(&input(&c, &class(&[]), ALL))
            .unwrap()
            .request
            .capacity_range,
        None
    );
}

#[test]
fn topology_from_node_or_allowed_topologies() {
    let c = claim(&["ReadWriteOnce"]);
    let mut sc = class(&[]);
    sc.allowed_topologies = Some(vec![TopologySelectorTerm {
        match_label_expressions: Some(vec![
            TopologySelectorLabelRequirement {
                key: "zone".into(),
                values: vec!["a".into(), "b".into()],
            },
            TopologySelectorLabelRequirement {
                key: "rack".into(),
                values: vec!["1".into()],
            },
        ]),
    }]);
    let p = plan(&input(&c, &sc, ALL)).unwrap();
    let req = p.request.accessibility_requirements.unwrap();
    let segs: Vec<BTreeMap<String, String>> = req
        .requisite
        .iter()
        .map(|t| t.segments.clone().into_iter().collect())
        .collect();
    assert_eq!(segs.len(), 2);
    assert!(segs.iter().all(|s| s["rack"] == "1"));
    let node = BTreeMap::from([("topology.stowage.io/node".to_string(), "n1".to_string())]);
    let mut i = input(&c, &sc, ALL);
    i.node_topology = Some(node.clone());
    let req = plan(&i)
        .unwrap()
        .request
        .accessibility_requirements
        .unwrap();
    assert_eq!(req.requisite.len(), 1);
    assert_eq!(req.preferred, req.requisite);
    // Without the capability there is no requirement at all.
    let mut i = input(
        &c,
        &sc,
        DriverCaps {
            topology: false,
            ..ALL
        },
    );
    i.node_topology = Some(node);
    assert!(
        plan(&i)
            .unwrap()
            .request
            .accessibility_requirements
            .is_none()
    );
}

#[test]
fn clone_sources() {
    let mut c = claim(&["ReadWriteOnce"]);
    c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
        api_group: None,
        kind: "PersistentVolumeClaim".into(),
        name: "src".into(),
    });
    let sc = class(&[]);
    assert!(matches!(
        plan(&input(&c, &sc, ALL)),
        Err(PlanError::DataSource(_))
    ));
    let mut i = input(&c, &sc, ALL);
    i.clone_source = Some("default/pvc-src".into());
    let p = plan(&i).unwrap();
    assert_eq!(
        p.request.volume_content_source.unwrap().r#type,
        Some(v1::volume_content_source::Type::Volume(
            v1::volume_content_source::VolumeSource {
                volume_id: "default/pvc-src".into()
            }
        ))
    );
    assert!(matches!(
        plan(&PlanInput {
            caps: DriverCaps {
                clone: false,
                ..ALL
            },
            ..i
        }),
        Err(PlanError::DataSource(_))
    ));
    c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
        api_group: Some("snapshot.storage.k8s.io".into()),
        kind: "VolumeSnapshot".into(),
        name: "snap".into(),
    });
    assert!(matches!(
        plan(&input(&c, &sc, ALL)),
        Err(PlanError::DataSource(_))
    ));
}

#[test]
fn pv_records_the_volume() {
    let c = claim(&["ReadWriteOnce", "ReadOnlyMany"]);
    let sc = class(&[
        ("csi.storage.k8s.io/fstype", "ext4"),
        ("csi.storage.k8s.io/provisioner-secret-name", "p"),
        (
            "csi.storage.k8s.io/provisioner-secret-namespace",
            "kube-system",
        ),
        ("csi.storage.k8s.io/node-publish-secret-name", "np"),
        (
            "csi.storage.k8s.io/node-publish-secret-namespace",
            "${pvc.namespace}",
        ),
    ]);
    let p = plan(&input(&c, &sc, ALL)).unwrap();
    let created = v1::Volume {
        capacity_bytes: 3 << 30,
        volume_id: "default/pvc-1234".into(),
        volume_context: [("server".to_string(), "10.0.0.5".to_string())]
            .into_iter()
            .collect(),
        content_source: None,
        accessible_topology: vec![v1::Topology {
            segments: [("topology.stowage.io/node".to_string(), "n1".to_string())]
                .into_iter()
                .collect(),
        }],
    };
    let pv = build_pv(&p, DRIVER, &c, &sc, &created);
    assert_eq!(pv.metadata.name.as_deref(), Some("pvc-1234"));
    assert_eq!(
        o::annotation(&pv.metadata, ANN_PROVISIONED_BY),
        Some(DRIVER)
    );
    assert_eq!(
        o::annotation(&pv.metadata, ANN_DELETION_SECRET_NAMESPACE),
        Some("kube-system")
    );
    assert!(o::has_finalizer(&pv.metadata, FINALIZER));
    let spec = pv.spec.as_ref().unwrap();
    assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "3Gi");
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(csi.volume_handle, "default/pvc-1234");
    assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
    assert_eq!(
        csi.volume_attributes.as_ref().unwrap()["server"],
        "10.0.0.5"
    );
    assert_eq!(
        csi.node_publish_secret_ref
            .as_ref()
            .unwrap()
            .namespace
            .as_deref(),
        Some("db")
    );
    assert!(csi.node_stage_secret_ref.is_none());
    let r = spec.claim_ref.as_ref().unwrap();
    assert_eq!(
        (r.namespace.as_deref(), r.name.as_deref(), r.uid.as_deref()),
        (Some("db"), Some("data"), Some("1234"))
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some("gold"));
    assert_eq!(spec.mount_options, Some(vec!["noatime".to_string()]));
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
    let terms = &spec
        .node_affinity
        .as_ref()
        .unwrap()
        .required
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms.len(), 1);
    assert_eq!(
        terms[0].match_expressions.as_ref().unwrap()[0].key,
        "topology.stowage.io/node"
    );
    // A driver that reports no capacity: the request. Retain: no finalizer.
    let mut retain = class(&[]);
    retain.reclaim_policy = Some("Retain".into());
    let p = plan(&input(&c, &retain, ALL)).unwrap();
    let pv = build_pv(
        &p,
        DRIVER,
        &c,
        &retain,
        &v1::Volume {
            capacity_bytes: 0,
            ..created
        },
    );
    assert_eq!(
        pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        "2Gi"
    );
    assert!(pv.metadata.finalizers.is_none());
}

#[test]
#[allow(clippy::type_complexity)] // a table's row type
fn snapshot_sources() {
    use k8s_openapi::api::core::v1::TypedObjectReference;
    use v1::volume_content_source::{SnapshotSource, Type};
    let snap_ref = || TypedLocalObjectReference {
        api_group: Some("snapshot.storage.k8s.io".into()),
        kind: "VolumeSnapshot".into(),
        name: "snap".into(),
    };
    let caps = DriverCaps {
        snapshot: true,
        ..ALL
    };
    let ready = |size: u64| {
        Some(RestoreSource::Snapshot {
            id: "default/snap-1".into(),
            size_bytes: size,
        })
    };
    let gib = 1u64 << 30;
    // (what, dataSource?, dataSourceRef namespace, caps, looked-up source, want)
    type Want = Result<&'static str, fn(&PlanError) -> bool>;
    let cases: Vec<(
        &str,
        bool,
        Option<&str>,
        DriverCaps,
        Option<RestoreSource>,
        Want,
    )> = vec![
        ("ready", true, None, caps, ready(gib), Ok("default/snap-1")),
        (
            "ready, no size",
            true,
            None,
            caps,
            ready(0),
            Ok("default/snap-1"),
        ),
        (
            "as dataSourceRef",
            false,
            None,
            caps,
            ready(gib),
            Ok("default/snap-1"),
        ),
        (
            "dataSourceRef, same namespace",
            false,
            Some("db"),
            caps,
            ready(gib),
            Ok("default/snap-1"),
        ),
        (
            "dataSourceRef, other namespace",
            false,
            Some("other"),
            caps,
            ready(gib),
            Err(|e| matches!(e, PlanError::DataSource(m) if m.contains("other namespaces"))),
        ),
        (
            "bigger than the request",
            true,
            None,
            caps,
            ready(4 * gib),
            Err(|e| matches!(e, PlanError::Capacity(m) if m.contains("restoreSize"))),
        ),
        (
            "not ready",
            true,
            None,
            caps,
            Some(RestoreSource::NotReady(
                "volumesnapshot \"snap\" is not ready to use yet".into(),
            )),
            Err(|e| matches!(e, PlanError::SourceNotReady(m) if m.contains("not ready"))),
        ),
        (
            "not looked up",
            true,
            None,
            caps,
            None,
            Err(|e| matches!(e, PlanError::SourceNotReady(_))),
        ),
        (
            "other driver",
            true,
            None,
            caps,
            Some(RestoreSource::Refused(
                "volumesnapshot \"snap\" is a snapshot of driver rbd.stowage.io".into(),
            )),
            Err(|e| matches!(e, PlanError::DataSource(m) if m.contains("rbd.stowage.io"))),
        ),
        (
            "driver without snapshots",
            true,
            None,
            ALL,
            ready(gib),
            Err(|e| matches!(e, PlanError::DataSource(m) if m.contains("CREATE_DELETE_SNAPSHOT"))),
        ),
    ];
    let sc = class(&[]);
    for (what, as_ds, ref_ns, caps, source, want) in cases {
        let mut c = claim(&["ReadWriteOnce"]);
        let spec = c.spec.as_mut().unwrap();
        if as_ds {
            spec.data_source = Some(snap_ref());
        } else {
            spec.data_source_ref = Some(TypedObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: "snap".into(),
                namespace: ref_ns.map(Into::into),
            });
        }
        let mut i = input(&c, &sc, caps);
        i.snapshot_source = source;
        match (plan(&i), want) {
            (Ok(p), Ok(id)) => assert_eq!(
                p.request.volume_content_source.and_then(|s| s.r#type),
                Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: id.into()
                })),
                "{what}"
            ),
            (Err(e), Err(check)) => assert!(check(&e), "{what}: {e:?}"),
            (got, _) => panic!("{what}: unexpected {got:?}"),
        }
    }
    // Another kind names what is accepted.
    let mut c = claim(&["ReadWriteOnce"]);
    c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
        api_group: Some("example.com".into()),
        kind: "Backup".into(),
        name: "b".into(),
    });
    assert!(matches!(
        plan(&input(&c, &sc, caps)),
        Err(PlanError::DataSource(m)) if m.contains("example.com/Backup") && m.contains("VolumeSnapshot")
    ));
}
