//! `stowage-controller`: serves the CSI controller of every configured backend, one socket per
//! driver.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage_backends::config::{ConfigFile, per_driver};
use stowage_csi::endpoint::Endpoint;
use stowage_csi::serve::Listener;

#[derive(Parser, Debug)]
#[command(
    name = "stowage-controller",
    version = stowage_version::VERSION,
    about = "Stowage CSI controller plugin (Identity + Controller + stowage.v1)"
)]
struct Args {
    /// Where to serve: unix:///path/csi.sock (or tcp://host:port for tests). `{driver}` is
    /// replaced by the driver name (unix:///csi/{driver}.sock); required when the
    /// configuration names several backends.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/stowage/controller.sock"
    )]
    endpoint: String,
    /// Backend configuration (YAML): one backend, or a `backends:` list; see examples/.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// Serve GET /metrics (Prometheus text) here, e.g. 0.0.0.0:9809. Off when unset.
    #[arg(long, env = "STOWAGE_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

pub fn main() -> anyhow::Result<()> {
    // A small runtime (stowage_csi::runtime): a plugin mostly waits.
    stowage_csi::runtime::build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    stowage_csi::identity::set_vendor_version(stowage_version::VERSION);
    stowage_csi::logging::init(&args.log_format)?;
    stowage_backends::metrics::get()
        .set_build_info(stowage_version::VERSION_NUMBER, stowage_version::COMMIT);
    let file = ConfigFile::load(&args.config)?;
    file.check_per_driver("--endpoint", &args.endpoint)
        .map_err(anyhow::Error::msg)?;
    // Bound first, so a taken port stops the start with the flag named before any socket exists.
    let metrics = match args.metrics_address {
        Some(addr) => Some(
            stowage_csi::metrics::bind(addr)
                .await
                .with_context(|| format!("--metrics-address {addr}"))?,
        ),
        None => None,
    };
    // Every backend is built and every socket bound before any serves: a bad instance or a
    // taken socket stops the start instead of leaving some drivers up and others missing.
    let mut servers = Vec::new();
    for config in &file.backends {
        let driver = config.driver_name();
        let endpoint = Endpoint::parse(&per_driver(&args.endpoint, driver))
            .with_context(|| format!("--endpoint for {driver}"))?;
        let backend = stowage_backends::build_controller(config)
            .await
            .with_context(|| format!("starting the {driver} backend"))?;
        let listener = Listener::bind(&endpoint)
            .await
            .with_context(|| driver.to_string())?
            .with_driver(driver);
        tracing::info!(driver, %endpoint, "stowage-controller serving");
        servers.push((listener, stowage_controller::routes(backend)));
    }
    // One shutdown for gRPC and /metrics: SIGTERM stops both.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listener) = metrics {
        stowage_csi::metrics::start(listener, stop_rx.clone());
    }
    let shutdown = async move {
        stowage_csi::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    stowage_csi::serve::serve_all(servers, shutdown).await?;
    tracing::info!("stowage-controller stopped");
    Ok(())
}
