//! kata-monitor with real processes: management servers ("shims", the metrics-server example) with
//! real `kata-agent`s under a temporary run directory, the real `kata-monitor` binary, hand-made
//! broken shims, `promtool`, and a real Prometheus scraping the monitor.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use support::{prom, Proc, ShimOptions};

/// How fast a sandbox must appear in, or leave, `/sandboxes` (from the issue).
const DISCOVERY_LIMIT: Duration = Duration::from_secs(2);

struct Response {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// One GET to the monitor over TCP.
async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to kata-monitor");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("send request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("read the body")
        .to_bytes()
        .to_vec();
    Response {
        status,
        headers,
        body,
    }
}

async fn metrics(port: u16) -> String {
    let response = get(port, "/metrics", &[]).await;
    assert_eq!(response.status, 200);
    response.text()
}

async fn sandbox_ids(port: u16) -> Vec<String> {
    get(port, "/sandboxes", &[])
        .await
        .text()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls `/sandboxes` until `present(ids)` holds; returns how long that took.
async fn wait_for_sandboxes(
    port: u16,
    what: &str,
    present: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let ids = sandbox_ids(port).await;
        if present(&ids) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: /sandboxes still says {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts kata-monitor on a free port, watching `run_dirs`.
fn start_monitor(run_dirs: &[&Path], extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new(support::bin("kata-monitor"));
    cmd.args(["--listen-address", &format!("127.0.0.1:{port}")])
        .args(["--log-level", "warn"])
        .args(extra);
    for dir in run_dirs {
        cmd.arg("--run-dir").arg(dir);
    }
    let proc = Proc {
        child: cmd.spawn().expect("start kata-monitor"),
        name: "kata-monitor".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kata-monitor did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, port)
}

/// A sandbox: its own agent and a shim with pod annotations.
struct TestSandbox {
    id: String,
    agent_url: String,
    pod: (String, String, String),
    shim: Option<Proc>,
    _agent: Proc,
}

fn start_sandbox(dir: &Path, run_dir: &Path, tag: &str) -> TestSandbox {
    let id = support::unique_id(tag);
    let agent_dir = dir.join(format!("agent-{id}"));
    std::fs::create_dir_all(&agent_dir).unwrap();
    let (agent, agent_url) = support::start_agent(&agent_dir);
    let pod = (
        format!("uid-{id}"),
        format!("pod-{tag}"),
        format!("ns-{tag}"),
    );
    let shim = support::start_shim(ShimOptions {
        sandbox_id: &id,
        agent_url: &agent_url,
        run_dir,
        hypervisor_pid: None,
        metrics_timeout: "1s",
        extra: vec![
            "--no-abstract".into(),
            "--annotation".into(),
            format!("io.kubernetes.cri.sandbox-uid={}", pod.0),
            "--annotation".into(),
            format!("io.kubernetes.cri.sandbox-name={}", pod.1),
            "--annotation".into(),
            format!("io.kubernetes.cri.sandbox-namespace={}", pod.2),
            "--annotation".into(),
            "io.kubernetes.cri.container-type=sandbox".into(),
        ],
    });
    TestSandbox {
        id,
        agent_url,
        pod,
        shim: Some(shim),
        _agent: agent,
    }
}

/// Every `kata_shim_*`/`kata_guest_*` sample carries exactly one `sandbox_id`, and the cri labels
/// of the pod it came from.
fn assert_labelled(text: &str, sandboxes: &[&TestSandbox]) {
    let by_id: BTreeMap<&str, &TestSandbox> =
        sandboxes.iter().map(|s| (s.id.as_str(), *s)).collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.matches("sandbox_id=").count() <= 1,
            "sandbox_id repeated: {line}"
        );
    }
    let all = prom::samples(text);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for sample in all
        .iter()
        .filter(|s| s.name.starts_with("kata_shim_") || s.name.starts_with("kata_guest_"))
    {
        let id = sample
            .labels
            .get("sandbox_id")
            .unwrap_or_else(|| panic!("{} has no sandbox_id", sample.name));
        let sandbox = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{} has an unknown sandbox_id {id}", sample.name));
        assert_eq!(sample.labels.get("cri_uid"), Some(&sandbox.pod.0));
        assert_eq!(sample.labels.get("cri_name"), Some(&sandbox.pod.1));
        assert_eq!(sample.labels.get("cri_namespace"), Some(&sandbox.pod.2));
        *seen.entry(sandbox.id.as_str()).or_default() += 1;
    }
    for sandbox in sandboxes {
        for family in [
            "kata_guest_meminfo",
            "kata_shim_threads",
            "kata_shim_process_resident_memory_bytes",
            "kata_agent_process_resident_memory_bytes",
        ] {
            assert!(
                all.iter()
                    .any(|s| s.name == family && s.labels.get("sandbox_id") == Some(&sandbox.id)),
                "{family} of {} missing",
                sandbox.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_come_and_go_and_every_series_is_labelled() {
    let dir = support::temp_dir();
    // The run directory does not exist yet when the monitor starts.
    let run_dir = dir.path().join("sbs");
    let other_run_dir = dir.path().join("kata");
    let (_monitor, port) = start_monitor(&[&run_dir, &other_run_dir], &[]);
    assert!(sandbox_ids(port).await.is_empty());

    let mut sandboxes = Vec::new();
    for tag in ["web", "db", "cache"] {
        let sandbox = start_sandbox(dir.path(), &run_dir, tag);
        // The shim's socket exists once it said ready.
        let took = wait_for_sandboxes(port, "arrival", |ids| ids.contains(&sandbox.id)).await;
        assert!(
            took < DISCOVERY_LIMIT,
            "{} appeared after {took:?}",
            sandbox.id
        );
        sandboxes.push(sandbox);
    }
    let mut expected: Vec<String> = sandboxes.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    assert_eq!(sandbox_ids(port).await, expected);

    let text = metrics(port).await;
    assert_labelled(&text, &sandboxes.iter().collect::<Vec<_>>());
    let all = prom::samples(&text);
    assert_eq!(
        prom::value(&all, "kata_monitor_running_shim_count", &[]),
        Some(3.0)
    );
    for sandbox in &sandboxes {
        assert_eq!(
            prom::value(
                &all,
                "kata_monitor_sandbox_up",
                &[("sandbox_id", &sandbox.id)]
            ),
            Some(1.0)
        );
    }
    assert!(
        !prom::has_prefix(&all, "process_"),
        "shim process_* not renamed"
    );
    // One HELP/TYPE per family, whatever the number of sandboxes.
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut unique = types.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(types.len(), unique.len(), "a family is typed twice");
    support::promtool_check(&text).expect("promtool accepts the monitor's output");

    // Filters, one sandbox, gzip, OpenMetrics.
    let guest = get(
        port,
        "/metrics?filter_family=kata_guest_,kata_monitor_running",
        &[],
    )
    .await;
    let guest_samples = prom::samples(&guest.text());
    assert!(!guest_samples.is_empty());
    assert!(guest_samples
        .iter()
        .all(|s| s.name.starts_with("kata_guest_") || s.name == "kata_monitor_running_shim_count"));
    let one = &sandboxes[1];
    let only = get(port, &format!("/metrics?sandbox={}", one.id), &[]).await;
    assert_eq!(only.status, 200);
    let only_samples = prom::samples(&only.text());
    assert!(prom::has_prefix(&only_samples, "kata_guest_meminfo"));
    assert!(only_samples
        .iter()
        .all(|s| s.labels.get("sandbox_id") == Some(&one.id)));
    assert_eq!(get(port, "/metrics?sandbox=nosuch", &[]).await.status, 404);

    let zipped = get(port, "/metrics", &[("accept-encoding", "gzip")]).await;
    assert_eq!(zipped.header("content-encoding"), "gzip");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&zipped.body[..])
        .read_to_string(&mut unzipped)
        .expect("a valid gzip body");
    assert_labelled(&unzipped, &sandboxes.iter().collect::<Vec<_>>());

    let open = get(
        port,
        "/metrics",
        &[("accept", "application/openmetrics-text; version=1.0.0")],
    )
    .await;
    assert!(open
        .header("content-type")
        .starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(open.text().ends_with("# EOF\n"));
    assert_eq!(
        get(port, "/metrics", &[]).await.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );

    // The other endpoints.
    let url = get(port, &format!("/agent-url?sandbox={}", one.id), &[]).await;
    assert_eq!((url.status, url.text()), (200, one.agent_url.clone()));
    assert_eq!(
        get(port, "/agent-url?sandbox=nosuch", &[]).await.status,
        404
    );
    assert_eq!(get(port, "/agent-url?sandbox=../x", &[]).await.status, 400);
    let html = get(port, "/sandboxes", &[("accept", "text/html")]).await;
    assert!(html.header("content-type").starts_with("text/html"));
    assert!(html
        .text()
        .contains(&format!("<li><a href=\"/agent-url?sandbox={}\">", one.id)));
    assert!(get(port, "/", &[]).await.text().contains("/sandboxes"));
    assert_eq!(get(port, "/nope", &[]).await.status, 404);

    // Departures: a shim that stops (removing its directory), and a directory removed by hand.
    let mut leaving = sandboxes.remove(0);
    leaving
        .shim
        .take()
        .unwrap()
        .terminate(Duration::from_secs(5))
        .expect("the shim stops on SIGTERM");
    let took = wait_for_sandboxes(port, "departure", |ids| !ids.contains(&leaving.id)).await;
    assert!(took < DISCOVERY_LIMIT, "{} left after {took:?}", leaving.id);
    let removed = sandboxes.remove(0);
    std::fs::remove_dir_all(run_dir.join(&removed.id)).unwrap();
    let took = wait_for_sandboxes(port, "departure", |ids| !ids.contains(&removed.id)).await;
    assert!(took < DISCOVERY_LIMIT, "{} left after {took:?}", removed.id);

    let text = metrics(port).await;
    assert_labelled(&text, &[&sandboxes[0]]);
    let all = prom::samples(&text);
    assert_eq!(
        prom::value(&all, "kata_monitor_running_shim_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        prom::value(
            &all,
            "kata_monitor_sandbox_up",
            &[("sandbox_id", &leaving.id)]
        ),
        None,
        "a departed sandbox keeps no series"
    );
}

/// A unix-socket HTTP server at `<run dir>/<id>/shim-monitor.sock` that answers every request with
/// `response` (raw HTTP), standing in for a broken shim.
async fn fake_shim(
    run_dir: &Path,
    id: &str,
    status: &str,
    body: &str,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket: PathBuf = run_dir.join(id).join("shim-monitor.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_and_broken_shims_are_counted_and_do_not_stall_the_others() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    std::fs::create_dir_all(&run_dir).unwrap();
    let good: Vec<TestSandbox> = ["alpha", "beta"]
        .iter()
        .map(|tag| start_sandbox(dir.path(), &run_dir, tag))
        .collect();
    let hung = start_sandbox(dir.path(), &run_dir, "hung");
    let malformed = support::unique_id("malformed");
    let failing = support::unique_id("failing");
    let _f1 = fake_shim(
        &run_dir,
        &malformed,
        "200 OK",
        "this { is not \"prometheus text\n",
    )
    .await;
    let _f2 = fake_shim(&run_dir, &failing, "500 Internal Server Error", "boom\n").await;

    let scrape_timeout = Duration::from_secs(2);
    let (_monitor, port) = start_monitor(&[&run_dir], &["--scrape-timeout", "2s"]);
    wait_for_sandboxes(port, "all five", |ids| ids.len() == 5).await;
    hung.shim
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGSTOP);

    let started = Instant::now();
    let text = metrics(port).await;
    let took = started.elapsed();
    assert!(
        took < scrape_timeout + Duration::from_secs(1),
        "the scrape took {took:?} with one shim hung"
    );
    assert_labelled(&text, &good.iter().collect::<Vec<_>>());
    let all = prom::samples(&text);
    for sandbox in &good {
        assert_eq!(
            prom::value(
                &all,
                "kata_monitor_sandbox_up",
                &[("sandbox_id", &sandbox.id)]
            ),
            Some(1.0)
        );
    }
    for bad in [&hung.id, &malformed, &failing] {
        assert_eq!(
            prom::value(&all, "kata_monitor_sandbox_up", &[("sandbox_id", bad)]),
            Some(0.0),
            "{bad} should be visible as down"
        );
        assert!(
            !all.iter()
                .any(|s| s.labels.get("sandbox_id") == Some(bad)
                    && s.name != "kata_monitor_sandbox_up"),
            "{bad} contributed series"
        );
    }
    assert_eq!(
        prom::value(&all, "kata_monitor_scrape_failed_count", &[]),
        Some(3.0)
    );
    assert_eq!(
        prom::value(&all, "kata_monitor_scrape_count", &[]),
        Some(1.0)
    );
    support::promtool_check(&text).expect("promtool accepts the monitor's output");

    // Each scrape counts its failures again.
    let text = metrics(port).await;
    assert_eq!(
        prom::value(
            &prom::samples(&text),
            "kata_monitor_scrape_failed_count",
            &[]
        ),
        Some(6.0)
    );
}

/// A shim that goes away while it is being scraped (its sandbox was deleted): it removes its
/// socket and directory on the first request and closes the connection without an answer.
async fn vanishing_shim(run_dir: &Path, id: &str) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncReadExt;
    let dir = run_dir.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let listener = tokio::net::UnixListener::bind(dir.join("shim-monitor.sock")).unwrap();
    tokio::spawn(async move {
        if let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            std::fs::remove_dir_all(&dir).unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_deleted_during_a_scrape_is_not_a_failure() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    std::fs::create_dir_all(&run_dir).unwrap();
    let good = start_sandbox(dir.path(), &run_dir, "stays");
    let leaving = support::unique_id("leaving");
    let _shim = vanishing_shim(&run_dir, &leaving).await;
    let (_monitor, port) = start_monitor(&[&run_dir], &[]);
    wait_for_sandboxes(port, "both", |ids| ids.len() == 2).await;

    let all = prom::samples(&metrics(port).await);
    assert_eq!(
        prom::value(&all, "kata_monitor_scrape_failed_count", &[]),
        Some(0.0),
        "a sandbox that left was counted as failed"
    );
    assert_eq!(
        prom::value(&all, "kata_monitor_sandbox_up", &[("sandbox_id", &leaving)]),
        None
    );
    assert_eq!(
        prom::value(&all, "kata_monitor_sandbox_up", &[("sandbox_id", &good.id)]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_monitor() {
    let dir = support::temp_dir();
    let run_dir = dir.path().join("sbs");
    let sandbox = start_sandbox(dir.path(), &run_dir, "prom");
    let (_monitor, port) = start_monitor(&[&run_dir], &[]);
    wait_for_sandboxes(port, "arrival", |ids| ids.contains(&sandbox.id)).await;

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: kata\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    let _prometheus = Proc {
        child: prometheus,
        name: "prometheus".into(),
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let answer = query(prom_port, "kata_guest_meminfo").await;
        if answer.contains(&format!("\"sandbox_id\":\"{}\"", sandbox.id)) {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no kata_guest_meminfo with sandbox_id; last answer: {answer}; targets: {}",
            query_path(prom_port, "/api/v1/targets").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        answer.contains(&format!("\"cri_name\":\"{}\"", sandbox.pod.1)),
        "{answer}"
    );
    assert!(answer.contains("\"item\":\"mem_total\""), "{answer}");
    // The scrape was healthy (no parse error) as Prometheus saw it.
    let up = query(prom_port, "up").await;
    assert!(up.contains("\"value\":[") && up.contains(",\"1\"]"), "{up}");
}

async fn query(port: u16, promql: &str) -> String {
    query_path(port, &format!("/api/v1/query?query={promql}")).await
}

/// Body of a GET on Prometheus' HTTP API ("" while it is not up yet).
async fn query_path(port: u16, path: &str) -> String {
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => get(port, path, &[]).await.text(),
        Err(_) => String::new(),
    }
}
