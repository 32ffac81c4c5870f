//! Hostile and idle clients against both HTTP servers, with real processes and sockets: the shim's
//! management server (the metrics-server example with a real `kata-agent`) and the real
//! `kata-monitor` binary. A crowd of refused peers or of idle connections must not starve the real
//! scrapes that go on at the same time, and must not fill the server's log.
//!
//! Scrapes are checked against the deadlines their real clients apply (kata-monitor's default
//! 3 s for one shim, its 8 s for a whole scrape), not against tight timings. The latencies are
//! printed as `BENCH` lines for BENCHMARKS.md.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{prom, Proc, ShimOptions};

/// What kata-monitor waits for one shim by default (`--scrape-timeout 3s`).
const SHIM_SCRAPE_DEADLINE: Duration = Duration::from_secs(3);
/// kata-monitor's whole scrape ends within 8 s (README), below Prometheus' 10 s.
const MONITOR_SCRAPE_DEADLINE: Duration = Duration::from_secs(8);
const IDLE_CROWD: usize = 1000;
/// Refused uid-65534 connections: rounds of 300 held at once.
const REFUSED_ROUNDS: usize = 5;
const REFUSED_PER_ROUND: usize = 300;
/// The unprivileged user of the refused crowd.
const NOBODY: u32 = 65534;

/// Room for a thousand sockets in this process and in the servers it starts (they inherit it).
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 4 * IDLE_CROWD as u64,
        "RLIMIT_NOFILE hard limit {} is too low for this test",
        limit.rlim_max
    );
}

/// A shim socket, as a client on this host reaches it.
#[derive(Clone)]
enum ShimSocket {
    File(PathBuf),
    /// The abstract name without its leading NUL.
    Abstract(String),
}

impl ShimSocket {
    fn connect(&self) -> std::io::Result<UnixStream> {
        match self {
            ShimSocket::File(path) => UnixStream::connect(path),
            ShimSocket::Abstract(name) => {
                UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)
            }
        }
    }
}

struct Shim {
    id: String,
    file: ShimSocket,
    abstract_: ShimSocket,
    log: PathBuf,
    proc: Proc,
    _agent: Proc,
}

fn start_shim(dir: &Path, extra: Vec<String>) -> Shim {
    let id = support::unique_id("abuse");
    let agent_dir = dir.join(format!("agent-{id}"));
    std::fs::create_dir_all(&agent_dir).unwrap();
    let (agent, agent_url) = support::start_agent(&agent_dir);
    let run_dir = dir.join("sbs");
    let log = dir.join(format!("{id}.log"));
    let proc = support::start_shim_logging_to(
        ShimOptions {
            sandbox_id: &id,
            agent_url: &agent_url,
            run_dir: &run_dir,
            hypervisor_pid: None,
            metrics_timeout: "1s",
            extra,
        },
        &log,
    );
    Shim {
        file: ShimSocket::File(run_dir.join(&id).join("shim-monitor.sock")),
        // The Kata 2.0 address (DESIGN §3.2); the example's namespace is "default".
        abstract_: ShimSocket::Abstract(format!("/containerd-shim/default/{id}/shim-monitor.sock")),
        id,
        log,
        proc,
        _agent: agent,
    }
}

/// One `GET /metrics` the way a scraper sends it; Ok with the time it took when the answer is a
/// complete 200 (its Content-Length worth of body) holding the agent's families.
fn scrape_shim(socket: &ShimSocket) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = socket.connect().map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read after {} bytes: {e}", answer.len()))?;
    let took = started.elapsed();
    let answer = String::from_utf8(answer).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete head in {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("answered {head:?}"));
    }
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    if body.len() != length {
        return Err(format!(
            "body of {} bytes, Content-Length {length}",
            body.len()
        ));
    }
    let samples = prom::samples(body);
    if prom::value(&samples, "kata_shim_agent_metrics_up", &[]) != Some(1.0)
        || !samples.iter().any(|s| s.name == "kata_guest_meminfo")
    {
        return Err("the body lacks the agent's families".into());
    }
    Ok(took)
}

/// Scrapes `sockets` in turn from a thread until stopped; returns when each scrape ended and its
/// outcome.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, Result<Duration, String>)>>,
}

