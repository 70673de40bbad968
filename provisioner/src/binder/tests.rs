//! Binder tables (one row per rule of KCM's syncClaim / syncVolume) and property tests that run
//! whole worlds of claims and volumes to convergence.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeSpec,
    PersistentVolumeStatus, VolumeNodeAffinity, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use proptest::prelude::*;

use super::*;
use crate::objects::{self as o, ClaimPhase, VolumePhase};

const DRIVER: &str = "local.stowage.io";
const KCM: Policy<'static> = Policy {
    mode: BinderMode::Kcm,
    driver: DRIVER,
};
const BUILTIN: Policy<'static> = Policy {
    mode: BinderMode::Builtin,
    driver: DRIVER,
};

fn gi(n: u64) -> Quantity {
    Quantity(format!("{n}Gi"))
}

fn claim(
    name: &str,
    request_gi: u64,
    modes: &[&str],
    class: Option<&str>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(modes.iter().map(|s| s.to_string()).collect()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), gi(request_gi))])),
                ..Default::default()
            }),
            storage_class_name: class.map(str::to_owned),
            ..Default::default()
        }),
        status: Some(Default::default()),
    }
}

fn volume(name: &str, cap_gi: u64, modes: &[&str], class: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(modes.iter().map(|s| s.to_string()).collect()),
            capacity: Some(BTreeMap::from([("storage".into(), gi(cap_gi))])),
            storage_class_name: Some(class.into()),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.into(),
                volume_handle: format!("default/{name}"),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: Some(PersistentVolumeStatus {
            phase: Some("Available".into()),
            ..Default::default()
        }),
    }
}

fn class(name: &str, provisioner: &str, wffc: bool) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        provisioner: provisioner.into(),
        volume_binding_mode: Some(
            if wffc {
                "WaitForFirstConsumer"
            } else {
                "Immediate"
            }
            .into(),
        ),
        ..Default::default()
    }
}

fn with_phase(mut pv: PersistentVolume, phase: Option<&str>) -> PersistentVolume {
    pv.status.get_or_insert_with(Default::default).phase = phase.map(str::to_owned);
    pv
}

fn claimed_by(
    mut pv: PersistentVolume,
    c: &PersistentVolumeClaim,
    with_uid: bool,
) -> PersistentVolume {
    let mut r = claim_reference(c);
    if !with_uid {
        r.uid = None;
    }
    pv.spec.as_mut().unwrap().claim_ref = Some(r);
    pv
}

fn annotate<T: kube::Resource>(mut obj: T, k: &str, v: &str) -> T {
    o::set_annotation(obj.meta_mut(), k, v);
    obj
}

fn policy(mut pv: PersistentVolume, p: &str) -> PersistentVolume {
    pv.spec.as_mut().unwrap().persistent_volume_reclaim_policy = Some(p.into());
    pv
}

fn bound_claim_to(mut c: PersistentVolumeClaim, pv: &str) -> PersistentVolumeClaim {
    c.spec.as_mut().unwrap().volume_name = Some(pv.into());
    o::set_annotation(&mut c.metadata, ANN_BIND_COMPLETED, "yes");
    c.status = Some(PersistentVolumeClaimStatus {
        phase: Some("Bound".into()),
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        ..Default::default()
    });
    c
}

fn claim_sync(
    p: Policy<'_>,
    c: &PersistentVolumeClaim,
    sc: Option<&StorageClass>,
    vols: &[PersistentVolume],
) -> Vec<ClaimAction> {
    claim_sync_with(p, c, sc, vols, None)
}

fn claim_sync_with(
    p: Policy<'_>,
    c: &PersistentVolumeClaim,
    sc: Option<&StorageClass>,
    vols: &[PersistentVolume],
    default_class: Option<&StorageClass>,
) -> Vec<ClaimAction> {
    let refs: Vec<&PersistentVolume> = vols.iter().collect();
    sync_claim(
        p,
        &ClaimInput {
            claim: c,
            class: sc,
            volumes: &refs,
            node: None,
            default_class,
        },
    )
}

fn non_events(a: Vec<ClaimAction>) -> Vec<ClaimAction> {
    a.into_iter().filter(|a| !a.is_event()).collect()
}

fn reasons(a: &[ClaimAction]) -> Vec<&'static str> {
    a.iter()
        .filter_map(|a| match a {
            ClaimAction::Event(n) => Some(n.reason),
            _ => None,
        })
        .collect()
}

fn full_bind(v: &str) -> Vec<ClaimAction> {
    vec![
        ClaimAction::BindVolume { volume: v.into() },
        ClaimAction::VolumePhase {
            volume: v.into(),
            phase: VolumePhase::Bound,
        },
        ClaimAction::BindClaim { volume: v.into() },
        ClaimAction::ClaimPhase {
            phase: ClaimPhase::Bound,
            volume: Some(v.into()),
        },
    ]
}

const RWO: &str = "ReadWriteOnce";
const ROX: &str = "ReadOnlyMany";
const RWX: &str = "ReadWriteMany";

// ---------------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------------

#[test]
fn smallest_fit_wins() {
    let c = claim("c", 5, &[RWO], Some("gold"));
    let vols = vec![
        volume("big", 100, &[RWO], "gold"),
        volume("fit", 10, &[RWO], "gold"),
        volume("small", 1, &[RWO], "gold"),
        volume("exact", 5, &[RWO], "gold"),
    ];
    assert_eq!(claim_sync(BUILTIN, &c, None, &vols), full_bind("exact"));
}

