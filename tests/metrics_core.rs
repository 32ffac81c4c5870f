//! The metrics path end to end with real processes: a real `kata-agent`, the shim's management
//! server (the metrics-server example, which is the shim's metrics module without containerd),
//! and the real `kata-runtime` binary. Values are checked against /proc read by the test itself.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{prom, ShimOptions};

/// The shim's agent deadline in these tests, and the slack the issue allows on top of it.
const DEADLINE: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_secs(1);

/// Families the shim serves from its own registry, whatever the agent does.
const HOST_FAMILIES: [&str; 11] = [
    "kata_shim_threads",
    "kata_shim_fds",
    "kata_shim_proc_status",
    "kata_shim_proc_stat",
    "kata_shim_netdev",
    "process_resident_memory_bytes",
    "kata_hypervisor_threads",
    "kata_hypervisor_fds",
    "kata_hypervisor_proc_status",
    "kata_hypervisor_proc_stat",
    "kata_hypervisor_netdev",
];

fn assert_host_families(text: &str) {
    let all = prom::samples(text);
    for family in HOST_FAMILIES {
        assert!(
            prom::has_prefix(&all, family),
            "{family} missing from:\n{text}"
        );
    }
}

fn agent_up(text: &str) -> f64 {
    prom::value(&prom::samples(text), "kata_shim_agent_metrics_up", &[])
        .expect("kata_shim_agent_metrics_up present")
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_what_proc_says_about_the_agent_and_hypervisor() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (_agent, agent_url) = support::start_agent(dir.path());
    let hypervisor = support::start_fake_hypervisor();
    let id = support::unique_id("values");
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir: &run_dir,
        hypervisor_pid: Some(hypervisor.pid()),
        metrics_timeout: "1s",
        extra: vec![],
    });

    let (text, _) = support::scrape(&run_dir, &id).await;
    let all = prom::samples(&text);

    // The agent runs on this machine, so its "guest" is this machine.
    let mem_total = support::proc_field("/proc/meminfo", "MemTotal") * 1024;
    assert_eq!(
        prom::value(&all, "kata_guest_meminfo", &[("item", "mem_total")]),
        Some(mem_total as f64)
    );

    let cpus: BTreeSet<String> = prom::family(&all, "kata_guest_cpu_time")
        .iter()
        .map(|l| l.labels["cpu"].clone())
        .collect();
    let mut expected: BTreeSet<String> = support::proc_stat_cpus().into_iter().collect();
    expected.insert("total".to_string());
    assert_eq!(cpus, expected);

    let pid = hypervisor.pid();
    let status = format!("/proc/{pid}/status");
    assert_eq!(
        prom::value(&all, "kata_hypervisor_threads", &[]),
        Some(support::proc_field(&status, "Threads") as f64)
    );
    assert_eq!(prom::value(&all, "kata_hypervisor_threads", &[]), Some(5.0));
    assert_eq!(
        prom::value(&all, "kata_hypervisor_proc_status", &[("item", "vmrss")]),
        Some((support::proc_field(&status, "VmRSS") * 1024) as f64)
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert_eq!(
        prom::value(&all, "kata_hypervisor_fds", &[]),
        Some(fds as f64)
    );

    // The agent's standard process families arrive renamed; the shim's own stay unprefixed.
    assert!(prom::has_prefix(
        &all,
        "kata_agent_process_resident_memory_bytes"
    ));
    assert!(prom::has_prefix(&all, "kata_agent_proc_status"));
    assert!(prom::value(&all, "kata_agent_scrape_count", &[]).is_some_and(|n| n >= 1.0));
    assert!(prom::value(&all, "process_resident_memory_bytes", &[]).is_some());
    assert_host_families(&text);
    assert_eq!(agent_up(&text), 1.0);
    let calls = prom::value(
        &all,
        "kata_shim_agent_rpc_durations_histogram_milliseconds_count",
        &[("action", "grpc.GetMetricsRequest")],
    );
    assert_eq!(calls, Some(1.0), "one scrape, one GetMetrics call");

    // Nothing the host adds is missing from a second scrape, and the scrape count moved.
    let (second, _) = support::scrape(&run_dir, &id).await;
    let second = prom::samples(&second);
    assert_eq!(
        prom::value(&second, "kata_agent_scrape_count", &[]),
        Some(2.0)
    );

    support::promtool_check(&text).expect("a full scrape passes promtool check metrics");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_sandbox_prints_katas_message_and_fails() {
    let dir = support::temp_dir();
    let (code, out, err) = support::kata_runtime(dir.path(), &["metrics", "no-such-sandbox"]).await;
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        "Container ID (no-such-sandbox) does not exist"
    );

    let (code, _, err) = support::kata_runtime(dir.path(), &["metrics", "../../etc"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("invalid sandbox id \"../../etc\""), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn management_server_speaks_http_correctly() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (_agent, agent_url) = support::start_agent(dir.path());
    let id = support::unique_id("http");
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir: &run_dir,
        hypervisor_pid: None,
        metrics_timeout: "1s",
        extra: vec![],
    });
    let socket = run_dir.join(&id).join("shim-monitor.sock");

    // Directory 0700, socket 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run_dir.join(&id)), 0o700);
    assert_eq!(mode(&socket), 0o600);

    let (head, body) = raw_http(&socket, "GET /metrics HTTP/1.1\r\nHost: anything\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("kata_guest_meminfo"));

    let (head, body) = raw_http(
        &socket,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    );
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut plain)
        .expect("a valid gzip body");
    assert!(plain.contains("kata_guest_meminfo"));

    let (head, body) = raw_http(&socket, "GET /agent-url HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        agent_url,
        "agent URL, no newline"
    );

    let (head, _) = raw_http(&socket, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = raw_http(
        &socket,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (head, _) = raw_http(&socket, &huge);
    assert!(
        head.starts_with("HTTP/1.1 431"),
        "oversized request headers: {head}"
    );
}

/// Sends one raw request and reads the whole answer (the test closes its write side after sending).
fn raw_http(socket: &std::path::Path, request: &str) -> (String, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).expect("connect to the management socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut body = answer[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (head, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_leaves_the_host_families_and_says_so() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (agent, agent_url) = support::start_agent(dir.path());
    let hypervisor = support::start_fake_hypervisor();
    let id = support::unique_id("killed");
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir: &run_dir,
        hypervisor_pid: Some(hypervisor.pid()),
        metrics_timeout: "1s",
        extra: vec![],
    });
    let (text, _) = support::scrape(&run_dir, &id).await;
    assert_eq!(agent_up(&text), 1.0);

    agent.signal(nix::sys::signal::Signal::SIGKILL);
    drop(agent);
    let (text, took) = support::scrape(&run_dir, &id).await;
    assert!(took < DEADLINE + SLACK, "scrape took {took:?}");
    assert_eq!(agent_up(&text), 0.0);
    assert_host_families(&text);
    assert!(!text.contains("kata_guest_"), "no stale guest data");
    let all = prom::samples(&text);
    let errors: f64 = prom::family(&all, "kata_shim_agent_metrics_errors_total")
        .iter()
        .map(|l| l.value)
        .sum();
    assert!(errors >= 1.0, "the failure is counted");
    support::promtool_check(&text).expect("promtool accepts the agent-less scrape");

    // The agent comes back on the same socket: the next scrape reconnects.
    let (_agent, _) = support::start_agent(dir.path());
    let (text, _) = support::scrape(&run_dir, &id).await;
    assert_eq!(
        agent_up(&text),
        1.0,
        "reconnected after the agent restarted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_does_not_stall_the_scrape() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (agent, agent_url) = support::start_agent(dir.path());
    let hypervisor = support::start_fake_hypervisor();
    let id = support::unique_id("hung");
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir: &run_dir,
        hypervisor_pid: Some(hypervisor.pid()),
        metrics_timeout: "1s",
        extra: vec![],
    });
    let (text, _) = support::scrape(&run_dir, &id).await;
    assert_eq!(agent_up(&text), 1.0);

    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    for round in 0..2 {
        let (text, took) = support::scrape(&run_dir, &id).await;
        assert!(
            took < DEADLINE + SLACK,
            "round {round}: scrape took {took:?}"
        );
        assert_eq!(agent_up(&text), 0.0);
        assert_host_families(&text);
        let all = prom::samples(&text);
        assert!(prom::value(
            &all,
            "kata_shim_agent_metrics_errors_total",
            &[("reason", "timeout")]
        )
        .is_some_and(|n| n >= 1.0));
    }
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    let (text, _) = support::scrape(&run_dir, &id).await;
    assert_eq!(agent_up(&text), 1.0, "recovers once the agent runs again");
}

