//! [`Fs`] over NFSv3 from user space, with the pure-Rust `nfs3_client` crate: the controller
//! creates, copies and deletes volume directories on the NFS server without mounting anything,
//! so it needs no privileges, no kernel NFS client and no mount namespace.
//!
//! How it talks to the server:
//! - [`NfsFs::connect`] is eager: it resolves the server name, asks the portmapper for the
//!   ports that were not given, mounts the export (MOUNT v3, then UMNT right away: NFSv3 file
//!   handles do not depend on mount state, and the server's mount list stays clean), reads
//!   FSINFO for the transfer sizes and looks up (creating if missing) `base_dir`. A wrong export,
//!   refused credentials or an unreachable server therefore fail at startup, not at the first
//!   volume request.
//! - RPCs go over a small pool of TCP connections, each carrying one call at a time (the crate
//!   has no request pipelining). Connections open lazily; an idle connection the server closed
//!   (restart) is dropped before use, and an I/O failure on a reused connection is retried once
//!   on a fresh one for procedures that are safe to repeat.
//! - Every attempt (pool wait + connect + call) is bounded by [`NfsOptions::timeout`]; running
//!   out of it gives [`Error::Unavailable`] naming the server.
//! - Credentials are AUTH_SYS with the configured uid/gid; the source port is unprivileged
//!   unless [`NfsOptions::privileged_port`] (needs root or CAP_NET_BIND_SERVICE).
//! - Paths resolve by LOOKUP, one component at a time from the base handle, so symlinks inside
//!   volumes are never followed (LOOKUP returns the link itself; using it as a directory fails
//!   with NOTDIR). Handles are cached for a few seconds and dropped on our own remove and
//!   rename. Changes made behind our back are caught where they show: a stale handle clears
//!   the cache, mounts again and retries the operation once; a "does not exist" answer (or an
//!   unlinked directory) reached through a cached handle is asked again without the cache.
//!   A directory renamed by someone else can still be seen under its old name until its cache
//!   entry expires.
//!
//! The server name is resolved once, at connect; a server that moves needs a new `NfsFs`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::nfs3_types::mount::{dirpath, mountstat3};
use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, FSINFO3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args,
    Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args,
    RMDIR3args, SETATTR3args, SYMLINK3args, WRITE3args, cookieverf3, createhow3, diropargs3,
    fattr3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, sattr3, stable_how, symlinkdata3,
};
use nfs3_client::nfs3_types::portmap::IPPROTO_TCP;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::nfs3_types::{mount as mnt3, nfs3};
use nfs3_client::{MountClient, MountError, Nfs3Client, PortmapError, PortmapperClient, RpcError};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use super::{COPY_CHUNK, DirAttrs, DirEntry, FileKind, FileStat, Fs, FsStats};
use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// Where and how to reach the NFS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsOptions {
    /// IP literal (v4, v6, optionally in brackets) or host name, resolved at connect.
    pub server: String,
    /// Export path as the MOUNT protocol knows it, e.g. `/export` (ganesha: the pseudo path).
    pub export: String,
    /// Directory inside the export that is this filesystem's base, created if missing;
    /// `""` = the export root.
    pub base_dir: String,
    /// NFS port; `None` asks the portmapper (port 111).
    pub port: Option<u16>,
    /// MOUNT port; `None` asks the portmapper.
    pub mount_port: Option<u16>,
    /// AUTH_SYS credentials sent with every call.
    pub uid: u32,
    pub gid: u32,
    /// Connect from a source port below 1024 (servers exporting with `secure`).
    pub privileged_port: bool,
    /// Most concurrent RPCs (one TCP connection each); 0 is treated as 1.
    pub pool_size: usize,
    /// Bound on each RPC attempt, including waiting for a pooled connection and connecting.
    pub timeout: Duration,
}

impl NfsOptions {
    /// Options with the usual defaults: export root as base, ports from the portmapper,
    /// root credentials, unprivileged source port, 4 connections, 10 s timeout.
    pub fn new(server: impl Into<String>, export: impl Into<String>) -> Self {
        NfsOptions {
            server: server.into(),
            export: export.into(),
            base_dir: String::new(),
            port: None,
            mount_port: None,
            uid: 0,
            gid: 0,
            privileged_port: false,
            pool_size: 4,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How long a cached handle is trusted. Short, because other clients (pods writing into a
/// volume) may rename things behind our back; long enough to serve a copy or delete walk.
const HANDLE_TTL: Duration = Duration::from_secs(5);
/// Above this many cached handles the cache starts over, which is simpler than LRU and cheap
/// (a miss costs one LOOKUP per path component).
const HANDLE_CACHE_MAX: usize = 4096;
/// READDIRPLUS sizes: ~64 KiB replies keep the number of round trips low for big directories
/// while staying far below any server's limit.
const READDIR_DIRCOUNT: u32 = 16 * 1024;
const READDIR_MAXCOUNT: u32 = 64 * 1024;
const BASE_DIR_MODE: u32 = 0o755;
const PRIV_PORT_LOW: u16 = 300;
const PRIV_PORT_HIGH: u16 = 1023;
const PRIV_PORT_TRIES: u16 = 64;
const PORTMAP_PORT: u16 = 111;

/// A directory-tree filesystem on an NFSv3 export. Cheap to clone (shared state).
#[derive(Clone)]
pub struct NfsFs {
    inner: Arc<Inner>,
}

impl fmt::Debug for NfsFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsFs")
            .field("server", &self.inner.pool.label)
            .field("base_dir", &self.inner.opts.base_dir)
            .finish()
    }
}

struct Inner {
    opts: NfsOptions,
    ip: IpAddr,
    mount_port: u16,
    pool: Pool,
    /// Handle of `base_dir`; replaced when the server reports it stale.
    base: RwLock<nfs_fh3>,
    cache: Mutex<HandleCache>,
    /// Transfer sizes from FSINFO, capped at COPY_CHUNK.
    rsize: AtomicU32,
    wsize: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent on panic (single inserts/removes), so poisoning is
    // not a reason to fail every later call.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Failure of one attempt at an operation, telling [`NfsFs::run`] whether another may help.
enum OpError {
    /// The server called a handle we used stale: drop every cached handle, mount again, retry.
    Stale(String),
    /// "Not there" was answered inside a directory whose handle came from the cache. That
    /// directory may have been removed and recreated behind our back (its old handle then
    /// still works but names an empty, unlinked directory): ask again without the cache.
    Recheck(String),
    Fail(Error),
}

/// Whether an attempt may use cached handles. The second attempt after a `Recheck` or `Stale`
/// resolves every path from the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Cached,
    Fresh,
}

/// A resolved handle and whether any cached handle was used to find it.
struct Resolved {
    fh: nfs_fh3,
    cached: bool,
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::Fail(e)
    }
}

type OpResult<T> = std::result::Result<T, OpError>;

/// Calls one NFS procedure through the pool: `rpc!(self, "LOOKUP", path, idempotent, lookup, args)`.
macro_rules! rpc {
    ($inner:expr, $op:literal, $path:expr, $idempotent:expr, $method:ident, $args:expr) => {{
        let args = $args;
        let args = &args;
        $inner
            .pool
            .call($op, $path, $idempotent, move |mut c| async move {
                let r = c.$method(args).await;
                (c, r)
            })
            .await
    }};
}

impl NfsFs {
    /// Connects and mounts eagerly (see the module docs); `Error::Unavailable` when the server
    /// cannot be reached in time, so a caller may retry later.
    pub async fn connect(opts: NfsOptions) -> Result<NfsFs> {
        if opts.server.trim().is_empty() {
            return Err(Error::invalid("server", "must not be empty"));
        }
        if !opts.export.starts_with('/') {
            return Err(Error::invalid(
                "export",
                "must be an absolute path such as /export",
            ));
        }
        if !opts.base_dir.is_empty() {
            RelPath::parse("base_dir", &opts.base_dir)?;
        }
        if opts.timeout.is_zero() {
            return Err(Error::invalid("timeout", "must be greater than zero"));
        }
        let ip = resolve_host(&opts.server, opts.timeout).await?;
        let (nfs_port, mount_port) = match (opts.port, opts.mount_port) {
            (Some(n), Some(m)) => (n, m),
            _ => {
                let (n, m) = portmap_ports(ip, &opts).await?;
                (opts.port.unwrap_or(n), opts.mount_port.unwrap_or(m))
            }
        };
        let label = if opts.server.parse::<IpAddr>().is_ok() {
            format!("NFS server {}", SocketAddr::new(ip, nfs_port))
        } else {
            format!(
                "NFS server {} ({})",
                opts.server,
                SocketAddr::new(ip, nfs_port)
            )
        };
        let pool = Pool {
            addr: SocketAddr::new(ip, nfs_port),
            privileged: opts.privileged_port,
            cred: auth_sys(opts.uid, opts.gid),
            uid: opts.uid,
            gid: opts.gid,
            timeout: opts.timeout,
            label,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(opts.pool_size.max(1)),
        };
        let inner = Inner {
            ip,
            mount_port,
            pool,
            base: RwLock::new(nfs_fh3::default()),
            cache: Mutex::new(HandleCache::default()),
            rsize: AtomicU32::new(COPY_CHUNK),
            wsize: AtomicU32::new(COPY_CHUNK),
            opts,
        };
        let root = inner.mount_root().await?;
        inner.read_fsinfo(&root).await?;
        let base = inner.open_base(root).await?;
        *inner.base.write().unwrap_or_else(PoisonError::into_inner) = base;
        Ok(NfsFs {
            inner: Arc::new(inner),
        })
    }

