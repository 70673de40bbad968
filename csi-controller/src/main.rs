//! `stowage-controller`: serves one backend's CSI controller on a unix socket.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage_csi::endpoint::Endpoint;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Stowage CSI controller plugin (Identity + Controller + stowage.v1)"
)]
struct Args {
    /// Where to serve: unix:///path/csi.sock (or tcp://host:port for tests).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/stowage/controller.sock"
    )]
    endpoint: String,
    /// Backend configuration (YAML); see examples/.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: PathBuf,
    /// Log format: text or json.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    stowage_csi::logging::init(&args.log_format)?;
    let endpoint = Endpoint::parse(&args.endpoint).context("--endpoint")?;
    let config = stowage_backends::Config::load(&args.config)?;
    let backend = stowage_backends::build_controller(&config)
        .await
        .context("starting the backend")?;
    tracing::info!(driver = backend.driver_name(), %endpoint, "stowage-controller serving");
    stowage_csi::serve::serve(
        &endpoint,
        stowage_controller::routes(backend),
        stowage_csi::serve::shutdown_signal(),
    )
    .await?;
    tracing::info!("stowage-controller stopped");
    Ok(())
}
