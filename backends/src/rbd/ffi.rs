//! A small hand-written binding to librados and librbd: only the calls Stowage makes.
//!
//! Why our own: the `ceph` crate is librados-only (no RBD), pulls crates with security
//! advisories and mis-handles ioctx destruction; no maintained librbd crate exists.
//!
//! Why loaded at run time (libloading) rather than linked behind a cargo feature: one
//! `stowage-controller` binary serves every backend, and the NFS, GlusterFS or S3 deployments
//! must neither need Ceph's libraries installed nor a second build flavour. CI and developers
//! build the workspace without Ceph headers. librados.so.2 and librbd.so.1 are stable C ABIs
//! (their sonames have not changed since 2012), so declaring the prototypes here is safe; when
//! a library is missing the error names it and the package that ships it.
//!
//! Every call blocks (librados waits for the cluster), so callers run them on the blocking
//! thread pool; `rados_osd_op_timeout` / `rados_mon_op_timeout` bound each one, so an OSD that
//! is down yields ETIMEDOUT instead of a thread stuck forever.

#![allow(non_camel_case_types)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

type rados_t = *mut c_void;
type rados_ioctx_t = *mut c_void;
type rados_write_op_t = *mut c_void;
type rbd_image_t = *mut c_void;
type rbd_image_options_t = *mut c_void;

pub use super::{
    FEATURE_DEEP_FLATTEN, FEATURE_EXCLUSIVE_LOCK, FEATURE_FAST_DIFF, FEATURE_LAYERING,
    FEATURE_OBJECT_MAP,
};

const OPT_FORMAT: c_int = 0;
const OPT_FEATURES: c_int = 1;
const OPT_ORDER: c_int = 2;
const OPT_CLONE_FORMAT: c_int = 12;
const SNAP_NS_USER: c_int = 0;
const CREATE_EXCLUSIVE: c_int = 1;

#[repr(C)]
struct rbd_image_spec_t {
    id: *mut c_char,
    name: *mut c_char,
}

