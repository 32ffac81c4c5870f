//! kata-monitor: one Prometheus target for every Kata sandbox on this node.

use clap::Parser;
use kata_shim_metrics::monitor::{self, config::Args};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    kata_shim_metrics::logging::init(&args.log_level);
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kata-monitor: {err}");
            std::process::exit(2);
        }
    };
    if let Err(err) = monitor::run(config).await {
        eprintln!("kata-monitor: {err}");
        std::process::exit(1);
    }
}