/// Starts a fake agent answering `text`, and a shim in front of it.
async fn shim_with_fake_agent(
    dir: &std::path::Path,
    text: String,
    extra: Vec<String>,
) -> (
    ttrpc::asynchronous::Server,
    support::Proc,
    support::Proc,
    String,
) {
    let (server, url) = support::fake_agent::serve(
        &dir.join("fake-agent.sock"),
        support::fake_agent::FakeAgent {
            text,
            delay: Duration::ZERO,
        },
    )
    .await;
    let hypervisor = support::start_fake_hypervisor();
    let id = support::unique_id("fake");
    let shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &url,
        run_dir: &dir.join("sbs"),
        hypervisor_pid: Some(hypervisor.pid()),
        metrics_timeout: "1s",
        extra,
    });
    (server, shim, hypervisor, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_agent_text_is_refused() {
    let dir = support::temp_dir();
    let garbage =
        "this is { not prometheus\n\u{0}\u{1}binary junk }}} 1 2 3\nkata_guest_x{item=\"a} NaNx\n"
            .to_string();
    let (_server, _shim, _hv, id) = shim_with_fake_agent(dir.path(), garbage, vec![]).await;
    let (text, took) = support::scrape(&dir.path().join("sbs"), &id).await;
    assert!(took < DEADLINE + SLACK, "scrape took {took:?}");
    assert_eq!(agent_up(&text), 0.0);
    assert_host_families(&text);
    assert!(!text.contains("binary junk") && !text.contains("kata_guest_x"));
    let all = prom::samples(&text);
    assert!(prom::value(
        &all,
        "kata_shim_agent_metrics_errors_total",
        &[("reason", "invalid_text")]
    )
    .is_some_and(|n| n >= 1.0));
    support::promtool_check(&text).expect("promtool accepts the scrape");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_agent_text_is_refused() {
    let dir = support::temp_dir();
    let mut big = String::from("# TYPE kata_guest_load gauge\n");
    for i in 0..40_000 {
        big.push_str(&format!("kata_guest_load{{item=\"load{i}\"}} 1\n"));
    }
    let (_server, _shim, _hv, id) = shim_with_fake_agent(
        dir.path(),
        big,
        vec!["--max-agent-text".into(), "262144".into()],
    )
    .await;
    let (text, took) = support::scrape(&dir.path().join("sbs"), &id).await;
    assert!(took < DEADLINE + SLACK, "scrape took {took:?}");
    assert_eq!(agent_up(&text), 0.0);
    assert_host_families(&text);
    assert!(!text.contains("load39999"));
    let all = prom::samples(&text);
    assert!(prom::value(
        &all,
        "kata_shim_agent_metrics_errors_total",
        &[("reason", "too_large")]
    )
    .is_some_and(|n| n >= 1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_cannot_forge_host_families_or_labels() {
    let dir = support::temp_dir();
    let lies = "\
# TYPE kata_guest_load gauge
kata_guest_load{item=\"load1\"} 0.5
# TYPE kata_hypervisor_threads gauge
kata_hypervisor_threads 999
# TYPE kata_guest_tasks gauge
kata_guest_tasks{item=\"cur\",sandbox_id=\"someone-else\"} 3
# TYPE process_open_fds gauge
process_open_fds 7
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item=\"mem_total\"} 1
kata_guest_meminfo{item=\"mem_total\"} 2
"
    .to_string();
    let (_server, _shim, hv, id) = shim_with_fake_agent(dir.path(), lies, vec![]).await;
    let (text, _) = support::scrape(&dir.path().join("sbs"), &id).await;
    let all = prom::samples(&text);
    assert_eq!(
        agent_up(&text),
        1.0,
        "the valid families still count as agent metrics"
    );
    assert_eq!(
        prom::value(&all, "kata_guest_load", &[("item", "load1")]),
        Some(0.5)
    );
    assert_eq!(
        prom::value(&all, "kata_agent_process_open_fds", &[]),
        Some(7.0),
        "renamed"
    );
    let threads = support::proc_field(&format!("/proc/{}/status", hv.pid()), "Threads") as f64;
    assert_eq!(
        prom::value(&all, "kata_hypervisor_threads", &[]),
        Some(threads),
        "the host's value, not the guest's 999"
    );
    assert!(
        prom::family(&all, "kata_guest_tasks").is_empty(),
        "a family setting sandbox_id is dropped"
    );
    assert!(
        prom::family(&all, "kata_guest_meminfo").is_empty(),
        "a family with duplicate series is dropped"
    );
    assert!(!text.contains("someone-else"));
    let dropped =
        prom::value(&all, "kata_shim_agent_metrics_dropped_families_total", &[]).unwrap_or(0.0);
    assert_eq!(
        dropped, 3.0,
        "hypervisor forgery, sandbox_id label, duplicate series"
    );
    support::promtool_check(&text).expect("promtool accepts the scrape");
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_vsock_reaches_the_agent_through_the_handshake() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (_agent, _) = support::start_agent(dir.path());
    let relay = support::hvsock_relay::start(
        &dir.path().join("vm.vsock"),
        &dir.path().join("agent.sock"),
        support::hvsock_relay::Mode::Relay,
    );
    let id = support::unique_id("hvsock");
    let url = format!("hvsock://{}:1024", relay.socket.display());
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &url,
        run_dir: &run_dir,
        hypervisor_pid: None,
        metrics_timeout: "1s",
        extra: vec![],
    });
    let (text, _) = support::scrape(&run_dir, &id).await;
    assert_eq!(agent_up(&text), 1.0);
    let mem_total = support::proc_field("/proc/meminfo", "MemTotal") * 1024;
    assert_eq!(
        prom::value(
            &prom::samples(&text),
            "kata_guest_meminfo",
            &[("item", "mem_total")]
        ),
        Some(mem_total as f64)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_vsock_faults_are_reported_clearly_and_in_time() {
    use kata_shim_metrics::agent_client::{AgentClient, AgentTimeouts};
    use support::hvsock_relay::Mode;

    let dir = support::temp_dir();
    let (_agent, _) = support::start_agent(dir.path());
    let cases = [
        (Mode::Garbage, "expected a reply \"OK <port>\""),
        (Mode::Silent, "within"),
        (
            Mode::Close,
            "closed the connection before answering CONNECT 1024",
        ),
    ];
    for (mode, expected) in cases {
        let socket = dir.path().join(format!("{mode:?}.vsock"));
        let _relay = support::hvsock_relay::start(&socket, &dir.path().join("agent.sock"), mode);
        let url = format!("hvsock://{}:1024", socket.display())
            .parse()
            .unwrap();
        let client = AgentClient::new(
            url,
            AgentTimeouts {
                connect: DEADLINE,
                metrics: DEADLINE,
                ..AgentTimeouts::default()
            },
        );
        let started = Instant::now();
        let err = client
            .get_metrics(Default::default())
            .await
            .expect_err("a broken relay cannot give metrics");
        let took = started.elapsed();
        assert!(took < DEADLINE + SLACK, "{mode:?}: took {took:?}");
        let message = err.to_string();
        assert!(message.contains(expected), "{mode:?}: {message}");
        assert!(
            message.contains(&socket.display().to_string()),
            "{mode:?}: names the address: {message}"
        );

        // Through the shim: still answers, says the agent is missing.
        let id = support::unique_id("hvfault");
        let run_dir = dir.path().join("sbs");
        let url = format!("hvsock://{}:1024", socket.display());
        let _shim = support::start_shim(ShimOptions {
            sandbox_id: &id,
            agent_url: &url,
            run_dir: &run_dir,
            hypervisor_pid: None,
            metrics_timeout: "1s",
            extra: vec![],
        });
        let (text, took) = support::scrape(&run_dir, &id).await;
        assert!(took < DEADLINE + SLACK, "{mode:?}: scrape took {took:?}");
        assert_eq!(agent_up(&text), 0.0, "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_abstract_socket_serves_only_root_in_the_host_mount_namespace() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let (_agent, agent_url) = support::start_agent(dir.path());
    let id = support::unique_id("peer");
    let _shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir: &run_dir,
        hypervisor_pid: None,
        metrics_timeout: "1s",
        extra: vec![],
    });
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root, like containerd's shims"
    );
    // An empty run directory leaves only the abstract socket to find.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let runtime = support::bin("kata-runtime");
    let run = |prefix: &[&str]| {
        let mut cmd = std::process::Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .arg(&runtime)
            .args(["metrics", &id])
            .env("KATA_SANDBOX_RUN_DIR", &empty);
        let out = cmd.output().expect("run kata-runtime");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = run(&["env"]);
    assert_eq!(code, Some(0), "root in the host namespace is served: {err}");
    assert!(out.contains("kata_shim_agent_metrics_up"));

    let (code, out, err) = run(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    assert_ne!(code, Some(0));
    assert!(out.is_empty());
    assert!(
        err.contains("403") && err.contains("peer uid 65534"),
        "{err}"
    );

    let (code, out, err) = run(&["unshare", "--mount"]);
    assert_ne!(code, Some(0));
    assert!(out.is_empty());
    assert!(
        err.contains("403") && err.contains("another mount namespace"),
        "{err}"
    );
}
