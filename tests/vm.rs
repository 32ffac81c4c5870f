//! A real sandbox VM: QEMU boots Debian's kernel with our static agent as init, the shim side talks
//! to it over (hybrid) vsock, and stopping it leaves no process and no file behind.
//!
//! Needs the guest image (`make guest-image`): set `KSM_GUEST_DIR` to its directory (`make test` does).
//! Only one VM runs at a time: every test here takes `VM_LOCK`.

#![cfg(feature = "host")]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kata_shim_metrics::agent::url::AgentUrl;
use kata_shim_metrics::agent::CONSOLE_READY_LINE;
use kata_shim_metrics::agent_client::{AgentClient, AgentTimeouts};
use kata_shim_metrics::protocols::agent::GetMetricsRequest;
use kata_shim_metrics::shim::hypervisor::{kill_leftovers, Accel, Vm, VmConfig, VmError};
use support::prom;

static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn vsock_daemon() -> PathBuf {
    if let Some(path) = std::env::var_os("KSM_VSOCK_DAEMON") {
        return PathBuf::from(path);
    }
    let cargo_bin = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/vhost-device-vsock"));
    match cargo_bin {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("vhost-device-vsock"),
    }
}

/// A short temporary directory (unix socket paths must stay under 108 bytes).
fn short_temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ksm-vm-")
        .tempdir_in("/tmp")
        .expect("create a temporary directory in /tmp")
}

fn config(guest: &Path, dir: &Path) -> VmConfig {
    let share = dir.join("shared");
    std::fs::create_dir_all(&share).expect("create the shared directory");
    // KSM_GUEST_KERNEL=vmlinuz compares the compressed kernel's boot time.
    let kernel = std::env::var("KSM_GUEST_KERNEL").unwrap_or_else(|_| "vmlinux".to_string());
    let mut cfg = VmConfig::new(
        guest.join(kernel),
        guest.join("initrd.img"),
        share,
        dir.join("vm"),
    );
    cfg.vsock_daemon = vsock_daemon();
    cfg.memory_mib = 512;
    cfg.vcpus = 1;
    // A shared 2-core machine under TCG: boots take seconds, sometimes many.
    cfg.boot_timeout = Duration::from_secs(180);
    cfg
}