#[repr(C)]
struct rbd_linked_image_spec_t {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

#[repr(C)]
struct rbd_snap_spec_t {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

#[repr(C)]
struct rbd_snap_info_t {
    id: u64,
    size: u64,
    name: *const c_char,
}

#[repr(C)]
struct rbd_trash_image_info_t {
    id: *mut c_char,
    name: *mut c_char,
    source: c_int,
    deletion_time: libc::time_t,
    deferment_end_time: libc::time_t,
}

#[repr(C)]
struct rbd_image_watcher_t {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

/// RBD_LOCK_MODE_EXCLUSIVE (rbd_lock_mode_t in librbd.h).
const LOCK_MODE_EXCLUSIVE: c_int = 0;

#[repr(C)]
#[derive(Default)]
struct rados_cluster_stat_t {
    kb: u64,
    kb_used: u64,
    kb_avail: u64,
    num_objects: u64,
}

/// A failed librados/librbd call: which call, on what, and the errno it returned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CephError {
    #[error("{lib} could not be loaded ({reason}); install the {package} package on this machine")]
    Library {
        lib: &'static str,
        package: &'static str,
        reason: String,
    },
    #[error("{op} {target}: {msg} (errno {errno})")]
    Call {
        op: &'static str,
        target: String,
        errno: i32,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl CephError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            CephError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
    pub fn is(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }
}

pub type CephResult<T> = std::result::Result<T, CephError>;

fn check(op: &'static str, target: &str, rc: c_int) -> CephResult<c_int> {
    if rc >= 0 {
        return Ok(rc);
    }
    let errno = -rc;
    Err(CephError::Call {
        op,
        target: target.to_owned(),
        errno,
        msg: std::io::Error::from_raw_os_error(errno).to_string(),
    })
}

fn cstr(s: &str) -> CephResult<CString> {
    CString::new(s).map_err(|_| CephError::Invalid(format!("{s:?} contains NUL")))
}

/// Copies a C string owned by librados/librbd.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: per the contract above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

macro_rules! api {
    ($( $lib:ident : $name:ident ( $($arg:ty),* ) -> $ret:ty ; )*) => {
        /// Function pointers resolved once from librados.so.2 and librbd.so.1.
        struct Api {
            _rados: libloading::Library,
            _rbd: libloading::Library,
            $( $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        impl Api {
            fn load() -> CephResult<Api> {
                let open = |lib: &'static str, package: &'static str| {
                    // SAFETY: loading a shared library runs its initialisers; librados and
                    // librbd have no initialisers with preconditions on the caller.
                    unsafe { libloading::Library::new(lib) }.map_err(|e| CephError::Library {
                        lib,
                        package,
                        reason: e.to_string(),
                    })
                };
                let rados = open("librados.so.2", "librados2")?;
                let rbd = open("librbd.so.1", "librbd1")?;
                Ok(Api {
                    $( $name: {
                        let lib = match stringify!($lib) { "rados" => &rados, _ => &rbd };
                        // SAFETY: the declared signature matches the C prototype in
                        // rados/librados.h or rbd/librbd.h (Pacific and later).
                        let sym = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                        }
                        .map_err(|e| CephError::Library {
                            lib: if stringify!($lib) == "rados" { "librados.so.2" } else { "librbd.so.1" },
                            package: if stringify!($lib) == "rados" { "librados2" } else { "librbd1" },
                            reason: format!("symbol {}: {e}", stringify!($name)),
                        })?;
                        *sym
                    }, )*
                    _rados: rados,
                    _rbd: rbd,
                })
            }
        }
    };
}

api! {
    rados: rados_create2(*mut rados_t, *const c_char, *const c_char, u64) -> c_int;
    rados: rados_conf_set(rados_t, *const c_char, *const c_char) -> c_int;
    rados: rados_connect(rados_t) -> c_int;
    rados: rados_shutdown(rados_t) -> ();
    rados: rados_cluster_stat(rados_t, *mut rados_cluster_stat_t) -> c_int;
    rados: rados_ioctx_create(rados_t, *const c_char, *mut rados_ioctx_t) -> c_int;
    rados: rados_ioctx_destroy(rados_ioctx_t) -> ();
    rados: rados_read(rados_ioctx_t, *const c_char, *mut c_char, usize, u64) -> c_int;
    rados: rados_remove(rados_ioctx_t, *const c_char) -> c_int;
    rados: rados_write_full(rados_ioctx_t, *const c_char, *const c_char, usize) -> c_int;
    rados: rados_create_write_op() -> rados_write_op_t;
    rados: rados_release_write_op(rados_write_op_t) -> ();
    rados: rados_write_op_create(rados_write_op_t, c_int, *const c_char) -> ();
    rados: rados_write_op_write_full(rados_write_op_t, *const c_char, usize) -> ();
    rados: rados_write_op_operate(rados_write_op_t, rados_ioctx_t, *const c_char, *mut libc::time_t, c_int) -> c_int;
    rbd: rbd_image_options_create(*mut rbd_image_options_t) -> ();
    rbd: rbd_image_options_destroy(rbd_image_options_t) -> ();
    rbd: rbd_image_options_set_uint64(rbd_image_options_t, c_int, u64) -> c_int;
    rbd: rbd_create4(rados_ioctx_t, *const c_char, u64, rbd_image_options_t) -> c_int;
    rbd: rbd_clone3(rados_ioctx_t, *const c_char, *const c_char, rados_ioctx_t, *const c_char, rbd_image_options_t) -> c_int;
    rbd: rbd_remove(rados_ioctx_t, *const c_char) -> c_int;
    rbd: rbd_rename(rados_ioctx_t, *const c_char, *const c_char) -> c_int;
    rbd: rbd_trash_move(rados_ioctx_t, *const c_char, u64) -> c_int;
    rbd: rbd_trash_remove(rados_ioctx_t, *const c_char, bool) -> c_int;
    rbd: rbd_trash_list(rados_ioctx_t, *mut rbd_trash_image_info_t, *mut usize) -> c_int;
    rbd: rbd_trash_list_cleanup(*mut rbd_trash_image_info_t, usize) -> ();
    rbd: rbd_list2(rados_ioctx_t, *mut rbd_image_spec_t, *mut usize) -> c_int;
    rbd: rbd_image_spec_list_cleanup(*mut rbd_image_spec_t, usize) -> ();
    rbd: rbd_open(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_open_by_id(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_close(rbd_image_t) -> c_int;
    rbd: rbd_get_size(rbd_image_t, *mut u64) -> c_int;
    rbd: rbd_get_id(rbd_image_t, *mut c_char, usize) -> c_int;
    rbd: rbd_get_name(rbd_image_t, *mut c_char, *mut usize) -> c_int;
    rbd: rbd_get_features(rbd_image_t, *mut u64) -> c_int;
    rbd: rbd_resize(rbd_image_t, u64) -> c_int;
    rbd: rbd_flatten(rbd_image_t) -> c_int;
    rbd: rbd_get_parent(rbd_image_t, *mut rbd_linked_image_spec_t, *mut rbd_snap_spec_t) -> c_int;
    rbd: rbd_linked_image_spec_cleanup(*mut rbd_linked_image_spec_t) -> ();
    rbd: rbd_snap_spec_cleanup(*mut rbd_snap_spec_t) -> ();
    rbd: rbd_list_children3(rbd_image_t, *mut rbd_linked_image_spec_t, *mut usize) -> c_int;
    rbd: rbd_linked_image_spec_list_cleanup(*mut rbd_linked_image_spec_t, usize) -> ();
    rbd: rbd_snap_create(rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_snap_remove(rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_snap_list(rbd_image_t, *mut rbd_snap_info_t, *mut c_int) -> c_int;
    rbd: rbd_snap_list_end(*mut rbd_snap_info_t) -> ();
    rbd: rbd_snap_get_timestamp(rbd_image_t, u64, *mut libc::timespec) -> c_int;
    rbd: rbd_snap_get_namespace_type(rbd_image_t, u64, *mut c_int) -> c_int;
    rbd: rbd_snap_protect(rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_snap_unprotect(rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_snap_is_protected(rbd_image_t, *const c_char, *mut c_int) -> c_int;
    rbd: rbd_metadata_get(rbd_image_t, *const c_char, *mut c_char, *mut usize) -> c_int;
    rbd: rbd_metadata_set(rbd_image_t, *const c_char, *const c_char) -> c_int;
    rbd: rbd_metadata_remove(rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_metadata_list(rbd_image_t, *const c_char, u64, *mut c_char, *mut usize, *mut c_char, *mut usize) -> c_int;
    rbd: rbd_lock_get_owners(rbd_image_t, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd: rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    rbd: rbd_lock_break(rbd_image_t, c_int, *const c_char) -> c_int;
    rbd: rbd_watchers_list(rbd_image_t, *mut rbd_image_watcher_t, *mut usize) -> c_int;
    rbd: rbd_watchers_list_cleanup(*mut rbd_image_watcher_t, usize) -> ();
}

static API: OnceLock<CephResult<Api>> = OnceLock::new();

fn api() -> CephResult<&'static Api> {
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
}

/// Checks that both libraries load (a clear error at start instead of at the first call).
pub fn ensure_loaded() -> CephResult<()> {
    api().map(|_| ())
}

/// Connection settings. The key is passed to librados in memory, never written or logged.
pub struct ConnectOptions<'a> {
    pub monitors: &'a str,
    pub user: &'a str,
    pub key: &'a str,
    pub op_timeout_secs: u64,
}

/// A connected cluster handle (`rados_t`). librados handles are thread-safe, so one per
/// cluster and user is shared by all calls.
pub struct Cluster {
    h: rados_t,
}

// SAFETY: librados documents rados_t and rados_ioctx_t as safe to use from several threads.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Cluster {
    pub fn connect(o: &ConnectOptions<'_>) -> CephResult<Cluster> {
        let a = api()?;
        let mut h: rados_t = ptr::null_mut();
        let name = cstr(&format!("client.{}", o.user))?;
        let cluster = cstr("ceph")?;
        // SAFETY: out-pointer to a local; name strings outlive the call.
        check("rados_create2", o.user, unsafe {
            (a.rados_create2)(&mut h, cluster.as_ptr(), name.as_ptr(), 0)
        })?;
        let c = Cluster { h };
        let t = o.op_timeout_secs.max(1).to_string();
        // Nothing from /etc/ceph or the environment: the instance config and the CSI secrets
        // say everything, so the same call works on any machine.
        for (k, v) in [
            ("mon_host", o.monitors),
            ("key", o.key),
            ("rados_osd_op_timeout", t.as_str()),
            ("rados_mon_op_timeout", t.as_str()),
            ("client_mount_timeout", t.as_str()),
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),
            ("log_file", ""),
            ("admin_socket", ""),
        ] {
            let (ck, cv) = (cstr(k)?, cstr(v)?);
            // SAFETY: h is a valid handle; strings outlive the call.
            check("rados_conf_set", k, unsafe {
                (a.rados_conf_set)(c.h, ck.as_ptr(), cv.as_ptr())
            })?;
        }
        // SAFETY: configured handle.
        check("rados_connect", o.monitors, unsafe {
            (a.rados_connect)(c.h)
        })?;
        Ok(c)
    }

    pub fn pool(&self, name: &str) -> CephResult<Pool> {
        let a = api()?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        let n = cstr(name)?;
        // SAFETY: connected handle, out-pointer to a local.
        check("rados_ioctx_create", name, unsafe {
            (a.rados_ioctx_create)(self.h, n.as_ptr(), &mut io)
        })?;
        Ok(Pool {
            io,
            name: name.to_owned(),
        })
    }

    /// (total, available) bytes of the cluster's raw capacity.
    pub fn stat(&self) -> CephResult<(u64, u64)> {
        let a = api()?;
        let mut st = rados_cluster_stat_t::default();
        // SAFETY: connected handle, out-pointer to a local struct of the C layout.
        check("rados_cluster_stat", "", unsafe {
            (a.rados_cluster_stat)(self.h, &mut st)
        })?;
        Ok((st.kb.saturating_mul(1024), st.kb_avail.saturating_mul(1024)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: the handle is ours and no Pool outlives it (Pools hold an Arc of us).
            unsafe { (a.rados_shutdown)(self.h) }
        }
    }
}

/// An I/O context on one pool. Owners keep the [`Cluster`] alive longer than every Pool.
pub struct Pool {
    io: rados_ioctx_t,
    pub name: String,
}

// SAFETY: see Cluster.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: the ioctx is ours and destroyed once.
            unsafe { (a.rados_ioctx_destroy)(self.io) }
        }
    }
}

/// Options of a new image or clone.
#[derive(Debug, Clone, Copy)]
pub struct ImageOptions {
    pub features: u64,
    /// log2 of the object size; 22 = 4 MiB, librbd's default.
    pub order: u64,
}

struct Opts(rbd_image_options_t);

impl Opts {
    fn new(a: &Api, o: &ImageOptions, clone: bool) -> CephResult<Opts> {
        let mut h: rbd_image_options_t = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { (a.rbd_image_options_create)(&mut h) };
        let opts = Opts(h);
        let set = |k: c_int, v: u64| {
            // SAFETY: h is a live options handle.
            check("rbd_image_options_set", "", unsafe {
                (a.rbd_image_options_set_uint64)(opts.0, k, v)
            })
            .map(|_| ())
        };
        set(OPT_FEATURES, o.features)?;
        set(OPT_ORDER, o.order)?;
        if clone {
            // Clone v2: the parent snapshot needs no protection and can be removed (it moves
            // to the trash namespace) while clones exist.
            set(OPT_CLONE_FORMAT, 2)?;
        } else {
            set(OPT_FORMAT, 2)?;
        }
        Ok(opts)
    }
}

impl Drop for Opts {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: created by rbd_image_options_create, destroyed once.
            unsafe { (a.rbd_image_options_destroy)(self.0) }
        }
    }
}

/// An entry of the RBD trash.
#[derive(Debug, Clone)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
}

impl Pool {
    pub fn create_image(&self, name: &str, size: u64, o: &ImageOptions) -> CephResult<()> {
        let a = api()?;
        let opts = Opts::new(a, o, false)?;
        let n = cstr(name)?;
        // SAFETY: live ioctx and options; name outlives the call.
        check("rbd_create4", name, unsafe {
            (a.rbd_create4)(self.io, n.as_ptr(), size, opts.0)
        })
        .map(|_| ())
    }

