//! A sandbox whose VM stalls or breaks, under a real containerd: a paused guest (QEMU stopped for a
//! few seconds while scrapes time out) gets its agent channel back on its own; a frozen guest is
//! still killed and removed through containerd; a dead vsock relay stops the VM and ends the task
//! instead of leaving a running VM behind a task that says it exited.
//!
//! Needs the guest image (`make guest-image`; `KSM_GUEST_DIR`, as `make test` sets it). One VM at a
//! time; two boots in all.

mod support;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::containerd::*;
use support::prom;

static VM_LOCK: Mutex<()> = Mutex::new(());

/// `kata-runtime metrics <id>`: whether the agent's metrics were in it (None: the call failed).
fn agent_up(env: &Containerd, id: &str) -> Option<bool> {
    let out = Command::new(support::bin("kata-runtime"))
        .args(["metrics", id])
        .env("KATA_SANDBOX_RUN_DIR", env.run_dir())
        .output()
        .expect("run kata-runtime");
    if !out.status.success() {
        return None;
    }
    let samples = prom::samples(&String::from_utf8_lossy(&out.stdout));
    prom::value(&samples, "kata_shim_agent_metrics_up", &[]).map(|v| v == 1.0)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    started.elapsed()
}

/// `STATUS` of the task in `ctr task ls` (None when it is not listed).
fn task_status(env: &Containerd, id: &str) -> Option<String> {
    let out = env.ctr(&["task", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            (words.first() == Some(&id)).then(|| words.get(2).map(|s| s.to_string()))?
        })
}

/// `ctr task delete`, which must succeed.
fn delete_task(env: &Containerd, id: &str) -> String {
    let out = env.ctr(&["task", "delete", id]);
    assert!(
        out.status.success(),
        "ctr task delete: {}\n{}",
        text(&out),
        env.log()
    );
    text(&out)
}

fn daemon_log_panics(env: &Containerd, id: &str) -> bool {
    let log = env.run_dir().join(id).join("vm/vsock-daemon.log");
    std::fs::read_to_string(log).is_ok_and(|text| text.contains("panicked"))
}

fn vsock_daemon_of(env: &Containerd, id: &str) -> i32 {
    let pid_file = env.run_dir().join(id).join("vm/vsock-daemon.pid");
    let text = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    text.trim().parse().expect("a pid")
}

#[test]
#[ignore = "boots the guest image: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_paused_guest_recovers_and_a_frozen_one_is_killed_and_removed() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);
    let id = support::unique_id("stall");
    run_detached(&env, &id);
    let qemu = Pid::from_raw(task_pid(&env, &id));
    assert_eq!(agent_up(&env, &id), Some(true), "before the pause");

    // Paused for about four seconds while scrapes go on: they answer, without the agent.
    kill(qemu, Signal::SIGSTOP).expect("SIGSTOP QEMU");
    let paused = Instant::now();
    let mut scrapes = 0;
    while paused.elapsed() < Duration::from_secs(4) {
        assert_eq!(agent_up(&env, &id), Some(false), "while QEMU is stopped");
        scrapes += 1;
    }
    kill(qemu, Signal::SIGCONT).expect("SIGCONT QEMU");
    let back = wait_until("the agent's metrics back", Duration::from_secs(30), || {
        agent_up(&env, &id) == Some(true)
    });
    eprintln!("{scrapes} scrapes while paused; the agent was back {back:?} after SIGCONT");
    let exec = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after-pause",
        &id,
        "echo",
        "hi",
    ]);
    assert!(exec.status.success(), "ctr task exec: {}", text(&exec));
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "hi\n");
    assert_eq!(task_status(&env, &id).as_deref(), Some("RUNNING"));
    assert!(!daemon_log_panics(&env, &id), "the vsock daemon panicked");

    // Frozen for good: SIGKILL still ends the task, and containerd removes everything.
    kill(qemu, Signal::SIGSTOP).expect("SIGSTOP QEMU");
    let killing = Instant::now();
    let out = env.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out));
    wait_until("the task stopped", Duration::from_secs(30), || {
        task_status(&env, &id).as_deref() == Some("STOPPED")
    });
    eprintln!("a frozen sandbox killed in {:?}", killing.elapsed());
    delete_task(&env, &id);
    let out = env.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "ctr container delete: {}", text(&out));
    assert_gone(qemu.as_raw(), "the frozen QEMU");
    assert_clean(&env, &id);
}

#[test]
#[ignore = "boots the guest image: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_dead_vsock_relay_stops_the_vm_and_ends_the_task() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);
    let id = support::unique_id("relay");
    run_detached(&env, &id);
    let qemu = task_pid(&env, &id);
    let daemon = vsock_daemon_of(&env, &id);
    assert_eq!(agent_up(&env, &id), Some(true));

    kill(Pid::from_raw(daemon), Signal::SIGKILL).expect("kill the vsock daemon");
    let took = wait_until("the task stopped", Duration::from_secs(10), || {
        task_status(&env, &id).as_deref() == Some("STOPPED")
    });
    eprintln!("the task stopped {took:?} after the relay died");
    // The VM went with it, reaped: no zombie for the hypervisor metrics to report as running.
    assert_gone(qemu, "QEMU of a sandbox whose relay died");
    assert!(
        !std::path::Path::new(&format!("/proc/{qemu}")).exists(),
        "QEMU {qemu} is still in /proc (a zombie)"
    );
    let out = env.ctr(&["task", "ls"]);
    eprintln!("{}", text(&out));
    delete_task(&env, &id);
    let out = env.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "ctr container delete: {}", text(&out));
    assert_clean(&env, &id);
}