/// A client of the VM's agent with room for a slow TCG guest.
fn agent_client(vm: &Vm) -> AgentClient {
    AgentClient::new(
        vm.agent_url().clone(),
        AgentTimeouts {
            connect: Duration::from_secs(5),
            metrics: Duration::from_secs(20),
            request: Duration::from_secs(20),
        },
    )
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes, but `Vm::stop` reaps, so none should remain.
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Pids of processes whose command line mentions the directory `needle`.
fn processes_mentioning(needle: &Path) -> Vec<i32> {
    support::processes_mentioning(&needle.display().to_string())
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the guest image: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
async fn a_guest_boots_reports_its_metrics_and_stops_cleanly() {
    let guest = support::guest_dir();
    let _one_vm = VM_LOCK.lock().await;
    kata_shim_metrics::logging::init("warn");
    let dir = short_temp_dir();
    let mut cfg = config(&guest, dir.path());
    cfg.accel = Accel::Auto;

    let mut vm = match Vm::start(&cfg).await {
        Ok(vm) => vm,
        Err(err) => panic!("the VM did not boot: {err}"),
    };
    let qemu_pid = vm.pid();
    let daemon_pid = vm.vsock_daemon_pid();
    let timings = vm.timings();
    eprintln!(
        "VM up: accel {}, QEMU start to agent ready {:?} (KVM probe {:?}, vsock daemon {:?}), \
         QEMU RSS {} MiB",
        vm.accel(),
        timings.qemu_to_agent,
        timings.accel_probe,
        timings.vsock_daemon,
        support::rss_kib(qemu_pid) / 1024
    );
    assert!(alive(qemu_pid));
    if let Some(pid) = daemon_pid {
        eprintln!("vsock daemon RSS {} KiB", support::rss_kib(pid));
    }
    match vm.agent_url() {
        AgentUrl::Hvsock { path, port } => {
            assert_eq!(path, &cfg.state_dir.join("vm.vsock"));
            assert_eq!(*port, 1024);
            assert!(daemon_pid.is_some_and(alive), "the vsock daemon runs");
        }
        AgentUrl::Vsock { cid, port } => {
            assert!(*cid >= 3);
            assert_eq!(*port, 1024);
        }
        other => panic!("unexpected agent URL {other}"),
    }

    // The guest's init reports on the serial console what it set up.
    let console = std::fs::read_to_string(cfg.state_dir.join("console.log")).unwrap_or_default();
    assert!(
        console.contains("guest set up"),
        "no setup line on the console:\n{console}"
    );
    // The line the boot waits for before its first CONNECT (without it a boot waits 20 s more).
    assert!(
        console.contains(CONSOLE_READY_LINE),
        "no {CONSOLE_READY_LINE:?} on the console:\n{console}"
    );
    for problem in ["cannot load module", "cannot mount", "eth0"] {
        let bad: Vec<&str> = console
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(problem))
            .collect();
        assert!(bad.is_empty(), "guest setup warnings: {bad:#?}");
    }

    let client = agent_client(&vm);
    client
        .serving()
        .await
        .expect("the agent answers a health check");
    let text = client
        .get_metrics(GetMetricsRequest::new())
        .await
        .expect("the agent answers GetMetrics")
        .metrics;
    let samples = prom::samples(&text);

    let vm_bytes = 512.0 * 1024.0 * 1024.0;
    let mem_total = prom::value(&samples, "kata_guest_meminfo", &[("item", "mem_total")])
        .expect("kata_guest_meminfo{item=\"mem_total\"} is reported");
    eprintln!(
        "guest MemTotal {} KiB ({:.0}% of the VM's memory)",
        mem_total / 1024.0,
        100.0 * mem_total / vm_bytes
    );
    assert!(
        mem_total >= 0.7 * vm_bytes && mem_total <= vm_bytes,
        "guest MemTotal {mem_total} bytes is not 70-100% of the VM's 512 MiB"
    );
    let cpus: Vec<&str> = prom::family(&samples, "kata_guest_cpu_time")
        .iter()
        .filter_map(|l| l.labels.get("cpu").map(String::as_str))
        .collect();
    assert!(cpus.contains(&"0"), "cpu=\"0\" missing: {cpus:?}");
    assert!(cpus.contains(&"total"), "cpu=\"total\" missing: {cpus:?}");
    let interfaces: std::collections::BTreeSet<&str> =
        prom::family(&samples, "kata_guest_netdev_stat")
            .iter()
            .filter_map(|l| l.labels.get("interface").map(String::as_str))
            .collect();
    // Without a pod network the VM has no NIC (the pod tests see eth0 with its traffic).
    assert_eq!(interfaces, ["lo"].into(), "a VM without NICs shows only lo");

    // The client stays connected, as the shim's would: stopping must not hang on it.
    let stopping = std::time::Instant::now();
    vm.stop().await.expect("the VM stops");
    eprintln!("VM stopped in {:?}", stopping.elapsed());
    drop(client);
    assert!(!alive(qemu_pid), "QEMU (pid {qemu_pid}) is still there");
    if let Some(pid) = daemon_pid {
        assert!(!alive(pid), "the vsock daemon (pid {pid}) is still there");
    }
    assert!(
        !cfg.state_dir.exists(),
        "the state directory is left behind"
    );
    assert!(processes_mentioning(&cfg.state_dir).is_empty());
    vm.stop().await.expect("a second stop does nothing");
}

fn assert_nothing_left(cfg: &VmConfig) {
    assert!(
        !cfg.state_dir.exists(),
        "{} is left behind",
        cfg.state_dir.display()
    );
    let left = processes_mentioning(&cfg.state_dir);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the guest image: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
async fn a_vm_that_cannot_boot_fails_clearly_and_leaves_nothing() {
    let guest = support::guest_dir();
    let _one_vm = VM_LOCK.lock().await;
    let dir = short_temp_dir();

    // No kernel: refused before anything starts.
    let mut cfg = config(&guest, dir.path());
    cfg.kernel = dir.path().join("no-such-vmlinux");
    cfg.accel = Accel::Tcg;
    let err = Vm::start(&cfg).await.err().expect("a missing kernel fails");
    assert!(matches!(err, VmError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("no-such-vmlinux"), "{err}");
    assert_nothing_left(&cfg);

    // Socket paths too long for sun_path: refused with a clear reason.
    let mut cfg = config(&guest, dir.path());
    cfg.state_dir = dir.path().join("d".repeat(100));
    cfg.accel = Accel::Tcg;
    let err = Vm::start(&cfg).await.err().expect("a long state dir fails");
    assert!(err.to_string().contains("shorter state directory"), "{err}");
    assert_nothing_left(&cfg);

    // An initrd without an agent: QEMU and the daemon run, nothing ever answers.
    let empty = dir.path().join("empty-initrd.img");
    std::fs::write(&empty, b"").expect("write an empty initrd");
    let mut cfg = config(&guest, dir.path());
    cfg.initrd = empty;
    cfg.accel = Accel::Tcg;
    cfg.boot_timeout = Duration::from_secs(3);
    let err = Vm::start(&cfg)
        .await
        .err()
        .expect("a guest without agent fails");
    let text = err.to_string();
    eprintln!("a guest without agent: {text}");
    assert!(
        matches!(err, VmError::Timeout { .. } | VmError::Exited { .. }),
        "{text}"
    );
    assert!(text.contains("console.log"), "no console tail in: {text}");
    assert_nothing_left(&cfg);
}

/// A vsock daemon that, on its first start only, reports its relay thread's panic the way
/// vhost-device-vsock 0.3 does (and records its pid), then runs the real daemon.
fn vsock_daemon_that_fails_once(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let first_pid = dir.join("first-daemon.pid");
    let script = dir.join("vsock-daemon-fails-once");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             if [ ! -e '{first}' ]; then\n\
             echo $$ > '{first}'\n\
             echo \"thread 'vring_worker' panicked at src/vsock_conn.rs:238:62: injected\" >&2\n\
             fi\n\
             exec '{real}' \"$@\"\n",
            first = first_pid.display(),
            real = vsock_daemon().display()
        ),
    )
    .expect("write the daemon wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("make the wrapper executable");
    (script, first_pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the guest image: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
async fn a_boot_whose_vsock_relay_stops_relaying_starts_the_vm_again() {
    let guest = support::guest_dir();
    let _one_vm = VM_LOCK.lock().await;
    if std::path::Path::new("/dev/vhost-vsock").exists() {
        eprintln!("skipped: with /dev/vhost-vsock no vsock daemon runs");
        return;
    }
    let dir = short_temp_dir();
    let mut cfg = config(&guest, dir.path());
    cfg.accel = Accel::Tcg;
    let (daemon, first_pid) = vsock_daemon_that_fails_once(dir.path());
    cfg.vsock_daemon = daemon;

    let mut vm = match Vm::start(&cfg).await {
        Ok(vm) => vm,
        Err(err) => panic!("the VM did not boot on a second attempt: {err}"),
    };
    let first: i32 = std::fs::read_to_string(&first_pid)
        .expect("the first daemon ran")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        !alive(first),
        "the first daemon (pid {first}) is left running"
    );
    assert_ne!(vm.vsock_daemon_pid(), Some(first), "a new daemon relays");
    let daemon_log =
        std::fs::read_to_string(cfg.state_dir.join("vsock-daemon.log")).expect("the daemon's log");
    assert!(!daemon_log.contains("panicked"), "{daemon_log}");
    let client = agent_client(&vm);
    client.serving().await.expect("the agent answers");
    drop(client);
    vm.stop().await.expect("the VM stops");
    assert_nothing_left(&cfg);
}

#[tokio::test]
async fn leftovers_of_a_crashed_shim_are_cleaned_up() {
    let dir = short_temp_dir();
    let state = dir.path().join("vm");
    std::fs::create_dir(&state).expect("create the state dir");
    // Stands in for QEMU: one process whose command line mentions the state directory.
    let mut ours = std::process::Command::new("python3")
        .args(["-c", "import time; time.sleep(600)"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    // A pid file naming a process that is not ours (reused pid): must survive.
    let mut other = std::process::Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sleep");
    std::fs::write(state.join("qemu.pid"), format!("{}\n", ours.id())).expect("pid file");
    std::fs::write(state.join("vsock-daemon.pid"), format!("{}\n", other.id())).expect("pid file");
    std::fs::write(state.join("console.log"), "boot log").expect("log file");

    // The kernel fills in a new process's command line just after exec: wait until it shows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&state).contains(&(ours.id() as i32)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stand-in never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    kill_leftovers(&state).expect("kill_leftovers");
    let status = ours.wait().expect("wait for the stand-in");
    assert!(!status.success(), "the stand-in was killed: {status}");
    assert!(
        other.try_wait().expect("try_wait").is_none(),
        "an unrelated process was killed"
    );
    assert!(!state.exists());
    let _ = other.kill();
    let _ = other.wait();
    kill_leftovers(&state).expect("nothing to do is fine");
}
