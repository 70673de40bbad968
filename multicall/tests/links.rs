//! The image's links: `stowage-all` started under each binary's name is that binary (its own
//! `--version` line and flags), and under an unknown name says what it can be.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_stowage-all");

#[test]
fn each_link_name_runs_that_binary() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "stowage-controller",
        "stowage-node",
        "stowage-provisioner",
        "stowage-docker",
        "stowage",
    ] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(EXE, &link).unwrap();
        let out = Command::new(&link).arg("--version").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --version: {out:?}");
        assert!(
            text.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{name} --version printed {text:?}"
        );
        // The same through the first argument.
        let out = Command::new(EXE)
            .args([name, "--version"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!("{name} ")),
            "stowage-all {name} --version: {out:?}"
        );
        // Each binary's own flags: a bad value is that binary's clap error, exit status 2.
        let out = Command::new(&link).arg("--no-such-flag").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name} --no-such-flag: {out:?}");
    }
    // The node's own flag, refused with the node's own message.
    let out = Command::new(dir.path().join("stowage-node"))
        .args(["--metrics-address", "nope"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--metrics-address"),
        "{out:?}"
    );
}

#[test]
fn an_unknown_name_says_what_it_can_be() {
    let out = Command::new(EXE).arg("stowage-nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["stowage-controller", "stowage-node", "stowage-provisioner"] {
        assert!(err.contains(name), "{err}");
    }
}