    pub fn options(&self) -> &NfsOptions {
        &self.inner.opts
    }

    /// Runs an operation with cached handles and, when the answer may be due to an outdated
    /// handle, once more without them (after re-mounting when the server said "stale").
    async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Pass) -> Fut + Send,
        Fut: Future<Output = OpResult<T>> + Send,
        T: Send,
    {
        let first = match f(Pass::Cached).await {
            Ok(v) => return Ok(v),
            Err(OpError::Fail(e)) => return Err(e),
            Err(OpError::Recheck(what)) => {
                tracing::trace!(server = %self.inner.pool.label, %what, "negative answer under a cached handle; re-resolving");
                what
            }
            Err(OpError::Stale(what)) => {
                tracing::debug!(server = %self.inner.pool.label, %what, "stale NFS file handle; re-resolving");
                lock(&self.inner.cache).clear();
                self.inner.refresh_base().await?;
                what
            }
        };
        match f(Pass::Fresh).await {
            Ok(v) => Ok(v),
            Err(OpError::Fail(e)) => Err(e),
            // A fresh pass uses no cached handle, so only a handle that went stale during the
            // call itself lands here.
            Err(OpError::Stale(what) | OpError::Recheck(what)) => Err(Error::Internal(format!(
                "{}: {what}: file handle stale again after re-resolving (first: {first})",
                self.inner.pool.label
            ))),
        }
    }
}

