//! kata-agent: serves the agent API (containers, GetMetrics, Health) on vsock port 1024, or on a
//! unix socket. `kata-agent init-container` (hidden) is the container init it re-executes.
//!
//! Started by the kernel as the guest's init (PID 1), it first sets the guest up (mounts, modules,
//! network, hostname) and then never exits: termination signals are logged and ignored, and if the
//! agent cannot serve, it powers the VM off so that the hypervisor exits and the shim sees it.
//! Reaping: see `guest::reaper` (it owns waitpid for container processes).

use std::time::Duration;

use clap::Parser;
use kata_shim_metrics::agent::url::AgentUrl;
use kata_shim_metrics::agent::CONSOLE_READY_LINE;
use kata_shim_metrics::guest::boot;
use kata_shim_metrics::guest::container::cgroup::CgroupRoot;
use kata_shim_metrics::guest::container::{self, spawn::INIT_SUBCOMMAND};
use kata_shim_metrics::guest::reaper::Reaper;
use kata_shim_metrics::guest::service::{self, AgentService};
use tokio::signal::unix::{signal, SignalKind};

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
    // The container init (see guest::container::spawn) re-executes this binary; it must run
    // before any thread exists, so before the tokio runtime (and it is PID 1 of its own pid
    // namespace, so before the guest-init check too).
    if std::env::args_os().nth(1).as_deref() == Some(INIT_SUBCOMMAND.as_ref()) {
        container::init::main();
    }
    let init = boot::is_init();
    let args = if init {
        // The kernel passes init the unknown words of the kernel command line: ignore them.
        Args::try_parse().unwrap_or_else(|_| Args {
            listen: AgentUrl::Vsock {
                cid: kata_shim_metrics::agent::url::VSOCK_CID_ANY,
                port: kata_shim_metrics::agent::url::DEFAULT_AGENT_PORT,
            },
            log_level: "info".to_string(),
        })
    } else {
        Args::parse()
    };
    if init {
        // The serial console is read by people and by the shim's error messages: no colour codes.
        // Still single-threaded here, so changing the environment is safe.
        std::env::set_var("NO_COLOR", "1");
    }
    kata_shim_metrics::logging::init(&args.log_level);
    if init {
        // Before any thread exists: the console and mounts are process-wide.
        boot::setup_guest();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => fail(init, format!("cannot start the async runtime: {err}")),
    };
    let result = runtime.block_on(run(args, init));
    match result {
        Ok(()) if !init => {}
        Ok(()) => fail(init, "the agent stopped serving".to_string()),
        Err(err) => fail(init, err.to_string()),
    }
}

/// Exits with an error, or as init (which must never exit) powers the VM off.
fn fail(init: bool, what: String) -> ! {
    eprintln!("kata-agent: {what}");
    if !init {
        std::process::exit(1);
    }
    tracing::error!("kata-agent cannot serve as the guest's init: {what}; powering off");
    std::thread::sleep(Duration::from_millis(200));
    let err = boot::power_off();
    tracing::error!("power off failed: {err}; sleeping forever");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

async fn run(args: Args, init: bool) -> Result<(), Box<dyn std::error::Error>> {
    let reaper = Reaper::start()?;
    let service = AgentService::new(reaper, CgroupRoot::detect())?;
    let containers = service.containers();
    let mut server = service::serve(&args.listen, service).await?;
    tracing::info!(listen = %args.listen, "agent serving");
    if init {
        // Whatever the log level: the shim waits for this line (see CONSOLE_READY_LINE).
        eprintln!("{CONSOLE_READY_LINE}");
        // PID 1 does not stop on SIGTERM or SIGINT (handlers, unlike SIG_IGN, are not inherited by
        // the processes the agent starts).
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = term.recv() => tracing::warn!("SIGTERM ignored: the guest's init does not stop"),
                _ = int.recv() => tracing::warn!("SIGINT ignored: the guest's init does not stop"),
            }
        }
    }
    kata_shim_metrics::signals::wait_for_termination().await?;
    tracing::info!("agent stopping");
    // Containers outlive their agent otherwise (on a host; in a guest the VM goes with it).
    let _ = containers.destroy_sandbox().await;
    server.shutdown().await?;
    Ok(())
}
