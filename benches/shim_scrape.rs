//! Scrapes one shim's `/metrics` (management server + live agent over a unix socket) 1000 times and
//! reports latency percentiles, the shim's RSS and the bytes per scrape; then times the shim-only
//! part (gather + encode of the host registry) in process. Run with `cargo bench --bench shim_scrape`;
//! results go to BENCHMARKS.md by hand (they depend on the machine).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kata_shim_metrics::agent_client::{AgentClient, AgentTimeouts};
use kata_shim_metrics::bench_support::{shim_compose, AgentRender};
use kata_shim_metrics::mgmt::client::{get, GetOptions, DEFAULT_MAX_BODY};
use kata_shim_metrics::mgmt::paths::SocketAddress;
use kata_shim_metrics::protocols::agent::GetMetricsRequest;
use kata_shim_metrics::shim::metrics::registry::{
    register_hypervisor, register_shim_collectors, REGISTRY,
};
use prometheus::{Encoder, TextEncoder};

const SCRAPES: usize = 1000;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn release_example(name: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --release --example");
    assert!(status.success());
    // The example sits next to the bench's own binary (`<target>/release/deps/`), wherever
    // CARGO_TARGET_DIR puts it.
    let deps = std::env::current_exe().expect("the bench's own path");
    deps.parent()
        .and_then(Path::parent)
        .expect("the bench runs from <target>/release/deps")
        .join("examples")
        .join(name)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent_socket = dir.path().join("agent.sock");
    let agent_url = format!("unix://{}", agent_socket.display());
    let _agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_kata-agent"))
            .args(["--listen", &agent_url, "--log-level", "warn"])
            .spawn()
            .expect("start kata-agent"),
    );
    wait_for(&agent_socket);
    let hypervisor = Killed(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("start sleep"),
    );
    let run_dir = dir.path().join("sbs");
    let shim = Killed(
        Command::new(release_example("metrics-server"))
            .args([
                "--sandbox-id",
                "bench",
                "--namespace",
                "default",
                "--agent-url",
                &agent_url,
            ])
            .args(["--hypervisor-pid", &hypervisor.0.id().to_string()])
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--no-abstract")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the shim"),
    );
    let socket = run_dir.join("bench/shim-monitor.sock");
    wait_for(&socket);
    let address = SocketAddress::File(socket);
    let options = GetOptions {
        timeout: Duration::from_secs(5),
        max_body: DEFAULT_MAX_BODY,
        gzip: false,
    };

    let mut times = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let response = get(&address, "/metrics", &options).await.expect("scrape");
        times.push(started.elapsed());
        assert!(response.status.is_success());
        bytes = response.body.len();
    }
    report("full scrape (shim + agent, new connection each)", times);
    println!("bytes per scrape: {bytes}");
    println!(
        "shim RSS after {SCRAPES} scrapes: {} KiB (peak {} KiB)",
        status_kib(shim.0.id(), "VmRSS:"),
        status_kib(shim.0.id(), "VmHWM:")
    );

    let mut times = Vec::with_capacity(SCRAPES);
    for _ in 0..SCRAPES {
        let started = Instant::now();
        get(&address, "/agent-url", &options)
            .await
            .expect("agent-url");
        times.push(started.elapsed());
    }
    report("HTTP round trip alone (/agent-url)", times);

    // The GetMetrics round trip alone, over the same kind of socket, as the shim makes it.
    let agent = AgentClient::new(
        agent_url.parse().expect("agent url"),
        AgentTimeouts::default(),
    );
    let mut times = Vec::with_capacity(SCRAPES);
    let mut agent_text = String::new();
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let reply = agent
            .get_metrics(GetMetricsRequest::new())
            .await
            .expect("GetMetrics");
        times.push(started.elapsed());
        agent_text = reply.metrics;
    }
    report(
        "GetMetrics round trip (ttrpc client to a live agent)",
        times,
    );
    println!("agent text: {} bytes", agent_text.len());

    // What the agent does per call without the transport, in this process.
    let agent_render = AgentRender::new().expect("agent registry");
    let mut times = Vec::with_capacity(SCRAPES);
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let text = agent_render.render().expect("agent render");
        times.push(started.elapsed());
        assert!(!text.is_empty());
    }
    report("agent's own time per GetMetrics (in process)", times);

    register_shim_collectors().expect("shim collectors");
    register_hypervisor(hypervisor.0.id() as i32).expect("hypervisor collector");
    let mut times = Vec::with_capacity(SCRAPES);
    let mut out = Vec::with_capacity(64 * 1024);
    for _ in 0..SCRAPES {
        out.clear();
        let started = Instant::now();
        TextEncoder::new()
            .encode(&REGISTRY.gather(), &mut out)
            .expect("encode");
        times.push(started.elapsed());
    }
    report(
        "shim-only part (gather + encode host registry, in process)",
        times,
    );
    println!("host registry text: {} bytes", out.len());

    let mut times = Vec::with_capacity(SCRAPES);
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let body = shim_compose(&agent_text);
        times.push(started.elapsed());
        assert!(body.len() > agent_text.len());
    }
    report(
        "shim's whole part with the agent's text in hand (check + host registry + encode, in process)",
        times,
    );
}
