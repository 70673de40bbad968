//! `stowage status`: lists what [`crate::explain`] needs and prints its report.

use std::io::Write;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::explain::{self, Inputs, Report, human_age};
use crate::output::{self, Format, OutputError};
use crate::usage;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
}

pub struct StatusOptions {
    /// Only claims of this namespace (PVs are cluster-wide and always listed).
    pub namespace: Option<String>,
    pub pending_after_secs: i64,
    /// Ask the kubelets of nodes running pods of Stowage claims for the volumes' usage.
    pub usage: bool,
}

/// How long one kubelet's stats summary may take (through the API server's node proxy).
const SUMMARY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn list<K>(api: Api<K>, what: &'static str, lp: &ListParams) -> Result<Vec<K>, StatusError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(lp)
        .await
        .map_err(|source| StatusError::List { what, source })?
        .items)
}

/// How long watch events are collected before the report is redrawn: a provisioning touches
/// the claim and the PV several times within a second.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// `status --watch`: prints the report, then again after PVs or claims changed (watch events,
/// coalesced for [`SETTLE`]). On a terminal each report replaces the previous one; otherwise
/// (a pipe, a log) a report is printed only when its text differs from the last one printed,
/// with no control codes. Returns when the watch streams end (the process is normally
/// stopped with Ctrl-C).
pub async fn watch(
    client: &Client,
    opts: &StatusOptions,
    format: Format,
    out: &mut dyn Write,
    tty: bool,
) -> Result<(), StatusError> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let pvs = watcher(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|_| ());
    let claims: Api<PersistentVolumeClaim> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let claims = watcher(claims, watcher::Config::default())
        .default_backoff()
        .map(|_| ());
    let mut events = std::pin::pin!(futures::stream::select(pvs, claims));
    let mut last: Option<Vec<u8>> = None;
    loop {
        let report = gather(client, opts).await?;
        let mut text = Vec::new();
        print(&mut text, format, &report)?;
        if last.as_ref() != Some(&text) {
            if tty {
                // Cursor home and clear screen: the new report replaces the old one.
                out.write_all(b"\x1b[H\x1b[2J").map_err(OutputError::from)?;
            }
            out.write_all(&text).map_err(OutputError::from)?;
            out.flush().map_err(OutputError::from)?;
            last = Some(text);
        }
        // Wait for a change, then let the burst it belongs to settle.
        if events.next().await.is_none() {
            return Ok(());
        }
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                () = &mut settle => break,
                e = events.next() => if e.is_none() { break },
            }
        }
    }
}

/// Reads the cluster and explains it.
pub async fn gather(client: &Client, opts: &StatusOptions) -> Result<Report, StatusError> {
    let all = ListParams::default();
    let pvs = list(
        Api::<PersistentVolume>::all(client.clone()),
        "PersistentVolumes",
        &all,
    )
    .await?;
    let (claims_api, events_api): (Api<PersistentVolumeClaim>, Api<Event>) = match &opts.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let claims = list(claims_api, "PersistentVolumeClaims", &all).await?;
    let classes = list(
        Api::<StorageClass>::all(client.clone()),
        "StorageClasses",
        &all,
    )
    .await?;
    let attachments = list(
        Api::<VolumeAttachment>::all(client.clone()),
        "VolumeAttachments",
        &all,
    )
    .await?;
    // Only the events about claims and PVs; PV events live in the default namespace, which a
    // namespaced listing of claims' events does not cover.
    let mut events = list(
        events_api,
        "Events",
        &ListParams::default().fields("involvedObject.kind=PersistentVolumeClaim"),
    )
    .await?;
    events.extend(
        list(
            Api::<Event>::all(client.clone()),
            "Events",
            &ListParams::default().fields("involvedObject.kind=PersistentVolume"),
        )
        .await?,
    );
    let mut report = explain::explain(&Inputs {
        pvs: &pvs,
        claims: &claims,
        classes: &classes,
        attachments: &attachments,
        events: &events,
        now: Timestamp::now(),
        pending_after_secs: opts.pending_after_secs,
    });
    if opts.usage {
        let (map, notes) = usage_of(client, opts, &report).await;
        usage::apply(&mut report, &map);
        report.notes.extend(notes);
    }
    Ok(report)
}