    /// Clone v2 of `parent@snap` into `child` (same pool).
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child: &str,
        o: &ImageOptions,
    ) -> CephResult<()> {
        let a = api()?;
        let opts = Opts::new(a, o, true)?;
        let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        // SAFETY: live ioctx (used as both parent and child pool) and options.
        check("rbd_clone3", child, unsafe {
            (a.rbd_clone3)(self.io, p.as_ptr(), s.as_ptr(), self.io, c.as_ptr(), opts.0)
        })
        .map(|_| ())
    }

    pub fn remove_image(&self, name: &str) -> CephResult<()> {
        let a = api()?;
        let n = cstr(name)?;
        // SAFETY: live ioctx.
        check("rbd_remove", name, unsafe {
            (a.rbd_remove)(self.io, n.as_ptr())
        })
        .map(|_| ())
    }

    pub fn rename(&self, from: &str, to: &str) -> CephResult<()> {
        let a = api()?;
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: live ioctx (source and destination pool are the same).
        check("rbd_rename", from, unsafe {
            (a.rbd_rename)(self.io, f.as_ptr(), t.as_ptr())
        })
        .map(|_| ())
    }

    pub fn trash_move(&self, name: &str) -> CephResult<()> {
        let a = api()?;
        let n = cstr(name)?;
        // SAFETY: live ioctx.
        check("rbd_trash_move", name, unsafe {
            (a.rbd_trash_move)(self.io, n.as_ptr(), 0)
        })
        .map(|_| ())
    }

