//! The tokio runtime stowage-controller and stowage-node run on.
//!
//! `#[tokio::main]` starts one worker thread per CPU; a plugin on a 64-core node would keep 64
//! threads (and up to 8 glibc malloc arenas per core) for work that is almost all waiting on
//! syscalls, child processes and the network. Two workers keep one free while the other is
//! stuck in a slow syscall; blocking work (tokio::fs, spawn_blocking) has its own pool as
//! before.

use std::time::Duration;

/// Worker threads at most (fewer on a one-CPU machine).
pub const MAX_WORKERS: usize = 2;

/// The runtime, after capping glibc's malloc arenas (two: one per worker is enough for the
/// few allocating threads; the default grows to 8 per core under load).
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_keep_alive(Duration::from_secs(10))
        .enable_all()
        .build()
}
