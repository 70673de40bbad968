use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimStatus, PersistentVolumeSpec, SecretReference, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

const DRIVER: &str = "local.stowage.io";
const GI: u64 = 1 << 30;

const CAPS: DriverCaps = DriverCaps {
    single_node_multi_writer: true,
    topology: false,
    clone: true,
    publish_unpublish: true,
    publish_readonly: true,
    expand: true,
    snapshot: false,
    list_snapshots: false,
};

fn storage_map(s: &str) -> Option<BTreeMap<String, Quantity>> {
    Some(BTreeMap::from([(STORAGE.to_string(), Quantity(s.into()))]))
}

/// A bound claim asking for `request`, with `capacity` in its status, and optionally an
/// allocated size and resize status.
fn claim(request: &str, capacity: &str, alloc: Option<(&str, &str)>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            namespace: Some("db".into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: storage_map(request),
                ..Default::default()
            }),
            storage_class_name: Some("gold".into()),
            volume_name: Some("pv-1".into()),
            ..Default::default()
        }),
        status: Some(PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            capacity: storage_map(capacity),
            allocated_resources: alloc.and_then(|(a, _)| storage_map(a)),
            allocated_resource_statuses: alloc
                .map(|(_, s)| BTreeMap::from([(STORAGE.to_string(), s.to_string())])),
            ..Default::default()
        }),
    }
}

fn pv(capacity: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some("pv-1".into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            capacity: storage_map(capacity),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.into(),
                volume_handle: "default/vol".into(),
                controller_expand_secret_ref: Some(SecretReference {
                    name: Some("s".into()),
                    namespace: Some("ns".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn class(allow: Option<bool>) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some("gold".into()),
            ..Default::default()
        },
        provisioner: DRIVER.into(),
        allow_volume_expansion: allow,
        ..Default::default()
    }
}

fn step(
    c: &PersistentVolumeClaim,
    p: Option<&PersistentVolume>,
    sc: Option<&StorageClass>,
) -> Step {
    next(&ResizeInput {
        driver: DRIVER,
        caps: CAPS,
        claim: c,
        pv: p,
        class: sc,
    })
}

fn bytes_of(s: Step) -> Option<u64> {
    match s {
        Step::Expand(c) => Some(c.bytes),
        _ => None,
    }
}

#[test]
fn when_and_how_far_to_expand() {
    let yes = class(Some(true));
    let table: Vec<(&str, PersistentVolumeClaim, PersistentVolume, Option<u64>)> = vec![
        ("nothing asked", claim("1Gi", "1Gi", None), pv("1Gi"), None),
        (
            "asked less than it has",
            claim("1Gi", "2Gi", None),
            pv("2Gi"),
            None,
        ),
        (
            "first expansion",
            claim("2Gi", "1Gi", None),
            pv("1Gi"),
            Some(2 * GI),
        ),
        (
            "in progress finishes at its size first",
            claim("5Gi", "1Gi", Some(("2Gi", CONTROLLER_RESIZE_IN_PROGRESS))),
            pv("1Gi"),
            Some(2 * GI),
        ),
        (
            "infeasible, the user lowered the request: recovery tries the new one",
            claim("3Gi", "1Gi", Some(("100Gi", CONTROLLER_RESIZE_INFEASIBLE))),
            pv("1Gi"),
            Some(3 * GI),
        ),
        (
            "infeasible, request unchanged: waits for the user",
            claim(
                "100Gi",
                "1Gi",
                Some(("100Gi", CONTROLLER_RESIZE_INFEASIBLE)),
            ),
            pv("1Gi"),
            None,
        ),
        (
            "PV grown, claim not recorded (crash): asked again",
            claim("2Gi", "1Gi", Some(("2Gi", CONTROLLER_RESIZE_IN_PROGRESS))),
            pv("2Gi"),
            Some(2 * GI),
        ),
        (
            "node's turn",
            claim("2Gi", "1Gi", Some(("2Gi", NODE_RESIZE_PENDING))),
            pv("2Gi"),
            None,
        ),
    ];
    for (what, c, p, want) in table {
        assert_eq!(bytes_of(step(&c, Some(&p), Some(&yes))), want, "{what}");
    }
}

#[test]
fn what_is_not_ours_or_not_allowed() {
    let c = claim("2Gi", "1Gi", None);
    let p = pv("1Gi");
    let yes = class(Some(true));
    // Class does not allow it, or there is none: skipped with a reason.
    assert!(
        matches!(step(&c, Some(&p), Some(&class(None))), Step::Skip(m) if m.contains("allowVolumeExpansion"))
    );
    assert!(matches!(step(&c, Some(&p), None), Step::Skip(_)));
    // Another driver's PV, no PV, a driver without EXPAND_VOLUME.
    let mut other = p.clone();
    other.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "nfs.stowage.io".into();
    assert_eq!(step(&c, Some(&other), Some(&yes)), Step::Done);
    assert_eq!(step(&c, None, Some(&yes)), Step::Done);
    let no_expand = DriverCaps {
        expand: false,
        ..CAPS
    };
    assert_eq!(
        next(&ResizeInput {
            driver: DRIVER,
            caps: no_expand,
            claim: &c,
            pv: Some(&p),
            class: Some(&yes),
        }),
        Step::Done
    );
    // Not bound yet.
    let mut pending = c.clone();
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    assert_eq!(step(&pending, Some(&p), Some(&yes)), Step::Done);
}

#[test]
fn the_call() {
    let c = claim("2Gi", "1Gi", None);
    let p = pv("1Gi");
    let Step::Expand(call) = step(&c, Some(&p), Some(&class(Some(true)))) else {
        panic!("expected an expansion");
    };
    assert_eq!(call.volume_id, "default/vol");
    assert_eq!(
        call.secret,
        Some(SecretRef {
            name: "s".into(),
            namespace: "ns".into()
        })
    );
    assert!(call.capability.is_some());
}

fn cond<'a>(
    st: &'a PersistentVolumeClaimStatus,
    t: &str,
) -> Option<&'a PersistentVolumeClaimCondition> {
    st.conditions.iter().flatten().find(|c| c.type_ == t)
}

