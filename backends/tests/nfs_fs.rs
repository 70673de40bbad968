//! `NfsFs` against a real NFS server, checked on the server's disk.
//!
//! Start a server and export its settings, then run:
//!   tests/infra/ganesha.sh start && set -a && . /tmp/stowage-ganesha/env && set +a
//!   cargo test -p stowage-backends --test nfs_fs -- --nocapture
//! Needs STOWAGE_NFS_SERVER, STOWAGE_NFS_EXPORT, STOWAGE_NFS_PORT, STOWAGE_NFS_MOUNT_PORT and
//! STOWAGE_NFS_EXPORT_DIR (the exported directory, to look at results on disk). The restart
//! and stalled-server tests also need STOWAGE_NFS_STATE (the ganesha.sh state dir). Without
//! them the tests report that they did not run; with STOWAGE_REQUIRE_NFS=1 they fail instead.
//! Must run on the server's host as root (it inspects and chowns files in the export).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_backends::error::Error;
use stowage_backends::fs::nfs::{NfsFs, NfsOptions};
use stowage_backends::fs::{DirAttrs, FileKind, Fs};
use stowage_backends::relpath::RelPath;

/// Tests that restart or stall the shared server take this for writing; the others hold it
/// for reading, so they never see the server go away under them.
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[derive(Debug, Clone)]
struct Server {
    server: String,
    export: String,
    port: u16,
    mount_port: u16,
    export_dir: PathBuf,
    state: Option<PathBuf>,
}

fn required() -> bool {
    std::env::var("STOWAGE_REQUIRE_NFS").is_ok_and(|v| v == "1")
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The server under test, or `None` (after saying so) when none is configured.
fn server(test: &str) -> Option<Server> {
    let names = [
        "STOWAGE_NFS_SERVER",
        "STOWAGE_NFS_EXPORT",
        "STOWAGE_NFS_PORT",
        "STOWAGE_NFS_MOUNT_PORT",
        "STOWAGE_NFS_EXPORT_DIR",
    ];
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| env_opt(n).is_none())
        .collect();
    if !missing.is_empty() {
        if required() {
            panic!(
                "STOWAGE_REQUIRE_NFS=1 but {} not set (run tests/infra/ganesha.sh start)",
                missing.join(", ")
            );
        }
        eprintln!(
            "{test}: NOT RUN: no NFS server configured ({} unset)",
            missing.join(", ")
        );
        return None;
    }
    let get = |n: &str| env_opt(n).unwrap();
    Some(Server {
        server: get("STOWAGE_NFS_SERVER"),
        export: get("STOWAGE_NFS_EXPORT"),
        port: get("STOWAGE_NFS_PORT").parse().expect("STOWAGE_NFS_PORT"),
        mount_port: get("STOWAGE_NFS_MOUNT_PORT")
            .parse()
            .expect("STOWAGE_NFS_MOUNT_PORT"),
        export_dir: PathBuf::from(get("STOWAGE_NFS_EXPORT_DIR")),
        state: env_opt("STOWAGE_NFS_STATE").map(PathBuf::from),
    })
}

/// The ganesha.sh state dir for tests that restart or stall the server: STOWAGE_NFS_STATE,
/// or the parent of the export dir when that is a ganesha.sh state dir (it exports
/// `$STATE/export`), which is how the cargo suite's server is laid out.
fn state_dir(test: &str, srv: &Server) -> Option<PathBuf> {
    let derived = srv
        .export_dir
        .parent()
        .filter(|d| d.join("ganesha.pid").is_file() && d.join("env").is_file())
        .map(Path::to_path_buf);
    match srv.state.clone().or(derived) {
        Some(s) => Some(s),
        None if required() => panic!(
            "STOWAGE_REQUIRE_NFS=1 but STOWAGE_NFS_STATE is not set and {} is not inside a \
             ganesha.sh state dir",
            srv.export_dir.display()
        ),
        None => {
            eprintln!("{test}: NOT RUN: STOWAGE_NFS_STATE (ganesha.sh state dir) unset");
            None
        }
    }
}