#[test]
fn matching_table() {
    // (description, claim, volume, matches)
    let base = || claim("c", 5, &[RWO], Some("gold"));
    let v = || volume("v", 10, &[RWO], "gold");
    let mut block = v();
    block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    let mut block_claim = base();
    block_claim.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    let mut labelled = v();
    labelled.metadata.labels = Some(BTreeMap::from([("tier".into(), "fast".into())]));
    let mut selecting = base();
    selecting.spec.as_mut().unwrap().selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([("tier".into(), "fast".into())])),
        match_expressions: None,
    });
    let mut deleting = v();
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let mut vac_claim = base();
    vac_claim
        .spec
        .as_mut()
        .unwrap()
        .volume_attributes_class_name = Some("silver".into());
    let other = claim("other", 1, &[RWO], Some("gold"));

    let table: Vec<(&str, PersistentVolumeClaim, PersistentVolume, bool)> = vec![
        ("same everything", base(), v(), true),
        (
            "other class",
            base(),
            volume("v", 10, &[RWO], "silver"),
            false,
        ),
        (
            "claim without class takes class-less volumes",
            claim("c", 5, &[RWO], Some("")),
            volume("v", 10, &[RWO], ""),
            true,
        ),
        (
            "class-less claim, classed volume",
            claim("c", 5, &[RWO], Some("")),
            v(),
            false,
        ),
        ("too small", base(), volume("v", 4, &[RWO], "gold"), false),
        (
            "exactly the request",
            base(),
            volume("v", 5, &[RWO], "gold"),
            true,
        ),
        (
            "superset of modes",
            base(),
            volume("v", 10, &[RWO, RWX], "gold"),
            true,
        ),
        (
            "missing a mode",
            claim("c", 5, &[RWO, RWX], Some("gold")),
            v(),
            false,
        ),
        (
            "block volume, filesystem claim",
            base(),
            block.clone(),
            false,
        ),
        (
            "block claim, block volume",
            block_claim.clone(),
            block,
            true,
        ),
        ("block claim, filesystem volume", block_claim, v(), false),
        ("selector matches", selecting.clone(), labelled, true),
        ("selector does not match", selecting, v(), false),
        ("volume being deleted", base(), deleting, false),
        (
            "volume not Available yet",
            base(),
            with_phase(v(), None),
            false,
        ),
        (
            "volume Released",
            base(),
            with_phase(v(), Some("Released")),
            false,
        ),
        (
            "volume claimed by another claim",
            base(),
            claimed_by(v(), &other, true),
            false,
        ),
        (
            "volume reserved for another claim",
            base(),
            claimed_by(v(), &other, false),
            false,
        ),
        ("attributes class differs", vac_claim, v(), false),
    ];
    for (what, c, pv, want) in table {
        let got = claim_sync(BUILTIN, &c, None, std::slice::from_ref(&pv));
        let bound = got
            .iter()
            .any(|a| matches!(a, ClaimAction::BindClaim { .. }));
        assert_eq!(bound, want, "{what}: {got:?}");
    }
}

#[test]
fn fewest_extra_access_modes_win_over_size() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    let vols = vec![
        volume("many-modes-small", 1, &[RWO, ROX, RWX], "gold"),
        volume("one-mode-large", 50, &[RWO], "gold"),
    ];
    assert_eq!(
        claim_sync(BUILTIN, &c, None, &vols),
        full_bind("one-mode-large")
    );
}

#[test]
fn prebound_volume_wins_even_if_larger_or_not_available() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    // Reserved by name only (user pre-binding), still Pending-phase and another class:
    // KCM binds a reserved volume without looking at class or phase.
    let reserved = claimed_by(
        with_phase(volume("reserved", 50, &[RWO], "other"), None),
        &c,
        false,
    );
    let vols = vec![volume("fit", 1, &[RWO], "gold"), reserved];
    assert_eq!(claim_sync(BUILTIN, &c, None, &vols), full_bind("reserved"));
    // ... but capacity and volume mode still count.
    let small = claimed_by(
        volume("reserved", 0, &[RWO], "gold"),
        &claim("c", 1, &[RWO], None),
        false,
    );
    let got = claim_sync(
        BUILTIN,
        &c,
        None,
        &[small, volume("fit", 1, &[RWO], "gold")],
    );
    assert_eq!(got, full_bind("fit"));
}

#[test]
fn provisioned_volume_is_found_by_uid() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    let pv = with_phase(
        claimed_by(volume("pvc-uid-c", 1, &[RWO], "gold"), &c, true),
        None,
    );
    let got = claim_sync(BUILTIN, &c, Some(&class("gold", DRIVER, false)), &[pv]);
    // claimRef is already right: no BindVolume, but the annotation-free claimRef set by the
    // provisioner means "bound by the provisioner", so only the rest of the bind follows.
    assert_eq!(
        got,
        vec![
            ClaimAction::VolumePhase {
                volume: "pvc-uid-c".into(),
                phase: VolumePhase::Bound
            },
            ClaimAction::BindClaim {
                volume: "pvc-uid-c".into()
            },
            ClaimAction::ClaimPhase {
                phase: ClaimPhase::Bound,
                volume: Some("pvc-uid-c".into())
            },
        ]
    );
}