/// Usage of the bound claims mounted by running pods, from the kubelets of their nodes (asked
/// at once, each bounded). Whatever cannot be read becomes a note, never an error: the status
/// of claims matters more than their usage.
async fn usage_of(
    client: &Client,
    opts: &StatusOptions,
    report: &Report,
) -> (usage::UsageMap, Vec<String>) {
    let bound: BTreeSet<String> = report
        .claims
        .iter()
        .filter(|c| c.phase == "Bound")
        .map(|c| format!("{}/{}", c.namespace, c.name))
        .collect();
    let mut notes = Vec::new();
    if bound.is_empty() {
        return (usage::UsageMap::new(), notes);
    }
    let pods_api: Api<Pod> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let pods = match pods_api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => {
            notes.push(format!("usage not shown: listing pods: {e}"));
            return (usage::UsageMap::new(), notes);
        }
    };
    let nodes = usage::nodes_to_ask(&pods, &bound);
    let asks = nodes.iter().map(|node| async move {
        let uri = format!("/api/v1/nodes/{node}/proxy/stats/summary");
        let req = match http::Request::get(uri).body(Vec::new()) {
            Ok(r) => r,
            Err(e) => return (node, Err(e.to_string())),
        };
        let res = match tokio::time::timeout(SUMMARY_TIMEOUT, client.request_text(req)).await {
            Err(_) => Err(format!("no answer within {}s", SUMMARY_TIMEOUT.as_secs())),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(text)) => usage::parse_summary(text.as_bytes())
                .map_err(|e| format!("unreadable stats summary: {e}")),
        };
        (node, res)
    });
    let mut map = usage::UsageMap::new();
    for (node, res) in futures::future::join_all(asks).await {
        match res {
            Ok(m) => {
                for (k, v) in m {
                    map.entry(k).or_insert(v);
                }
            }
            Err(e) => notes.push(format!("usage from node {node} not shown: {e}")),
        }
    }
    (map, notes)
}

pub fn print(out: &mut dyn Write, format: Format, r: &Report) -> Result<(), OutputError> {
    if matches!(format, Format::Json | Format::Yaml) {
        return output::structured(out, format, r);
    }
    let wide = format == Format::Wide;
    if r.volumes.is_empty() && r.claims.is_empty() {
        writeln!(out, "No Stowage volumes or claims.")?;
    }
    if !r.volumes.is_empty() {
        let mut header = vec![
            "VOLUME", "PHASE", "BACKEND", "CLASS", "CAPACITY", "USED", "CLAIM", "ATTACH", "AGE",
        ];
        if wide {
            header.extend(["ACCESS MODES", "RECLAIM", "NODE", "HANDLE"]);
        }
        let rows: Vec<Vec<String>> = r
            .volumes
            .iter()
            .map(|v| {
                let mut row = vec![
                    v.name.clone(),
                    v.phase.clone(),
                    v.backend.clone(),
                    dash(&v.class),
                    dash(&v.capacity),
                    used(v.usage),
                    dash(&v.claim),
                    v.attach.clone(),
                    human_age(v.age_seconds),
                ];
                if wide {
                    row.extend([
                        dash(&v.access_modes.join(",")),
                        v.reclaim_policy.clone(),
                        dash(&v.node),
                        dash(&v.volume_handle),
                    ]);
                }
                row
            })
            .collect();
        output::table(out, &header, &rows)?;
    }
    if !r.claims.is_empty() {
        if !r.volumes.is_empty() {
            writeln!(out)?;
        }
        let mut header = vec![
            "NAMESPACE",
            "CLAIM",
            "PHASE",
            "VOLUME",
            "BACKEND",
            "CLASS",
            "CAPACITY",
            "USED",
            "AGE",
        ];
        if wide {
            header.extend(["ACCESS MODES", "DRIVER"]);
        }
        let rows: Vec<Vec<String>> = r
            .claims
            .iter()
            .map(|c| {
                let mut row = vec![
                    c.namespace.clone(),
                    c.name.clone(),
                    c.phase.clone(),
                    dash(&c.volume),
                    c.backend.clone(),
                    dash(&c.class),
                    dash(&c.capacity),
                    used(c.usage),
                    human_age(c.age_seconds),
                ];
                if wide {
                    row.extend([dash(&c.access_modes.join(",")), c.driver.clone()]);
                }
                row
            })
            .collect();
        output::table(out, &header, &rows)?;
    }
    if !r.problems.is_empty() {
        writeln!(out, "\nSTUCK ({}):", r.problems.len())?;
        for p in &r.problems {
            let name = if p.namespace.is_empty() {
                p.name.clone()
            } else {
                format!("{}/{}", p.namespace, p.name)
            };
            writeln!(
                out,
                "  {} {} {} for {}: {}",
                p.kind,
                name,
                p.state,
                human_age(p.age_seconds),
                p.reason
            )?;
            writeln!(out, "    fix: {}", p.hint)?;
        }
    }
    for n in &r.notes {
        writeln!(out, "note: {n}")?;
    }
    Ok(())
}

fn used(u: Option<usage::Usage>) -> String {
    u.map_or_else(|| "-".into(), |u| u.human())
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}
