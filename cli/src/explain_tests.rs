use serde_json::{Value, json};

use super::*;

const NOW: &str = "2026-12-07T10:00:00Z";
const HOUR_AGO: &str = "2026-12-07T09:00:00Z";
const JUST_NOW: &str = "2026-12-07T09:59:50Z";

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("test object")
}

fn pv(
    name: &str,
    driver: &str,
    phase: &str,
    reclaim: &str,
    extra_status: Value,
) -> PersistentVolume {
    let mut status = json!({"phase": phase});
    if let (Some(s), Some(e)) = (status.as_object_mut(), extra_status.as_object()) {
        s.extend(e.clone());
    }
    obj(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "creationTimestamp": HOUR_AGO},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": reclaim, "storageClassName": "fast",
                 "claimRef": {"namespace": "app", "name": "data"},
                 "csi": {"driver": driver, "volumeHandle": format!("default/{name}")}},
        "status": status
    }))
}

fn claim(
    name: &str,
    class: &str,
    phase: &str,
    volume: Option<&str>,
    created: &str,
) -> PersistentVolumeClaim {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                          "resources": {"requests": {"storage": "2Gi"}}});
    if let Some(v) = volume {
        spec["volumeName"] = json!(v);
    }
    obj(json!({
        "metadata": {"name": name, "namespace": "app", "uid": format!("uid-{name}"), "creationTimestamp": created},
        "spec": spec, "status": {"phase": phase}
    }))
}

fn class(name: &str, provisioner: &str, mode: &str) -> StorageClass {
    obj(json!({"metadata": {"name": name}, "provisioner": provisioner, "volumeBindingMode": mode}))
}

fn event(kind: &str, ns: &str, name: &str, reason: &str, msg: &str, at: &str) -> Event {
    obj(json!({
        "metadata": {"name": format!("{name}.{reason}"), "namespace": if ns.is_empty() { "default" } else { ns }},
        "involvedObject": {"kind": kind, "namespace": ns, "name": name},
        "reason": reason, "message": msg, "type": "Warning", "lastTimestamp": at
    }))
}

fn va(name: &str, pv: &str, node: &str, status: Value) -> VolumeAttachment {
    obj(json!({
        "metadata": {"name": name, "creationTimestamp": HOUR_AGO},
        "spec": {"attacher": "rbd.stowage.io", "nodeName": node, "source": {"persistentVolumeName": pv}},
        "status": status
    }))
}

struct Case {
    name: &'static str,
    pvs: Vec<PersistentVolume>,
    claims: Vec<PersistentVolumeClaim>,
    classes: Vec<StorageClass>,
    vas: Vec<VolumeAttachment>,
    events: Vec<Event>,
    /// (kind, name, state, a piece of the reason) of every problem, in order.
    problems: Vec<(&'static str, &'static str, &'static str, &'static str)>,
    volumes: usize,
    claims_shown: usize,
}

fn run(c: &Case) -> Report {
    explain(&Inputs {
        pvs: &c.pvs,
        claims: &c.claims,
        classes: &c.classes,
        attachments: &c.vas,
        events: &c.events,
        now: NOW.parse().expect("time"),
        pending_after_secs: 60,
    })
}