#[test]
fn node_affinity_filters_when_the_node_is_known() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    let mut pinned = volume("pinned", 1, &[RWO], "gold");
    pinned.spec.as_mut().unwrap().node_affinity = Some(VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: "topology.stowage.io/node".into(),
                    operator: "In".into(),
                    values: Some(vec!["n1".into()]),
                }]),
                match_fields: None,
            }],
        }),
    });
    let node = |name: &str| Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "topology.stowage.io/node".into(),
                name.into(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    };
    let refs = [&pinned];
    for (n, want) in [("n1", true), ("n2", false)] {
        let nd = node(n);
        let got = sync_claim(
            BUILTIN,
            &ClaimInput {
                claim: &c,
                class: None,
                volumes: &refs,
                node: Some(&nd),
                default_class: None,
            },
        );
        assert_eq!(
            got.iter()
                .any(|a| matches!(a, ClaimAction::BindClaim { .. })),
            want,
            "{n}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Claim sync, builtin
// ---------------------------------------------------------------------------------------------

#[test]
fn unmatched_claims_table() {
    let ours = class("gold", DRIVER, false);
    let theirs = class("ebs", "ebs.csi.aws.com", false);
    let wffc = class("late", DRIVER, true);

    // Our class: provision, Pending. No annotation write of its own: the provisioner
    // annotation goes with the bind write (see provisioner_annotation_rides_on_the_bind).
    let c = claim("c", 1, &[RWO], Some("gold"));
    assert_eq!(
        claim_sync(BUILTIN, &c, Some(&ours), &[]),
        vec![ClaimAction::Provision {
            selected_node: None
        },]
    );
    // No Pending write before provisioning (the claim is bound in the same sync); a failed
    // provisioning marks it Pending, once.
    assert_eq!(
        pending_after_failed_provision(&c),
        vec![ClaimAction::ClaimPhase {
            phase: ClaimPhase::Pending,
            volume: None
        }]
    );
    let mut pending = c.clone();
    pending.status.get_or_insert_with(Default::default).phase = Some("Pending".into());
    assert!(pending_after_failed_provision(&pending).is_empty());
    // Already annotated and Pending: only Provision.
    let mut c2 = annotate(c.clone(), ANN_STORAGE_PROVISIONER, DRIVER);
    c2.status.as_mut().unwrap().phase = Some("Pending".into());
    assert_eq!(
        claim_sync(BUILTIN, &c2, Some(&ours), &[]),
        vec![ClaimAction::Provision {
            selected_node: None
        }]
    );
    // Being deleted: never provision.
    let mut dying = c2.clone();
    dying.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    assert!(claim_sync(BUILTIN, &dying, Some(&ours), &[]).is_empty());

    // Another provisioner's class: annotate for it and wait.
    let c = claim("c", 1, &[RWO], Some("ebs"));
    let got = claim_sync(BUILTIN, &c, Some(&theirs), &[]);
    assert_eq!(
        non_events(got.clone()),
        vec![
            ClaimAction::AnnotateProvisioner {
                provisioner: "ebs.csi.aws.com".into()
            },
            ClaimAction::ClaimPhase {
                phase: ClaimPhase::Pending,
                volume: None
            },
        ]
    );
    assert_eq!(reasons(&got), vec!["ExternalProvisioning"]);

    // WaitForFirstConsumer: nothing until the scheduler picks a node.
    let c = claim("c", 1, &[RWO], Some("late"));
    let got = claim_sync(BUILTIN, &c, Some(&wffc), &[volume("v", 1, &[RWO], "late")]);
    assert_eq!(reasons(&got), vec!["WaitForFirstConsumer"]);
    assert!(!got.iter().any(|a| matches!(
        a,
        ClaimAction::Provision { .. } | ClaimAction::BindClaim { .. }
    )));
    let c = annotate(c, ANN_SELECTED_NODE, "n1");
    let got = claim_sync(BUILTIN, &c, Some(&wffc), &[]);
    assert!(got.contains(&ClaimAction::Provision {
        selected_node: Some("n1".into())
    }));

    // Class named but missing.
    let c = claim("c", 1, &[RWO], Some("nope"));
    let got = claim_sync(BUILTIN, &c, None, &[]);
    assert_eq!(reasons(&got), vec!["ProvisioningFailed"]);
    assert!(
        !got.iter()
            .any(|a| matches!(a, ClaimAction::Provision { .. }))
    );

    // No class at all and nothing to bind.
    let c = claim("c", 1, &[RWO], Some(""));
    assert_eq!(
        reasons(&claim_sync(BUILTIN, &c, None, &[])),
        vec!["FailedBinding"]
    );

    // A malformed request is reported, not a panic.
    let mut c = claim("c", 1, &[RWO], Some("gold"));
    c.spec
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .requests = Some(BTreeMap::from([(
        "storage".into(),
        Quantity("lots".into()),
    )]));
    assert_eq!(
        reasons(&claim_sync(BUILTIN, &c, Some(&ours), &[])),
        vec!["FailedBinding"]
    );
}

/// Builtin mode writes the claim once to bind it: volumeName, the binding annotations and,
/// for a volume provisioned for this claim, the provisioner annotations KCM would have set.
#[test]
fn provisioner_annotation_rides_on_the_bind() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    let mut pv = volume(&o::pv_name_for(&c), 1, &[RWO], "gold");
    pv.spec.as_mut().unwrap().claim_ref = Some(claim_reference(&c));
    let pv = provisioned(pv, "Delete");
    let mut bound = c.clone();
    assert!(bind_claim(&mut bound, &pv));
    for ann in [ANN_STORAGE_PROVISIONER, ANN_BETA_STORAGE_PROVISIONER] {
        assert_eq!(o::annotation(&bound.metadata, ann), Some(DRIVER), "{ann}");
    }
    assert_eq!(o::claim_volume_name(&bound), o::name(&pv.metadata));
    // Once written, binding again changes nothing (no write on resync).
    assert!(!bind_claim(&mut bound.clone(), &pv));

    // A static volume (not named after the claim) gets no provisioner annotation.
    let mut stat = volume("static", 1, &[RWO], "gold");
    stat.spec.as_mut().unwrap().claim_ref = Some(claim_reference(&c));
    let stat = provisioned(stat, "Delete");
    let mut bound = c.clone();
    assert!(bind_claim(&mut bound, &stat));
    assert_eq!(
        o::annotation(&bound.metadata, ANN_STORAGE_PROVISIONER),
        None
    );

    // A volume named after the claim but bound to an older claim of that name: none either.
    let mut other = pv.clone();
    other.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("older".into());
    let mut bound = c.clone();
    bind_claim(&mut bound, &other);
    assert_eq!(
        o::annotation(&bound.metadata, ANN_STORAGE_PROVISIONER),
        None
    );
}

#[test]
fn claim_asking_for_a_volume_by_name() {
    let mut c = claim("c", 5, &[RWO], Some("gold"));
    c.spec.as_mut().unwrap().volume_name = Some("v".into());
    // Missing volume: wait.
    assert_eq!(
        claim_sync(BUILTIN, &c, None, &[]),
        vec![ClaimAction::ClaimPhase {
            phase: ClaimPhase::Pending,
            volume: None
        }]
    );
    // Free and fitting: bind (the claim already names it, so no bound-by-controller there).
    let got = claim_sync(BUILTIN, &c, None, &[volume("v", 5, &[RWO], "gold")]);
    assert_eq!(got, full_bind("v"));
    // Free but too small: VolumeMismatch.
    let got = claim_sync(BUILTIN, &c, None, &[volume("v", 1, &[RWO], "gold")]);
    assert_eq!(reasons(&got), vec!["VolumeMismatch"]);
    // Bound to someone else: wait.
    let other = claim("o", 1, &[RWO], Some("gold"));
    let got = claim_sync(
        BUILTIN,
        &c,
        None,
        &[claimed_by(volume("v", 5, &[RWO], "gold"), &other, true)],
    );
    assert_eq!(
        got,
        vec![ClaimAction::ClaimPhase {
            phase: ClaimPhase::Pending,
            volume: None
        }]
    );
}

#[test]
fn bound_claims_table() {
    let c = claim("c", 1, &[RWO], Some("gold"));
    let pv = with_phase(
        claimed_by(volume("v", 1, &[RWO], "gold"), &c, true),
        Some("Bound"),
    );
    let bc = bound_claim_to(c.clone(), "v");
    // Converged: nothing.
    assert!(claim_sync(BUILTIN, &bc, None, std::slice::from_ref(&pv)).is_empty());
    // PV gone: Lost, with one event.
    let got = claim_sync(BUILTIN, &bc, None, &[]);
    assert_eq!(reasons(&got), vec!["ClaimLost"]);
    assert!(got.contains(&ClaimAction::ClaimPhase {
        phase: ClaimPhase::Lost,
        volume: None
    }));
    // Already Lost: no new event, nothing to do.
    let mut lost = bc.clone();
    lost.status = Some(PersistentVolumeClaimStatus {
        phase: Some("Lost".into()),
        ..Default::default()
    });
    assert!(claim_sync(BUILTIN, &lost, None, &[]).is_empty());
    // volumeName erased.
    let mut erased = bc.clone();
    erased.spec.as_mut().unwrap().volume_name = None;
    assert_eq!(
        reasons(&claim_sync(BUILTIN, &erased, None, &[])),
        vec!["ClaimLost"]
    );
    // PV came unbound: bind again.
    let mut unbound = pv.clone();
    unbound.spec.as_mut().unwrap().claim_ref = None;
    let got = claim_sync(BUILTIN, &bc, None, &[unbound]);
    assert!(got.contains(&ClaimAction::BindVolume { volume: "v".into() }));
    // PV belongs to another claim: misbound.
    let other = claim("o", 1, &[RWO], Some("gold"));
    let stolen = claimed_by(pv, &other, true);
    assert_eq!(
        reasons(&claim_sync(BUILTIN, &bc, None, &[stolen])),
        vec!["ClaimMisbound"]
    );
}

#[test]
fn kcm_mode_only_provisions_what_kcm_hands_over() {
    let ours = class("gold", DRIVER, false);
    let c = claim("c", 1, &[RWO], Some("gold"));
    // KCM has not annotated the claim (it may still bind a static volume): nothing.
    assert!(claim_sync(KCM, &c, Some(&ours), &[volume("v", 1, &[RWO], "gold")]).is_empty());
    let annotated = annotate(c.clone(), ANN_STORAGE_PROVISIONER, DRIVER);
    assert_eq!(
        claim_sync(KCM, &annotated, Some(&ours), &[]),
        vec![ClaimAction::Provision {
            selected_node: None
        }]
    );
    // The beta annotation counts too.
    let beta = annotate(c.clone(), ANN_BETA_STORAGE_PROVISIONER, DRIVER);
    assert_eq!(claim_sync(KCM, &beta, Some(&ours), &[]).len(), 1);
    // Annotated for another driver, or class of another driver: nothing.
    let theirs = annotate(c.clone(), ANN_STORAGE_PROVISIONER, "other");
    assert!(claim_sync(KCM, &theirs, Some(&ours), &[]).is_empty());
    assert!(claim_sync(KCM, &annotated, Some(&class("gold", "other", false)), &[]).is_empty());
    // Already has a volume name, or is Bound: nothing.
    assert!(
        claim_sync(
            KCM,
            &bound_claim_to(annotated.clone(), "v"),
            Some(&ours),
            &[]
        )
        .is_empty()
    );
    // WFFC without a node: nothing; with one: provision there.
    let late = class("gold", DRIVER, true);
    assert!(claim_sync(KCM, &annotated, Some(&late), &[]).is_empty());
    let placed = annotate(annotated, ANN_SELECTED_NODE, "n1");
    assert_eq!(
        claim_sync(KCM, &placed, Some(&late), &[]),
        vec![ClaimAction::Provision {
            selected_node: Some("n1".into())
        }]
    );
    // KCM mode never binds or sets phases.
    assert!(
        claim_sync(
            KCM,
            &claim("x", 1, &[RWO], Some("")),
            None,
            &[volume("v", 1, &[RWO], "")]
        )
        .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Volume sync
// ---------------------------------------------------------------------------------------------

fn provisioned(pv: PersistentVolume, reclaim: &str) -> PersistentVolume {
    let mut pv = policy(annotate(pv, ANN_PROVISIONED_BY, DRIVER), reclaim);
    if reclaim == "Delete" {
        pv.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    pv
}

fn vsync(
    p: Policy<'_>,
    pv: &PersistentVolume,
    c: Option<&PersistentVolumeClaim>,
) -> Vec<VolumeAction> {
    sync_volume(p, pv, c)
}

#[test]
fn volume_phases_builtin() {
    use VolumeAction as A;
    let c = claim("c", 1, &[RWO], Some("gold"));
    let avail = |p| A::Phase {
        phase: p,
        message: None,
    };
    // New static PV: Available.
    assert_eq!(
        vsync(
            BUILTIN,
            &with_phase(volume("v", 1, &[RWO], "gold"), None),
            None
        ),
        vec![avail(VolumePhase::Available)]
    );
    // Reserved: Available.
    let reserved = with_phase(claimed_by(volume("v", 1, &[RWO], "gold"), &c, false), None);
    assert_eq!(
        vsync(BUILTIN, &reserved, None),
        vec![avail(VolumePhase::Available)]
    );
    // Bound both ways: Bound.
    let pv = claimed_by(volume("v", 1, &[RWO], "gold"), &c, true);
    let bc = bound_claim_to(c.clone(), "v");
    assert_eq!(
        vsync(BUILTIN, &pv, Some(&bc)),
        vec![avail(VolumePhase::Bound)]
    );
    // Claim still unbound: wait for the claim sync.
    assert!(vsync(BUILTIN, &pv, Some(&c)).is_empty());
    // Claim gone (Retain): Released and nothing else.
    assert_eq!(
        vsync(BUILTIN, &pv, None),
        vec![avail(VolumePhase::Released)]
    );
    // Claim re-created with another UID: the old one is gone.
    let mut again = c.clone();
    again.metadata.uid = Some("new".into());
    assert_eq!(
        vsync(BUILTIN, &pv, Some(&again)),
        vec![avail(VolumePhase::Released)]
    );
    // Already Released: converged.
    assert!(vsync(BUILTIN, &with_phase(pv.clone(), Some("Released")), None).is_empty());
    // Claim bound elsewhere, binder-bound: unbind.
    let elsewhere = bound_claim_to(c.clone(), "other");
    let mut by_ctl = annotate(pv.clone(), ANN_BOUND_BY_CONTROLLER, "yes");
    by_ctl.status.as_mut().unwrap().phase = Some("Bound".into());
    assert_eq!(
        vsync(BUILTIN, &by_ctl, Some(&elsewhere)),
        vec![A::Unbind, avail(VolumePhase::Available)]
    );
    let mut unbound = by_ctl.clone();
    unbind_volume(&mut unbound);
    assert!(unbound.spec.as_ref().unwrap().claim_ref.is_none());
    assert!(!o::has_annotation(
        &unbound.metadata,
        ANN_BOUND_BY_CONTROLLER
    ));
    // Provisioner-bound (pre-bound at creation, no bound-by-controller): back to the pool.
    let mut dynamic = annotate(pv.clone(), ANN_PROVISIONED_BY, DRIVER);
    unbind_volume(&mut dynamic);
    assert!(dynamic.spec.as_ref().unwrap().claim_ref.is_none());
    // User-bound: unbinding keeps the reservation, minus the UID.
    let mut user = pv.clone();
    unbind_volume(&mut user);
    let r = user.spec.as_ref().unwrap().claim_ref.as_ref().unwrap();
    assert_eq!((r.name.as_deref(), r.uid.as_deref()), (Some("c"), None));
    // Volume-mode mismatch with the claim that reserved it: warn.
    let mut block = c.clone();
    block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    let got = vsync(BUILTIN, &pv, Some(&block));
    assert!(matches!(&got[..], [A::Event(n)] if n.reason == "VolumeMismatch"));
}

#[test]
fn reclaim_table() {
    use VolumeAction as A;
    let c = claim("c", 1, &[RWO], Some("gold"));
    let released = |pv: PersistentVolume| with_phase(claimed_by(pv, &c, true), Some("Released"));
    let base = || volume("v", 1, &[RWO], "gold");

    // Delete, provisioned by us: backend, object, finalizer — in both modes.
    for p in [KCM, BUILTIN] {
        assert_eq!(
            vsync(p, &released(provisioned(base(), "Delete")), None),
            vec![A::DeleteBackend, A::DeleteObject, A::RemoveFinalizer]
        );
    }
    // KCM mode waits until KCM says Released.
    let bound_phase = with_phase(
        claimed_by(provisioned(base(), "Delete"), &c, true),
        Some("Bound"),
    );
    assert!(vsync(KCM, &bound_phase, None).is_empty());
    // Builtin declares it Released itself, then deletes.
    assert_eq!(
        vsync(BUILTIN, &bound_phase, None),
        vec![
            A::Phase {
                phase: VolumePhase::Released,
                message: None
            },
            A::DeleteBackend,
            A::DeleteObject,
            A::RemoveFinalizer
        ]
    );
    // Retain: nothing.
    assert!(vsync(KCM, &released(provisioned(base(), "Retain")), None).is_empty());
    assert!(vsync(BUILTIN, &released(provisioned(base(), "Retain")), None).is_empty());
    // Recycle: scrub, unbind (builtin: and Available). KCM marks such PVs Failed first.
    assert_eq!(
        vsync(
            KCM,
            &with_phase(released(policy(base(), "Recycle")), Some("Failed")),
            None
        ),
        vec![A::Recycle, A::Unbind]
    );
    assert_eq!(
        vsync(BUILTIN, &released(policy(base(), "Recycle")), None),
        vec![
            A::Recycle,
            A::Unbind,
            A::Phase {
                phase: VolumePhase::Available,
                message: None
            }
        ]
    );
    // Another driver's Recycle volume in builtin mode: Failed once, with the KCM message.
    let mut theirs = released(policy(base(), "Recycle"));
    theirs.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "other".into();
    let got = vsync(BUILTIN, &theirs, None);
    assert!(
        matches!(&got[0], A::Phase { phase: VolumePhase::Failed, message: Some(m) } if m.contains("No recycler"))
    );
    assert!(vsync(BUILTIN, &with_phase(theirs.clone(), Some("Failed")), None).is_empty());
    assert!(vsync(KCM, &theirs, None).is_empty());
    // Another driver's Delete volume: its provisioner's business.
    theirs
        .spec
        .as_mut()
        .unwrap()
        .persistent_volume_reclaim_policy = Some("Delete".into());
    assert!(vsync(BUILTIN, &theirs, None).is_empty());
    // Our driver, Delete, but not provisioned by us: never deleted, Failed in builtin.
    let static_delete = released(policy(base(), "Delete"));
    assert!(vsync(KCM, &static_delete, None).is_empty());
    assert!(matches!(
        vsync(BUILTIN, &static_delete, None)[0],
        A::Phase {
            phase: VolumePhase::Failed,
            ..
        }
    ));
    // A claim that still exists is never reclaimed, whatever the phase says.
    let bc = bound_claim_to(c.clone(), "v");
    let stale = released(provisioned(base(), "Delete"));
    assert!(
        !vsync(KCM, &stale, Some(&bc))
            .iter()
            .any(|a| matches!(a, A::DeleteBackend | A::Recycle))
    );
    // Dynamically provisioned Delete volume whose claim bound elsewhere: deleted.
    let elsewhere = bound_claim_to(c.clone(), "other");
    let orphan = with_phase(
        claimed_by(provisioned(base(), "Delete"), &c, true),
        Some("Bound"),
    );
    assert!(vsync(BUILTIN, &orphan, Some(&elsewhere)).contains(&A::DeleteBackend));
}

#[test]
fn finalizer_upkeep_and_object_deletion() {
    use VolumeAction as A;
    let c = claim("c", 1, &[RWO], Some("gold"));
    let bc = bound_claim_to(c.clone(), "v");
    let bound = |pv: PersistentVolume| with_phase(claimed_by(pv, &c, true), Some("Bound"));
    let base = || volume("v", 1, &[RWO], "gold");
    // A Delete PV we provisioned without the finalizer gets it.
    let mut nofin = provisioned(base(), "Delete");
    nofin.metadata.finalizers = None;
    assert_eq!(vsync(KCM, &bound(nofin), Some(&bc)), vec![A::AddFinalizer]);
    // Policy changed to Retain: the finalizer goes.
    let mut retain = provisioned(base(), "Delete");
    retain
        .spec
        .as_mut()
        .unwrap()
        .persistent_volume_reclaim_policy = Some("Retain".into());
    assert_eq!(
        vsync(KCM, &bound(retain.clone()), Some(&bc)),
        vec![A::RemoveFinalizer]
    );
    // Other drivers' PVs are left alone.
    let mut theirs = provisioned(base(), "Delete");
    theirs.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "other".into();
    theirs.metadata.finalizers = None;
    assert!(vsync(KCM, &bound(theirs), Some(&bc)).is_empty());

    let deleted = |mut pv: PersistentVolume| {
        pv.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        pv
    };
    // PV object deleted while its claim uses it: wait.
    assert!(
        vsync(
            KCM,
            &deleted(bound(provisioned(base(), "Delete"))),
            Some(&bc)
        )
        .is_empty()
    );
    // ... once the claim is gone: backend volume first, then the finalizer.
    assert_eq!(
        vsync(KCM, &deleted(bound(provisioned(base(), "Delete"))), None),
        vec![A::DeleteBackend, A::RemoveFinalizer]
    );
    // Deleted while Available: same.
    assert_eq!(
        vsync(KCM, &deleted(provisioned(base(), "Delete")), None),
        vec![A::DeleteBackend, A::RemoveFinalizer]
    );
    // Deleted with Retain and a leftover finalizer: keep the data, drop the finalizer.
    let mut leftover = deleted(retain);
    leftover.spec.as_mut().unwrap().claim_ref = None;
    assert_eq!(vsync(KCM, &leftover, None), vec![A::RemoveFinalizer]);
    // Builtin keeps the phase honest while deleting so pv-protection can let go.
    assert_eq!(
        vsync(
            BUILTIN,
            &deleted(bound(provisioned(base(), "Delete"))),
            None
        ),
        vec![
            A::Phase {
                phase: VolumePhase::Released,
                message: None
            },
            A::DeleteBackend,
            A::RemoveFinalizer
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Retroactive default StorageClass (builtin)
// ---------------------------------------------------------------------------------------------

fn default_marked(mut sc: StorageClass, ann: &str, created_s: i64) -> StorageClass {
    o::set_annotation(&mut sc.metadata, ann, "true");
    sc.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(created_s).unwrap(),
    ));
    sc
}

#[test]
fn default_class_is_the_newest_marked_one_then_by_name() {
    let plain = class("plain", DRIVER, false);
    let old = default_marked(class("old", DRIVER, false), o::ANN_DEFAULT_CLASS, 100);
    let beta = default_marked(class("beta", DRIVER, false), o::ANN_BETA_DEFAULT_CLASS, 200);
    let twin_b = default_marked(class("b", DRIVER, false), o::ANN_DEFAULT_CLASS, 300);
    let twin_a = default_marked(class("a", DRIVER, false), o::ANN_DEFAULT_CLASS, 300);
    let mut not_true = class("nottrue", DRIVER, false);
    o::set_annotation(&mut not_true.metadata, o::ANN_DEFAULT_CLASS, "false");
    let name = |c: Option<&StorageClass>| c.map(|c| o::name(&c.metadata).to_owned());

    assert_eq!(name(default_class([&plain, &not_true])), None);
    assert_eq!(name(default_class([&plain, &old])), Some("old".into()));
    assert_eq!(name(default_class([&old, &beta])), Some("beta".into()));
    assert_eq!(
        name(default_class([&old, &twin_b, &beta, &twin_a])),
        Some("a".into())
    );
}

fn claim_sync_with_default(
    p: Policy<'_>,
    c: &PersistentVolumeClaim,
    default: &StorageClass,
    vols: &[PersistentVolume],
) -> Vec<ClaimAction> {
    claim_sync_with(p, c, None, vols, Some(default))
}

#[test]
fn a_claim_without_class_gets_the_default_once_nothing_matches() {
    let fast = default_marked(class("fast", DRIVER, false), o::ANN_DEFAULT_CLASS, 1);
    let c = claim("c", 1, &["ReadWriteOnce"], None);
    // No volume at all: the class is assigned and nothing else happens in this pass.
    assert_eq!(
        claim_sync_with_default(BUILTIN, &c, &fast, &[]),
        vec![ClaimAction::AssignClass {
            class: "fast".into()
        }]
    );
    // A class-less volume that fits binds first, as in KCM.
    let v = volume("v", 1, &["ReadWriteOnce"], "");
    let got = non_events(claim_sync_with_default(BUILTIN, &c, &fast, &[v]));
    assert!(
        got.contains(&ClaimAction::BindClaim { volume: "v".into() }),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|a| matches!(a, ClaimAction::AssignClass { .. }))
    );
}

#[test]
fn a_claim_that_chose_no_class_or_a_class_keeps_its_choice() {
    let fast = default_marked(class("fast", DRIVER, false), o::ANN_DEFAULT_CLASS, 1);
    let empty = claim("empty", 1, &["ReadWriteOnce"], Some(""));
    let named = claim("named", 1, &["ReadWriteOnce"], Some("slow"));
    let beta = annotate(
        claim("beta", 1, &["ReadWriteOnce"], None),
        o::ANN_BETA_STORAGE_CLASS,
        "slow",
    );
    for c in [&empty, &named, &beta] {
        let got = claim_sync_with_default(BUILTIN, c, &fast, &[]);
        assert!(
            !got.iter()
                .any(|a| matches!(a, ClaimAction::AssignClass { .. })),
            "{}: {got:?}",
            o::name(&c.metadata)
        );
    }
    // With KCM binding, KCM assigns it.
    let none = claim("none", 1, &["ReadWriteOnce"], None);
    assert_eq!(claim_sync_with_default(KCM, &none, &fast, &[]), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Worlds run to convergence
// ---------------------------------------------------------------------------------------------

/// An in-memory API server: applies actions the way the controller does.
#[derive(Debug, Clone)]
struct World {
    claims: Vec<PersistentVolumeClaim>,
    volumes: Vec<PersistentVolume>,
    classes: Vec<StorageClass>,
    /// Backend volumes by handle (what DeleteVolume removes).
    backend: std::collections::BTreeSet<String>,
    recycled: Vec<String>,
    /// Static volumes that started out reserved for a claim by name.
    reserved: std::collections::BTreeSet<String>,
}

impl World {
    fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes.iter().find(|c| o::name(&c.metadata) == name)
    }

    fn pv_mut(&mut self, name: &str) -> &mut PersistentVolume {
        self.volumes
            .iter_mut()
            .find(|v| o::name(&v.metadata) == name)
            .expect("action names an existing volume")
    }

    fn provision(&mut self, c: &PersistentVolumeClaim, class: &StorageClass) {
        let name = o::pv_name_for(c);
        if self.volumes.iter().any(|v| o::name(&v.metadata) == name) {
            return;
        }
        let mut pv = volume(&name, 0, &[], o::name(&class.metadata));
        let spec = pv.spec.as_mut().unwrap();
        spec.access_modes = c.spec.as_ref().unwrap().access_modes.clone();
        spec.capacity = Some(BTreeMap::from([(
            "storage".into(),
            Quantity(o::claim_request(c).unwrap().to_string()),
        )]));
        spec.volume_mode = c.spec.as_ref().unwrap().volume_mode.clone();
        spec.persistent_volume_reclaim_policy = class.reclaim_policy.clone();
        spec.claim_ref = Some(claim_reference(c));
        pv.status = None;
        let pv = provisioned(pv, class.reclaim_policy.as_deref().unwrap_or("Delete"));
        self.backend.insert(format!("default/{name}"));
        self.volumes.push(pv);
    }

    /// One pass over every claim then every volume; returns how many mutations happened.
    fn step(&mut self, p: Policy<'_>, order: &[usize]) -> usize {
        let mut changes = 0;
        for &i in order {
            if i >= self.claims.len() {
                continue;
            }
            let c = self.claims[i].clone();
            let cls = self.class(o::claim_class(&c)).cloned();
            let vols = self.volumes.clone();
            let refs: Vec<&PersistentVolume> = vols.iter().collect();
            let actions = sync_claim(
                p,
                &ClaimInput {
                    claim: &c,
                    class: cls.as_ref(),
                    volumes: &refs,
                    node: None,
                    default_class: None,
                },
            );
            for a in actions {
                match a {
                    ClaimAction::Event(_) => continue,
                    ClaimAction::BindVolume { volume } => {
                        let claim = self.claims[i].clone();
                        assert!(bind_volume(self.pv_mut(&volume), &claim));
                    }
                    ClaimAction::VolumePhase { volume, phase } => {
                        self.pv_mut(&volume)
                            .status
                            .get_or_insert_with(Default::default)
                            .phase = Some(phase.as_str().into());
                    }
                    ClaimAction::BindClaim { volume } => {
                        let pv = self.pv_mut(&volume).clone();
                        assert!(bind_claim(&mut self.claims[i], &pv));
                    }
                    ClaimAction::ClaimPhase { phase, volume } => {
                        let pv = volume.map(|v| self.pv_mut(&v).clone());
                        let st = claim_status(&self.claims[i], phase, pv.as_ref());
                        self.claims[i].status = Some(st);
                    }
                    ClaimAction::AssignClass { class } => {
                        self.claims[i]
                            .spec
                            .get_or_insert_with(Default::default)
                            .storage_class_name = Some(class);
                    }
                    ClaimAction::AnnotateProvisioner { provisioner } => {
                        o::set_annotation(
                            &mut self.claims[i].metadata,
                            ANN_STORAGE_PROVISIONER,
                            &provisioner,
                        );
                    }
                    ClaimAction::Provision { .. } => {
                        let cls = cls.clone().expect("provision needs a class");
                        let claim = self.claims[i].clone();
                        self.provision(&claim, &cls);
                    }
                }
                changes += 1;
            }
        }
        let names: Vec<String> = self
            .volumes
            .iter()
            .map(|v| o::name(&v.metadata).to_owned())
            .collect();
        for name in names {
            let Some(pv) = self
                .volumes
                .iter()
                .find(|v| o::name(&v.metadata) == name)
                .cloned()
            else {
                continue;
            };
            let claim = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| {
                    self.claims
                        .iter()
                        .find(|c| c.metadata.name == r.name && c.metadata.namespace == r.namespace)
                })
                .cloned();
            for a in sync_volume(p, &pv, claim.as_ref()) {
                let handle = o::volume_handle(&pv).unwrap_or("").to_owned();
                match a {
                    VolumeAction::Event(_) => continue,
                    VolumeAction::Phase { phase, message } => {
                        let st = self
                            .pv_mut(&name)
                            .status
                            .get_or_insert_with(Default::default);
                        st.phase = Some(phase.as_str().into());
                        st.message = message;
                    }
                    VolumeAction::Unbind => unbind_volume(self.pv_mut(&name)),
                    VolumeAction::AddFinalizer => self
                        .pv_mut(&name)
                        .metadata
                        .finalizers
                        .get_or_insert_with(Vec::new)
                        .push(FINALIZER.into()),
                    VolumeAction::RemoveFinalizer => {
                        if let Some(f) = self
                            .volumes
                            .iter_mut()
                            .find(|v| o::name(&v.metadata) == name)
                        {
                            f.metadata
                                .finalizers
                                .get_or_insert_with(Vec::new)
                                .retain(|x| x != FINALIZER);
                        }
                    }
                    VolumeAction::DeleteBackend => {
                        self.backend.remove(&handle);
                    }
                    VolumeAction::DeleteObject => {
                        self.volumes.retain(|v| o::name(&v.metadata) != name);
                    }
                    VolumeAction::Recycle => self.recycled.push(handle),
                }
                changes += 1;
            }
        }
        changes
    }

    fn converge(&mut self, p: Policy<'_>, order: &[usize]) -> Result<(), String> {
        for _ in 0..12 {
            if self.step(p, order) == 0 {
                return Ok(());
            }
        }
        Err(format!(
            "no convergence after 12 rounds: {:#?}",
            self.volumes
        ))
    }
}

#[derive(Debug, Clone)]
struct ClaimSpec {
    request: u64,
    modes: Vec<&'static str>,
    block: bool,
    class: &'static str,
}

#[derive(Debug, Clone)]
struct VolSpec {
    cap: u64,
    modes: Vec<&'static str>,
    block: bool,
    class: &'static str,
    reclaim: &'static str,
    reserved_for: Option<usize>,
}

fn modes_strategy() -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(vec![RWO, ROX, RWX, "ReadWriteOncePod"], 1..=3)
}

fn claim_strategy() -> impl Strategy<Value = ClaimSpec> {
    (
        prop::sample::select(vec![1u64, 2, 5, 10]),
        modes_strategy(),
        any::<bool>(),
        prop::sample::select(vec!["gold", "ebs", "", "missing"]),
    )
        .prop_map(|(request, modes, block, class)| ClaimSpec {
            request,
            modes,
            block,
            class,
        })
}

fn vol_strategy() -> impl Strategy<Value = VolSpec> {
    (
        prop::sample::select(vec![1u64, 2, 5, 10, 20]),
        modes_strategy(),
        prop::bool::weighted(0.2),
        prop::sample::select(vec!["gold", "ebs", ""]),
        prop::sample::select(vec!["Delete", "Retain", "Recycle"]),
        prop::option::weighted(0.2, 0usize..8),
    )
        .prop_map(
            |(cap, modes, block, class, reclaim, reserved_for)| VolSpec {
                cap,
                modes,
                block,
                class,
                reclaim,
                reserved_for,
            },
        )
}

fn build_world(claims: &[ClaimSpec], vols: &[VolSpec], gold_reclaim: &str) -> World {
    let mut gold = class("gold", DRIVER, false);
    gold.reclaim_policy = Some(gold_reclaim.into());
    let ebs = class("ebs", "ebs.csi.aws.com", false);
    let claims: Vec<PersistentVolumeClaim> = claims
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = claim(&format!("c{i}"), s.request, &s.modes, Some(s.class));
            if s.block {
                c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
            }
            c
        })
        .collect();
    let volumes: Vec<PersistentVolume> = vols
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = policy(
                volume(&format!("static{i}"), s.cap, &s.modes, s.class),
                s.reclaim,
            );
            v.status = None;
            if s.block {
                v.spec.as_mut().unwrap().volume_mode = Some("Block".into());
            }
            if let Some(c) = s.reserved_for.and_then(|j| claims.get(j)) {
                v = claimed_by(v, c, false);
            }
            v
        })
        .collect();
    let reserved: std::collections::BTreeSet<String> = volumes
        .iter()
        .filter(|v: &&PersistentVolume| {
            v.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).is_some()
        })
        .map(|v| o::name(&v.metadata).to_owned())
        .collect();
    World {
        claims,
        volumes,
        classes: vec![gold, ebs],
        backend: Default::default(),
        recycled: vec![],
        reserved,
    }
}

