//! `stowage-all`: every Stowage binary in one executable, for the container image. The image
//! links `stowage-controller`, `stowage-node`, `stowage-provisioner`, `stowage-docker` and
//! `stowage` to it; the name it is started under picks the binary (`stowage-all <name> ...`
//! works too). Each binary's own `main.rs` is compiled in as a module, unchanged, so the
//! flags, help and behaviour are exactly those of the separate binaries.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

#[path = "../../cli/src/main.rs"]
mod cli;
#[path = "../../csi-controller/src/main.rs"]
mod controller;
#[path = "../../docker-plugin/src/main.rs"]
mod docker;
#[path = "../../csi-node/src/main.rs"]
mod node;
#[path = "../../provisioner/src/main.rs"]
mod provisioner;

/// The binaries this executable can be, by the name it is started under.
const APPLETS: [&str; 5] = [
    "stowage-controller",
    "stowage-node",
    "stowage-provisioner",
    "stowage-docker",
    "stowage",
];

fn name_of(arg0: &OsString) -> String {
    Path::new(arg0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs an `anyhow` main the way Rust runs `fn main() -> Result`: the error printed with its
/// causes, exit status 1.
fn report(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let mut name = name_of(&arg0);
    if !APPLETS.contains(&name.as_str()) {
        // `stowage-all stowage-node --help`: the applet is the first argument.
        match args.next().map(|a| name_of(&a)) {
            Some(n) if APPLETS.contains(&n.as_str()) => name = n,
            _ => {
                eprintln!(
                    "stowage-all: start me as one of {} (a link with that name), or as `stowage-all <name> [args]`",
                    APPLETS.join(", ")
                );
                return ExitCode::from(2);
            }
        }
        return exec_as(&name, args.collect());
    }
    run(&name)
}

fn run(name: &str) -> ExitCode {
    match name {
        "stowage-controller" => report(controller::main()),
        "stowage-node" => report(node::main()),
        "stowage-provisioner" => report(provisioner::main()),
        "stowage-docker" => report(docker::main()),
        _ => cli::main(),
    }
}

/// `stowage-all <name> args...`: the mains parse `std::env::args`, whose first two entries
/// are `stowage-all <name>`, so run this executable again under the applet's name (argv[0]),
/// which is what the image's links do.
fn exec_as(name: &str, rest: Vec<OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("stowage-all: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let err = std::process::Command::new(exe).arg0(name).args(rest).exec();
    eprintln!("stowage-all: exec as {name}: {err}");
    ExitCode::FAILURE
}
