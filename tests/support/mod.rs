//! Shared test support: starting the project's binaries as real processes, reading their output,
//! and small independent readers of /proc and of Prometheus text (so tests do not check our code
//! with our code).
#![allow(dead_code)]

pub mod containerd;
pub mod cri;
pub mod fake_agent;
pub mod hvsock_relay;
pub mod netns;
pub mod pod_checks;
pub mod prom;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when the test drops it.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary of this package (cargo builds them for integration tests).
pub fn bin(name: &str) -> PathBuf {
    match name {
        "kata-agent" => PathBuf::from(env!("CARGO_BIN_EXE_kata-agent")),
        "kata-runtime" => PathBuf::from(env!("CARGO_BIN_EXE_kata-runtime")),
        "kata-monitor" => PathBuf::from(env!("CARGO_BIN_EXE_kata-monitor")),
        "containerd-shim-kata-v2" => PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-kata-v2")),
        other => panic!("unknown binary {other}"),
    }
}

/// An example of this package, built on demand when a filtered `cargo test` skipped it.
pub fn example(name: &str) -> PathBuf {
    let dir = bin("kata-runtime")
        .parent()
        .expect("binaries live in a directory")
        .join("examples");
    let path = dir.join(name);
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--examples", "--quiet"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --examples");
        assert!(status.success(), "cargo build --examples failed");
    });
    assert!(
        path.exists(),
        "example {name} missing at {}",
        path.display()
    );
    path
}

