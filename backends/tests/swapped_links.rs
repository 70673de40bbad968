//! A pod swapping a directory of its volume for a symlink to outside files while the
//! controller copies (snapshot, clone) or measures the volume: the walk must never reach
//! through the link. `renameat2(RENAME_EXCHANGE)` flips `sub` between a real directory and a
//! symlink to `outside/` as fast as it can while copies run; no copy may hold an outside byte
//! and no usage figure may include the outside file's size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use stowage_backends::fs::Fs;
use stowage_backends::fs::local::LocalFs;
use stowage_backends::relpath::RelPath;

const OUTSIDE: &[u8] = b"OUTSIDE-SECRET";

/// Every regular file's bytes under `dir`, links not followed.
fn files_under(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            files_under(&e.path(), out);
        } else if md.is_file() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_link_during_a_copy_is_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let vol = base.join("vol");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(vol.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // Many names, so that a walk spends time inside `sub` (and inside `outside` if it follows).
    for i in 0..50 {
        std::fs::write(vol.join("sub").join(format!("f{i}")), b"inside").unwrap();
        std::fs::write(outside.join(format!("f{i}")), OUTSIDE.repeat(1000)).unwrap();
    }
    std::os::unix::fs::symlink(&outside, vol.join("swap")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = {
        let (stop, vol) = (stop.clone(), vol.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    vol.join("sub"),
                    rustix::fs::CWD,
                    vol.join("swap"),
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                n += 1;
            }
            n
        })
    };

    let fs = LocalFs::new(&base);
    let from = RelPath::parse("path", "vol").unwrap();
    let rounds = 300;
    let mut max_usage = 0u64;
    for i in 0..rounds {
        let to = RelPath::parse("path", &format!("copy-{i}")).unwrap();
        fs.copy_tree(&from, &to).await.unwrap();
        max_usage = max_usage.max(fs.tree_size(&from).await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swaps.join().unwrap();

    let mut files = Vec::new();
    for i in 0..rounds {
        files_under(&base.join(format!("copy-{i}")), &mut files);
    }
    let leaked: Vec<_> = files
        .iter()
        .filter(|(_, b)| b.windows(OUTSIDE.len()).any(|w| w == OUTSIDE))
        .map(|(p, _)| p.display().to_string())
        .collect();
    eprintln!(
        "{rounds} copies during {swaps} swaps: {} files copied, {} with outside bytes; largest usage {max_usage}",
        files.len(),
        leaked.len()
    );
    assert!(files.len() >= 50, "the copies hold the volume's own files");
    assert!(leaked.is_empty(), "outside bytes copied into {leaked:?}");
    // 50 files of 6 bytes inside; one outside file alone is 14 000.
    assert!(max_usage < 1000, "usage counted outside files: {max_usage}");
    for i in 0..50 {
        assert_eq!(
            std::fs::read(outside.join(format!("f{i}"))).unwrap(),
            OUTSIDE.repeat(1000)
        );
    }
}

/// What `cp -a --sparse=always` kept and the descriptor walk must keep too: holes, hard links
/// within the tree, modes, times and symlinks.
#[tokio::test]
async fn a_copy_keeps_holes_hard_links_modes_times_and_links() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let vol = base.join("vol");
    std::fs::create_dir_all(vol.join("d")).unwrap();
    let sparse = std::fs::File::create(vol.join("sparse.img")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", (64 << 20) - 4).unwrap();
    drop(sparse);
    std::fs::write(vol.join("d/a"), b"linked").unwrap();
    std::fs::hard_link(vol.join("d/a"), vol.join("b")).unwrap();
    std::os::unix::fs::symlink("d/a", vol.join("rel-link")).unwrap();
    std::fs::set_permissions(vol.join("d/a"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(vol.join("d"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let mtime = std::fs::metadata(vol.join("d/a")).unwrap().mtime();

    let fs = LocalFs::new(&base);
    let from = RelPath::parse("path", "vol").unwrap();
    let to = RelPath::parse("path", "copy").unwrap();
    fs.copy_tree(&from, &to).await.unwrap();
    let copy = base.join("copy");

    let md = std::fs::metadata(copy.join("sparse.img")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "holes filled: {} bytes allocated",
        md.blocks() * 512
    );
    let mut tail = [0u8; 4];
    std::os::unix::fs::FileExt::read_at(
        &std::fs::File::open(copy.join("sparse.img")).unwrap(),
        &mut tail,
        (64 << 20) - 4,
    )
    .unwrap();
    assert_eq!(&tail, b"tail");
    let (a, b) = (
        std::fs::metadata(copy.join("d/a")).unwrap(),
        std::fs::metadata(copy.join("b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hard links within the tree stay one file");
    assert_ne!(a.ino(), std::fs::metadata(vol.join("d/a")).unwrap().ino());
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert_eq!(a.mtime(), mtime);
    assert_eq!(
        std::fs::metadata(copy.join("d")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        std::fs::read_link(copy.join("rel-link")).unwrap(),
        std::path::Path::new("d/a")
    );
    assert_eq!(std::fs::read(copy.join("rel-link")).unwrap(), b"linked");
    // The target must not exist yet: a copy never merges into an existing tree.
    assert!(fs.copy_tree(&from, &to).await.is_err());
}

/// A wide and deep tree copies and measures with few descriptors: a directory is opened when
/// its turn comes, not when it is listed (2000 sibling directories and a chain 300 deep under
/// a limit of 128 open files).
#[tokio::test]
async fn wide_and_deep_trees_need_few_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let vol = base.join("vol");
    for i in 0..2000 {
        let d = vol.join("wide").join(format!("d{i}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"12345").unwrap();
    }
    let mut deep = vol.join("deep");
    for i in 0..300 {
        deep = deep.join(format!("{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"bottom").unwrap();

    // This binary's other tests use a handful of descriptors.
    let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(128),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let fs = LocalFs::new(&base);
    let from = RelPath::parse("path", "vol").unwrap();
    let copied = fs
        .copy_tree(&from, &RelPath::parse("path", "copy").unwrap())
        .await;
    let size = fs.tree_size(&from).await;
    rustix::process::setrlimit(rustix::process::Resource::Nofile, old).unwrap();
    copied.unwrap();
    assert_eq!(size.unwrap(), 2000 * 5 + 6);
    let copy = base.join("copy");
    assert_eq!(std::fs::read(copy.join("wide/d1999/f")).unwrap(), b"12345");
    let bottom = deep
        .strip_prefix(&vol)
        .map(|rel| copy.join(rel).join("bottom"))
        .unwrap();
    assert_eq!(std::fs::read(bottom).unwrap(), b"bottom");
}
