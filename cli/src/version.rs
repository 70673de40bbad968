//! The version line every Stowage binary prints: crate version and git commit.

/// `0.1.0 (commit abc1234)`; the commit comes from build.rs ("unknown" outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STOWAGE_GIT_COMMIT"),
    ")"
);
