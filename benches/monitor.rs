//! kata-monitor aggregate scrape of N sandboxes: latency p50/p99 and the monitor's peak RSS.
//!
//! The N "shims" are light: this process serves every `<run dir>/<id>/shim-monitor.sock` itself,
//! each answering `/metrics` with a recorded shim body (tests/data/shim-payload.txt, or
//! `KATA_BENCH_PAYLOAD`) and `/pod-labels` with a pod identity. The monitor is the real binary.
//!
//! `cargo bench --bench monitor` (optionally `-- 10 100` to choose N).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

const SCRAPES: usize = 20;
const WARMUP: usize = 2;

struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn payload_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KATA_BENCH_PAYLOAD") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shim-payload.txt")
}

/// A sandbox id shaped like containerd's (64 hex digits).
fn sandbox_id(n: usize) -> String {
    format!("{:064x}", 0x5eed_0000_0000u64 + n as u64 * 7919)
}

fn response(status: &str, content_type: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Serves one light shim on `socket`.
fn serve_shim(listener: UnixListener, metrics: Bytes, pod: Bytes) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (metrics, pod) = (metrics.clone(), pod.clone());
            tokio::spawn(async move {
                let mut request = Vec::with_capacity(256);
                let mut buf = [0u8; 512];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = if request.starts_with(b"GET /metrics") {
                    metrics
                } else if request.starts_with(b"GET /pod-labels") {
                    pod
                } else {
                    response("404 Not Found", "text/plain", b"no\n")
                };
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18090)
}

/// GET on the monitor; returns the body size.
async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> usize {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to kata-monitor");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header("host", "localhost");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .expect("response");
    let mut body = response.into_body();
    let mut size = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            size += data.len();
        }
    }
    size
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn bench(n: usize, payload: &Bytes) {
    let dir = tempfile::tempdir().expect("temp dir");
    let run_dir = dir.path().join("sbs");
    let metrics = response(
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        payload,
    );
    for i in 0..n {
        let id = sandbox_id(i);
        std::fs::create_dir_all(run_dir.join(&id)).expect("sandbox dir");
        let listener =
            UnixListener::bind(run_dir.join(&id).join("shim-monitor.sock")).expect("bind");
        let pod = format!(
            "cri_uid={:08x}-1f2e-4d3c-8b7a-{:012x}\ncri_name=bench-pod-{i}\ncri_namespace=bench\n",
            i, i
        );
        serve_shim(
            listener,
            metrics.clone(),
            response("200 OK", "text/plain", pod.as_bytes()),
        );
    }

    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kata-monitor"))
        .args(["--listen-address", &format!("127.0.0.1:{port}")])
        .args(["--log-level", "error"])
        .arg("--run-dir")
        .arg(&run_dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("start kata-monitor");
    let monitor = Monitor(child);
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
            drop(stream);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "monitor did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait for discovery to list all N.
    loop {
        let count = sandboxes(port).await;
        if count == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {count} of {n} found"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (label, headers) in [
        ("text", vec![]),
        (
            "openmetrics+gzip",
            vec![
                (
                    "accept",
                    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                ),
                ("accept-encoding", "gzip"),
            ],
        ),
    ] {
        let mut times = Vec::with_capacity(SCRAPES);
        let mut size = 0;
        let mut cpu_before = Duration::ZERO;
        for round in 0..WARMUP + SCRAPES {
            if round == WARMUP {
                cpu_before = cpu_time(monitor.0.id());
            }
            let t = Instant::now();
            size = get(port, "/metrics", &headers).await;
            if round >= WARMUP {
                times.push(t.elapsed());
            }
        }
        times.sort();
        let cpu = cpu_time(monitor.0.id()).saturating_sub(cpu_before) / SCRAPES as u32;
        println!(
            "| {n} | {label} | {:.0} | {:.0} | {:.0} | {:.1} | {} |",
            percentile(&times, 0.5).as_secs_f64() * 1000.0,
            percentile(&times, 0.99).as_secs_f64() * 1000.0,
            cpu.as_secs_f64() * 1000.0,
            size as f64 / 1_048_576.0,
            vm_hwm_kib(monitor.0.id()) / 1024,
        );
    }
    drop(monitor);
}

async fn sandboxes(port: u16) -> usize {
    let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(_) => return 0,
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return 0;
    };
    tokio::spawn(connection);
    let request = hyper::Request::get("/sandboxes")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let Ok(response) = sender.send_request(request).await else {
        return 0;
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    body.iter().filter(|&&b| b == b'\n').count()
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 500]
    } else {
        sizes
    };
    let payload = Bytes::from(std::fs::read(payload_path()).expect("read the shim payload"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "kata-monitor aggregate scrape, {SCRAPES} scrapes after {WARMUP} warm-up, payload {} bytes per shim",
        payload.len()
    );
    println!(
        "| sandboxes | request | p50 ms | p99 ms | monitor CPU ms/scrape | body MiB | monitor peak RSS (VmHWM) MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let payload = Arc::new(payload);
    for n in sizes {
        runtime.block_on(bench(n, &payload));
    }
}
