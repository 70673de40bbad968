//! Volume group snapshots for every backend that has snapshots, built on its single-volume
//! snapshot calls: a group is the set of member snapshots whose IDs share the group's prefix,
//! so no separate group record exists to get out of step with its members.
//!
//! IDs: group `<instance>/grp-<h(name)>`, members `<instance>/grp-<h(name)>-<h(volume)>`.
//! Member snapshots are taken one after another: the group is not crash-consistent across
//! volumes (copy-based snapshots cannot pause writers); applications that need that must quiesce
//! first, as with any copy-based snapshot.

use std::collections::BTreeMap;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::controller::ControllerBackend;
use crate::error::{Error, Result};
use crate::types::{Secrets, Snapshot, SnapshotFilter};
use crate::volume_id::VolumeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub id: String,
    pub snapshots: Vec<Snapshot>,
    pub created: SystemTime,
    pub ready: bool,
}

fn h(s: &str, n: usize) -> String {
    let mut x = hex::encode(Sha256::digest(s.as_bytes()));
    x.truncate(n);
    x
}

/// The group a member snapshot belongs to, if any.
pub fn group_of(snapshot_id: &str) -> Option<String> {
    let (inst, rest) = snapshot_id.split_once('/')?;
    let rest = rest.strip_prefix("grp-")?;
    let (g, _member) = rest.split_once('-')?;
    Some(format!("{inst}/grp-{g}"))
}

fn parse_group(id: &str) -> Result<(String, String)> {
    let vid = VolumeId::parse("group_snapshot_id", id)?;
    let g = vid
        .path
        .as_str()
        .strip_prefix("grp-")
        .filter(|g| g.len() == 24 && g.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::not_found("group snapshot", id))?;
    Ok((vid.instance, g.to_owned()))
}

async fn members(backend: &dyn ControllerBackend, group_id: &str) -> Result<Vec<Snapshot>> {
    let prefix = format!("{group_id}-");
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = backend
            .list_snapshots(&SnapshotFilter::default(), token.as_deref(), 0)
            .await?;
        out.extend(page.items.into_iter().filter(|s| s.id.starts_with(&prefix)));
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

fn group(id: String, snapshots: Vec<Snapshot>) -> GroupSnapshot {
    let created = snapshots
        .iter()
        .map(|s| s.created)
        .min()
        .unwrap_or_else(SystemTime::now);
    let ready = snapshots.iter().all(|s| s.ready);
    GroupSnapshot {
        id,
        snapshots,
        created,
        ready,
    }
}

pub async fn create(
    backend: &dyn ControllerBackend,
    name: &str,
    source_volume_ids: &[String],
    parameters: &BTreeMap<String, String>,
    secrets: &Secrets,
) -> Result<GroupSnapshot> {
    if name.is_empty() {
        return Err(Error::invalid("name", "is required"));
    }
    if source_volume_ids.is_empty() {
        return Err(Error::invalid(
            "source_volume_ids",
            "at least one volume is required",
        ));
    }
    let mut instance: Option<String> = None;
    for v in source_volume_ids {
        let id = VolumeId::parse("source_volume_ids", v)?;
        match &instance {
            None => instance = Some(id.instance.clone()),
            Some(i) if *i != id.instance => {
                return Err(Error::invalid(
                    "source_volume_ids",
                    "all volumes of a group must be on one backend instance",
                ));
            }
            _ => {}
        }
        backend.get_volume(v).await?;
    }
    let inst = instance.unwrap_or_default();
    let gid = format!("{inst}/grp-{}", h(name, 24));
    let existing = members(backend, &gid).await?;
    let mut wanted: Vec<&String> = source_volume_ids.iter().collect();
    wanted.sort();
    wanted.dedup();
    if !existing.is_empty() {
        let mut have: Vec<&String> = existing.iter().map(|s| &s.source_volume_id).collect();
        have.sort();
        // A group is complete when every wanted member exists; a partial one (a crash midway) is
        // completed below, but members of other volumes mean the name is taken.
        if have.iter().any(|v| !wanted.contains(v)) {
            return Err(Error::AlreadyExists(format!(
                "group snapshot {name:?} exists with other volumes"
            )));
        }
    }
    let mut snaps = Vec::new();
    for v in wanted {
        let member_name = format!("grp-{}-{}", h(name, 24), h(v, 16));
        snaps.push(
            backend
                .create_snapshot(&member_name, v, parameters, secrets)
                .await?,
        );
    }
    Ok(group(gid, snaps))
}

pub async fn get(backend: &dyn ControllerBackend, group_id: &str) -> Result<GroupSnapshot> {
    parse_group(group_id)?;
    let snaps = members(backend, group_id).await?;
    if snaps.is_empty() {
        return Err(Error::not_found("group snapshot", group_id));
    }
    Ok(group(group_id.to_owned(), snaps))
}

pub async fn delete(
    backend: &dyn ControllerBackend,
    group_id: &str,
    secrets: &Secrets,
) -> Result<()> {
    match parse_group(group_id) {
        Ok(_) => {}
        Err(Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    }
    for s in members(backend, group_id).await? {
        backend.delete_snapshot(&s.id, secrets).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_know_their_group() {
        let g = format!("default/grp-{}", h("g1", 24));
        let m = format!("{g}-{}", h("default/v", 16));
        assert_eq!(group_of(&m).as_deref(), Some(g.as_str()));
        assert_eq!(group_of("default/snap-1"), None);
        assert!(parse_group(&g).is_ok());
        assert!(matches!(
            parse_group("default/nope"),
            Err(Error::NotFound { .. })
        ));
    }
}