impl Inner {
    fn base(&self) -> nfs_fh3 {
        self.base
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Path as it appears on the server, for error messages.
    fn disp(&self, rel: &str) -> String {
        let mut s = self.opts.export.trim_end_matches('/').to_owned();
        for part in [self.opts.base_dir.as_str(), rel] {
            if !part.is_empty() {
                s.push('/');
                s.push_str(part);
            }
        }
        s
    }

    /// Maps an NFS status (anything but NOENT, which callers handle themselves) to our error.
    fn status_err(&self, op: &'static str, rel: &str, st: nfsstat3) -> OpError {
        let path = self.disp(rel);
        let server = &self.pool.label;
        let e = match st {
            nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_BADHANDLE => {
                return OpError::Stale(format!("{op} {path}: {st}"));
            }
            nfsstat3::NFS3ERR_NOENT => Error::not_found("path", path),
            nfsstat3::NFS3ERR_EXIST => Error::AlreadyExists(format!("{path} already exists")),
            nfsstat3::NFS3ERR_NOTEMPTY => {
                Error::FailedPrecondition(format!("{path}: directory not empty"))
            }
            nfsstat3::NFS3ERR_NOSPC | nfsstat3::NFS3ERR_DQUOT => {
                Error::ResourceExhausted(format!("{server}: no space left for {op} {path} ({st})"))
            }
            nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => Error::FailedPrecondition(format!(
                "{op} {path}: permission denied by {server} for uid {} gid {} ({st})",
                self.opts.uid, self.opts.gid
            )),
            nfsstat3::NFS3ERR_NOTDIR => Error::FailedPrecondition(format!(
                "{op} {path}: a path component is not a directory ({st})"
            )),
            nfsstat3::NFS3ERR_ISDIR => {
                Error::FailedPrecondition(format!("{op} {path}: is a directory ({st})"))
            }
            nfsstat3::NFS3ERR_ROFS => {
                Error::FailedPrecondition(format!("{op} {path}: {server} exports read-only ({st})"))
            }
            nfsstat3::NFS3ERR_NAMETOOLONG => Error::invalid("path", format!("{path}: {st}")),
            nfsstat3::NFS3ERR_FBIG => {
                Error::OutOfRange(format!("{op} {path}: file too large ({st})"))
            }
            // The server asks to come back later (grace period, busy backend).
            nfsstat3::NFS3ERR_JUKEBOX => Error::Unavailable(format!(
                "{server}: {op} {path}: server busy, retry later ({st})"
            )),
            _ => Error::Internal(format!("{server}: {op} {path}: {st}")),
        };
        OpError::Fail(e)
    }

    /// `status_err`, except that NOENT under a cached directory handle asks for a recheck.
    fn fail(&self, op: &'static str, rel: &str, st: nfsstat3, cached: bool) -> OpError {
        if st == nfsstat3::NFS3ERR_NOENT && cached {
            return OpError::Recheck(format!("{op} {rel}"));
        }
        self.status_err(op, rel, st)
    }

    fn cache_get(&self, rel: &str) -> Option<nfs_fh3> {
        lock(&self.cache).get(rel)
    }

    fn cache_put(&self, rel: &str, fh: &nfs_fh3) {
        lock(&self.cache).put(rel, fh);
    }

    fn cache_forget(&self, rel: &str) {
        lock(&self.cache).forget_tree(rel);
    }

    // ---- connection setup ----

    /// MOUNT the export and return its root handle.
    async fn mount_root(&self) -> Result<nfs_fh3> {
        let server = self.pool.label.clone();
        let export = self.opts.export.clone();
        let addr = SocketAddr::new(self.ip, self.mount_port);
        let work = async {
            let stream = connect_tcp(addr, self.opts.privileged_port)
                .await
                .map_err(|e| self.pool.connect_err(&format!("MOUNT port {addr}"), e))?;
            let mut client = MountClient::new_with_auth(
                Conn(Arc::new(stream)),
                self.pool.cred.clone(),
                opaque_auth::default(),
            );
            let ok = client
                .mnt(dirpath(Opaque::borrowed(export.as_bytes())))
                .await
                .map_err(|e| self.mount_err(e))?;
            // Handles stay valid without mount state; unmounting keeps the server's mount
            // list from growing with every reconnect. Best effort.
            let _ = client
                .umnt(dirpath(Opaque::borrowed(export.as_bytes())))
                .await;
            Ok::<_, Error>(nfs_fh3 {
                data: Opaque::owned(ok.fhandle.0.into_owned()),
            })
        };
        tokio::time::timeout(self.opts.timeout, work)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "{server}: MOUNT {export} via {addr} timed out after {:?}",
                    self.opts.timeout
                ))
            })?
    }

    fn mount_err(&self, e: MountError) -> Error {
        let server = &self.pool.label;
        let export = &self.opts.export;
        match e {
            MountError::Rpc(e) => self.pool.rpc_err("MOUNT", export, e),
            MountError::Denied(mountstat3::MNT3ERR_NOENT) => {
                Error::not_found("NFS export", format!("{export} on {server}"))
            }
            MountError::Denied(st @ (mountstat3::MNT3ERR_ACCES | mountstat3::MNT3ERR_PERM)) => {
                Error::FailedPrecondition(format!(
                    "{server} refused to mount {export} ({st}); check the export's client list, \
                     security flavor and whether it requires a privileged source port"
                ))
            }
            MountError::Denied(st) => {
                Error::Internal(format!("{server} refused to mount {export}: {st}"))
            }
        }
    }

    async fn read_fsinfo(&self, root: &nfs_fh3) -> Result<()> {
        let res = rpc!(
            self,
            "FSINFO",
            "",
            true,
            fsinfo,
            FSINFO3args {
                fsroot: root.clone()
            }
        )?;
        match res {
            Nfs3Result::Ok(ok) => {
                // 0 means "no preference"; a server with smaller limits gets smaller chunks.
                let pick = |max: u32| {
                    if max == 0 {
                        64 * 1024
                    } else {
                        max.min(COPY_CHUNK)
                    }
                };
                self.rsize.store(pick(ok.rtmax), Ordering::Relaxed);
                self.wsize.store(pick(ok.wtmax), Ordering::Relaxed);
                Ok(())
            }
            Nfs3Result::Err((st, _)) => Err(self.setup_err(self.status_err("FSINFO", "", st))),
        }
    }

    /// Walks (creating as needed) `base_dir` below the export root.
    async fn open_base(&self, root: nfs_fh3) -> Result<nfs_fh3> {
        let mut cur = root;
        if self.opts.base_dir.is_empty() {
            return Ok(cur);
        }
        let base = RelPath::parse("base_dir", &self.opts.base_dir)?;
        let mut walked = String::new();
        for comp in base.components() {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(comp);
            let shown = format!("{}/{walked}", self.opts.export.trim_end_matches('/'));
            let found = self
                .lookup_in(&cur, comp, &shown)
                .await
                .map_err(|e| self.setup_err(e))?;
            cur = match found {
                Some((fh, attrs)) => {
                    if attrs.is_some_and(|a| a.type_ != ftype3::NF3DIR) {
                        return Err(Error::FailedPrecondition(format!(
                            "base_dir {shown} on {} is not a directory",
                            self.pool.label
                        )));
                    }
                    fh
                }
                None => self.mkdir_base_component(&cur, comp, &shown).await?,
            };
        }
        Ok(cur)
    }

    async fn mkdir_base_component(
        &self,
        dir: &nfs_fh3,
        name: &str,
        shown: &str,
    ) -> Result<nfs_fh3> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: sattr(Some(BASE_DIR_MODE), None, None, None),
        };
        let res = rpc!(self, "MKDIR", shown, false, mkdir, args)?;
        let made = match res {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Some(fh),
                Nfs3Option::None => None,
            },
            // Another controller replica created it first.
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => None,
            Nfs3Result::Err((st, _)) => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot create base_dir {shown} on {}: {st}",
                    self.pool.label
                )));
            }
        };
        if let Some(fh) = made {
            return Ok(fh);
        }
        match self
            .lookup_in(dir, name, shown)
            .await
            .map_err(|e| self.setup_err(e))?
        {
            Some((fh, _)) => Ok(fh),
            None => Err(Error::Internal(format!(
                "{}: base_dir {shown} vanished right after MKDIR",
                self.pool.label
            ))),
        }
    }

    /// Setup (mount, base lookup) has no cached handles to retry without.
    fn setup_err(&self, e: OpError) -> Error {
        match e {
            OpError::Fail(e) => e,
            OpError::Stale(m) | OpError::Recheck(m) => {
                Error::Internal(format!("{}: {m}", self.pool.label))
            }
        }
    }

    async fn refresh_base(&self) -> Result<()> {
        let root = self.mount_root().await?;
        let base = self.open_base(root).await?;
        *self.base.write().unwrap_or_else(PoisonError::into_inner) = base;
        Ok(())
    }

    // ---- path resolution ----

    /// LOOKUP `name` in `dir`; `None` when it does not exist. `shown` names the path in errors.
    async fn lookup_in(
        &self,
        dir: &nfs_fh3,
        name: &str,
        shown: &str,
    ) -> OpResult<Option<(nfs_fh3, Option<fattr3>)>> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        match rpc!(self, "LOOKUP", shown, true, lookup, args)? {
            Nfs3Result::Ok(ok) => Ok(Some((ok.object, opt(ok.obj_attributes)))),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
            Nfs3Result::Err((st, _)) => Err(self.status_err("LOOKUP", shown, st)),
        }
    }

    /// Handle of `path`, `None` when it or a parent does not exist.
    async fn resolve(&self, path: &str, pass: Pass) -> OpResult<Option<Resolved>> {
        let use_cache = pass == Pass::Cached;
        if use_cache && let Some(fh) = self.cache_get(path) {
            return Ok(Some(Resolved { fh, cached: true }));
        }
        let mut cur = self.base();
        let mut cached = false;
        let mut start = 0;
        for comp in path.split('/') {
            let end = start + comp.len();
            let prefix = &path[..end];
            start = end + 1;
            if use_cache && let Some(fh) = self.cache_get(prefix) {
                cur = fh;
                cached = true;
                continue;
            }
            match self.lookup_in(&cur, comp, prefix).await? {
                Some((fh, _)) => {
                    self.cache_put(prefix, &fh);
                    cur = fh;
                }
                None if cached => return Err(OpError::Recheck(format!("LOOKUP {prefix}"))),
                None => return Ok(None),
            }
        }
        Ok(Some(Resolved { fh: cur, cached }))
    }

    async fn resolve_existing(&self, path: &RelPath, pass: Pass) -> OpResult<Resolved> {
        match self.resolve(path.as_str(), pass).await? {
            Some(r) => Ok(r),
            None => Err(Error::not_found("path", self.disp(path.as_str())).into()),
        }
    }

    /// Handle of the parent directory; `None` when the parent does not exist.
    async fn parent(&self, path: &RelPath, pass: Pass) -> OpResult<Option<Resolved>> {
        match path.parent() {
            None => Ok(Some(Resolved {
                fh: self.base(),
                cached: false,
            })),
            Some(p) => self.resolve(p.as_str(), pass).await,
        }
    }

    async fn parent_existing(&self, path: &RelPath, pass: Pass) -> OpResult<Resolved> {
        match self.parent(path, pass).await? {
            Some(r) => Ok(r),
            None => {
                let p = path.parent().map(|p| p.to_string()).unwrap_or_default();
                Err(Error::not_found("path", self.disp(&p)).into())
            }
        }
    }

    async fn getattr(&self, fh: &nfs_fh3, shown: &str) -> OpResult<fattr3> {
        match rpc!(
            self,
            "GETATTR",
            shown,
            true,
            getattr,
            GETATTR3args { object: fh.clone() }
        )? {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((st, _)) => Err(self.status_err("GETATTR", shown, st)),
        }
    }

    async fn setattr(&self, fh: &nfs_fh3, shown: &str, attrs: sattr3) -> OpResult<()> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: attrs,
            guard: Nfs3Option::None,
        };
        match rpc!(self, "SETATTR", shown, true, setattr, args)? {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((st, _)) => Err(self.status_err("SETATTR", shown, st)),
        }
    }

    /// Entries of a directory with their attributes (READDIRPLUS), without `.` and `..`.
    async fn list(&self, path: &str, dir: &Resolved) -> OpResult<Vec<(String, Option<fattr3>)>> {
        let mut restarted = false;
        'listing: loop {
            let mut out = Vec::new();
            let mut cookie = 0u64;
            let mut verf = cookieverf3::default();
            loop {
                let args = READDIRPLUS3args {
                    dir: dir.fh.clone(),
                    cookie,
                    cookieverf: verf,
                    dircount: READDIR_DIRCOUNT,
                    maxcount: READDIR_MAXCOUNT,
                };
                let ok = match rpc!(self, "READDIRPLUS", path, true, readdirplus, args)? {
                    Nfs3Result::Ok(ok) => ok,
                    // The directory changed under a multi-call listing: start over once.
                    Nfs3Result::Err((nfsstat3::NFS3ERR_BAD_COOKIE, _)) if !restarted => {
                        restarted = true;
                        continue 'listing;
                    }
                    Nfs3Result::Err((st, _)) => {
                        return Err(self.fail("READDIRPLUS", path, st, dir.cached));
                    }
                };
                // A removed directory still listable through an old handle has no links left;
                // its (empty) listing is not the answer for the path.
                if dir.cached && matches!(&ok.dir_attributes, Nfs3Option::Some(a) if a.nlink == 0) {
                    return Err(OpError::Recheck(format!("READDIRPLUS {path}")));
                }
                verf = ok.cookieverf;
                let entries = ok.reply.entries.into_inner();
                let last = entries.last().map(|e| e.cookie);
                for e in entries {
                    let name = String::from_utf8_lossy(e.name.as_ref()).into_owned();
                    if name == "." || name == ".." {
                        continue;
                    }
                    if let Nfs3Option::Some(fh) = &e.name_handle {
                        self.cache_put(&join_str(path, &name), fh);
                    }
                    out.push((name, opt(e.name_attributes)));
                }
                if ok.reply.eof {
                    return Ok(out);
                }
                match last {
                    Some(c) => cookie = c,
                    // No entries and no eof would loop forever.
                    None => {
                        return Err(Error::Internal(format!(
                            "{}: READDIRPLUS {} returned no entries before end of directory",
                            self.pool.label,
                            self.disp(path)
                        ))
                        .into());
                    }
                }
            }
        }
    }

    /// `list` with every entry's attributes filled in (by LOOKUP where the server left them out).
    async fn list_with_attrs(&self, pass: Pass, path: &RelPath) -> OpResult<Vec<(String, fattr3)>> {
        let dir = self.resolve_existing(path, pass).await?;
        let mut out = Vec::new();
        for (name, attrs) in self.list(path.as_str(), &dir).await? {
            let attrs = match attrs {
                Some(a) => a,
                None => {
                    let child = join_str(path.as_str(), &name);
                    match self.lookup_in(&dir.fh, &name, &child).await? {
                        Some((fh, Some(a))) => {
                            self.cache_put(&child, &fh);
                            a
                        }
                        Some((fh, None)) => self.getattr(&fh, &child).await?,
                        // Removed since the listing.
                        None => continue,
                    }
                }
            };
            out.push((name, attrs));
        }
        Ok(out)
    }

    // ---- one attempt of each Fs operation ----

    async fn stat_once(&self, pass: Pass, path: &RelPath) -> OpResult<Option<FileStat>> {
        let Some(dir) = self.parent(path, pass).await? else {
            return Ok(None);
        };
        let p = path.as_str();
        // Always a fresh LOOKUP of the last component: stat answers "is it there now".
        match self.lookup_in(&dir.fh, path.file_name(), p).await? {
            None if dir.cached => Err(OpError::Recheck(format!("LOOKUP {p}"))),
            None => {
                self.cache_forget(p);
                Ok(None)
            }
            Some((fh, attrs)) => {
                self.cache_put(p, &fh);
                let a = match attrs {
                    Some(a) => a,
                    None => self.getattr(&fh, p).await?,
                };
                Ok(Some(to_stat(&a)))
            }
        }
    }

    async fn mkdir_once(&self, pass: Pass, path: &RelPath, attrs: DirAttrs) -> OpResult<bool> {
        let dir = self.parent_existing(path, pass).await?;
        let p = path.as_str();
        let want = sattr(Some(attrs.mode), attrs.uid, attrs.gid, None);
        let args = MKDIR3args {
            where_: dirop(&dir.fh, path.file_name()),
            attributes: want.clone(),
        };
        // Not repeated on a lost reply: the repeat would see EXIST and report "already there".
        let (fh, got) = match rpc!(self, "MKDIR", p, false, mkdir, args)? {
            Nfs3Result::Ok(ok) => (opt(ok.obj), opt(ok.obj_attributes)),
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                return match self.stat_once(pass, path).await? {
                    Some(st) if st.kind == FileKind::Dir => Ok(false),
                    _ => Err(Error::FailedPrecondition(format!(
                        "{} exists and is not a directory",
                        self.disp(p)
                    ))
                    .into()),
                };
            }
            Nfs3Result::Err((st, _)) => return Err(self.fail("MKDIR", p, st, dir.cached)),
        };
        // MKDIR may legally return no handle.
        let fh = match fh {
            Some(fh) => fh,
            None => match self.lookup_in(&dir.fh, path.file_name(), p).await? {
                Some((fh, _)) => fh,
                None => return Err(Error::not_found("path", self.disp(p)).into()),
            },
        };
        self.cache_put(p, &fh);
        // The server may apply a umask or drop set-id bits; the trait promises the exact mode.
        let exact = got.is_some_and(|a| {
            a.mode & 0o7777 == attrs.mode & 0o7777
                && attrs.uid.is_none_or(|u| u == a.uid)
                && attrs.gid.is_none_or(|g| g == a.gid)
        });
        if !exact {
            self.setattr(&fh, p, want).await?;
        }
        Ok(true)
    }

    async fn set_attrs_once(&self, pass: Pass, path: &RelPath, attrs: DirAttrs) -> OpResult<()> {
        let r = self.resolve_existing(path, pass).await?;
        self.setattr(
            &r.fh,
            path.as_str(),
            sattr(Some(attrs.mode), attrs.uid, attrs.gid, None),
        )
        .await
    }

    async fn create_file_once(&self, pass: Pass, path: &RelPath, mode: u32) -> OpResult<()> {
        let dir = self.parent_existing(path, pass).await?;
        let p = path.as_str();
        // Two rounds: a GUARDED create that loses a race with another creator falls back to
        // truncating what is there.
        for _ in 0..2 {
            if let Some((fh, attrs)) = self.lookup_in(&dir.fh, path.file_name(), p).await? {
                // Truncate through the handle rather than CREATE UNCHECKED, which some servers
                // resolve by opening the name and would follow a symlink planted there.
                let a = match attrs {
                    Some(a) => a,
                    None => self.getattr(&fh, p).await?,
                };
                if a.type_ != ftype3::NF3REG {
                    return Err(Error::FailedPrecondition(format!(
                        "{} exists and is not a regular file",
                        self.disp(p)
                    ))
                    .into());
                }
                self.setattr(&fh, p, sattr(Some(mode), None, None, Some(0)))
                    .await?;
                self.cache_put(p, &fh);
                return Ok(());
            }
            let args = CREATE3args {
                where_: dirop(&dir.fh, path.file_name()),
                how: createhow3::GUARDED(sattr(Some(mode), None, None, Some(0))),
            };
            // A repeated GUARDED create answers EXIST, which the next round handles.
            match rpc!(self, "CREATE", p, true, create, args)? {
                Nfs3Result::Ok(ok) => {
                    let fh = match opt(ok.obj) {
                        Some(fh) => fh,
                        None => match self.lookup_in(&dir.fh, path.file_name(), p).await? {
                            Some((fh, _)) => fh,
                            None => return Err(Error::not_found("path", self.disp(p)).into()),
                        },
                    };
                    self.cache_put(p, &fh);
                    if opt(ok.obj_attributes).is_none_or(|a| a.mode & 0o7777 != mode & 0o7777) {
                        self.setattr(&fh, p, sattr(Some(mode), None, None, None))
                            .await?;
                    }
                    return Ok(());
                }
                Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => continue,
                Nfs3Result::Err((st, _)) => return Err(self.fail("CREATE", p, st, dir.cached)),
            }
        }
        Err(Error::Aborted(self.disp(p)).into())
    }

    async fn read_at_once(
        &self,
        pass: Pass,
        path: &RelPath,
        offset: u64,
        len: u32,
    ) -> OpResult<Vec<u8>> {
        let r = self.resolve_existing(path, pass).await?;
        let p = path.as_str();
        let rsize = self.rsize.load(Ordering::Relaxed).max(1);
        let mut out: Vec<u8> = Vec::with_capacity(len.min(COPY_CHUNK) as usize);
        while out.len() < len as usize {
            let want = (len - out.len() as u32).min(rsize);
            let args = READ3args {
                file: r.fh.clone(),
                offset: offset + out.len() as u64,
                count: want,
            };
            let ok = match rpc!(self, "READ", p, true, read, args)? {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((st, _)) => return Err(self.fail("READ", p, st, r.cached)),
            };
            let data = ok.data.into_owned();
            let n = data.len();
            out.extend_from_slice(&data);
            if ok.eof || n == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn write_at_once(
        &self,
        pass: Pass,
        path: &RelPath,
        offset: u64,
        data: &[u8],
    ) -> OpResult<()> {
        let r = self.resolve_existing(path, pass).await?;
        let p = path.as_str();
        let wsize = self.wsize.load(Ordering::Relaxed).max(1) as usize;
        let mut done = 0usize;
        let mut needs_commit = false;
        while done < data.len() {
            let chunk = &data[done..data.len().min(done + wsize)];
            let args = WRITE3args {
                file: r.fh.clone(),
                offset: offset + done as u64,
                count: chunk.len() as u32,
                stable: stable_how::FILE_SYNC,
                data: Opaque::borrowed(chunk),
            };
            let ok = match rpc!(self, "WRITE", p, true, write, args)? {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((st, _)) => return Err(self.fail("WRITE", p, st, r.cached)),
            };
            if ok.count == 0 {
                return Err(Error::Internal(format!(
                    "{}: WRITE {} accepted 0 bytes",
                    self.pool.label,
                    self.disp(p)
                ))
                .into());
            }
            // A server may commit less than asked; then a COMMIT makes the data stable.
            needs_commit |= ok.committed != stable_how::FILE_SYNC;
            done += (ok.count as usize).min(chunk.len());
        }
        if needs_commit {
            let args = COMMIT3args {
                file: r.fh.clone(),
                offset,
                count: 0,
            };
            if let Nfs3Result::Err((st, _)) = rpc!(self, "COMMIT", p, true, commit, args)? {
                return Err(self.fail("COMMIT", p, st, r.cached));
            }
        }
        Ok(())
    }

    async fn set_len_once(&self, pass: Pass, path: &RelPath, len: u64) -> OpResult<()> {
        let r = self.resolve_existing(path, pass).await?;
        let a = self.getattr(&r.fh, path.as_str()).await?;
        if a.type_ != ftype3::NF3REG {
            return Err(Error::FailedPrecondition(format!(
                "{} is not a regular file",
                self.disp(path.as_str())
            ))
            .into());
        }
        self.setattr(&r.fh, path.as_str(), sattr(None, None, None, Some(len)))
            .await
    }

    async fn symlink_once(&self, pass: Pass, target: &str, path: &RelPath) -> OpResult<()> {
        let dir = self.parent_existing(path, pass).await?;
        let p = path.as_str();
        let args = SYMLINK3args {
            where_: dirop(&dir.fh, path.file_name()),
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3(Opaque::borrowed(target.as_bytes())),
            },
        };
        match rpc!(self, "SYMLINK", p, false, symlink, args)? {
            Nfs3Result::Ok(ok) => {
                if let Some(fh) = opt(ok.obj) {
                    self.cache_put(p, &fh);
                }
                Ok(())
            }
            Nfs3Result::Err((st, _)) => Err(self.fail("SYMLINK", p, st, dir.cached)),
        }
    }

    async fn read_link_once(&self, pass: Pass, path: &RelPath) -> OpResult<String> {
        let r = self.resolve_existing(path, pass).await?;
        let p = path.as_str();
        match rpc!(
            self,
            "READLINK",
            p,
            true,
            readlink,
            READLINK3args { symlink: r.fh }
        )? {
            Nfs3Result::Ok(ok) => Ok(String::from_utf8_lossy(ok.data.as_ref()).into_owned()),
            Nfs3Result::Err((nfsstat3::NFS3ERR_INVAL, _)) => {
                Err(Error::FailedPrecondition(format!("{} is not a symlink", self.disp(p))).into())
            }
            Nfs3Result::Err((st, _)) => Err(self.fail("READLINK", p, st, r.cached)),
        }
    }

    async fn rename_once(&self, pass: Pass, from: &RelPath, to: &RelPath) -> OpResult<()> {
        let from_dir = self.parent_existing(from, pass).await?;
        let to_dir = self.parent_existing(to, pass).await?;
        let shown = format!("{} -> {}", from.as_str(), to.as_str());
        let args = RENAME3args {
            from: dirop(&from_dir.fh, from.file_name()),
            to: dirop(&to_dir.fh, to.file_name()),
        };
        let res = rpc!(self, "RENAME", &shown, false, rename, args);
        // Whatever happened, cached handles below either name may now be wrong.
        self.cache_forget(from.as_str());
        self.cache_forget(to.as_str());
        match res? {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) if from_dir.cached || to_dir.cached => {
                Err(OpError::Recheck(format!("RENAME {shown}")))
            }
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => {
                Err(Error::not_found("path", self.disp(from.as_str())).into())
            }
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST | nfsstat3::NFS3ERR_NOTEMPTY, _)) => {
                Err(Error::FailedPrecondition(format!(
                    "cannot rename {} over {}: target is a non-empty directory",
                    self.disp(from.as_str()),
                    self.disp(to.as_str())
                ))
                .into())
            }
            Nfs3Result::Err((st, _)) => Err(self.status_err("RENAME", &shown, st)),
        }
    }

    async fn remove_once(&self, pass: Pass, path: &RelPath, dir_too: bool) -> OpResult<bool> {
        let Some(dir) = self.parent(path, pass).await? else {
            return Ok(false);
        };
        let p = path.as_str();
        let what = dirop(&dir.fh, path.file_name());
        // Repeating a remove whose reply was lost answers NOENT, which is the state we want.
        let (op, failed) = if dir_too {
            (
                "RMDIR",
                status_of(rpc!(
                    self,
                    "RMDIR",
                    p,
                    true,
                    rmdir,
                    RMDIR3args { object: what }
                )?),
            )
        } else {
            (
                "REMOVE",
                status_of(rpc!(
                    self,
                    "REMOVE",
                    p,
                    true,
                    remove,
                    REMOVE3args { object: what }
                )?),
            )
        };
        self.cache_forget(p);
        match failed {
            None => Ok(true),
            Some(nfsstat3::NFS3ERR_NOENT) if dir.cached => {
                Err(OpError::Recheck(format!("{op} {p}")))
            }
            Some(nfsstat3::NFS3ERR_NOENT) => Ok(false),
            Some(st) => Err(self.status_err(op, p, st)),
        }
    }

    async fn fs_stats_once(&self) -> OpResult<FsStats> {
        let base = self.base();
        match rpc!(
            self,
            "FSSTAT",
            "",
            true,
            fsstat,
            FSSTAT3args { fsroot: base }
        )? {
            Nfs3Result::Ok(ok) => Ok(FsStats {
                total_bytes: ok.tbytes,
                available_bytes: ok.abytes,
                total_inodes: ok.tfiles,
                free_inodes: ok.ffiles,
            }),
            Nfs3Result::Err((st, _)) => Err(self.status_err("FSSTAT", "", st)),
        }
    }
}

