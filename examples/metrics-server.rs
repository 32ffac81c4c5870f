//! Serves one sandbox's management socket for an agent that is already running (a host agent, or a
//! VM started by hand): the shim's whole metrics path without containerd. The tests and benchmarks
//! use it as "the shim"; it prints `ready` on stdout once both sockets listen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kata_shim_metrics::agent::url::AgentUrl;
use kata_shim_metrics::agent_client::{AgentClient, AgentTimeouts};
use kata_shim_metrics::metrics::exposition::Limits;
use kata_shim_metrics::mgmt::{self, paths};
use kata_shim_metrics::shim::metrics::{launch, registry};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    sandbox_id: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long)]
    agent_url: AgentUrl,
    /// The process to report as the hypervisor.
    #[arg(long)]
    hypervisor_pid: Option<i32>,
    /// Run directory (default: $KATA_SANDBOX_RUN_DIR, else /run/vc/sbs).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    metrics_timeout: Duration,
    /// Largest agent metrics text accepted, in bytes.
    #[arg(long)]
    max_agent_text: Option<usize>,
    #[arg(long)]
    no_abstract: bool,
    /// An OCI annotation of the sandbox, `key=value` (repeatable); the CRI ones give the pod labels.
    #[arg(long = "annotation", value_parser = parse_annotation)]
    annotations: Vec<(String, String)>,
}

fn parse_annotation(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("annotation {text:?} is not key=value"))
}

#[tokio::main]
async fn main() {
    kata_shim_metrics::logging::init("warn");
    if let Err(err) = run(Args::parse()).await {
        eprintln!("metrics-server: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let timeouts = AgentTimeouts {
        metrics: args.metrics_timeout,
        connect: args.metrics_timeout,
        ..AgentTimeouts::default()
    };
    let mut limits = Limits::default();
    if let Some(max) = args.max_agent_text {
        limits.max_bytes = max;
    }
    let server = launch::start(launch::SandboxMetrics {
        sandbox_id: args.sandbox_id,
        namespace: args.namespace,
        run_dir: args.run_dir.unwrap_or_else(|| paths::run_dir(None)),
        hypervisor_pid: args.hypervisor_pid,
        vsock_daemon_pid: None,
        agent: Arc::new(
            AgentClient::new(args.agent_url, timeouts)
                .with_durations(Some(registry::agent_rpc_durations())),
        ),
        agent_text_limits: limits,
        abstract_socket: !args.no_abstract,
        pod: mgmt::pod_identity_from_annotations(&args.annotations.into_iter().collect()),
        containers: Default::default(),
    })
    .await?;
    println!("ready");
    kata_shim_metrics::signals::wait_for_termination().await?;
    server.shutdown().await;
    Ok(())
}
