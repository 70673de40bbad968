//! Bench, not a test: the full Docker volume cycle, `docker volume create` + `docker run -v`
//! (one write) + `docker volume rm`, through Stowage's plugin (local backend) and through
//! Docker's built-in `local` driver, interleaved in the same run against the same dockerd,
//! printing both rates and their ratio.
//!
//!   tests/infra/docker.sh start --state /tmp/sd && . /tmp/sd/env
//!   stowage-bench-docker [cycles]        (default 20; needs root and a built stowage-docker)

#[path = "../../it/docker_common/mod.rs"]
mod docker_common;

use std::time::{Duration, Instant};

use docker_common::{Docker, DockerPlugin, local_config};

fn cycle(d: &Docker, driver: &str, name: &str) -> Duration {
    let t = Instant::now();
    d.ok(&["volume", "create", "-d", driver, name]);
    d.ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{name}:/data"),
        &d.image,
        "sh",
        "-c",
        "echo bench > /data/f",
    ]);
    d.ok(&["volume", "rm", name]);
    t.elapsed()
}

struct Stats {
    mean_ms: f64,
    p50_ms: f64,
    rate: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let total: Duration = v.iter().sum();
    let mean = total.as_secs_f64() / v.len() as f64;
    Stats {
        mean_ms: mean * 1000.0,
        p50_ms: v[v.len() / 2].as_secs_f64() * 1000.0,
        rate: 1.0 / mean,
    }
}

fn main() -> anyhow::Result<()> {
    let cycles: usize = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|_| anyhow::anyhow!("usage: stowage-bench-docker [cycles]"))?,
        None => 20,
    };
    anyhow::ensure!(cycles > 0, "cycles must be at least 1");
    let Some(docker) = Docker::from_env() else {
        anyhow::bail!(
            "no dockerd: tests/infra/docker.sh start --state DIR, then . DIR/env (sets STOWAGE_DOCKER_HOST)"
        );
    };
    let dir = tempfile::tempdir()?;
    let (cfg, _base) = local_config(dir.path())?;
    let plugin = DockerPlugin::start_for_docker(dir.path(), &cfg)?;

    // One untimed cycle each: the first call activates the plugin and warms the image.
    cycle(&docker, "local", "bench-warm-local");
    cycle(&docker, &plugin.name, "bench-warm-stowage");

    let (mut builtin, mut ours) = (Vec::new(), Vec::new());
    // Interleaved, so that drift in the machine's load hits both alike.
    for i in 0..cycles {
        builtin.push(cycle(&docker, "local", &format!("bench-l{i}")));
        ours.push(cycle(&docker, &plugin.name, &format!("bench-s{i}")));
    }
    let b = stats(builtin);
    let s = stats(ours);
    println!(
        "docker volume create + docker run -v (one write) + docker volume rm, {cycles} cycles each, same dockerd, interleaved"
    );
    println!(
        "  docker built-in local driver : {:7.1} ms mean  {:7.1} ms p50  {:6.2} cycles/s",
        b.mean_ms, b.p50_ms, b.rate
    );
    println!(
        "  stowage plugin, local backend: {:7.1} ms mean  {:7.1} ms p50  {:6.2} cycles/s",
        s.mean_ms, s.p50_ms, s.rate
    );
    println!(
        "  ratio stowage / built-in     : {:.2}x the time per cycle, {:.2}x the rate",
        s.mean_ms / b.mean_ms,
        s.rate / b.rate
    );
    Ok(())
}