fn check_bindings(w: &World) -> Result<(), TestCaseError> {
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for c in &w.claims {
        let key = o::claim_key(c);
        match ClaimPhase::of(c) {
            Some(ClaimPhase::Bound) => {
                let vn = o::claim_volume_name(c);
                let pv = w.volumes.iter().find(|v| o::name(&v.metadata) == vn);
                let pv =
                    pv.ok_or_else(|| TestCaseError::fail(format!("{key} bound to missing {vn}")))?;
                prop_assert_eq!(relation(pv, Some(c)), Relation::Bound, "{} / {}", key, vn);
                prop_assert_eq!(VolumePhase::of(pv), Some(VolumePhase::Bound));
                prop_assert!(
                    owners.insert(vn.to_owned(), key.clone()).is_none(),
                    "{} bound twice",
                    vn
                );
                // What it got satisfies what it asked for; a reservation made by a person
                // overrides class and access modes, as in KCM.
                prop_assert!(o::volume_capacity(pv).unwrap() >= o::claim_request(c).unwrap());
                if !w.reserved.contains(vn) {
                    prop_assert!(
                        access_modes_cover(pv, c),
                        "{} got {} without its access modes",
                        key,
                        vn
                    );
                    prop_assert_eq!(o::volume_class(pv), o::claim_class(c));
                }
                prop_assert!(!volume_mode_mismatch(pv, c));
                prop_assert!(o::has_annotation(&c.metadata, ANN_BIND_COMPLETED));
            }
            Some(ClaimPhase::Pending) => {
                prop_assert!(
                    o::claim_volume_name(c).is_empty()
                        || !o::has_annotation(&c.metadata, ANN_BIND_COMPLETED)
                );
                // Our class always gets a volume: a Pending claim of it is a bug.
                prop_assert_ne!(o::claim_class(c), "gold", "{} left Pending", key);
            }
            other => prop_assert!(false, "{} in phase {:?}", key, other),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any mix of claims and static volumes converges, every claim of our class is bound,
    /// nothing is bound twice, everything bound fits its claim, and the converged world is
    /// stable (a further sync asks for nothing).
    #[test]
    fn worlds_converge(
        claims in prop::collection::vec(claim_strategy(), 0..8),
        vols in prop::collection::vec(vol_strategy(), 0..8),
        order in Just((0..8).collect::<Vec<usize>>()).prop_shuffle(),
        gold_reclaim in prop::sample::select(vec!["Delete", "Retain"]),
    ) {
        let mut w = build_world(&claims, &vols, gold_reclaim);
        w.converge(BUILTIN, &order).map_err(TestCaseError::fail)?;
        check_bindings(&w)?;
        prop_assert_eq!(w.step(BUILTIN, &order), 0);
    }

    /// Deleting claims releases their volumes and reclaims them by policy: Delete volumes we
    /// provisioned disappear with their backend volume, Retain ones stay Released, Recycle ones
    /// are scrubbed and Available again; nothing that a live claim uses is touched.
    #[test]
    fn deleting_claims_reclaims_by_policy(
        claims in prop::collection::vec(claim_strategy(), 1..8),
        vols in prop::collection::vec(vol_strategy(), 0..8),
        delete in prop::collection::vec(any::<bool>(), 8),
        gold_reclaim in prop::sample::select(vec!["Delete", "Retain"]),
    ) {
        let order: Vec<usize> = (0..8).collect();
        let mut w = build_world(&claims, &vols, gold_reclaim);
        w.converge(BUILTIN, &order).map_err(TestCaseError::fail)?;
        let before = w.clone();
        let gone: Vec<PersistentVolumeClaim> = w
            .claims
            .iter()
            .enumerate()
            .filter(|(i, _)| delete[*i])
            .map(|(_, c)| c.clone())
            .collect();
        w.claims.retain(|c| !gone.iter().any(|g| g.metadata.uid == c.metadata.uid));
        w.converge(BUILTIN, &order).map_err(TestCaseError::fail)?;
        check_bindings(&w)?;
        for g in &gone {
            let vn = o::claim_volume_name(g);
            if vn.is_empty() { continue; }
            let old = before.volumes.iter().find(|v| o::name(&v.metadata) == vn).unwrap();
            let now = w.volumes.iter().find(|v| o::name(&v.metadata) == vn);
            let handle = o::volume_handle(old).unwrap().to_owned();
            let ours_dynamic = o::annotation(&old.metadata, ANN_PROVISIONED_BY) == Some(DRIVER);
            match o::reclaim_policy(old) {
                "Delete" if ours_dynamic => {
                    prop_assert!(now.is_none(), "{} should be deleted", vn);
                    prop_assert!(!w.backend.contains(&handle));
                }
                "Delete" => prop_assert_eq!(now.and_then(VolumePhase::of), Some(VolumePhase::Failed)),
                "Retain" => prop_assert_eq!(now.and_then(VolumePhase::of), Some(VolumePhase::Released)),
                "Recycle" => {
                    prop_assert!(w.recycled.contains(&handle));
                    let now = now.unwrap();
                    // Available again, or already bound to another claim that wanted it.
                    prop_assert!(matches!(VolumePhase::of(now), Some(VolumePhase::Available | VolumePhase::Bound)));
                }
                other => prop_assert!(false, "policy {}", other),
            }
        }
    }

    /// KCM mode never writes bindings or phases, whatever the world looks like.
    #[test]
    fn kcm_mode_never_binds(
        claims in prop::collection::vec(claim_strategy(), 0..6),
        vols in prop::collection::vec(vol_strategy(), 0..6),
    ) {
        let w = build_world(&claims, &vols, "Delete");
        let refs: Vec<&PersistentVolume> = w.volumes.iter().collect();
        for c in &w.claims {
            let cls = w.class(o::claim_class(c));
            for a in sync_claim(KCM, &ClaimInput { claim: c, class: cls, volumes: &refs, node: None, default_class: None }) {
                prop_assert!(matches!(a, ClaimAction::Provision { .. }), "{:?}", a);
            }
        }
        for v in &w.volumes {
            for a in sync_volume(KCM, v, None) {
                prop_assert!(!matches!(a, VolumeAction::Phase { .. }), "{:?}", a);
            }
        }
    }
}
