//! kata-agent: serves the agent API (GetMetrics, Health) on vsock port 1024, or on a unix socket.

use clap::Parser;
use kata_shim_metrics::agent::container::{self, spawn::INIT_SUBCOMMAND};
use kata_shim_metrics::agent::reaper::Reaper;
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

fn main() {
    // The container init (see agent::container::spawn) re-executes this binary; it must run
    // before any thread exists, so before the tokio runtime.
    if std::env::args_os().nth(1).as_deref() == Some(INIT_SUBCOMMAND.as_ref()) {
        container::init::main();
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kata-agent: starting the async runtime: {err}");
            std::process::exit(1);
        }
    };
    runtime.block_on(agent_main(args));
}

async fn agent_main(args: Args) {
    kata_shim_metrics::logging::init(&args.log_level);
    if let Err(err) = run(args).await {
        eprintln!("kata-agent: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let reaper = Reaper::start()?;
    let service = AgentService::new(reaper)?;
    let mut server = service::serve(&args.listen, service).await?;
    tracing::info!(listen = %args.listen, "agent serving");
    kata_shim_metrics::signals::wait_for_termination().await?;
    tracing::info!("agent stopping");
    server.shutdown().await?;
    Ok(())
}