fn rs(st: &PersistentVolumeClaimStatus) -> Option<&str> {
    st.allocated_resource_statuses
        .as_ref()
        .and_then(|m| m.get(STORAGE))
        .map(String::as_str)
}

#[test]
fn status_through_a_resize() {
    let c = claim("2Gi", "1Gi", None);
    let st = in_progress(&c, 2 * GI);
    assert_eq!(st.allocated_resources, storage_map("2Gi"));
    assert_eq!(rs(&st), Some(CONTROLLER_RESIZE_IN_PROGRESS));
    assert_eq!(
        cond(&st, COND_RESIZING).map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(
        st.capacity,
        storage_map("1Gi"),
        "capacity waits for the result"
    );
    // Computing it again changes nothing (no write, no watch event, no loop).
    let mut c2 = c.clone();
    c2.status = Some(st.clone());
    assert_eq!(in_progress(&c2, 2 * GI), st);

    // Done by the controller alone: capacity set, statuses and conditions gone.
    let done = finished(&c2, 2 * GI, false);
    assert_eq!(done.capacity, storage_map("2Gi"));
    assert_eq!(done.allocated_resource_statuses, None);
    assert_eq!(done.conditions, None);

    // The node must grow the filesystem: capacity stays, the claim says it waits.
    let node = finished(&c2, 2 * GI, true);
    assert_eq!(node.capacity, storage_map("1Gi"));
    assert_eq!(rs(&node), Some(NODE_RESIZE_PENDING));
    assert!(cond(&node, COND_FS_RESIZE_PENDING).is_some());
    assert!(cond(&node, COND_RESIZING).is_none());
}

#[test]
fn status_after_failures() {
    let mut c = claim("100Gi", "1Gi", None);
    c.status = Some(in_progress(&c, 100 * GI));
    let inf = failed(&c, "too big", true);
    assert_eq!(rs(&inf), Some(CONTROLLER_RESIZE_INFEASIBLE));
    assert!(cond(&inf, COND_RESIZING).is_none());
    assert_eq!(
        cond(&inf, COND_CONTROLLER_RESIZE_ERROR).and_then(|c| c.message.as_deref()),
        Some("too big")
    );
    assert_eq!(inf.allocated_resources, storage_map("100Gi"));
    // A transient failure stays in progress, to be retried at the same size.
    let tr = failed(&c, "backend down", false);
    assert_eq!(rs(&tr), Some(CONTROLLER_RESIZE_IN_PROGRESS));
    assert!(cond(&tr, COND_RESIZING).is_some());
    // Recovery: the lowered request goes through and clears the error.
    let mut c2 = claim("3Gi", "1Gi", None);
    c2.status = Some(inf);
    let Step::Expand(call) = step(&c2, Some(&pv("1Gi")), Some(&class(Some(true)))) else {
        panic!("expected an expansion");
    };
    assert_eq!(call.bytes, 3 * GI);
    c2.status = Some(in_progress(&c2, call.bytes));
    assert_eq!(
        c2.status.as_ref().unwrap().allocated_resources,
        storage_map("3Gi")
    );
    let done = finished(&c2, 3 * GI, false);
    assert_eq!(done.capacity, storage_map("3Gi"));
    assert_eq!(done.allocated_resource_statuses, None);
    assert!(cond(&done, COND_CONTROLLER_RESIZE_ERROR).is_none());
}

#[test]
fn volume_capacity_only_grows() {
    let p = pv("2Gi");
    assert!(grown_volume(&p, GI).is_none());
    assert!(grown_volume(&p, 2 * GI).is_none());
    let g = grown_volume(&p, 3 * GI).unwrap();
    assert_eq!(g.spec.unwrap().capacity, storage_map("3Gi"));
}

#[test]
fn infeasible_codes() {
    use tonic::Code;
    for (code, want) in [
        (Code::OutOfRange, true),
        (Code::InvalidArgument, true),
        (Code::Unimplemented, true),
        (Code::Unavailable, false),
        (Code::Internal, false),
        (Code::DeadlineExceeded, false),
    ] {
        assert_eq!(is_infeasible(Some(code)), want, "{code:?}");
    }
    assert!(!is_infeasible(None));
}