/// The failure status of a result whose bodies we do not need.
fn status_of<T, E>(r: Nfs3Result<T, E>) -> Option<nfsstat3> {
    match r {
        Nfs3Result::Ok(_) => None,
        Nfs3Result::Err((st, _)) => Some(st),
    }
}

#[async_trait]
impl Fs for NfsFs {
    async fn stat(&self, path: &RelPath) -> Result<Option<FileStat>> {
        self.run(|pass| self.inner.stat_once(pass, path)).await
    }

    async fn mkdir(&self, path: &RelPath, attrs: DirAttrs) -> Result<bool> {
        self.run(|pass| self.inner.mkdir_once(pass, path, attrs))
            .await
    }

    async fn set_attrs(&self, path: &RelPath, attrs: DirAttrs) -> Result<()> {
        self.run(|pass| self.inner.set_attrs_once(pass, path, attrs))
            .await
    }

    async fn read_dir(&self, path: &RelPath) -> Result<Vec<DirEntry>> {
        let entries = self
            .run(|pass| self.inner.list_with_attrs(pass, path))
            .await?;
        Ok(entries
            .into_iter()
            .map(|(name, a)| DirEntry {
                name,
                kind: kind_of(a.type_),
            })
            .collect())
    }

    async fn create_file(&self, path: &RelPath, mode: u32) -> Result<()> {
        self.run(|pass| self.inner.create_file_once(pass, path, mode))
            .await
    }