impl Scraper {
    fn start(sockets: Vec<ShimSocket>) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            for socket in sockets.iter().cycle() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let outcome = scrape_shim(socket);
                results.push((Instant::now(), outcome));
            }
            results
        });
        Scraper { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, Result<Duration, String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the scraper thread panicked")
    }
}

/// Log lines of `log` that contain `needle`.
fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The most memory `pid` has held (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    support::proc_field(&format!("/proc/{pid}/status"), "VmHWM")
}

fn percentile(durations: &[Duration], p: f64) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, durations: &[Duration]) {
    println!(
        "BENCH {what}: {} scrapes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        durations.len(),
        percentile(durations, 0.5).as_secs_f64() * 1000.0,
        percentile(durations, 0.99).as_secs_f64() * 1000.0,
        percentile(durations, 1.0).as_secs_f64() * 1000.0,
    );
}

/// uid 65534 opens rounds of connections to an abstract socket (half of them send a request, half
/// send nothing), holds each round for a second, then reads what each got. Prints `{"403": n, "closed": m, ...}`.
const REFUSED_CROWD: &str = r#"
import json, socket, sys, time
name, n, rounds = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
counts = {}
for _ in range(rounds):
    held = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(b"\0" + name)
        if i % 2 == 0:
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            except OSError:
                pass
        held.append(s)
    # Hold the round open, as an attacker would, while the root scrapes go on.
    time.sleep(1)
    for s in held:
        s.settimeout(10)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        s.close()
        if data.startswith(b"HTTP/1.1 "):
            key = data.split(b" ")[1].decode()
        else:
            key = "closed" if not data else "garbage"
        counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts), flush=True)
"#;

#[test]
fn refused_peers_hold_nothing_and_are_logged_once_per_uid() {
    raise_fd_limit();
    let dir = support::temp_dir();
    let shim = start_shim(dir.path(), vec![]);
    let ShimSocket::Abstract(name) = &shim.abstract_ else {
        unreachable!()
    };

    let scraper = Scraper::start(vec![shim.abstract_.clone(), shim.file.clone()]);
    let attack_started = Instant::now();
    let crowd = Command::new("python3")
        .args(["-I", "-c", REFUSED_CROWD, name])
        .args([REFUSED_PER_ROUND.to_string(), REFUSED_ROUNDS.to_string()])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stderr(Stdio::inherit())
        .output()
        .expect("run the uid 65534 crowd with python3");
    let attack_ended = Instant::now();
    let scrapes = scraper.finish();

    assert!(crowd.status.success(), "the crowd failed: {crowd:?}");
    let counts: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&crowd.stdout).expect("the crowd's JSON line");
    let count = |key: &str| counts.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    let total = (REFUSED_ROUNDS * REFUSED_PER_ROUND) as u64;
    println!(
        "uid {NOBODY} crowd got {counts:?} in {:?}",
        attack_ended - attack_started
    );
    assert_eq!(
        count("403") + count("closed"),
        total,
        "every refused connection got 403 or was closed: {counts:?}"
    );
    assert!(count("403") > 0, "refused peers are told so: {counts:?}");

    let during: Vec<_> = scrapes
        .iter()
        .filter(|(ended, _)| *ended > attack_started && *ended < attack_ended)
        .collect();
    assert!(
        during.len() >= 5,
        "only {} root scrapes ended during the attack",
        during.len()
    );
    let failures: Vec<_> = scrapes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(failures.is_empty(), "root scrapes failed: {failures:?}");
    let durations: Vec<Duration> = scrapes.iter().filter_map(|(_, r)| r.clone().ok()).collect();
    report(
        &format!("root scrapes with {REFUSED_PER_ROUND} refused uid {NOBODY} connections at once"),
        &durations,
    );
    let slowest = percentile(&durations, 1.0);
    assert!(
        slowest < SHIM_SCRAPE_DEADLINE,
        "a root scrape took {slowest:?}"
    );

    let refusals = log_lines(&shim.log, "management request refused");
    println!("refusal log lines: {refusals:#?}");
    assert!(
        (1..10).contains(&refusals.len()),
        "{} refusal lines for {total} refusals",
        refusals.len()
    );
    assert!(refusals[0].contains("peer uid 65534"), "{}", refusals[0]);
}

