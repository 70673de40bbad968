//! Cluster checks: a CSIDriver object per Stowage driver, StorageClasses that point at Stowage
//! drivers (and at no driver nobody serves), and what the provisioner's ServiceAccount may do,
//! asked of the API server itself with SubjectAccessReviews.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::Check;
use crate::explain::is_stowage_driver;

const S: &str = "cluster";

/// What stowage-provisioner cannot work without (provisioner/deploy/rbac.yaml grants these):
/// (group, resource, subresource, verb).
pub const PROVISIONER_NEEDS: &[(&str, &str, &str, &str)] = &[
    ("", "persistentvolumes", "", "create"),
    ("", "persistentvolumes", "", "delete"),
    ("", "persistentvolumes", "status", "update"),
    ("", "persistentvolumeclaims", "", "watch"),
    ("", "persistentvolumeclaims", "status", "patch"),
    ("storage.k8s.io", "storageclasses", "", "list"),
    ("storage.k8s.io", "volumeattachments", "status", "patch"),
    ("", "events", "", "create"),
    ("coordination.k8s.io", "leases", "", "update"),
];

pub async fn checks(client: &Client, drivers: &[String], service_account: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let csidrivers: Api<CSIDriver> = Api::all(client.clone());
    for d in drivers {
        out.push(match csidrivers.get_opt(d).await {
            Ok(Some(c)) => {
                let spec = &c.spec;
                Check::ok(
                    S,
                    format!("CSIDriver {d}"),
                    format!(
                        "attachRequired={}, podInfoOnMount={}, fsGroupPolicy={}",
                        spec.attach_required.unwrap_or(true),
                        spec.pod_info_on_mount.unwrap_or(false),
                        spec.fs_group_policy.as_deref().unwrap_or("ReadWriteOnceWithFSType")
                    ),
                )
            }
            Ok(None) => Check::fail(
                S,
                format!("CSIDriver {d}"),
                "missing: the kubelet and KCM treat the driver as attachRequired with default settings",
                format!("kubectl apply -f provisioner/deploy/csidriver/{}.yaml (the chart installs it)", crate::explain::backend_of(d)),
            ),
            Err(e) => Check::fail(S, format!("CSIDriver {d}"), format!("cannot read: {e}"), "check --kubeconfig and RBAC"),
        });
    }
    match Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Err(e) => out.push(Check::fail(
            S,
            "StorageClasses",
            format!("cannot list: {e}"),
            "check --kubeconfig and RBAC",
        )),
        Ok(list) => {
            let ours: Vec<&StorageClass> = list
                .items
                .iter()
                .filter(|c| is_stowage_driver(&c.provisioner))
                .collect();
            for d in drivers {
                let names: Vec<&str> = ours
                    .iter()
                    .filter(|c| c.provisioner == *d)
                    .filter_map(|c| c.metadata.name.as_deref())
                    .collect();
                if names.is_empty() {
                    out.push(Check::warn(
                        S,
                        format!("StorageClasses of {d}"),
                        "none: claims cannot ask for this driver",
                        format!("create a StorageClass with provisioner: {d}"),
                    ));
                } else {
                    out.push(Check::ok(
                        S,
                        format!("StorageClasses of {d}"),
                        names.join(", "),
                    ));
                }
            }
            for c in ours.iter().filter(|c| !drivers.contains(&c.provisioner)) {
                out.push(Check::warn(
                    S,
                    format!("StorageClass {}", c.metadata.name.as_deref().unwrap_or("?")),
                    format!("provisioner {} is not a configured driver", c.provisioner),
                    "add the backend to the configuration, or delete the class",
                ));
            }
        }
    }
    out.push(rbac(client, service_account).await);
    out
}

async fn rbac(client: &Client, service_account: &str) -> Check {
    let (ns, name) = service_account
        .split_once('/')
        .unwrap_or(("stowage-system", service_account));
    let user = format!("system:serviceaccount:{ns}:{name}");
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (group, resource, sub, verb) in PROVISIONER_NEEDS {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: (!sub.is_empty()).then(|| sub.to_string()),
                    verb: Some(verb.to_string()),
                    namespace: (*resource == "leases" || *resource == "events")
                        .then(|| ns.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) => {
                if !r.status.is_some_and(|s| s.allowed) {
                    let what = if sub.is_empty() {
                        resource.to_string()
                    } else {
                        format!("{resource}/{sub}")
                    };
                    denied.push(format!("{verb} {what}"));
                }
            }
            Err(e) => {
                return Check::warn(
                    S,
                    format!("RBAC of {user}"),
                    format!("cannot ask the API server (SubjectAccessReview): {e}"),
                    "run doctor with a kubeconfig that may create subjectaccessreviews",
                );
            }
        }
    }
    if denied.is_empty() {
        Check::ok(
            S,
            format!("RBAC of {user}"),
            format!("allowed all {} checked verbs", PROVISIONER_NEEDS.len()),
        )
    } else {
        Check::fail(
            S,
            format!("RBAC of {user}"),
            format!("denied: {}", denied.join(", ")),
            "kubectl apply -f provisioner/deploy/rbac.yaml (or the chart's ClusterRole); --service-account names another account",
        )
    }
}

/// The Stowage drivers the cluster has CSIDriver objects for.
pub async fn stowage_csidrivers(client: &Client) -> Result<Vec<String>, kube::Error> {
    Ok(Api::<CSIDriver>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .filter(|n| is_stowage_driver(n))
        .collect())
}