fn ganesha_sh() -> PathBuf {
    match env_opt("STOWAGE_GANESHA_SH") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/infra/ganesha.sh"),
    }
}

fn opts(srv: &Server, base_dir: &str) -> NfsOptions {
    NfsOptions {
        base_dir: base_dir.to_owned(),
        port: Some(srv.port),
        mount_port: Some(srv.mount_port),
        pool_size: 4,
        timeout: Duration::from_secs(5),
        ..NfsOptions::new(srv.server.clone(), srv.export.clone())
    }
}

fn rp(s: &str) -> RelPath {
    RelPath::parse("test", s).unwrap()
}

/// A fresh top-level directory in the export, removed (from disk) when the test ends.
struct Scratch {
    name: String,
    disk: PathBuf,
}

impl Scratch {
    fn new(srv: &Server, test: &str) -> Scratch {
        let name = format!("itest-{test}-{}", uuid::Uuid::new_v4().simple());
        Scratch {
            disk: srv.export_dir.join(&name),
            name,
        }
    }
    fn on_disk(&self, rel: &str) -> PathBuf {
        self.disk.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.disk);
    }
}

fn mode_on_disk(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn primitives_land_on_the_server_disk() {
    let Some(srv) = server("primitives_land_on_the_server_disk") else {
        return;
    };
    let _shared = SERVER.read().await;
    let s = Scratch::new(&srv, "prim");
    // A nested base that does not exist yet: connect creates it.
    let fs = NfsFs::connect(opts(&srv, &format!("{}/base", s.name)))
        .await
        .unwrap();
    let base = s.on_disk("base");
    assert!(base.is_dir(), "base_dir not created on the server");

    // mkdir applies mode exactly (no umask) and owner.
    let attrs = DirAttrs {
        mode: 0o2775,
        uid: Some(1234),
        gid: Some(5678),
    };
    assert!(fs.mkdir(&rp("vol"), attrs).await.unwrap());
    let md = std::fs::metadata(base.join("vol")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o2775);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert!(
        !fs.mkdir(&rp("vol"), attrs).await.unwrap(),
        "second mkdir must report existing"
    );
    fs.mkdir(&rp("open"), DirAttrs::default()).await.unwrap();
    assert_eq!(mode_on_disk(&base.join("open")), 0o777);
    let err = fs
        .mkdir(&rp("missing/child"), DirAttrs::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    // set_attrs
    fs.set_attrs(
        &rp("vol"),
        DirAttrs {
            mode: 0o750,
            uid: Some(42),
            gid: Some(43),
        },
    )
    .await
    .unwrap();
    let md = std::fs::metadata(base.join("vol")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o750, 42, 43));
    let st = fs.stat(&rp("vol")).await.unwrap().unwrap();
    assert_eq!(
        (st.kind, st.mode, st.uid, st.gid),
        (FileKind::Dir, 0o750, 42, 43)
    );

    // Files: create, write (more than one WRITE), read back, sparse growth, truncate.
    fs.create_file(&rp("vol/f"), 0o640).await.unwrap();
    assert_eq!(mode_on_disk(&base.join("vol/f")), 0o640);
    let data = pattern(3 * 1024 * 1024 + 17, 7);
    fs.write_at(&rp("vol/f"), 0, &data).await.unwrap();
    assert_eq!(std::fs::read(base.join("vol/f")).unwrap(), data);
    fs.write_at(&rp("vol/f"), 5, b"HELLO").await.unwrap();
    let disk = std::fs::read(base.join("vol/f")).unwrap();
    assert_eq!(&disk[5..10], b"HELLO");
    let got = fs
        .read_at(&rp("vol/f"), 0, 2 * 1024 * 1024 + 3)
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        2 * 1024 * 1024 + 3,
        "read_at should fill the request below EOF"
    );
    assert_eq!(got[..], disk[..got.len()]);
    assert!(
        fs.read_at(&rp("vol/f"), data.len() as u64, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fs.read_file(&rp("vol/f")).await.unwrap().unwrap(), disk);
    fs.set_len(&rp("vol/f"), 64 << 20).await.unwrap();
    let md = std::fs::metadata(base.join("vol/f")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(md.blocks() * 512 < 16 << 20, "set_len must grow sparsely");
    fs.create_file(&rp("vol/f"), 0o600).await.unwrap();
    let md = std::fs::metadata(base.join("vol/f")).unwrap();
    assert_eq!(
        (md.len(), md.mode() & 0o7777),
        (0, 0o600),
        "create_file truncates and sets mode"
    );
    let err = fs.create_file(&rp("vol"), 0o644).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(!base.join("vol").is_file());
    let err = fs.read_at(&rp("vol/nothing"), 0, 10).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    // Symlinks are created, read and never followed.
    std::fs::create_dir(base.join("vol/sub")).unwrap();
    std::fs::write(base.join("vol/sub/inner"), b"x").unwrap();
    fs.symlink("sub", &rp("vol/dirlink")).await.unwrap();
    assert_eq!(
        std::fs::read_link(base.join("vol/dirlink")).unwrap(),
        Path::new("sub")
    );
    assert_eq!(fs.read_link(&rp("vol/dirlink")).await.unwrap(), "sub");
    assert_eq!(
        fs.stat(&rp("vol/dirlink")).await.unwrap().unwrap().kind,
        FileKind::Symlink
    );
    match fs.stat(&rp("vol/dirlink/inner")).await {
        Ok(None) | Err(_) => {}
        Ok(Some(st)) => panic!("stat followed a symlink: {st:?}"),
    }
    assert!(fs.read_at(&rp("vol/dirlink/inner"), 0, 1).await.is_err());
    std::os::unix::fs::symlink("/etc/hostname", base.join("vol/evil")).unwrap();
    let err = fs.create_file(&rp("vol/evil"), 0o644).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(
        std::fs::symlink_metadata(base.join("vol/evil"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let err = fs.read_link(&rp("vol/f")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

    // read_dir sees what is on disk, with kinds.
    let mut entries: Vec<(String, FileKind)> = fs
        .read_dir(&rp("vol"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.kind))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        entries,
        vec![
            ("dirlink".into(), FileKind::Symlink),
            ("evil".into(), FileKind::Symlink),
            ("f".into(), FileKind::File),
            ("sub".into(), FileKind::Dir),
        ]
    );
    // A directory bigger than one READDIRPLUS reply.
    std::fs::create_dir(base.join("many")).unwrap();
    for i in 0..1500 {
        std::fs::write(
            base.join(format!("many/file-with-a-longish-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    assert_eq!(fs.read_dir(&rp("many")).await.unwrap().len(), 1500);

    // rename: file, then over a non-empty directory (refused).
    fs.rename(&rp("vol/f"), &rp("vol/g")).await.unwrap();
    assert!(!base.join("vol/f").exists() && base.join("vol/g").is_file());
    assert!(fs.stat(&rp("vol/f")).await.unwrap().is_none());
    std::fs::create_dir(base.join("full")).unwrap();
    std::fs::write(base.join("full/x"), b"x").unwrap();
    let err = fs.rename(&rp("open"), &rp("full")).await.unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(_) | Error::AlreadyExists(_)),
        "{err:?}"
    );
    let err = fs.rename(&rp("nope"), &rp("nope2")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    // A renamed directory's old cached handle must not be used for the new name's children.
    fs.mkdir(&rp("d1"), DirAttrs::default()).await.unwrap();
    fs.create_file(&rp("d1/a"), 0o644).await.unwrap();
    fs.rename(&rp("d1"), &rp("d2")).await.unwrap();
    assert!(fs.stat(&rp("d1/a")).await.unwrap().is_none());
    assert!(fs.stat(&rp("d2/a")).await.unwrap().is_some());

    // removes
    assert!(fs.remove_file(&rp("vol/g")).await.unwrap());
    assert!(!base.join("vol/g").exists());
    assert!(!fs.remove_file(&rp("vol/g")).await.unwrap());
    assert!(!fs.remove_file(&rp("no/such/parent")).await.unwrap());
    let err = fs.remove_dir(&rp("full")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(fs.remove_dir(&rp("open")).await.unwrap());
    assert!(!base.join("open").exists());
    assert!(!fs.remove_dir(&rp("open")).await.unwrap());
    // Removed behind our back while cached: stat must notice.
    std::fs::remove_file(base.join("d2/a")).unwrap();
    assert!(fs.stat(&rp("d2/a")).await.unwrap().is_none());

    // A cached directory handle that went stale (directory replaced behind our back) is
    // dropped and the path resolved again.
    fs.mkdir(&rp("s1"), DirAttrs::default()).await.unwrap();
    fs.create_file(&rp("s1/a"), 0o644).await.unwrap();
    std::fs::remove_dir_all(base.join("s1")).unwrap();
    std::fs::create_dir(base.join("s1")).unwrap();
    fs.create_file(&rp("s1/b"), 0o644).await.unwrap();
    assert!(base.join("s1/b").is_file());
    assert!(fs.stat(&rp("s1/a")).await.unwrap().is_none());

    // fs_stats matches what the server's filesystem says.
    let st = fs.fs_stats().await.unwrap();
    let vfs = rustix::fs::statvfs(&base).unwrap();
    assert_eq!(st.total_bytes, vfs.f_blocks * vfs.f_frsize);
    let avail = vfs.f_bavail * vfs.f_frsize;
    assert!(
        st.available_bytes.abs_diff(avail) < avail / 20 + (64 << 20),
        "{st:?} vs {avail}"
    );
    assert!(st.total_inodes > 0);
}

#[tokio::test]
async fn copy_tree_remove_all_and_atomic_writes() {
    let Some(srv) = server("copy_tree_remove_all_and_atomic_writes") else {
        return;
    };
    let _shared = SERVER.read().await;
    let s = Scratch::new(&srv, "copy");
    let fs = NfsFs::connect(opts(&srv, &s.name)).await.unwrap();
    let src = s.on_disk("src");

    // Source tree made directly on the server's disk.
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    std::fs::write(src.join("a/b/c/deep.bin"), pattern(2_500_000, 3)).unwrap();
    std::fs::write(src.join("a/empty"), b"").unwrap();
    let sparse = std::fs::File::create(src.join("a/sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    drop(sparse);
    std::fs::set_permissions(src.join("top.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(src.join("a/b/c/deep.bin"), Some(1001), Some(1002)).unwrap();
    std::os::unix::fs::symlink("../top.txt", src.join("a/link")).unwrap();

    let t0 = Instant::now();
    fs.copy_tree(&rp("src"), &rp("dst")).await.unwrap();
    eprintln!(
        "copy_tree of ~10.5 MB apparent / 2.5 MB data: {:?}",
        t0.elapsed()
    );
    let dst = s.on_disk("dst");
    assert_eq!(std::fs::read(dst.join("top.txt")).unwrap(), b"top");
    assert_eq!(
        std::fs::read(dst.join("a/b/c/deep.bin")).unwrap(),
        pattern(2_500_000, 3)
    );
    assert_eq!(std::fs::metadata(dst.join("a/empty")).unwrap().len(), 0);
    assert_eq!(
        std::fs::metadata(dst.join("a/sparse")).unwrap().len(),
        8 << 20
    );
    assert_eq!(mode_on_disk(&dst.join("top.txt")), 0o600);
    assert_eq!(mode_on_disk(&dst.join("a/b")), 0o711);
    let md = std::fs::metadata(dst.join("a/b/c/deep.bin")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1001, 1002),
        "owner copied (root credentials)"
    );
    assert_eq!(
        std::fs::read_link(dst.join("a/link")).unwrap(),
        Path::new("../top.txt")
    );
    let err = fs.copy_tree(&rp("nothing"), &rp("dst2")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    let size = fs.tree_size(&rp("dst")).await.unwrap();
    let link_len = "../top.txt".len() as u64;
    assert_eq!(size, 3 + 2_500_000 + (8 << 20) + link_len);

    // write_file_atomic: content lands, overwrite replaces it, no temporary left behind.
    fs.write_file_atomic(&rp("dst/meta.json"), b"{\"v\":1}")
        .await
        .unwrap();
    assert_eq!(std::fs::read(dst.join("meta.json")).unwrap(), b"{\"v\":1}");
    fs.write_file_atomic(&rp("dst/meta.json"), b"{\"v\":2}")
        .await
        .unwrap();
    assert_eq!(
        fs.read_file(&rp("dst/meta.json")).await.unwrap().unwrap(),
        b"{\"v\":2}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dst)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(fs.read_file(&rp("dst/none.json")).await.unwrap().is_none());

    // clear_dir keeps the directory; remove_all takes the rest.
    fs.clear_dir(&rp("dst/a")).await.unwrap();
    assert!(dst.join("a").is_dir());
    assert_eq!(std::fs::read_dir(dst.join("a")).unwrap().count(), 0);
    let t0 = Instant::now();
    assert!(fs.remove_all(&rp("src")).await.unwrap());
    eprintln!("remove_all of the source tree: {:?}", t0.elapsed());
    assert!(!src.exists());
    assert!(!fs.remove_all(&rp("src")).await.unwrap());
    assert!(fs.remove_all(&rp("dst")).await.unwrap());
    assert!(!dst.exists());
}

#[tokio::test]
async fn auth_sys_credentials_and_permission_errors() {
    let Some(srv) = server("auth_sys_credentials_and_permission_errors") else {
        return;
    };
    let _shared = SERVER.read().await;
    let s = Scratch::new(&srv, "auth");
    std::fs::create_dir_all(s.on_disk("open")).unwrap();
    std::fs::set_permissions(s.on_disk("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir_all(s.on_disk("closed")).unwrap();
    std::fs::set_permissions(s.on_disk("closed"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let o = NfsOptions {
        uid: 4321,
        gid: 8765,
        ..opts(&srv, &s.name)
    };
    let fs = NfsFs::connect(o).await.unwrap();
    fs.create_file(&rp("open/mine"), 0o644).await.unwrap();
    fs.mkdir(&rp("open/dir"), DirAttrs::default())
        .await
        .unwrap();
    for p in ["open/mine", "open/dir"] {
        let md = std::fs::metadata(s.on_disk(p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (4321, 8765),
            "{p}: server did not see AUTH_SYS uid/gid"
        );
    }
    let err = fs
        .mkdir(&rp("closed/nope"), DirAttrs::default())
        .await
        .unwrap_err();
    match &err {
        Error::FailedPrecondition(m) => {
            assert!(m.contains("closed/nope") && m.contains("4321"), "{m}")
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    assert!(!s.on_disk("closed/nope").exists());
    let err = fs
        .set_attrs(
            &rp("closed"),
            DirAttrs {
                mode: 0o777,
                uid: None,
                gid: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

    // A privileged source port works when we may bind one.
    if rustix::process::geteuid().is_root() {
        let o = NfsOptions {
            privileged_port: true,
            ..opts(&srv, &s.name)
        };
        let fs = NfsFs::connect(o).await.unwrap();
        assert!(fs.stat(&rp("open/mine")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn connect_resolves_names_and_reports_bad_exports() {
    let Some(srv) = server("connect_resolves_names_and_reports_bad_exports") else {
        return;
    };
    let _shared = SERVER.read().await;
    if srv.server == "127.0.0.1" {
        let o = NfsOptions {
            server: "localhost".into(),
            ..opts(&srv, "")
        };
        let fs = NfsFs::connect(o).await.unwrap();
        assert!(fs.fs_stats().await.unwrap().total_bytes > 0);
    }
    let o = NfsOptions {
        export: "/no-such-export".into(),
        ..opts(&srv, "")
    };
    let err = NfsFs::connect(o).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { .. } | Error::FailedPrecondition(_)),
        "{err:?}"
    );

    // A base_dir that is a file is refused at connect.
    let s = Scratch::new(&srv, "basefile");
    std::fs::create_dir_all(&s.disk).unwrap();
    std::fs::write(s.on_disk("file"), b"").unwrap();
    let err = NfsFs::connect(opts(&srv, &format!("{}/file", s.name)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
}

#[tokio::test]
async fn round_trip_latency() {
    let Some(srv) = server("round_trip_latency") else {
        return;
    };
    let _shared = SERVER.read().await;
    let s = Scratch::new(&srv, "lat");
    let t0 = Instant::now();
    let fs = NfsFs::connect(opts(&srv, &s.name)).await.unwrap();
    eprintln!("connect (mount + fsinfo + base mkdir): {:?}", t0.elapsed());
    let n = 200u32;
    let t0 = Instant::now();
    for i in 0..n {
        let p = rp(&format!("d{i}"));
        assert!(fs.mkdir(&p, DirAttrs::default()).await.unwrap());
        assert!(fs.remove_dir(&p).await.unwrap());
    }
    let per = t0.elapsed() / n;
    eprintln!("mkdir+rmdir round trip: {per:?} average over {n}");
    let t0 = Instant::now();
    for _ in 0..n {
        fs.stat(&rp("x")).await.unwrap();
    }
    eprintln!("stat (missing): {:?} average", t0.elapsed() / n);
    // 64 concurrent callers share the pool of 4 connections.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            let p = RelPath::parse("p", &format!("c{i}")).unwrap();
            fs.mkdir(&p, DirAttrs::default()).await.unwrap();
            fs.write_file_atomic(&p.join("f").unwrap(), b"data")
                .await
                .unwrap();
            fs.remove_all(&p).await.unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    eprintln!(
        "64 concurrent mkdir+atomic write+remove_all: {:?}",
        t0.elapsed()
    );
    assert_eq!(std::fs::read_dir(&s.disk).unwrap().count(), 0);
    assert!(per < Duration::from_millis(100), "mkdir+rmdir took {per:?}");
}

/// A listener that accepts connections and never answers: the shape of a hung server.
async fn blackhole() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (port, h)
}

#[tokio::test]
async fn blackholed_and_closed_ports_fail_fast_as_unavailable() {
    // Needs no NFS server: runs everywhere.
    let (port, h) = blackhole().await;
    let o = NfsOptions {
        port: Some(port),
        mount_port: Some(port),
        timeout: Duration::from_millis(300),
        ..NfsOptions::new("127.0.0.1", "/export")
    };
    let t0 = Instant::now();
    let err = NfsFs::connect(o.clone()).await.unwrap_err();
    let took = t0.elapsed();
    match &err {
        Error::Unavailable(m) => assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    eprintln!("blackholed MOUNT: {err} after {took:?}");
    h.abort();

    // Nothing listening: refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = NfsOptions {
        port: Some(closed),
        mount_port: Some(closed),
        ..o
    };
    let t0 = Instant::now();
    let err = NfsFs::connect(o.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(1));

    // A server that accepts and hangs up: end of stream must fail the call at once, not
    // spin until the timeout (the client crate's own read loop treats 0 bytes as "again").
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slam = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            // Read the call first so closing sends a clean FIN rather than a reset.
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            drop(s);
        }
    });
    let o = NfsOptions {
        port: Some(slam),
        mount_port: Some(slam),
        timeout: Duration::from_secs(5),
        ..o
    };
    let t0 = Instant::now();
    let err = NfsFs::connect(o).await.unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(
        took < Duration::from_secs(1),
        "closed connection noticed after {took:?}"
    );
    eprintln!("hang-up: {err} after {took:?}");
    h.abort();
}

/// Sends SIGCONT to a stopped server however the test ends.
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

#[tokio::test]
async fn stalled_server_times_out_then_recovers() {
    let Some(srv) = server("stalled_server_times_out_then_recovers") else {
        return;
    };
    let Some(state) = state_dir("stalled_server_times_out_then_recovers", &srv) else {
        return;
    };
    let _exclusive = SERVER.write().await;
    let s = Scratch::new(&srv, "stall");
    let o = NfsOptions {
        timeout: Duration::from_millis(500),
        ..opts(&srv, &s.name)
    };
    let fs = NfsFs::connect(o).await.unwrap();
    fs.mkdir(&rp("before"), DirAttrs::default()).await.unwrap();

    let pid = std::fs::read_to_string(state.join("ganesha.pid"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let resume = Resume(pid);
    let t0 = Instant::now();
    let err = fs.stat(&rp("before")).await.unwrap_err();
    let took = t0.elapsed();
    eprintln!("stalled server: {err} after {took:?}");
    match &err {
        Error::Unavailable(m) => assert!(m.contains(&srv.server) && m.contains("timed out"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(resume);

    // The timed-out connection was dropped; the next calls work on fresh ones.
    assert!(fs.stat(&rp("before")).await.unwrap().is_some());
    assert!(fs.mkdir(&rp("after"), DirAttrs::default()).await.unwrap());
    assert!(s.on_disk("after").is_dir());
}

#[tokio::test]
async fn reconnects_after_server_restart() {
    let Some(srv) = server("reconnects_after_server_restart") else {
        return;
    };
    let Some(state) = state_dir("reconnects_after_server_restart", &srv) else {
        return;
    };
    let _exclusive = SERVER.write().await;
    let s = Scratch::new(&srv, "restart");
    let fs = NfsFs::connect(opts(&srv, &s.name)).await.unwrap();
    // Fill the pool with several open connections.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            fs.mkdir(
                &RelPath::parse("p", &format!("pre{i}")).unwrap(),
                DirAttrs::default(),
            )
            .await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    fs.create_file(&rp("pre0/f"), 0o644).await.unwrap();

    let sh = ganesha_sh();
    let st = state.to_str().unwrap();
    let ganesha = |cmd: &str| {
        std::process::Command::new(&sh)
            .args([cmd, "--state", st])
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", sh.display()))
            .success()
    };
    let t0 = Instant::now();
    assert!(ganesha("stop"), "ganesha.sh stop failed");
    // `fs` itself makes no call while the server is down, so its pooled connections are
    // still there (dead) when the server is back.
    let down = NfsFs::connect(opts(&srv, &s.name)).await;
    assert!(
        matches!(down, Err(Error::Unavailable(_))),
        "server down: {down:?}"
    );
    assert!(ganesha("start"), "ganesha.sh start failed");
    eprintln!("ganesha restart: {:?}", t0.elapsed());
    let env = std::fs::read_to_string(state.join("env")).unwrap();
    assert!(
        env.contains(&format!("NFS_PORT={}\n", srv.port)),
        "restart moved the port: {env}"
    );

    // First call after the restart is a non-repeatable one: the dead pooled connections
    // must be noticed before use, not fail the call.
    let t0 = Instant::now();
    assert!(fs.mkdir(&rp("post"), DirAttrs::default()).await.unwrap());
    eprintln!("first mkdir after restart: {:?}", t0.elapsed());
    assert!(s.on_disk("post").is_dir());
    // Cached handles from before the restart still work (or are refreshed).
    fs.write_at(&rp("pre0/f"), 0, b"after restart")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(s.on_disk("pre0/f")).unwrap(),
        b"after restart"
    );
    let mut tasks = Vec::new();
    for i in 0..8 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            fs.stat(&RelPath::parse("p", &format!("pre{i}")).unwrap())
                .await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().is_some());
    }
}