#[test]
fn table() {
    let cases = vec![
        Case {
            name: "healthy bound pair, foreign driver ignored",
            pvs: vec![
                pv("pv-a", "local.stowage.io", "Bound", "Delete", json!({})),
                pv(
                    "pv-other",
                    "ebs.csi.aws.com",
                    "Failed",
                    "Delete",
                    json!({"message": "x"}),
                ),
            ],
            claims: vec![
                claim("data", "fast", "Bound", Some("pv-a"), HOUR_AGO),
                claim("theirs", "gp2", "Pending", None, HOUR_AGO),
            ],
            classes: vec![
                class("fast", "local.stowage.io", "Immediate"),
                class("gp2", "ebs.csi.aws.com", "Immediate"),
            ],
            vas: vec![],
            events: vec![],
            problems: vec![],
            volumes: 1,
            claims_shown: 1,
        },
        Case {
            name: "pending claim with its last event (the newest of two)",
            pvs: vec![],
            claims: vec![claim("data", "fast", "Pending", None, HOUR_AGO)],
            classes: vec![class("fast", "nfs.stowage.io", "Immediate")],
            vas: vec![],
            events: vec![
                event(
                    "PersistentVolumeClaim",
                    "app",
                    "data",
                    "Provisioning",
                    "old",
                    HOUR_AGO,
                ),
                event(
                    "PersistentVolumeClaim",
                    "app",
                    "data",
                    "ProvisioningFailed",
                    "unknown parameter bogus",
                    JUST_NOW,
                ),
                event(
                    "PersistentVolumeClaim",
                    "other",
                    "data",
                    "X",
                    "another namespace",
                    NOW,
                ),
            ],
            problems: vec![(
                "PersistentVolumeClaim",
                "data",
                "Pending",
                "ProvisioningFailed: unknown parameter bogus",
            )],
            volumes: 0,
            claims_shown: 1,
        },
        Case {
            name: "a young pending claim is not stuck",
            pvs: vec![],
            claims: vec![claim("data", "fast", "Pending", None, JUST_NOW)],
            classes: vec![class("fast", "nfs.stowage.io", "Immediate")],
            vas: vec![],
            events: vec![],
            problems: vec![],
            volumes: 0,
            claims_shown: 1,
        },
        Case {
            name: "pending claim without events, WaitForFirstConsumer, missing class",
            pvs: vec![],
            claims: vec![
                claim("data", "fast", "Pending", None, HOUR_AGO),
                claim("late", "wait", "Pending", None, HOUR_AGO),
            ],
            classes: vec![
                class("fast", "s3.stowage.io", "Immediate"),
                class("wait", "s3.stowage.io", "WaitForFirstConsumer"),
            ],
            vas: vec![],
            events: vec![],
            problems: vec![
                ("PersistentVolumeClaim", "data", "Pending", "no event"),
                (
                    "PersistentVolumeClaim",
                    "late",
                    "Pending",
                    "WaitForFirstConsumer",
                ),
            ],
            volumes: 0,
            claims_shown: 2,
        },
        Case {
            name: "claim of a class that is gone, recognised by its provisioner annotation",
            pvs: vec![],
            claims: vec![{
                let mut c = claim("data", "gone", "Pending", None, HOUR_AGO);
                c.metadata.annotations = Some(
                    [(
                        ANN_STORAGE_PROVISIONER.to_owned(),
                        "nfs.stowage.io".to_owned(),
                    )]
                    .into(),
                );
                c
            }],
            classes: vec![],
            vas: vec![],
            events: vec![],
            problems: vec![(
                "PersistentVolumeClaim",
                "data",
                "Pending",
                "StorageClass gone does not exist",
            )],
            volumes: 0,
            claims_shown: 1,
        },
        Case {
            name: "released Retain, released Delete with its failed-delete event, Failed message",
            pvs: vec![
                pv("pv-keep", "nfs.stowage.io", "Released", "Retain", json!({})),
                pv("pv-del", "nfs.stowage.io", "Released", "Delete", json!({})),
                pv(
                    "pv-bad",
                    "local.stowage.io",
                    "Failed",
                    "Recycle",
                    json!({"message": "No recycler plugin found for the volume!"}),
                ),
            ],
            claims: vec![],
            classes: vec![],
            vas: vec![],
            events: vec![event(
                "PersistentVolume",
                "",
                "pv-del",
                "VolumeFailedDelete",
                "rpc error: Unavailable",
                JUST_NOW,
            )],
            problems: vec![
                ("PersistentVolume", "pv-bad", "Failed", "No recycler plugin"),
                (
                    "PersistentVolume",
                    "pv-del",
                    "Released",
                    "VolumeFailedDelete: rpc error: Unavailable",
                ),
                ("PersistentVolume", "pv-keep", "Released", "Retain keeps"),
            ],
            volumes: 3,
            claims_shown: 0,
        },
        Case {
            name: "attachError and detachError of VolumeAttachments",
            pvs: vec![
                pv("pv-r", "rbd.stowage.io", "Bound", "Delete", json!({})),
                pv("pv-s", "rbd.stowage.io", "Bound", "Delete", json!({})),
            ],
            claims: vec![],
            classes: vec![],
            vas: vec![
                va(
                    "csi-1",
                    "pv-r",
                    "node-2",
                    json!({"attached": false, "attachError": {"message": "image is published to node-1"}}),
                ),
                va(
                    "csi-2",
                    "pv-s",
                    "node-1",
                    json!({"attached": true, "detachError": {"message": "timeout"}}),
                ),
            ],
            events: vec![],
            problems: vec![
                (
                    "VolumeAttachment",
                    "csi-1",
                    "AttachError",
                    "PV pv-r on node node-2: image is published to node-1",
                ),
                ("VolumeAttachment", "csi-2", "DetachError", "timeout"),
            ],
            volumes: 2,
            claims_shown: 0,
        },
    ];
    for c in &cases {
        let r = run(c);
        assert_eq!(
            r.volumes.len(),
            c.volumes,
            "{}: volumes {:?}",
            c.name,
            r.volumes
        );
        assert_eq!(
            r.claims.len(),
            c.claims_shown,
            "{}: claims {:?}",
            c.name,
            r.claims
        );
        let got: Vec<_> = r
            .problems
            .iter()
            .map(|p| (p.kind, p.name.as_str(), p.state))
            .collect();
        let want: Vec<_> = c.problems.iter().map(|p| (p.0, p.1, p.2)).collect();
        assert_eq!(got, want, "{}: {:#?}", c.name, r.problems);
        for (p, w) in r.problems.iter().zip(&c.problems) {
            assert!(
                p.reason.contains(w.3),
                "{}: {:?} lacks {:?}",
                c.name,
                p.reason,
                w.3
            );
            assert!(!p.hint.is_empty(), "{}: no hint for {}", c.name, p.name);
        }
    }
}

