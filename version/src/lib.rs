//! The version every Stowage binary prints with `--version` and reports as GetPluginInfo's
//! vendor_version. Only binaries depend on this crate (libraries get the string at run time),
//! so a new commit relinks the binaries and rebuilds nothing else.

/// The git commit (12 hex digits) the binary was built from; "unknown" outside git.
pub const COMMIT: &str = env!("STOWAGE_GIT_COMMIT");

/// `0.1.0 (commit 0123456789ab)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STOWAGE_GIT_COMMIT"),
    ")"
);

/// The crate version alone (`0.1.0`), for the `version` label of `stowage_build_info`.
pub const VERSION_NUMBER: &str = env!("CARGO_PKG_VERSION");
