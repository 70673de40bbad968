use super::*;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::snapshot::types::{VolumeSnapshotClassFields, VolumeSnapshotSource, VolumeSnapshotSpec};

const D: &str = "local.stowage.io";
const UID: &str = "1111-2222";

fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    }
}

fn snap(class: Option<&str>) -> VolumeSnapshot {
    let mut s = VolumeSnapshot::new(
        "snap",
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some("data".into()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: class.map(Into::into),
        },
    );
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some(UID.into());
    s
}

fn with_finalizers(mut s: VolumeSnapshot, f: &[&str]) -> VolumeSnapshot {
    s.metadata.finalizers = Some(f.iter().map(|x| x.to_string()).collect());
    s
}

fn deleted(mut m: ObjectMeta) -> ObjectMeta {
    m.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    m
}

fn class(name: &str, driver: &str, default: bool, params: &[(&str, &str)]) -> VolumeSnapshotClass {
    let mut c = VolumeSnapshotClass::new(
        name,
        VolumeSnapshotClassFields {
            driver: driver.into(),
            parameters: Some(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            deletion_policy: DeletionPolicy::Delete,
        },
    );
    if default {
        o::set_annotation(&mut c.metadata, ANN_DEFAULT_CLASS, "true");
    }
    c
}

fn claim() -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta("data", Some("ns")),
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some("pvc-1".into()),
            ..Default::default()
        }),
        status: None,
    }
}

fn volume(driver: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: meta("pvc-1", None),
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.into(),
                volume_handle: "default/pvc-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn input<'a>(
    s: &'a VolumeSnapshot,
    classes: &'a [VolumeSnapshotClass],
    claim: Option<&'a PersistentVolumeClaim>,
    pv: Option<&'a PersistentVolume>,
    content: Option<&'a VolumeSnapshotContent>,
) -> SnapshotInput<'a> {
    SnapshotInput {
        driver: D,
        snapshot: s,
        claim,
        volume: pv,
        classes,
        content,
        restoring: None,
    }
}

fn made_content(s: &VolumeSnapshot, classes: &[VolumeSnapshotClass]) -> VolumeSnapshotContent {
    let c = claim();
    let v = volume(D);
    match next_snapshot(&input(s, classes, Some(&c), Some(&v), None)) {
        SnapshotStep::CreateContent(c) => *c,
        other => panic!("expected a content, got {other:?}"),
    }
}

#[test]
fn dynamic_snapshot_gets_finalizer_then_content() {
    let classes = [class("fast", D, false, &[])];
    let c = claim();
    let v = volume(D);
    let s = snap(Some("fast"));
    assert_eq!(
        next_snapshot(&input(&s, &classes, Some(&c), Some(&v), None)),
        SnapshotStep::AddFinalizer(FIN_SOURCE)
    );
    let s = with_finalizers(s, &[FIN_SOURCE]);
    let content = made_content(&s, &classes);
    assert_eq!(o::name(&content.metadata), format!("snapcontent-{UID}"));
    assert_eq!(content.spec.driver, D);
    assert_eq!(content.spec.volume_snapshot_ref.uid.as_deref(), Some(UID));
    assert_eq!(
        content.spec.volume_snapshot_ref.name.as_deref(),
        Some("snap")
    );
    assert_eq!(
        content.spec.volume_snapshot_ref.namespace.as_deref(),
        Some("ns")
    );
    assert_eq!(
        content.spec.source.volume_handle.as_deref(),
        Some("default/pvc-1")
    );
    assert_eq!(content.spec.deletion_policy, DeletionPolicy::Delete);
    assert_eq!(
        content.spec.volume_snapshot_class_name.as_deref(),
        Some("fast")
    );
    assert_eq!(
        snapshot_name(&content).as_deref(),
        Some("snapshot-1111-2222")
    );
}