/// Holds `size` idle connections (made by `connect`) open from a thread: every 100 ms it replaces
/// the ones the server closed, as a slowloris client would.
struct IdleCrowd {
    stop: Arc<AtomicBool>,
    /// Connections open after the first round of connects.
    established: Arc<AtomicUsize>,
    /// Connections the server closed (counted when seen).
    closed_by_server: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

trait Idle: Read + Send {}
impl Idle for UnixStream {}
impl Idle for TcpStream {}

impl IdleCrowd {
    fn start<C>(size: usize, connect: C) -> IdleCrowd
    where
        C: Fn(usize) -> std::io::Result<Box<dyn Idle>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let established = Arc::new(AtomicUsize::new(0));
        let closed_by_server = Arc::new(AtomicUsize::new(0));
        let (stopped, open, closed) = (stop.clone(), established.clone(), closed_by_server.clone());
        let thread = std::thread::spawn(move || {
            let mut crowd: Vec<Option<Box<dyn Idle>>> =
                (0..size).map(|i| connect(i).ok()).collect();
            open.store(crowd.iter().flatten().count(), Ordering::SeqCst);
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                for (i, slot) in crowd.iter_mut().enumerate() {
                    let alive = match slot {
                        // Non-blocking: WouldBlock means open and silent.
                        Some(conn) => {
                            matches!(conn.read(&mut [0u8; 64]), Err(e) if e.kind() == ErrorKind::WouldBlock)
                        }
                        None => false,
                    };
                    if !alive {
                        if slot.is_some() {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                        *slot = connect(i).ok();
                    }
                }
            }
        });
        IdleCrowd {
            stop,
            established,
            closed_by_server,
            thread: Some(thread),
        }
    }

    fn wait_established(&self, size: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.established.load(Ordering::SeqCst) < size {
            assert!(Instant::now() < deadline, "the idle crowd did not connect");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IdleCrowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn unix_idle(socket: ShimSocket) -> impl Fn(usize) -> std::io::Result<Box<dyn Idle>> + Send {
    move |_| {
        let stream = socket.connect()?;
        stream.set_nonblocking(true)?;
        Ok(Box::new(stream) as Box<dyn Idle>)
    }
}

/// Where idle TCP client `i` connects from: half the crowd from 127.0.0.2 (one address, held by
/// the per-address cap), the other half two to an address from 127.0.0.3 on (held by the server's
/// total). The real scrapes come from 127.0.0.1, as Prometheus comes from its own address.
fn crowd_address(i: usize) -> std::net::Ipv4Addr {
    let half = IDLE_CROWD / 2;
    let host = if i < half { 2 } else { 3 + (i - half) / 2 };
    std::net::Ipv4Addr::new(127, 0, 0, u8::try_from(host).expect("a loopback address"))
}

fn tcp_idle(port: u16) -> impl Fn(usize) -> std::io::Result<Box<dyn Idle>> + Send {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    move |i| {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((crowd_address(i), 0).into())?;
        let server = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // A SYN dropped while the listen queue is full is sent again after 1 s, then 3 s.
        let stream = runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), socket.connect(server)).await
            })
            .map_err(|_| std::io::Error::from(ErrorKind::TimedOut))??;
        Ok(Box::new(stream.into_std()?) as Box<dyn Idle>)
    }
}

#[test]
fn a_thousand_idle_connections_do_not_starve_shim_scrapes() {
    raise_fd_limit();
    let dir = support::temp_dir();
    let shim = start_shim(dir.path(), vec![]);
    let scrape_n = |n: usize| -> Vec<Duration> {
        (0..n)
            .map(|i| {
                scrape_shim(&shim.file).unwrap_or_else(|e| panic!("scrape {i} of {}: {e}", shim.id))
            })
            .collect()
    };

    let quiet = scrape_n(30);
    let peak_quiet = peak_rss_kib(shim.proc.pid());
    let crowd = IdleCrowd::start(IDLE_CROWD, unix_idle(shim.file.clone()));
    crowd.wait_established(IDLE_CROWD);
    let busy = scrape_n(30);
    let closed = crowd.closed_by_server.load(Ordering::Relaxed);
    drop(crowd);
    let peak_busy = peak_rss_kib(shim.proc.pid());

    report("shim file socket, no idle connections", &quiet);
    println!("BENCH shim peak RSS: {peak_quiet} KiB before the crowd, {peak_busy} KiB after it");
    report(
        &format!("shim file socket, {IDLE_CROWD} idle connections held"),
        &busy,
    );
    println!("the server closed {closed} idle connections");
    let slowest = percentile(&busy, 1.0);
    assert!(slowest < SHIM_SCRAPE_DEADLINE, "a scrape took {slowest:?}");
    assert!(closed > 0, "the server closed no idle connection");
    let warnings = log_lines(&shim.log, "WARN");
    println!("{} WARN lines in the shim's log", warnings.len());
    assert!(warnings.len() < 10, "the log filled: {warnings:#?}");
}