#[test]
fn attach_state_and_columns() {
    let pvs = vec![
        pv("pv-r", "rbd.stowage.io", "Bound", "Delete", json!({})),
        pv("pv-q", "rbd.stowage.io", "Bound", "Delete", json!({})),
        pv("pv-n", "nfs.stowage.io", "Bound", "Delete", json!({})),
    ];
    let vas = vec![
        va("a", "pv-r", "node-1", json!({"attached": true})),
        va("b", "pv-q", "node-2", json!({"attached": false})),
    ];
    let r = explain(&Inputs {
        pvs: &pvs,
        claims: &[],
        classes: &[],
        attachments: &vas,
        events: &[],
        now: NOW.parse().expect("time"),
        pending_after_secs: 60,
    });
    let by: BTreeMap<_, _> = r.volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    assert_eq!(
        (by["pv-r"].attach.as_str(), by["pv-r"].node.as_str()),
        ("attached", "node-1")
    );
    assert_eq!(by["pv-q"].attach, "attaching");
    assert_eq!(by["pv-n"].attach, "-");
    assert_eq!(by["pv-n"].backend, "nfs");
    assert_eq!(by["pv-n"].capacity, "1Gi");
    assert_eq!(by["pv-n"].claim, "app/data");
    assert_eq!(by["pv-n"].age_seconds, 3600);
}

#[test]
fn ages_and_drivers() {
    assert_eq!(human_age(5), "5s");
    assert_eq!(human_age(600), "10m");
    assert_eq!(human_age(5 * 3600), "5h");
    assert_eq!(human_age(3 * 86400), "3d");
    assert!(is_stowage_driver("nfs.stowage.io"));
    assert!(!is_stowage_driver(".stowage.io"));
    assert!(!is_stowage_driver("nfs.csi.k8s.io"));
}