    async fn read_at(&self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.run(|pass| self.inner.read_at_once(pass, path, offset, len))
            .await
    }

    async fn write_at(&self, path: &RelPath, offset: u64, data: &[u8]) -> Result<()> {
        self.run(|pass| self.inner.write_at_once(pass, path, offset, data))
            .await
    }

    async fn set_len(&self, path: &RelPath, len: u64) -> Result<()> {
        self.run(|pass| self.inner.set_len_once(pass, path, len))
            .await
    }

    async fn symlink(&self, target: &str, path: &RelPath) -> Result<()> {
        self.run(|pass| self.inner.symlink_once(pass, target, path))
            .await
    }

    async fn read_link(&self, path: &RelPath) -> Result<String> {
        self.run(|pass| self.inner.read_link_once(pass, path)).await
    }

    async fn rename(&self, from: &RelPath, to: &RelPath) -> Result<()> {
        self.run(|pass| self.inner.rename_once(pass, from, to))
            .await
    }

    async fn remove_file(&self, path: &RelPath) -> Result<bool> {
        self.run(|pass| self.inner.remove_once(pass, path, false))
            .await
    }

    async fn remove_dir(&self, path: &RelPath) -> Result<bool> {
        self.run(|pass| self.inner.remove_once(pass, path, true))
            .await
    }

