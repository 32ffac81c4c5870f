//! kata-runtime: command-line access to running sandboxes (`kata-runtime metrics <sandbox id>`).

use std::io::Write;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kata_shim_metrics::runtime_cli::{self, Lookup};

#[derive(Parser)]
#[command(name = "kata-runtime", version, about = "Kata-compatible runtime CLI")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a sandbox's metrics (Prometheus text) as its shim serves them.
    Metrics {
        /// The sandbox id.
        sandbox_id: String,
        /// containerd namespace of the sandbox (found automatically when left out).
        #[arg(long)]
        namespace: Option<String>,
        /// How long to wait for the shim's answer, e.g. 10s or 500ms.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Metrics {
            sandbox_id,
            namespace,
            timeout,
        } => {
            let lookup = Lookup {
                namespace,
                ..Lookup::default()
            };
            runtime_cli::metrics(&sandbox_id, &lookup, timeout).await
        }
    };
    match result {
        Ok(body) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(err) = stdout.write_all(&body).and_then(|()| stdout.flush()) {
                eprintln!("kata-runtime: writing the metrics: {err}");
                std::process::exit(1);
            }
        }
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(1);
        }
    }
}
