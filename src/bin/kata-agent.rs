//! kata-agent: serves the agent API (GetMetrics, Health) on vsock port 1024, or on a unix socket.

use clap::Parser;
use kata_shim_metrics::agent::service::{self, AgentService};
use kata_shim_metrics::agent::url::AgentUrl;

#[derive(Parser)]
#[command(name = "kata-agent", version, about = "Kata-compatible guest agent")]
struct Args {
    /// Where to listen: vsock://-1:<port> in a guest, unix://<path> on a host.
    #[arg(long, default_value = "vsock://-1:1024")]
    listen: AgentUrl,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    kata_shim_metrics::logging::init(&args.log_level);
    if let Err(err) = run(args).await {
        eprintln!("kata-agent: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let service = AgentService::new()?;
    let mut server = service::serve(&args.listen, service).await?;
    tracing::info!(listen = %args.listen, "agent serving");
    kata_shim_metrics::signals::wait_for_termination().await?;
    tracing::info!("agent stopping");
    server.shutdown().await?;
    Ok(())
}