/// kata-monitor on a free port watching `run_dir`, its log in `log`.
fn start_monitor(run_dir: &Path, log: &Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(support::bin("kata-monitor"))
        .args(["--listen-address", &format!("127.0.0.1:{port}")])
        .args(["--log-level", "warn"])
        .arg("--run-dir")
        .arg(run_dir)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start kata-monitor");
    let proc = Proc {
        child,
        name: "kata-monitor".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kata-monitor did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, port)
}

/// One Prometheus-like scrape of the monitor; Ok with its time when it is a 200 whose body holds
/// `kata_monitor_sandbox_up 1` and the agent's families for each of `ids`.
async fn scrape_monitor(port: u16, ids: &[String]) -> Result<Duration, String> {
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/metrics")
        .header("host", "localhost")
        .header("x-prometheus-scrape-timeout-seconds", "10")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("answered {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let took = started.elapsed();
    let samples = prom::samples(&String::from_utf8_lossy(&body));
    for id in ids {
        let up = prom::value(&samples, "kata_monitor_sandbox_up", &[("sandbox_id", id)]);
        let agent = prom::value(
            &samples,
            "kata_shim_agent_metrics_up",
            &[("sandbox_id", id)],
        );
        if up != Some(1.0) || agent != Some(1.0) {
            return Err(format!("sandbox {id}: up {up:?}, agent up {agent:?}"));
        }
    }
    Ok(took)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_idle_tcp_connections_do_not_starve_kata_monitor() {
    raise_fd_limit();
    let dir = support::temp_dir();
    let shims: Vec<Shim> = (0..2)
        .map(|_| start_shim(dir.path(), vec!["--no-abstract".into()]))
        .collect();
    let ids: Vec<String> = shims.iter().map(|s| s.id.clone()).collect();
    let log = dir.path().join("monitor.log");
    let (monitor, port) = start_monitor(&dir.path().join("sbs"), &log);
    // Discovery first: the quiet scrapes must already see both sandboxes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape_monitor(port, &ids).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "kata-monitor never saw both sandboxes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut quiet = Vec::new();
    for i in 0..20 {
        quiet.push(
            scrape_monitor(port, &ids)
                .await
                .unwrap_or_else(|e| panic!("quiet scrape {i}: {e}")),
        );
    }
    let peak_quiet = peak_rss_kib(monitor.pid());
    // Half the crowd from one address, half spread over 250: both the per-address cap and the
    // server's total are in play.
    let crowd = IdleCrowd::start(IDLE_CROWD, tcp_idle(port));
    tokio::task::block_in_place(|| crowd.wait_established(IDLE_CROWD));
    let mut busy = Vec::new();
    for i in 0..20 {
        busy.push(
            scrape_monitor(port, &ids)
                .await
                .unwrap_or_else(|e| panic!("scrape {i} with the idle crowd: {e}")),
        );
    }
    let closed = crowd.closed_by_server.load(Ordering::Relaxed);
    tokio::task::block_in_place(|| drop(crowd));
    let peak_busy = peak_rss_kib(monitor.pid());
    println!(
        "BENCH kata-monitor peak RSS: {peak_quiet} KiB before the crowd, {peak_busy} KiB after it"
    );

    report("kata-monitor, 2 sandboxes, no idle connections", &quiet);
    report(
        &format!("kata-monitor, 2 sandboxes, {IDLE_CROWD} idle TCP connections held"),
        &busy,
    );
    println!("kata-monitor closed {closed} idle connections");
    let slowest = percentile(&busy, 1.0);
    assert!(
        slowest < MONITOR_SCRAPE_DEADLINE,
        "a scrape took {slowest:?}"
    );
    assert!(closed > 0, "kata-monitor closed no idle connection");
    let warnings = log_lines(&log, "WARN");
    println!("{} WARN lines in kata-monitor's log", warnings.len());
    assert!(warnings.len() < 10, "the log filled: {warnings:#?}");
}
