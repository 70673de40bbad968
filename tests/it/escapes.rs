//! Links inside a volume that point outside it are data, never paths to follow: snapshots,
//! restores, clones, usage accounting, Recycle scrubbing and deletion of a volume holding them
//! leave the files they point at untouched, and copies keep them as links.

use std::path::Path;

use stowage_csi::stowage_v1;
use stowage_csi::v1;
use stowage_tests::{Plugin, controller_clients, local_config, wire};

fn assert_link(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(md.file_type().is_symlink(), "{} was followed", p.display());
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

    let snap = c
        .controller
        .create_snapshot(v1::CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "links-snap".into(),
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
            "links-restored",
            v1::volume_content_source::Type::Snapshot(v1::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        ),
        (
            "links-clone",
            v1::volume_content_source::Type::Volume(v1::volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            }),
        ),
    ] {
        let mut req = wire::create(name, 16 << 20);
        req.volume_content_source = Some(v1::VolumeContentSource {
            r#type: Some(source),
        });
        let made = c.controller.create_volume(req).await.unwrap().into_inner();
        copies.push(made.volume.unwrap().volume_id);
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

    c.stowage
        .recycle_volume(stowage_v1::RecycleVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(&vdir).unwrap().count(),
        0,
        "recycled volume is empty"
    );
    for volume_id in copies {
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
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
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
