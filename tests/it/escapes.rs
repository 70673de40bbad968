//! Links inside a volume that point outside it are data, never paths to follow: snapshots,
//! restores, clones, usage accounting, Recycle scrubbing and deletion of a volume holding them
//! leave the files they point at untouched, and copies keep them as links.

use std::path::Path;

use stowage_csi::stowage_v1;
use stowage_csi::v1;
use stowage_tests::{Clients, Plugin, controller_clients, local_config, wire};

fn assert_link(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(md.file_type().is_symlink(), "{} was followed", p.display());
}

/// A snapshot of `volume_id` (`<prefix>-snap`), then a volume restored from it
/// (`<prefix>-restored`) and a clone of the volume (`<prefix>-clone`): the snapshot's ID and
/// the copies' names and IDs.
async fn snapshot_and_copies(
    c: &mut Clients,
    volume_id: &str,
    prefix: &str,
) -> (String, Vec<(String, String)>) {
    let snap = c
        .controller
        .create_snapshot(v1::CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: format!("{prefix}-snap"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let mut copies = Vec::new();
    for (name, source) in [
        (
            format!("{prefix}-restored"),
            v1::volume_content_source::Type::Snapshot(v1::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        ),
        (
            format!("{prefix}-clone"),
            v1::volume_content_source::Type::Volume(v1::volume_content_source::VolumeSource {
                volume_id: volume_id.into(),
            }),
        ),
    ] {
        let mut req = wire::create(&name, 16 << 20);
        req.volume_content_source = Some(v1::VolumeContentSource {
            r#type: Some(source),
        });
        let made = c.controller.create_volume(req).await.unwrap().into_inner();
        copies.push((name, made.volume.unwrap().volume_id));
    }
    (snap.snapshot_id, copies)
}

/// Recycles `volume_id` (checking it is left empty at `vdir`), then deletes the copies, the
/// snapshot and (`delete_source`) the volume itself.
async fn recycle_and_delete(
    c: &mut Clients,
    volume_id: &str,
    vdir: &Path,
    copies: Vec<(String, String)>,
    snapshot_id: String,
    delete_source: bool,
) {
    c.stowage
        .recycle_volume(stowage_v1::RecycleVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(vdir).unwrap().count(),
        0,
        "recycled volume is empty"
    );
    let source = delete_source.then(|| volume_id.to_string());
    for volume_id in copies.into_iter().map(|(_, id)| id).chain(source) {
        c.controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.controller
        .delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn links_pointing_outside_a_volume_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("tree")).unwrap();
    std::fs::write(outside.join("secret"), b"outside data").unwrap();
    std::fs::write(outside.join("tree/file"), b"tree data").unwrap();
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap());

    let vol = c
        .controller
        .create_volume(wire::create("links", 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let vdir = base.join("links");
    assert!(vdir.is_dir(), "volume directory {}", vdir.display());
    // What a pod could plant: absolute and relative links to a file and to a tree outside,
    // and a link to the node's root.
    std::os::unix::fs::symlink(outside.join("secret"), vdir.join("abs-file")).unwrap();
    std::os::unix::fs::symlink(outside.join("tree"), vdir.join("abs-dir")).unwrap();
    std::os::unix::fs::symlink("../../outside/tree", vdir.join("rel-dir")).unwrap();
    std::os::unix::fs::symlink("/", vdir.join("root")).unwrap();
    std::fs::write(vdir.join("own"), b"own data").unwrap();

    let (snap, copies) = snapshot_and_copies(&mut c, &vol.volume_id, "links").await;
    for (name, _) in &copies {
        let copy = base.join(name);
        for l in ["abs-file", "abs-dir", "rel-dir", "root"] {
            assert_link(&copy.join(l));
        }
        assert_eq!(std::fs::read(copy.join("own")).unwrap(), b"own data");
    }

    // Usage accounting counts the volume's own bytes, not the tree behind a link (or "/").
    let details = c
        .stowage
        .get_volume_details(stowage_v1::GetVolumeDetailsRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        details.used_bytes < 1 << 20,
        "usage {} followed a link",
        details.used_bytes
    );

    recycle_and_delete(&mut c, &vol.volume_id, &vdir, copies, snap, false).await;
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"outside data"
    );
    assert_eq!(
        std::fs::read(outside.join("tree/file")).unwrap(),
        b"tree data"
    );
    assert!(ctl.child.try_wait().unwrap().is_none(), "controller died");
}

/// A hard link a pod planted to a file outside its volume (same filesystem) is the volume's
/// data to copy and to unlink, never the outside file to write or remove: copies are new
/// files (writing one leaves the outside file as it was), Recycle and delete unlink the name
/// and leave the outside file, its bytes and its inode in place.
#[tokio::test]
async fn hard_links_to_outside_files_are_copied_and_unlinked_never_written() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret");
    std::fs::write(&secret, b"outside data").unwrap();
    let ino = std::fs::metadata(&secret).unwrap().ino();
    let cfg = local_config(dir.path(), &base).unwrap();
    let mut ctl = Plugin::controller(dir.path(), &cfg).unwrap();
    let mut c = controller_clients(ctl.ready().await.unwrap());

    let vol = c
        .controller
        .create_volume(wire::create("hard", 16 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let vdir = base.join("hard");
    std::fs::hard_link(&secret, vdir.join("linked")).unwrap();
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 2);

    let (snap, copies) = snapshot_and_copies(&mut c, &vol.volume_id, "hard").await;
    for (name, _) in &copies {
        let copy = base.join(name).join("linked");
        assert_eq!(std::fs::read(&copy).unwrap(), b"outside data");
        assert_ne!(
            std::fs::metadata(&copy).unwrap().ino(),
            ino,
            "{name}: the copy is the outside file itself"
        );
        // What the pod of the copy may do with its file.
        std::fs::write(&copy, b"rewritten in the copy").unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"outside data", "{name}");
    }

    recycle_and_delete(&mut c, &vol.volume_id, &vdir, copies, snap, true).await;
    let md = std::fs::metadata(&secret).unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"outside data");
    assert_eq!(
        (md.ino(), md.nlink()),
        (ino, 1),
        "only the volume's names are gone"
    );
    assert!(ctl.child.try_wait().unwrap().is_none(), "controller died");
}