    async fn fs_stats(&self) -> Result<FsStats> {
        self.run(|_| self.inner.fs_stats_once()).await
    }

    // READDIRPLUS already carries every entry's size: one call per directory instead of a
    // LOOKUP per file as in the generic walk.
    async fn tree_size(&self, path: &RelPath) -> Result<u64> {
        let mut total = 0u64;
        let mut stack = vec![path.clone()];
        while let Some(dir) = stack.pop() {
            for (name, a) in self
                .run(|pass| self.inner.list_with_attrs(pass, &dir))
                .await?
            {
                if a.type_ == ftype3::NF3DIR {
                    stack.push(dir.join(&name)?);
                } else {
                    total = total.saturating_add(a.size);
                }
            }
        }
        Ok(total)
    }
}

// ---- connection pool ----

/// One TCP connection in the form the client crate wants. The stream is shared so the pool
/// can probe an idle connection for a server-side close while the client owns it.
struct Conn(Arc<TcpStream>);

impl AsyncRead for Conn {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.0.readable().await?;
            match self.0.try_read(buf) {
                // The crate's read_exact treats 0 as "try again" and would spin forever on a
                // closed connection; end of stream has to be an error here.
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the server",
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncWrite for Conn {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.0.writable().await?;
            match self.0.try_write(buf) {
                // Same spin hazard as reads, in write_all.
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection closed",
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

type Client = Nfs3Client<Conn>;

struct Idle {
    client: Client,
    stream: Arc<TcpStream>,
}

struct Pool {
    addr: SocketAddr,
    privileged: bool,
    cred: opaque_auth<'static>,
    uid: u32,
    gid: u32,
    timeout: Duration,
    /// "NFS server ADDR", the prefix of every error about this server.
    label: String,
    idle: Mutex<Vec<Idle>>,
    /// One permit per connection that may exist; callers beyond pool_size wait here.
    permits: Semaphore,
}

enum Attempt<R> {
    Done(R),
    Rpc { err: RpcError, reused: bool },
}

impl Pool {
    /// Runs `f` on a pooled connection. `f` gets the client by value and hands it back, so a
    /// call abandoned by the timeout takes its (now unusable) connection with it.
    async fn call<R, F, Fut>(
        &self,
        op: &'static str,
        path: &str,
        idempotent: bool,
        f: F,
    ) -> Result<R>
    where
        F: Fn(Client) -> Fut + Send + Sync,
        Fut: Future<Output = (Client, std::result::Result<R, RpcError>)> + Send,
        R: Send,
    {
        let mut retried = false;
        loop {
            let attempt = async {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| Error::Internal("NFS connection pool closed".into()))?;
                let (conn, reused) = match self.checkout() {
                    Some(c) => (c, true),
                    None => (self.open().await?, false),
                };
                let Idle { client, stream } = conn;
                let (client, res) = f(client).await;
                match res {
                    Ok(v) => {
                        self.checkin(Idle { client, stream });
                        Ok::<_, Error>(Attempt::Done(v))
                    }
                    Err(err) => {
                        if err.is_connection_reusable() {
                            self.checkin(Idle { client, stream });
                        }
                        Ok(Attempt::Rpc { err, reused })
                    }
                }
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "{}: {op} {path} timed out after {:?}",
                        self.label, self.timeout
                    )));
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Attempt::Done(v))) => return Ok(v),
                Ok(Ok(Attempt::Rpc { err, reused })) => {
                    // A reused connection can die between the liveness probe and the call
                    // (server restart); one fresh try is safe for repeatable procedures.
                    if matches!(err, RpcError::Io(_)) && reused && idempotent && !retried {
                        tracing::debug!(server = %self.label, op, error = %err, "NFS connection broke; retrying on a new one");
                        retried = true;
                        continue;
                    }
                    return Err(self.rpc_err(op, path, err));
                }
            }
        }
    }

    fn checkout(&self) -> Option<Idle> {
        let mut idle = lock(&self.idle);
        while let Some(c) = idle.pop() {
            if still_open(&c.stream) {
                return Some(c);
            }
            tracing::debug!(server = %self.label, "dropping NFS connection closed by the server");
        }
        None
    }

    fn checkin(&self, c: Idle) {
        lock(&self.idle).push(c);
    }

    async fn open(&self) -> Result<Idle> {
        let stream = connect_tcp(self.addr, self.privileged)
            .await
            .map_err(|e| self.connect_err(&format!("connect to {}", self.addr), e))?;
        let stream = Arc::new(stream);
        let client = Nfs3Client::new_with_auth(
            Conn(stream.clone()),
            self.cred.clone(),
            opaque_auth::default(),
        );
        Ok(Idle { client, stream })
    }

    fn connect_err(&self, what: &str, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::PermissionDenied && self.privileged {
            return Error::FailedPrecondition(format!(
                "{}: {what}: binding a privileged source port needs root or \
                 CAP_NET_BIND_SERVICE ({e})",
                self.label
            ));
        }
        Error::Unavailable(format!("{}: {what}: {e}", self.label))
    }

    fn rpc_err(&self, op: &str, path: &str, e: RpcError) -> Error {
        match e {
            RpcError::Io(e) => Error::Unavailable(format!("{}: {op} {path}: {e}", self.label)),
            RpcError::Auth(st) => Error::FailedPrecondition(format!(
                "{} rejected AUTH_SYS uid {} gid {}{} for {op} {path}: {st}",
                self.label,
                self.uid,
                self.gid,
                if self.privileged {
                    ""
                } else {
                    " from an unprivileged port"
                },
            )),
            other => Error::Internal(format!("{}: {op} {path}: {other}", self.label)),
        }
    }
}