#[test]
#[allow(clippy::type_complexity)] // a table's row type
fn class_choice_and_errors() {
    let c = claim();
    let v = volume(D);
    let cases: Vec<(
        &str,
        Option<&str>,
        Vec<VolumeSnapshotClass>,
        Result<&str, &str>,
    )> = vec![
        ("named", Some("a"), vec![class("a", D, false, &[])], Ok("a")),
        (
            "default of the driver",
            None,
            vec![class("other", "x.io", true, &[]), class("b", D, true, &[])],
            Ok("b"),
        ),
        (
            "no default",
            None,
            vec![class("a", D, false, &[])],
            Err("no default VolumeSnapshotClass"),
        ),
        (
            "two defaults",
            None,
            vec![class("a", D, true, &[]), class("b", D, true, &[])],
            Err("2 default VolumeSnapshotClasses (a, b)"),
        ),
        (
            "named missing",
            Some("gone"),
            vec![],
            Err("volumesnapshotclass \"gone\" not found"),
        ),
        (
            "unknown driver",
            Some("bad"),
            vec![class("bad", "nope.example.com", false, &[])],
            Err("is for driver \"nope.example.com\""),
        ),
        (
            "unknown csi key",
            Some("typo"),
            vec![class(
                "typo",
                D,
                false,
                &[("csi.storage.k8s.io/snapshoter-secret-name", "s")],
            )],
            Err("\"csi.storage.k8s.io/snapshoter-secret-name\": unknown"),
        ),
        (
            "secret name without namespace",
            Some("half"),
            vec![class("half", D, false, &[(SECRET_NAME, "s")])],
            Err("needs csi.storage.k8s.io/snapshotter-secret-namespace too"),
        ),
    ];
    for (what, named, classes, want) in cases {
        let mut s = with_finalizers(snap(named), &[FIN_SOURCE]);
        let mut got = next_snapshot(&input(&s, &classes, Some(&c), Some(&v), None));
        // A class-less snapshot first gets the default written into its spec, then its content.
        if let SnapshotStep::SetClass(name) = &got {
            assert!(
                named.is_none(),
                "{what}: SetClass for a snapshot naming {named:?}"
            );
            s.spec.volume_snapshot_class_name = Some(name.clone());
            got = next_snapshot(&input(&s, &classes, Some(&c), Some(&v), None));
        }
        match (want, got) {
            (Ok(name), SnapshotStep::CreateContent(content)) => assert_eq!(
                content.spec.volume_snapshot_class_name.as_deref(),
                Some(name),
                "{what}"
            ),
            (Err(msg), SnapshotStep::Error(e)) => assert!(e.contains(msg), "{what}: {e}"),
            (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn source_claim_problems_are_errors_or_not_ours() {
    let classes = [class("a", D, true, &[])];
    let s = with_finalizers(snap(Some("a")), &[FIN_SOURCE]);
    let mut unbound = claim();
    unbound.spec.as_mut().unwrap().volume_name = None;
    let v = volume(D);
    // Claim missing, class names this driver: ours, and said so.
    assert!(matches!(
        next_snapshot(&input(&s, &classes, None, None, None)),
        SnapshotStep::Error(e) if e.contains("persistentvolumeclaim \"data\" not found")
    ));
    assert!(matches!(
        next_snapshot(&input(&s, &classes, Some(&unbound), None, None)),
        SnapshotStep::Error(e) if e.contains("not bound yet")
    ));
    // The source volume is another driver's: that driver's provisioner handles it.
    let other = volume("nfs.stowage.io");
    assert_eq!(
        next_snapshot(&input(&s, &classes, Some(&claim()), Some(&other), None)),
        SnapshotStep::Ignore
    );
    // No class named, claim missing: cannot tell whose it is.
    let s2 = with_finalizers(snap(None), &[FIN_SOURCE]);
    assert_eq!(
        next_snapshot(&input(&s2, &classes, None, None, None)),
        SnapshotStep::Ignore
    );
    let _ = v;
}

#[test]
fn status_follows_content_then_bound_finalizer() {
    let classes = [class("a", D, false, &[])];
    let s = with_finalizers(snap(Some("a")), &[FIN_SOURCE]);
    let mut content = made_content(&s, &classes);
    let step = next_snapshot(&input(&s, &classes, None, None, Some(&content)));
    let SnapshotStep::Status(st) = step else {
        panic!("expected status, got {step:?}")
    };
    assert_eq!(st.bound_volume_snapshot_content_name, content.metadata.name);
    assert_eq!(st.ready_to_use, Some(false));
    // The driver answered: ready, 1 GiB, a creation time.
    content.status = Some(content_status(
        None,
        "default/snap-x",
        1 << 30,
        Some(1_700_000_000_000_000_000),
        true,
    ));
    let SnapshotStep::Status(st) = next_snapshot(&input(&s, &classes, None, None, Some(&content)))
    else {
        panic!()
    };
    assert_eq!(st.ready_to_use, Some(true));
    assert_eq!(st.restore_size, Some(Quantity("1Gi".into())));
    assert_eq!(
        st.creation_time.as_ref().map(|t| t.0.as_second()),
        Some(1_700_000_000)
    );
    let mut s = s;
    s.status = Some(*st);
    assert_eq!(
        next_snapshot(&input(&s, &classes, None, None, Some(&content))),
        SnapshotStep::AddFinalizer(FIN_BOUND)
    );
    let s = with_finalizers(s, &[FIN_SOURCE, FIN_BOUND]);
    assert_eq!(
        next_snapshot(&input(&s, &classes, None, None, Some(&content))),
        SnapshotStep::Done
    );
    // An error on the content shows on the snapshot.
    let mut failing = content.clone();
    failing.status.as_mut().unwrap().error = Some(crate::snapshot::types::VolumeSnapshotError {
        time: None,
        message: Some("secret ns/s: not found".into()),
    });
    let SnapshotStep::Status(st) = next_snapshot(&input(&s, &classes, None, None, Some(&failing)))
    else {
        panic!()
    };
    assert_eq!(
        st.error.and_then(|e| e.message).as_deref(),
        Some("secret ns/s: not found")
    );
}

fn preprovisioned(ref_uid: Option<&str>, ref_name: &str) -> VolumeSnapshotContent {
    let mut c = VolumeSnapshotContent::new(
        "static",
        VolumeSnapshotContentSpec {
            volume_snapshot_ref: ObjectReference {
                name: Some(ref_name.into()),
                namespace: Some("ns".into()),
                uid: ref_uid.map(Into::into),
                ..Default::default()
            },
            deletion_policy: DeletionPolicy::Retain,
            driver: D.into(),
            volume_snapshot_class_name: None,
            source: VolumeSnapshotContentSource {
                volume_handle: None,
                snapshot_handle: Some("default/old-snap".into()),
            },
            source_volume_mode: None,
        },
    );
    c.metadata.uid = Some("uid-static".into());
    c
}

#[test]
fn preprovisioned_content_binds() {
    let mut s = snap(None);
    s.spec.source = VolumeSnapshotSource {
        persistent_volume_claim_name: None,
        volume_snapshot_content_name: Some("static".into()),
    };
    let s = with_finalizers(s, &[FIN_SOURCE]);
    let cases: Vec<(&str, Option<VolumeSnapshotContent>, &str)> = vec![
        ("missing", None, "ignore"),
        ("unbound", Some(preprovisioned(None, "snap")), "bind"),
        ("empty uid", Some(preprovisioned(Some(""), "snap")), "bind"),
        ("ours", Some(preprovisioned(Some(UID), "snap")), "status"),
        (
            "another uid",
            Some(preprovisioned(Some("zzz"), "snap")),
            "error",
        ),
        ("another name", Some(preprovisioned(None, "other")), "error"),
    ];
    for (what, content, want) in cases {
        let got = next_snapshot(&input(&s, &[], None, None, content.as_ref()));
        let kind = match &got {
            SnapshotStep::Ignore => "ignore",
            SnapshotStep::BindContent(c) => {
                assert_eq!(c.spec.volume_snapshot_ref.uid.as_deref(), Some(UID));
                "bind"
            }
            SnapshotStep::Status(_) => "status",
            SnapshotStep::Error(_) => "error",
            _ => "other",
        };
        assert_eq!(kind, want, "{what}: {got:?}");
    }
}

#[test]
fn deletion_follows_the_policy_and_waits_for_restores() {
    let classes = [class("a", D, false, &[])];
    let live = with_finalizers(snap(Some("a")), &[FIN_SOURCE, FIN_BOUND]);
    let content = made_content(&live, &classes);
    let mut retain = content.clone();
    retain.spec.deletion_policy = DeletionPolicy::Retain;
    let mut content_going = content.clone();
    content_going.metadata = deleted(content_going.metadata);
    let mut s = live.clone();
    s.metadata = deleted(s.metadata);
    let name = o::name(&content.metadata).to_owned();

    let step = |c: Option<&VolumeSnapshotContent>, restoring: Option<&str>, s: &VolumeSnapshot| {
        let mut i = input(s, &classes, None, None, c);
        i.restoring = restoring.map(Into::into);
        next_snapshot(&i)
    };
    assert_eq!(
        step(Some(&content), None, &s),
        SnapshotStep::DeleteContent(name)
    );
    assert_eq!(
        step(Some(&content_going), None, &s),
        SnapshotStep::RemoveFinalizers
    );
    assert_eq!(
        step(Some(&retain), None, &s),
        SnapshotStep::RemoveFinalizers
    );
    assert!(matches!(
        step(Some(&content), Some("ns/restored"), &s),
        SnapshotStep::Wait(w) if w.contains("ns/restored")
    ));
    let mut bare = s.clone();
    bare.metadata.finalizers = None;
    assert_eq!(step(Some(&retain), None, &bare), SnapshotStep::Done);
}

#[test]
fn orphans_go_with_policy_delete() {
    let classes = [class("a", D, false, &[])];
    let s = with_finalizers(snap(Some("a")), &[FIN_SOURCE]);
    let content = made_content(&s, &classes);
    assert!(!next_orphan(D, &content, Some(&s)));
    assert!(next_orphan(D, &content, None));
    let mut recreated = s.clone();
    recreated.metadata.uid = Some("new".into());
    assert!(next_orphan(D, &content, Some(&recreated)));
    assert!(!next_orphan("other.io", &content, None));
    let mut retain = content.clone();
    retain.spec.deletion_policy = DeletionPolicy::Retain;
    assert!(!next_orphan(D, &retain, None));
    assert!(!next_orphan(D, &preprovisioned(None, "snap"), None));
}

#[test]
fn driver_creates_with_class_parameters_and_secret() {
    let classes = [class(
        "a",
        D,
        false,
        &[
            ("onDelete", "retain"),
            (SECRET_NAME, "snap-${volumesnapshot.name}"),
            (SECRET_NAMESPACE, "${volumesnapshot.namespace}"),
        ],
    )];
    let s = with_finalizers(snap(Some("a")), &[FIN_SOURCE]);
    let content = made_content(&s, &classes);
    // The common controller recorded the resolved secret for the delete.
    assert_eq!(
        content_secret(&content),
        Some(SecretRef {
            name: "snap-snap".into(),
            namespace: "ns".into()
        })
    );
    fn ci<'a>(
        c: &'a VolumeSnapshotContent,
        class: Option<&'a VolumeSnapshotClass>,
    ) -> ContentInput<'a> {
        ContentInput {
            driver: D,
            content: c,
            class,
            snapshot_live: true,
        }
    }
    assert_eq!(
        next_content(&ci(&content, Some(&classes[0]))),
        ContentStep::AddFinalizer
    );
    let mut content = content;
    content.metadata.finalizers = Some(vec![FIN_CONTENT.into()]);
    let ContentStep::Create(call) = next_content(&ci(&content, Some(&classes[0]))) else {
        panic!()
    };
    assert_eq!(call.name, "snapshot-1111-2222");
    assert_eq!(call.source_volume_id, "default/pvc-1");
    assert_eq!(
        call.parameters,
        BTreeMap::from([("onDelete".to_owned(), "retain".to_owned())])
    );
    assert_eq!(call.secret.map(|s| s.name).as_deref(), Some("snap-snap"));
    // Class gone: said, not guessed.
    assert!(
        matches!(next_content(&ci(&content, None)), ContentStep::Error(e) if e.contains("\"a\" not found"))
    );
    // Not ready yet: asked again (same name); ready: done.
    content.status = Some(content_status(None, "default/s1", 10, None, false));
    assert!(
        matches!(next_content(&ci(&content, Some(&classes[0]))), ContentStep::Create(c) if c.name == "snapshot-1111-2222")
    );
    content.status = Some(content_status(None, "default/s1", 10, None, true));
    assert_eq!(
        next_content(&ci(&content, Some(&classes[0]))),
        ContentStep::Done
    );
    // Another driver's content.
    assert_eq!(
        next_content(&ContentInput {
            driver: "nfs.stowage.io",
            ..ci(&content, None)
        }),
        ContentStep::Ignore
    );
    // Not bound yet (no UID in the reference): nothing to name the snapshot after.
    let mut unbound = content.clone();
    unbound.status = None;
    unbound.spec.volume_snapshot_ref.uid = None;
    assert_eq!(
        next_content(&ci(&unbound, Some(&classes[0]))),
        ContentStep::Wait
    );
}

#[test]
fn driver_deletes_only_with_policy_delete_and_no_live_snapshot() {
    let mut c = preprovisioned(Some(UID), "snap");
    c.metadata.finalizers = Some(vec![FIN_CONTENT.into()]);
    assert_eq!(
        next_content(&ContentInput {
            driver: D,
            content: &c,
            class: None,
            snapshot_live: false
        }),
        ContentStep::Check("default/old-snap".into())
    );
    c.metadata = deleted(c.metadata);
    let step = |c: &VolumeSnapshotContent, live: bool| {
        next_content(&ContentInput {
            driver: D,
            content: c,
            class: None,
            snapshot_live: live,
        })
    };
    // Retain: the physical snapshot stays.
    assert_eq!(step(&c, false), ContentStep::RemoveFinalizer);
    c.spec.deletion_policy = DeletionPolicy::Delete;
    assert_eq!(
        step(&c, false),
        ContentStep::Delete {
            snapshot_id: "default/old-snap".into(),
            secret: None
        }
    );
    assert_eq!(step(&c, true), ContentStep::Wait);
    c.metadata.finalizers = None;
    assert_eq!(step(&c, false), ContentStep::Done);
}

#[test]
fn restore_sources() {
    let classes = [class("a", D, false, &[])];
    let mut s = with_finalizers(snap(Some("a")), &[FIN_SOURCE]);
    let mut content = made_content(&s, &classes);
    let cname = o::name(&content.metadata).to_owned();
    let r = |s: Option<&VolumeSnapshot>, c: Option<&VolumeSnapshotContent>| {
        restore_source(D, "snap", s, c)
    };
    assert!(matches!(r(None, None), RestoreSource::NotReady(m) if m.contains("not found")));
    assert!(matches!(r(Some(&s), None), RestoreSource::NotReady(m) if m.contains("not bound")));
    s.status = Some(VolumeSnapshotStatus {
        bound_volume_snapshot_content_name: Some(cname.clone()),
        ..Default::default()
    });
    assert!(matches!(r(Some(&s), None), RestoreSource::NotReady(m) if m.contains(&cname)));
    assert!(
        matches!(r(Some(&s), Some(&content)), RestoreSource::NotReady(m) if m.contains("not ready"))
    );
    content.status = Some(content_status(None, "default/s1", 1 << 20, None, true));
    assert_eq!(
        r(Some(&s), Some(&content)),
        RestoreSource::Snapshot {
            id: "default/s1".into(),
            size_bytes: 1 << 20
        }
    );
    let mut other = content.clone();
    other.spec.driver = "rbd.stowage.io".into();
    assert!(
        matches!(r(Some(&s), Some(&other)), RestoreSource::Refused(m) if m.contains("rbd.stowage.io"))
    );
    let mut stolen = content.clone();
    stolen.spec.volume_snapshot_ref.uid = Some("other".into());
    assert!(matches!(
        r(Some(&s), Some(&stolen)),
        RestoreSource::Refused(_)
    ));
    s.metadata = deleted(s.metadata);
    assert!(
        matches!(r(Some(&s), Some(&content)), RestoreSource::Refused(m) if m.contains("being deleted"))
    );
}

#[test]
fn class_less_snapshot_gets_the_default_class_in_its_spec_first() {
    let classes = [class("other", "x.io", true, &[]), class("b", D, true, &[])];
    let (c, v) = (claim(), volume(D));
    let s = with_finalizers(snap(None), &[FIN_SOURCE]);
    assert_eq!(
        next_snapshot(&input(&s, &classes, Some(&c), Some(&v), None)),
        SnapshotStep::SetClass("b".into())
    );
}