    pub fn trash_remove(&self, id: &str) -> CephResult<()> {
        let a = api()?;
        let n = cstr(id)?;
        // SAFETY: live ioctx.
        check("rbd_trash_remove", id, unsafe {
            (a.rbd_trash_remove)(self.io, n.as_ptr(), true)
        })
        .map(|_| ())
    }

    pub fn trash_list(&self) -> CephResult<Vec<TrashEntry>> {
        let a = api()?;
        let mut cap: usize = 64;
        loop {
            let mut buf: Vec<rbd_trash_image_info_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: buf has room for `n` entries; on ERANGE librbd writes none and sets n.
            let rc = unsafe { (a.rbd_trash_list)(self.io, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check("rbd_trash_list", &self.name, rc)?;
            // SAFETY: librbd filled `n` entries.
            unsafe { buf.set_len(n) };
            let out = buf
                .iter()
                // SAFETY: filled entries hold valid strings until cleanup.
                .map(|e| unsafe {
                    TrashEntry {
                        id: owned(e.id),
                        name: owned(e.name),
                    }
                })
                .collect();
            // SAFETY: frees what librbd allocated inside the entries.
            unsafe { (a.rbd_trash_list_cleanup)(buf.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// (id, name) of every image in the pool's directory (not the trash).
    pub fn list_images(&self) -> CephResult<Vec<(String, String)>> {
        let a = api()?;
        let mut cap: usize = 256;
        loop {
            let mut buf: Vec<rbd_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: as in trash_list.
            let rc = unsafe { (a.rbd_list2)(self.io, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check("rbd_list2", &self.name, rc)?;
            // SAFETY: librbd filled `n` entries.
            unsafe { buf.set_len(n) };
            // SAFETY: valid strings until cleanup.
            let out = buf
                .iter()
                .map(|e| unsafe { (owned(e.id), owned(e.name)) })
                .collect();
            // SAFETY: frees the strings librbd allocated.
            unsafe { (a.rbd_image_spec_list_cleanup)(buf.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    pub fn open(&self, name: &str) -> CephResult<Image> {
        let a = api()?;
        let n = cstr(name)?;
        let mut h: rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx, out-pointer to a local, NULL snapshot = the head.
        check("rbd_open", name, unsafe {
            (a.rbd_open)(self.io, n.as_ptr(), &mut h, ptr::null())
        })?;
        Ok(Image {
            h,
            name: name.to_owned(),
        })
    }

    /// Opens by image ID: works for images in the trash too.
    pub fn open_by_id(&self, id: &str) -> CephResult<Image> {
        let a = api()?;
        let n = cstr(id)?;
        let mut h: rbd_image_t = ptr::null_mut();
        // SAFETY: as in open.
        check("rbd_open_by_id", id, unsafe {
            (a.rbd_open_by_id)(self.io, n.as_ptr(), &mut h, ptr::null())
        })?;
        Ok(Image {
            h,
            name: id.to_owned(),
        })
    }

    /// Reads a whole small RADOS object; None when it does not exist.
    pub fn read_object(&self, oid: &str) -> CephResult<Option<Vec<u8>>> {
        let a = api()?;
        let o = cstr(oid)?;
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: buf is writable for its length.
        let rc =
            unsafe { (a.rados_read)(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        let n = check("rados_read", oid, rc)? as usize;
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Creates an object with `data`; Err(EEXIST) when it already exists (an atomic claim).
    pub fn create_object(&self, oid: &str, data: &[u8]) -> CephResult<()> {
        let a = api()?;
        let o = cstr(oid)?;
        // SAFETY: a fresh write op, released below whatever happens.
        let op = unsafe { (a.rados_create_write_op)() };
        if op.is_null() {
            return Err(CephError::Invalid("rados_create_write_op failed".into()));
        }
        // SAFETY: op is live; data outlives operate().
        let rc = unsafe {
            (a.rados_write_op_create)(op, CREATE_EXCLUSIVE, ptr::null());
            (a.rados_write_op_write_full)(op, data.as_ptr().cast(), data.len());
            let rc = (a.rados_write_op_operate)(op, self.io, o.as_ptr(), ptr::null_mut(), 0);
            (a.rados_release_write_op)(op);
            rc
        };
        check("rados_write_op_operate", oid, rc).map(|_| ())
    }

    pub fn write_object(&self, oid: &str, data: &[u8]) -> CephResult<()> {
        let a = api()?;
        let o = cstr(oid)?;
        // SAFETY: data is readable for its length.
        check("rados_write_full", oid, unsafe {
            (a.rados_write_full)(self.io, o.as_ptr(), data.as_ptr().cast(), data.len())
        })
        .map(|_| ())
    }

    /// Removes an object; Ok when it was not there.
    pub fn remove_object(&self, oid: &str) -> CephResult<()> {
        let a = api()?;
        let o = cstr(oid)?;
        // SAFETY: live ioctx.
        let rc = unsafe { (a.rados_remove)(self.io, o.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        check("rados_remove", oid, rc).map(|_| ())
    }
}

/// A user snapshot of an image.
#[derive(Debug, Clone)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub created: i64,
}

/// The parent of a clone.
#[derive(Debug, Clone)]
pub struct Parent {
    pub image_id: String,
    pub image_name: String,
    pub snap_name: String,
    pub in_trash: bool,
}

/// An open image. Not shared between threads: each operation opens its own.
pub struct Image {
    h: rbd_image_t,
    pub name: String,
}

// SAFETY: an rbd_image_t may move between threads as long as calls on it are not concurrent;
// Image is not Sync, so they cannot be.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: opened by rbd_open*, closed once.
            unsafe { (a.rbd_close)(self.h) };
        }
    }
}

impl Image {
    pub fn size(&self) -> CephResult<u64> {
        let a = api()?;
        let mut s = 0u64;
        // SAFETY: open image, out-pointer to a local.
        check("rbd_get_size", &self.name, unsafe {
            (a.rbd_get_size)(self.h, &mut s)
        })?;
        Ok(s)
    }

    pub fn id(&self) -> CephResult<String> {
        let a = api()?;
        let mut buf = [0 as c_char; 64];
        // SAFETY: buf is writable for its length.
        check("rbd_get_id", &self.name, unsafe {
            (a.rbd_get_id)(self.h, buf.as_mut_ptr(), buf.len())
        })?;
        // SAFETY: librbd wrote a NUL-terminated string into buf.
        Ok(unsafe { owned(buf.as_ptr()) })
    }

    /// The image's current name (also for an image opened by ID).
    pub fn current_name(&self) -> CephResult<String> {
        let a = api()?;
        let mut len: usize = 128;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: buf is writable for len bytes.
            let rc = unsafe { (a.rbd_get_name)(self.h, buf.as_mut_ptr().cast(), &mut len) };
            if rc == -libc::ERANGE {
                continue;
            }
            check("rbd_get_name", &self.name, rc)?;
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
    }

    pub fn features(&self) -> CephResult<u64> {
        let a = api()?;
        let mut f = 0u64;
        // SAFETY: open image.
        check("rbd_get_features", &self.name, unsafe {
            (a.rbd_get_features)(self.h, &mut f)
        })?;
        Ok(f)
    }

    pub fn resize(&self, size: u64) -> CephResult<()> {
        let a = api()?;
        // SAFETY: open image.
        check("rbd_resize", &self.name, unsafe {
            (a.rbd_resize)(self.h, size)
        })
        .map(|_| ())
    }

    pub fn flatten(&self) -> CephResult<()> {
        let a = api()?;
        // SAFETY: open image.
        check("rbd_flatten", &self.name, unsafe {
            (a.rbd_flatten)(self.h)
        })
        .map(|_| ())
    }

    pub fn parent(&self) -> CephResult<Option<Parent>> {
        let a = api()?;
        // SAFETY: zeroed C structs are valid "empty" values for librbd to fill.
        let mut img: rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        let mut snap: rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image, out-pointers to locals.
        let rc = unsafe { (a.rbd_get_parent)(self.h, &mut img, &mut snap) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check("rbd_get_parent", &self.name, rc)?;
        // SAFETY: filled by librbd; cleaned up right after copying.
        let p = unsafe {
            let p = Parent {
                image_id: owned(img.image_id),
                image_name: owned(img.image_name),
                snap_name: owned(snap.name),
                in_trash: img.trash,
            };
            (a.rbd_linked_image_spec_cleanup)(&mut img);
            (a.rbd_snap_spec_cleanup)(&mut snap);
            p
        };
        Ok(Some(p))
    }

    /// Clones of any snapshot of this image: (image id, in trash).
    pub fn children(&self) -> CephResult<Vec<(String, bool)>> {
        let a = api()?;
        let mut cap: usize = 16;
        loop {
            let mut buf: Vec<rbd_linked_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: as in trash_list.
            let rc = unsafe { (a.rbd_list_children3)(self.h, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check("rbd_list_children3", &self.name, rc)?;
            // SAFETY: filled by librbd.
            unsafe { buf.set_len(n) };
            // SAFETY: valid strings until cleanup.
            let out = buf
                .iter()
                .map(|e| unsafe { (owned(e.image_id), e.trash) })
                .collect();
            // SAFETY: frees the strings librbd allocated.
            unsafe { (a.rbd_linked_image_spec_list_cleanup)(buf.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    pub fn snap_create(&self, snap: &str) -> CephResult<()> {
        let a = api()?;
        let s = cstr(snap)?;
        // SAFETY: open image.
        check(
            "rbd_snap_create",
            &format!("{}@{snap}", self.name),
            unsafe { (a.rbd_snap_create)(self.h, s.as_ptr()) },
        )
        .map(|_| ())
    }

    /// Removes a snapshot, unprotecting it first if a v1 client protected it. With clone v2 a
    /// snapshot that still has clones moves to the trash namespace and goes away with its
    /// last clone.
    pub fn snap_remove(&self, snap: &str) -> CephResult<()> {
        let a = api()?;
        let s = cstr(snap)?;
        let mut prot: c_int = 0;
        // SAFETY: open image, out-pointer to a local.
        let rc = unsafe { (a.rbd_snap_is_protected)(self.h, s.as_ptr(), &mut prot) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        if rc == 0 && prot != 0 {
            // SAFETY: open image.
            let rc = unsafe { (a.rbd_snap_unprotect)(self.h, s.as_ptr()) };
            if rc != -libc::EINVAL {
                check("rbd_snap_unprotect", snap, rc)?;
            }
        }
        // SAFETY: open image.
        let rc = unsafe { (a.rbd_snap_remove)(self.h, s.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        check("rbd_snap_remove", &format!("{}@{snap}", self.name), rc).map(|_| ())
    }

    pub fn snap_protect(&self, snap: &str) -> CephResult<()> {
        let a = api()?;
        let s = cstr(snap)?;
        // SAFETY: open image.
        let rc = unsafe { (a.rbd_snap_protect)(self.h, s.as_ptr()) };
        if rc == -libc::EBUSY {
            return Ok(()); // already protected
        }
        check("rbd_snap_protect", snap, rc).map(|_| ())
    }

    /// User snapshots (not the trash-namespace ones that only clones keep alive).
    pub fn snaps(&self) -> CephResult<Vec<SnapInfo>> {
        let a = api()?;
        let mut cap: c_int = 16;
        loop {
            let mut buf: Vec<rbd_snap_info_t> = Vec::with_capacity(cap as usize + 1);
            let mut n = cap;
            // SAFETY: room for `cap` entries (+1 for the terminator librbd writes).
            let rc = unsafe { (a.rbd_snap_list)(self.h, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            let count = check("rbd_snap_list", &self.name, rc)? as usize;
            // SAFETY: librbd filled `count` entries.
            unsafe { buf.set_len(count) };
            let mut out = Vec::with_capacity(count);
            for e in &buf {
                let mut ns: c_int = SNAP_NS_USER;
                // SAFETY: open image, out-pointer to a local.
                let _ = unsafe { (a.rbd_snap_get_namespace_type)(self.h, e.id, &mut ns) };
                if ns != SNAP_NS_USER {
                    continue;
                }
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: as above.
                let _ = unsafe { (a.rbd_snap_get_timestamp)(self.h, e.id, &mut ts) };
                out.push(SnapInfo {
                    id: e.id,
                    // SAFETY: valid until rbd_snap_list_end.
                    name: unsafe { owned(e.name) },
                    size: e.size,
                    created: ts.tv_sec,
                });
            }
            if count > 0 {
                // SAFETY: frees the names librbd allocated.
                unsafe { (a.rbd_snap_list_end)(buf.as_mut_ptr()) };
            }
            return Ok(out);
        }
    }

    pub fn metadata_get(&self, key: &str) -> CephResult<Option<String>> {
        let a = api()?;
        let k = cstr(key)?;
        let mut len: usize = 4096;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: buf is writable for len bytes.
            let rc = unsafe {
                (a.rbd_metadata_get)(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            if rc == -libc::ENOENT {
                return Ok(None);
            }
            if rc == -libc::ERANGE {
                continue;
            }
            check("rbd_metadata_get", key, rc)?;
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> CephResult<()> {
        let a = api()?;
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: open image.
        check("rbd_metadata_set", key, unsafe {
            (a.rbd_metadata_set)(self.h, k.as_ptr(), v.as_ptr())
        })
        .map(|_| ())
    }

    pub fn metadata_remove(&self, key: &str) -> CephResult<()> {
        let a = api()?;
        let k = cstr(key)?;
        // SAFETY: open image.
        let rc = unsafe { (a.rbd_metadata_remove)(self.h, k.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        check("rbd_metadata_remove", key, rc).map(|_| ())
    }

    /// All metadata keys and values.
    pub fn metadata_list(&self) -> CephResult<Vec<(String, String)>> {
        let a = api()?;
        let (mut klen, mut vlen) = (8192usize, 65536usize);
        loop {
            let mut keys = vec![0u8; klen];
            let mut vals = vec![0u8; vlen];
            let start = cstr("")?;
            // SAFETY: both buffers are writable for their lengths.
            let rc = unsafe {
                (a.rbd_metadata_list)(
                    self.h,
                    start.as_ptr(),
                    0,
                    keys.as_mut_ptr().cast(),
                    &mut klen,
                    vals.as_mut_ptr().cast(),
                    &mut vlen,
                )
            };
            if rc == -libc::ERANGE {
                continue;
            }
            check("rbd_metadata_list", &self.name, rc)?;
            keys.truncate(klen);
            vals.truncate(vlen);
            let ks = keys.split(|b| *b == 0).filter(|s| !s.is_empty());
            let vs = vals.split(|b| *b == 0);
            return Ok(ks
                .zip(vs)
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect());
        }
    }

    /// Addresses of the clients watching the image header (e.g. "127.0.0.1:0/816197711"),
    /// in the form [`Self::lock_owners`] gives: every client that has the image open, our
    /// own handle included. A client that died keeps its watch until the OSD's
    /// `osd_client_watch_timeout` expires.
    pub fn watchers(&self) -> CephResult<Vec<String>> {
        let a = api()?;
        let mut cap: usize = 16;
        loop {
            let mut buf: Vec<rbd_image_watcher_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: buf has room for `n` entries; on ERANGE librbd writes none and sets n.
            let rc = unsafe { (a.rbd_watchers_list)(self.h, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check("rbd_watchers_list", &self.name, rc)?;
            // SAFETY: librbd filled `n` entries.
            unsafe { buf.set_len(n) };
            // SAFETY: valid strings until cleanup.
            let out = buf.iter().map(|w| unsafe { owned(w.addr) }).collect();
            // SAFETY: frees the strings librbd allocated.
            unsafe { (a.rbd_watchers_list_cleanup)(buf.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Breaks the exclusive lock of `owner` (an address from [`Self::lock_owners`]). librbd
    /// blocklists the owner first (`rbd_blocklist_on_break_lock`, on by default), as `rbd lock
    /// rm` does, so a client that was only cut off cannot write after its lock is gone.
    /// EBUSY: the lock has another owner by now; ENOENT: no lock any more.
    pub fn lock_break(&self, owner: &str) -> CephResult<()> {
        let a = api()?;
        let o = cstr(owner)?;
        // SAFETY: open image, the owner string outlives the call.
        check("rbd_lock_break", &self.name, unsafe {
            (a.rbd_lock_break)(self.h, LOCK_MODE_EXCLUSIVE, o.as_ptr())
        })
        .map(|_| ())
    }

    /// Who holds the exclusive lock (its client address, e.g. "127.0.0.1:0/816197711").
    pub fn lock_owners(&self) -> CephResult<Vec<String>> {
        let a = api()?;
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n: usize = owners.len();
        // SAFETY: room for 8 owner pointers (an exclusive lock has one).
        let rc = unsafe { (a.rbd_lock_get_owners)(self.h, &mut mode, owners.as_mut_ptr(), &mut n) };
        if rc == -libc::ENOENT || rc == -libc::EOPNOTSUPP || rc == -libc::EINVAL {
            return Ok(Vec::new());
        }
        check("rbd_lock_get_owners", &self.name, rc)?;
        // SAFETY: librbd filled n owners; cleaned up once.
        let out = unsafe {
            let out = owners[..n].iter().map(|p| owned(*p)).collect();
            (a.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n);
            out
        };
        Ok(out)
    }
}
