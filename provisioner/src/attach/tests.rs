use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeSpec, SecretReference,
};
use k8s_openapi::api::storage::v1::{
    CSINode, CSINodeDriver, CSINodeSpec, VolumeAttachment, VolumeAttachmentSource,
    VolumeAttachmentSpec, VolumeAttachmentStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use stowage_csi::v1::volume_capability::AccessType;
use stowage_csi::v1::volume_capability::access_mode::Mode;

use super::*;

const DRIVER: &str = "rbd.stowage.io";
const FIN: &str = "external-attacher/rbd.stowage.io";

const CAPS: DriverCaps = DriverCaps {
    single_node_multi_writer: false,
    topology: false,
    clone: true,
    publish_unpublish: true,
    publish_readonly: true,
    expand: true,
    snapshot: false,
    list_snapshots: false,
};

fn pv(modes: &[&str], finalizers: &[&str]) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some("pv-1".into()),
            finalizers: Some(finalizers.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(modes.iter().map(|s| s.to_string()).collect()),
            mount_options: Some(vec!["noatime".into()]),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.into(),
                volume_handle: "pool/img-1".into(),
                fs_type: Some("xfs".into()),
                volume_attributes: Some(BTreeMap::from([("pool".into(), "rbd".into())])),
                controller_publish_secret_ref: Some(SecretReference {
                    name: Some("ceph".into()),
                    namespace: Some("ceph-ns".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn va(
    finalizers: &[&str],
    node_ann: Option<&str>,
    attached: bool,
    deleting: bool,
) -> VolumeAttachment {
    VolumeAttachment {
        metadata: ObjectMeta {
            name: Some("csi-abc".into()),
            finalizers: Some(finalizers.iter().map(|s| s.to_string()).collect()),
            annotations: node_ann
                .map(|n| BTreeMap::from([(ANN_NODE_ID.to_string(), n.to_string())])),
            deletion_timestamp: deleting.then_some(Time(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        },
        spec: VolumeAttachmentSpec {
            attacher: DRIVER.into(),
            node_name: "node-a".into(),
            source: VolumeAttachmentSource {
                persistent_volume_name: Some("pv-1".into()),
                inline_volume_spec: None,
            },
        },
        status: Some(VolumeAttachmentStatus {
            attached,
            ..Default::default()
        }),
    }
}

fn csinode(drivers: &[(&str, &str)]) -> CSINode {
    CSINode {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            ..Default::default()
        },
        spec: CSINodeSpec {
            drivers: drivers
                .iter()
                .map(|(d, id)| CSINodeDriver {
                    name: d.to_string(),
                    node_id: id.to_string(),
                    ..Default::default()
                })
                .collect(),
        },
    }
}

/// What a case says, the attachment, its PV and CSINode, and the step expected.
type Case<'a> = (
    &'a str,
    VolumeAttachment,
    Option<&'a PersistentVolume>,
    Option<&'a CSINode>,
    Step,
);

fn step(va: &VolumeAttachment, pv: Option<&PersistentVolume>, node: Option<&CSINode>) -> Step {
    next(&AttachInput {
        driver: DRIVER,
        caps: CAPS,
        va,
        pv,
        csinode: node,
    })
}

#[test]
fn finalizer_name_is_external_attachers() {
    assert_eq!(finalizer(DRIVER), FIN);
    assert_eq!(
        finalizer("example.com/x"),
        "external-attacher/example.com-x"
    );
}

/// The attach path, one step at a time, as the controller walks it.
#[test]
fn attach_steps() {
    let node = csinode(&[("other.io", "x"), (DRIVER, "id-a")]);
    let foreign = csinode(&[("other.io", "x")]);
    let bare = pv(&["ReadWriteOnce"], &[]);
    let guarded = pv(&["ReadWriteOnce"], &[FIN]);
    let table: Vec<Case<'_>> = vec![
        (
            "PV first",
            va(&[], None, false, false),
            Some(&bare),
            Some(&node),
            Step::AddVolumeFinalizer,
        ),
        (
            "then the attachment, with the node ID",
            va(&[], None, false, false),
            Some(&guarded),
            Some(&node),
            Step::AddFinalizer {
                node_id: "id-a".into(),
            },
        ),
        (
            "already attached",
            va(&[FIN], Some("id-a"), true, false),
            Some(&guarded),
            Some(&node),
            Step::Done,
        ),
        (
            "no PV",
            va(&[], None, false, false),
            None,
            Some(&node),
            Step::AttachError("PersistentVolume \"pv-1\" not found".into()),
        ),
        (
            "no CSINode",
            va(&[], None, false, false),
            Some(&guarded),
            None,
            Step::AttachError(
                "node \"node-a\" has no CSINode object: is the rbd.stowage.io node plugin running there?"
                    .into(),
            ),
        ),
        (
            "CSINode without the driver",
            va(&[], None, false, false),
            Some(&guarded),
            Some(&foreign),
            Step::AttachError(
                "driver rbd.stowage.io is not registered in the CSINode of node \"node-a\"".into(),
            ),
        ),
        (
            // A restart after the finalizer: the recorded ID wins, the CSINode is not needed.
            "recorded node ID without CSINode",
            va(&[FIN], Some("id-a"), false, false),
            Some(&guarded),
            None,
            Step::Publish(PublishCall {
                volume_id: "pool/img-1".into(),
                node_id: "id-a".into(),
                capability: capability_of(&guarded),
                readonly: false,
                secret: Some(SecretRef {
                    name: "ceph".into(),
                    namespace: "ceph-ns".into(),
                }),
                context: BTreeMap::from([("pool".into(), "rbd".into())]),
            }),
        ),
    ];
    for (what, a, p, n, want) in table {
        assert_eq!(step(&a, p, n), want, "{what}");
    }
}

fn capability_of(pv: &PersistentVolume) -> v1::VolumeCapability {
    volume_capability(pv.spec.as_ref().unwrap(), CAPS, DRIVER).unwrap()
}

#[test]
fn other_attachers_are_ignored() {
    let mut a = va(&[], None, false, false);
    a.spec.attacher = "csi.other.io".into();
    assert_eq!(step(&a, None, None), Step::Done);
    // Also while being deleted.
    a.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(step(&a, None, None), Step::Done);
}

#[test]
fn volume_of_another_driver_is_refused() {
    let mut p = pv(&["ReadWriteOnce"], &[FIN]);
    p.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "nfs.stowage.io".into();
    let a = va(&[FIN], Some("id-a"), false, false);
    assert!(
        matches!(step(&a, Some(&p), None), Step::AttachError(m) if m.contains("nfs.stowage.io"))
    );
    let mut p = pv(&["ReadWriteOnce"], &[FIN]);
    p.spec.as_mut().unwrap().csi = None;
    assert_eq!(
        step(&a, Some(&p), None),
        Step::AttachError("the volume is not a CSI volume".into())
    );
}

#[test]
fn detach_steps() {
    let node = csinode(&[(DRIVER, "id-new")]);
    let guarded = pv(&["ReadWriteOnce"], &[FIN]);
    let unpublish = |id: &str| {
        Step::Unpublish(UnpublishCall {
            volume_id: "pool/img-1".into(),
            node_id: id.into(),
            secret: Some(SecretRef {
                name: "ceph".into(),
                namespace: "ceph-ns".into(),
            }),
        })
    };
    let table: Vec<Case<'_>> = vec![
        (
            "not ours to hold",
            va(&[], None, true, true),
            Some(&guarded),
            Some(&node),
            Step::Done,
        ),
        (
            "recorded ID wins over a re-registered node",
            va(&[FIN], Some("id-a"), true, true),
            Some(&guarded),
            Some(&node),
            unpublish("id-a"),
        ),
        (
            "node gone: the recorded ID still detaches",
            va(&[FIN], Some("id-a"), true, true),
            Some(&guarded),
            None,
            unpublish("id-a"),
        ),
        (
            "published before the status was written (crash): still unpublished",
            va(&[FIN], Some("id-a"), false, true),
            Some(&guarded),
            None,
            unpublish("id-a"),
        ),
        (
            "external-attacher's attachment: the CSINode's ID",
            va(&[FIN], None, true, true),
            Some(&guarded),
            Some(&node),
            unpublish("id-new"),
        ),
        (
            "never published: finalizer only",
            va(&[FIN], None, false, true),
            Some(&guarded),
            None,
            Step::RemoveFinalizer,
        ),
        (
            "never published, PV gone",
            va(&[FIN], None, false, true),
            None,
            Some(&node),
            Step::RemoveFinalizer,
        ),
        (
            "attached, PV gone: cannot know the volume",
            va(&[FIN], Some("id-a"), true, true),
            None,
            None,
            Step::DetachError("PersistentVolume \"pv-1\" not found".into()),
        ),
    ];
    for (what, a, p, n, want) in table {
        assert_eq!(step(&a, p, n), want, "{what}");
    }
    assert!(matches!(
        step(&va(&[FIN], None, true, true), Some(&guarded), None),
        Step::DetachError(m) if m.contains("cannot detach")
    ));
}

#[test]
fn capabilities_from_the_pv() {
    let mode =
        |c: &v1::VolumeCapability| Mode::try_from(c.access_mode.as_ref().unwrap().mode).unwrap();
    let snmw = DriverCaps {
        single_node_multi_writer: true,
        ..CAPS
    };
    let table: &[(&[&str], DriverCaps, Mode)] = &[
        (&["ReadWriteOnce"], CAPS, Mode::SingleNodeWriter),
        (&["ReadWriteOnce"], snmw, Mode::SingleNodeMultiWriter),
        (&["ReadWriteOncePod"], snmw, Mode::SingleNodeSingleWriter),
        // Without SINGLE_NODE_MULTI_WRITER, RWOP is served as single-node.
        (&["ReadWriteOncePod"], CAPS, Mode::SingleNodeWriter),
        (&["ReadOnlyMany"], CAPS, Mode::MultiNodeReaderOnly),
        (
            &["ReadWriteOnce", "ReadOnlyMany"],
            CAPS,
            Mode::MultiNodeReaderOnly,
        ),
        (
            &["ReadWriteMany", "ReadWriteOnce"],
            CAPS,
            Mode::MultiNodeMultiWriter,
        ),
    ];
    for (modes, caps, want) in table {
        let p = pv(modes, &[]);
        let c = volume_capability(p.spec.as_ref().unwrap(), *caps, DRIVER).unwrap();
        assert_eq!(mode(&c), *want, "{modes:?}");
    }
    // Filesystem: fsType and mount flags travel; block: neither.
    let p = pv(&["ReadWriteOnce"], &[]);
    match capability_of(&p).access_type.unwrap() {
        AccessType::Mount(m) => {
            assert_eq!(m.fs_type, "xfs");
            assert_eq!(m.mount_flags, vec!["noatime".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    let mut p = pv(&["ReadWriteMany"], &[]);
    p.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    assert!(matches!(
        capability_of(&p).access_type.unwrap(),
        AccessType::Block(_)
    ));
    let p = pv(&[], &[]);
    assert!(volume_capability(p.spec.as_ref().unwrap(), CAPS, DRIVER).is_err());
}

#[test]
fn readonly_publish() {
    let publish = |p: &PersistentVolume, caps: DriverCaps| match next(&AttachInput {
        driver: DRIVER,
        caps,
        va: &va(&[FIN], Some("id-a"), false, false),
        pv: Some(p),
        csinode: None,
    }) {
        Step::Publish(c) => c.readonly,
        other => panic!("{other:?}"),
    };
    assert!(!publish(&pv(&["ReadWriteOnce"], &[FIN]), CAPS));
    assert!(publish(&pv(&["ReadOnlyMany"], &[FIN]), CAPS));
    let mut p = pv(&["ReadWriteOnce"], &[FIN]);
    p.spec.as_mut().unwrap().csi.as_mut().unwrap().read_only = Some(true);
    assert!(publish(&p, CAPS));
    // A driver without PUBLISH_READONLY is never asked for it.
    let no_ro = DriverCaps {
        publish_readonly: false,
        ..CAPS
    };
    assert!(!publish(&p, no_ro));
}

#[test]
fn inline_volume_spec() {
    let mut a = va(&[], None, false, false);
    a.spec.source.persistent_volume_name = None;
    a.spec.source.inline_volume_spec = pv(&["ReadWriteOnce"], &[]).spec;
    // No PV to protect: straight to the attachment's finalizer.
    let node = csinode(&[(DRIVER, "id-a")]);
    assert_eq!(
        step(&a, None, Some(&node)),
        Step::AddFinalizer {
            node_id: "id-a".into()
        }
    );
    a.metadata.finalizers = Some(vec![FIN.into()]);
    a.metadata.annotations = Some(BTreeMap::from([(ANN_NODE_ID.into(), "id-a".into())]));
    assert!(matches!(step(&a, None, Some(&node)), Step::Publish(c) if c.volume_id == "pool/img-1"));
}

#[test]
fn pv_finalizer_goes_with_the_last_attachment() {
    let mut p = pv(&["ReadWriteOnce"], &[FIN]);
    let a = va(&[FIN], Some("id-a"), true, false);
    let mut other = va(&[], None, false, false);
    other.spec.source.persistent_volume_name = Some("pv-2".into());
    // Not being deleted: stays.
    assert!(!volume_finalizer_removable(DRIVER, &p, [&a]));
    p.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert!(!volume_finalizer_removable(DRIVER, &p, [&a, &other]));
    assert!(volume_finalizer_removable(DRIVER, &p, [&other]));
    assert!(volume_finalizer_removable(DRIVER, &p, []));
    // Without our finalizer there is nothing to remove.
    p.metadata.finalizers = None;
    assert!(!volume_finalizer_removable(DRIVER, &p, []));
}