/// False when the server closed the connection or left unexpected bytes on it.
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

async fn connect_tcp(addr: SocketAddr, privileged: bool) -> io::Result<TcpStream> {
    let stream = if privileged {
        connect_privileged(addr).await?
    } else {
        TcpStream::connect(addr).await?
    };
    // One write per call and a wait for the reply: Nagle would only add latency.
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_privileged(addr: SocketAddr) -> io::Result<TcpStream> {
    let span = PRIV_PORT_HIGH - PRIV_PORT_LOW + 1;
    // Start at a random port so concurrent connects do not all fight over the same one.
    let start = (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u16;
    let local_ip: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free privileged port");
    for i in 0..PRIV_PORT_TRIES {
        let port = PRIV_PORT_LOW + (start + i) % span;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        match sock.bind(SocketAddr::new(local_ip, port)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                last = e;
                continue;
            }
            Err(e) => return Err(e),
        }
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            // The same (local, remote) pair may still be in TIME_WAIT.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn resolve_host(server: &str, timeout: Duration) -> Result<IpAddr> {
    let host = server.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "resolving NFS server {server}: timed out after {timeout:?}"
            ))
        })?
        .map_err(|e| Error::Unavailable(format!("resolving NFS server {server}: {e}")))?
        .map(|a| a.ip())
        .collect::<Vec<_>>();
    // IPv4 first: NFS servers and their export client lists are most often v4-only.
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| Error::Unavailable(format!("NFS server name {server} has no addresses")))
}