/// A sandbox id no other test (or test run) uses: abstract socket names are machine-wide.
pub fn unique_id(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ksm-test-")
        .tempdir()
        .expect("create a temporary directory")
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `kata-agent --listen unix://<dir>/agent.sock` and waits for its socket.
pub fn start_agent(dir: &Path) -> (Proc, String) {
    start_agent_with_env(dir, &[])
}

/// [`start_agent`] with extra environment variables.
pub fn start_agent_with_env(dir: &Path, env: &[(&str, &str)]) -> (Proc, String) {
    spawn_agent(Command::new(bin("kata-agent")), dir, env)
}

/// [`start_agent`] inside the network namespace at `netns` (`nsenter --net`, which execs the
/// agent: the process is the agent's). Its socket is reachable from any namespace.
pub fn start_agent_in_netns(dir: &Path, netns: &Path) -> (Proc, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg(bin("kata-agent"));
    spawn_agent(cmd, dir, &[])
}

fn spawn_agent(mut cmd: Command, dir: &Path, env: &[(&str, &str)]) -> (Proc, String) {
    let socket = dir.join("agent.sock");
    let url = format!("unix://{}", socket.display());
    let child = cmd
        .args(["--listen", &url, "--log-level", "warn"])
        .envs(env.iter().copied())
        .spawn()
        .expect("start kata-agent");
    let proc = Proc {
        child,
        name: "kata-agent".into(),
    };
    wait_until_connectable(&socket, Duration::from_secs(10));
    (proc, url)
}

/// Waits until something accepts on `socket` (a stale file left by a killed agent does not count).
pub fn wait_until_connectable(socket: &Path, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {} after {timeout:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process with a known number of threads (5), standing in for the hypervisor.
pub fn start_fake_hypervisor() -> Proc {
    let child = Command::new("python3")
        .args([
            "-c",
            "import threading, time\n\
             for _ in range(4): threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n\
             print('up', flush=True)\n\
             time.sleep(3600)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3 as the fake hypervisor");
    let mut proc = Proc {
        child,
        name: "fake-hypervisor".into(),
    };
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the fake hypervisor's first line");
    assert_eq!(line.trim(), "up");
    proc
}

/// How the test's metrics server ("the shim") is started.
pub struct ShimOptions<'a> {
    pub sandbox_id: &'a str,
    pub agent_url: &'a str,
    pub run_dir: &'a Path,
    pub hypervisor_pid: Option<i32>,
    pub metrics_timeout: &'a str,
    pub extra: Vec<String>,
}

/// Starts the metrics-server example and waits for its `ready` line.
pub fn start_shim(options: ShimOptions) -> Proc {
    spawn_shim(options, Stdio::inherit())
}

/// [`start_shim`] with the server's log (stderr) written to `log`.
pub fn start_shim_logging_to(options: ShimOptions, log: &Path) -> Proc {
    let file = std::fs::File::create(log).expect("create the shim's log file");
    spawn_shim(options, Stdio::from(file))
}

fn spawn_shim(options: ShimOptions, stderr: Stdio) -> Proc {
    let mut cmd = Command::new(example("metrics-server"));
    cmd.args([
        "--sandbox-id",
        options.sandbox_id,
        "--agent-url",
        options.agent_url,
    ])
    .arg("--run-dir")
    .arg(options.run_dir)
    .args(["--metrics-timeout", options.metrics_timeout])
    .args(&options.extra)
    .stdout(Stdio::piped())
    .stderr(stderr);
    if let Some(pid) = options.hypervisor_pid {
        cmd.args(["--hypervisor-pid", &pid.to_string()]);
    }
    let mut proc = Proc {
        child: cmd.spawn().expect("start the metrics server"),
        name: "metrics-server".into(),
    };
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("metrics server printed nothing within 20 s");
    assert_eq!(line.trim(), "ready", "metrics server did not start");
    proc
}

/// Runs `kata-runtime <args>` with the sandbox run directory set; returns (exit code, stdout, stderr).
pub async fn kata_runtime(run_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(bin("kata-runtime"))
        .args(args)
        .env("KATA_SANDBOX_RUN_DIR", run_dir)
        .output()
        .await
        .expect("run kata-runtime");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `kata-runtime metrics <id>`, which must succeed; returns the body and how long it took.
pub async fn scrape(run_dir: &Path, id: &str) -> (String, Duration) {
    let started = Instant::now();
    let (code, out, err) = kata_runtime(run_dir, &["metrics", id]).await;
    assert_eq!(code, 0, "kata-runtime metrics {id} failed: {err}");
    (out, started.elapsed())
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let me = std::process::id() as i32;
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != me && cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The resident memory of `pid` in KiB, as /proc/<pid>/status says.
pub fn rss_kib(pid: i32) -> u64 {
    proc_field(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Reads a `Key:   value kB` style field of /proc/<pid>/status or /proc/meminfo (first number).
pub fn proc_field(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {file}: {e}"));
    text.lines()
        .find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{key} not in {file}"))
}

/// `cpuN` lines of /proc/stat, i.e. the CPUs the kernel reports.
pub fn proc_stat_cpus() -> Vec<String> {
    std::fs::read_to_string("/proc/stat")
        .expect("read /proc/stat")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|first| first.strip_prefix("cpu"))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs `promtool check metrics` on `text`; Ok when it parsed (exit 0, or 3 for lint warnings only).
pub fn promtool_check(text: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool not runnable (install Debian's prometheus package): {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let body = text.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(body.as_bytes()));
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.code() {
        Some(0) | Some(3) if !report.contains("error while linting") => Ok(report),
        code => Err(format!("promtool exit {code:?}: {report}")),
    }
}

/// The guest image the VM tests boot (`KSM_GUEST_DIR`, set by `make test`). A test that asks for it
/// runs only on purpose, so a missing image is a failure that says what to do, never a skip.
pub fn guest_dir() -> PathBuf {
    let Some(dir) = std::env::var_os("KSM_GUEST_DIR").map(PathBuf::from) else {
        panic!(
            "KSM_GUEST_DIR is not set: build the guest with `make guest-image` and set \
             KSM_GUEST_DIR=build/guest, or run `make test`"
        );
    };
    for file in ["vmlinux", "initrd.img"] {
        assert!(
            dir.join(file).is_file(),
            "{} has no {file}: build the guest with `make guest-image`",
            dir.display()
        );
    }
    dir
}