/// NFS and MOUNT ports from the server's portmapper.
async fn portmap_ports(ip: IpAddr, opts: &NfsOptions) -> Result<(u16, u16)> {
    let addr = SocketAddr::new(ip, PORTMAP_PORT);
    let unavailable = |what: String| Error::Unavailable(format!("portmapper {addr}: {what}"));
    let work = async {
        let stream = connect_tcp(addr, false)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut pm = PortmapperClient::new(Conn(Arc::new(stream)));
        let mut ports = [0u16; 2];
        for (slot, (prog, vers, name)) in ports.iter_mut().zip([
            (nfs3::PROGRAM, nfs3::VERSION, "NFS"),
            (mnt3::PROGRAM, mnt3::VERSION, "MOUNT"),
        ]) {
            *slot = pm
                .getport(prog, vers, IPPROTO_TCP)
                .await
                .map_err(|e| match e {
                    PortmapError::ProgramUnavailable => {
                        unavailable(format!("{name} v{vers} over TCP is not registered"))
                    }
                    other => unavailable(other.to_string()),
                })?;
        }
        let [nfs, mount] = ports;
        Ok::<_, Error>((nfs, mount))
    };
    tokio::time::timeout(opts.timeout, work)
        .await
        .map_err(|_| unavailable(format!("no answer within {:?}", opts.timeout)))?
}

fn auth_sys(uid: u32, gid: u32) -> opaque_auth<'static> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32);
    opaque_auth::auth_unix(&auth_unix {
        stamp,
        machinename: Opaque::borrowed(b"stowage"),
        uid,
        gid,
        gids: vec![gid],
    })
}

// ---- handle cache ----

#[derive(Default)]
struct HandleCache {
    map: HashMap<String, (nfs_fh3, Instant)>,
}

impl HandleCache {
    fn get(&mut self, rel: &str) -> Option<nfs_fh3> {
        match self.map.get(rel) {
            Some((fh, at)) if at.elapsed() < HANDLE_TTL => Some(fh.clone()),
            Some(_) => {
                self.map.remove(rel);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, rel: &str, fh: &nfs_fh3) {
        if self.map.len() >= HANDLE_CACHE_MAX && !self.map.contains_key(rel) {
            self.map.clear();
        }
        self.map
            .insert(rel.to_owned(), (fh.clone(), Instant::now()));
    }

    /// Drops `rel` and everything below it.
    fn forget_tree(&mut self, rel: &str) {
        self.map.remove(rel);
        let prefix = format!("{rel}/");
        self.map.retain(|k, _| !k.starts_with(&prefix));
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

// ---- small conversions ----

fn dirop<'a>(dir: &nfs_fh3, name: &'a str) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name.as_bytes())),
    }
}

fn sattr(mode: Option<u32>, uid: Option<u32>, gid: Option<u32>, size: Option<u64>) -> sattr3 {
    fn o<
        T: nfs3_client::nfs3_types::xdr_codec::Pack + nfs3_client::nfs3_types::xdr_codec::Unpack,
    >(
        v: Option<T>,
    ) -> Nfs3Option<T> {
        match v {
            Some(v) => Nfs3Option::Some(v),
            None => Nfs3Option::None,
        }
    }
    sattr3 {
        mode: o(mode.map(|m| m & 0o7777)),
        uid: o(uid),
        gid: o(gid),
        size: o(size),
        ..sattr3::default()
    }
}

fn opt<T: nfs3_client::nfs3_types::xdr_codec::Pack + nfs3_client::nfs3_types::xdr_codec::Unpack>(
    v: Nfs3Option<T>,
) -> Option<T> {
    match v {
        Nfs3Option::Some(v) => Some(v),
        Nfs3Option::None => None,
    }
}

fn join_str(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn kind_of(t: ftype3) -> FileKind {
    match t {
        ftype3::NF3REG => FileKind::File,
        ftype3::NF3DIR => FileKind::Dir,
        ftype3::NF3LNK => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

fn to_stat(a: &fattr3) -> FileStat {
    FileStat {
        kind: kind_of(a.type_),
        size: a.size,
        mode: a.mode & 0o7777,
        uid: a.uid,
        gid: a.gid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fh(b: u8) -> nfs_fh3 {
        nfs_fh3 {
            data: Opaque::owned(vec![b]),
        }
    }

    #[test]
    fn cache_forgets_subtrees_only() {
        let mut c = HandleCache::default();
        for (k, b) in [("a", 1), ("a/b", 2), ("a/b/c", 3), ("ab", 4), ("x", 5)] {
            c.put(k, &fh(b));
        }
        c.forget_tree("a/b");
        assert!(c.get("a/b").is_none());
        assert!(c.get("a/b/c").is_none());
        assert_eq!(c.get("a"), Some(fh(1)));
        c.forget_tree("a");
        assert!(c.get("a").is_none());
        assert_eq!(
            c.get("ab"),
            Some(fh(4)),
            "a sibling sharing a prefix must survive"
        );
        assert_eq!(c.get("x"), Some(fh(5)));
    }

    #[test]
    fn sattr_masks_file_type_bits() {
        let s = sattr(Some(0o40755), Some(1), None, Some(0));
        assert_eq!(s.mode, Nfs3Option::Some(0o755));
        assert_eq!(s.uid, Nfs3Option::Some(1));
        assert_eq!(s.gid, Nfs3Option::None);
        assert_eq!(s.size, Nfs3Option::Some(0));
    }

    #[tokio::test]
    async fn rejects_bad_options_before_connecting() {
        let mut o = NfsOptions::new("127.0.0.1", "export");
        assert!(matches!(
            NfsFs::connect(o.clone()).await,
            Err(Error::InvalidArgument {
                field: "export",
                ..
            })
        ));
        o.export = "/export".into();
        o.base_dir = "../x".into();
        assert!(matches!(
            NfsFs::connect(o.clone()).await,
            Err(Error::InvalidArgument {
                field: "base_dir",
                ..
            })
        ));
        o.base_dir = String::new();
        o.timeout = Duration::ZERO;
        assert!(matches!(
            NfsFs::connect(o).await,
            Err(Error::InvalidArgument {
                field: "timeout",
                ..
            })
        ));
    }
}
