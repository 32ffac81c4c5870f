//! Real sandboxes under a real containerd: `ctr run --runtime io.containerd.kata.v2` boots a QEMU VM
//! whose init is our agent, runs busybox in it, serves the guest's metrics, and leaves nothing
//! behind after delete — also when the shim was killed or terminated; `ctr task exec` runs more
//! processes in a running container.
//!
//! Needs the guest image (`make guest-image`; set `KSM_GUEST_DIR`, as `make test` does), plus
//! containerd, QEMU, umoci, busybox-static and promtool (`make deps`). One VM at a time: every test
//! takes `VM_LOCK`; five VM boots in all.

mod support;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::containerd::*;
use support::prom;

static VM_LOCK: Mutex<()> = Mutex::new(());

/// The child of `parent` whose command name is `comm` (/proc/<pid>/stat's second and fourth fields).
fn child_named(parent: i32, comm: &str) -> i32 {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
            else {
                return false;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok());
            name == comm && ppid == Some(parent)
        })
        .unwrap_or_else(|| panic!("no child {comm:?} of {parent}"))
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process's stat");
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / procfs::ticks_per_second() as f64
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
#[ignore = "boots the guest image under containerd: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn ctr_run_prints_the_output_and_passes_the_exit_status_through() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);

    let id = support::unique_id("hello");
    let started = Instant::now();
    let out = env.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "echo",
        "hello",
    ]);
    eprintln!("BENCH ctr run --rm echo hello: {:?}", started.elapsed());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello",
        "{}",
        text(&out)
    );
    assert_clean(&env, &id);

    let id = support::unique_id("exit3");
    let out = env.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    assert_clean(&env, &id);

    // A terminal container (`ctr run -t`): ctr needs a terminal of its own, which script(1) gives it.
    let id = support::unique_id("tty");
    let ctr = format!(
        "{} ctr {} run -t --rm --runtime {RUNTIME} {IMAGE} {id} sh -c 'tty; exit 4'",
        repo().join("scripts/containerd-env.sh").display(),
        env.dir.path().display()
    );
    let out = Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script(1)");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("/dev/pts/"),
        "the process has a terminal: {shown:?}"
    );
    assert_clean(&env, &id);
}

/// The value of the first of `names` in `ctr task metrics`' table (names differ by ctr version).
fn task_metric(table: &str, names: &[&str]) -> u64 {
    table
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            names
                .contains(&name)
                .then(|| words.next()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("none of {names:?} in ctr task metrics' output:\n{table}"))
}

/// `kata-runtime metrics <id>`: the body and how long it took.
fn scrape(env: &Containerd, id: &str) -> (String, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(support::scrape(&env.run_dir(), id))
}

#[test]
#[ignore = "boots the guest image under containerd: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_detached_sandbox_serves_its_guests_metrics_and_delete_leaves_nothing() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);
    let id = support::unique_id("sleep");
    let start_time = run_detached(&env, &id);

    let qemu = task_pid(&env, &id);
    let comm = std::fs::read_to_string(format!("/proc/{qemu}/comm")).unwrap_or_default();
    assert!(
        comm.starts_with("qemu"),
        "task pid {qemu} is {comm:?}, not QEMU"
    );
    let threads_before = support::proc_field(&format!("/proc/{qemu}/status"), "Threads");
    let (body, _) = scrape(&env, &id);
    let threads_after = support::proc_field(&format!("/proc/{qemu}/status"), "Threads");
    let samples = prom::samples(&body);

    let mem_total = prom::value(&samples, "kata_guest_meminfo", &[("item", "mem_total")])
        .unwrap_or_else(|| panic!("no kata_guest_meminfo{{item=\"mem_total\"}} in:\n{body}"));
    let configured = (GUEST_MEMORY_MIB * 1024 * 1024) as f64;
    assert!(
        mem_total >= 0.7 * configured && mem_total <= configured,
        "guest mem_total {mem_total} is not within 70-100% of the configured {configured} bytes"
    );
    let host_total = support::proc_field("/proc/meminfo", "MemTotal") as f64 * 1024.0;
    assert!(
        mem_total < host_total / 4.0,
        "guest mem_total {mem_total} vs host {host_total}"
    );

    let threads =
        prom::value(&samples, "kata_hypervisor_threads", &[]).expect("kata_hypervisor_threads");
    assert!(
        threads as u64 == threads_before || threads as u64 == threads_after,
        "kata_hypervisor_threads {threads}, /proc/{qemu}/status says {threads_before}..{threads_after}"
    );
    for prefix in ["kata_shim_", "kata_agent_", "kata_guest_netdev_stat"] {
        assert!(
            prom::has_prefix(&samples, prefix),
            "no {prefix}* in:\n{body}"
        );
    }
    assert!(
        prom::has_prefix(&samples, "kata_shim_rpc_durations_histogram_milliseconds"),
        "task RPC latencies are missing"
    );
    if let Err(report) = support::promtool_check(&body) {
        panic!("promtool check metrics failed: {report}\n{body}");
    }

    // `ctr task metrics`: the container's own cgroup, measured in the guest and decoded by ctr
    // as cgroups v2 metrics (a "METRIC VALUE" table).
    let out = env.ctr(&["task", "metrics", &id]);
    assert!(
        out.status.success(),
        "ctr task metrics: {}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let memory = task_metric(&table, &["memory.usage", "memory.usage_in_bytes"]);
    assert!(memory > 0, "memory usage {memory} in:\n{table}");
    let pids = task_metric(&table, &["pids.current"]);
    assert!(pids >= 1, "pids.current {pids} in:\n{table}");

    // Benchmarks: written down, never pass/fail.
    let mut scrapes: Vec<Duration> = Vec::new();
    for _ in 0..10 {
        scrapes.push(scrape(&env, &id).1);
    }
    scrapes.sort();
    let (last, _) = scrape(&env, &id);
    let last = prom::samples(&last);
    let agent_rpc = "kata_shim_agent_rpc_durations_histogram_milliseconds";
    // Every agent call is recorded under Kata's action name, `grpc.<Name>Request`, whichever path
    // made it; the sandbox's boot and its container's start are among them.
    let actions: Vec<&str> = prom::family(&last, &format!("{agent_rpc}_count"))
        .iter()
        .filter_map(|line| line.labels.get("action").map(String::as_str))
        .collect();
    for action in &actions {
        let name = action
            .strip_prefix("grpc.")
            .and_then(|rest| rest.strip_suffix("Request"));
        assert!(
            name.is_some_and(|n| n.starts_with(|c: char| c.is_ascii_uppercase())
                && n.chars().all(|c| c.is_ascii_alphanumeric())),
            "action {action:?} is not spelled grpc.<Name>Request: {actions:?}"
        );
    }
    for expected in [
        "grpc.CheckRequest",
        "grpc.CreateSandboxRequest",
        "grpc.CreateContainerRequest",
        "grpc.StartContainerRequest",
        "grpc.GetMetricsRequest",
    ] {
        assert!(actions.contains(&expected), "no {expected} in {actions:?}");
    }
    let metrics_call = [("action", "grpc.GetMetricsRequest")];
    let vsock_ms = match (
        prom::value(&last, &format!("{agent_rpc}_sum"), &metrics_call),
        prom::value(&last, &format!("{agent_rpc}_count"), &metrics_call),
    ) {
        (Some(sum), Some(count)) if count > 0.0 => sum / count,
        _ => f64::NAN,
    };
    let shim = shim_pid(&id);
    eprintln!(
        "BENCH sandbox start (ctr run -d): {start_time:?}; shim RSS {} KiB; QEMU RSS {} KiB; \
         kata-runtime metrics median {:?} (min {:?}); GetMetrics over vsock mean {vsock_ms:.2} ms",
        support::rss_kib(shim),
        support::rss_kib(qemu),
        scrapes[scrapes.len() / 2],
        scrapes[0]
    );
    for line in env.log().lines().filter(|l| l.contains("sandbox is up")) {
        eprintln!("BENCH {line}");
    }

    // Pod overhead after several scrapes: the host memory of shim + QEMU beyond what the guest
    // uses, bounded by those processes' RSS read here; CPU overhead is a non-negative percentage.
    let overhead_memory = prom::value(&last, "kata_shim_pod_overhead_memory_in_bytes", &[])
        .expect("kata_shim_pod_overhead_memory_in_bytes after a scrape with guest figures");
    let host_rss = ((support::rss_kib(shim) + support::rss_kib(qemu)) * 1024) as f64;
    assert!(
        overhead_memory > 0.0 && overhead_memory <= host_rss * 1.1,
        "memory overhead {overhead_memory} vs shim + QEMU RSS {host_rss}"
    );
    let overhead_cpu = prom::value(&last, "kata_shim_pod_overhead_cpu", &[])
        .expect("kata_shim_pod_overhead_cpu after two scrapes");
    eprintln!(
        "BENCH pod overhead: memory {:.0} MiB of shim + QEMU RSS {:.0} MiB; CPU {overhead_cpu:.1}%",
        overhead_memory / 1048576.0,
        host_rss / 1048576.0
    );
    assert!(
        (0.0..=100.0 * num_cpus() as f64).contains(&overhead_cpu),
        "CPU overhead {overhead_cpu}%"
    );

    // Host and guest side by side: the host figures against the shim's, QEMU's and the vsock
    // daemon's /proc entries read here; the overhead is their difference in the same scrape.
    let daemon = child_named(shim, "vhost-device-vs");
    let host_pids = [shim, qemu, daemon];
    let host_memory = prom::value(&last, "kata_shim_pod_host_memory_bytes", &[])
        .expect("kata_shim_pod_host_memory_bytes");
    let guest_memory = prom::value(&last, "kata_shim_pod_guest_memory_bytes", &[])
        .expect("kata_shim_pod_guest_memory_bytes");
    let rss_now: u64 = host_pids
        .iter()
        .map(|&pid| support::rss_kib(pid) * 1024)
        .sum();
    assert!(
        (host_memory - rss_now as f64).abs() <= 0.1 * rss_now as f64,
        "host memory {host_memory} vs the RSS of shim, QEMU and vsock daemon {rss_now}"
    );
    assert_eq!(overhead_memory, (host_memory - guest_memory).max(0.0));
    let host_cpu = prom::value(&last, "kata_shim_pod_host_cpu_seconds_total", &[])
        .expect("kata_shim_pod_host_cpu_seconds_total");
    let cpu_now: f64 = host_pids.iter().map(|&pid| cpu_seconds(pid)).sum();
    assert!(
        host_cpu > 0.0 && host_cpu <= cpu_now + 0.05,
        "host CPU {host_cpu} s, the processes' /proc says {cpu_now} s now"
    );
    let cached = prom::value(&last, "kata_guest_meminfo", &[("item", "cached")]);
    assert_eq!(
        prom::value(&last, "kata_shim_pod_guest_page_cache_bytes", &[]),
        cached
    );

    // The pod identity comes from the sandbox's annotations, for kata-monitor's labels.
    let pod_labels = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(kata_shim_metrics::mgmt::client::get(
            &kata_shim_metrics::mgmt::paths::SocketAddress::File(
                env.run_dir().join(&id).join("shim-monitor.sock"),
            ),
            "/pod-labels",
            &kata_shim_metrics::mgmt::client::GetOptions::default(),
        ))
        .expect("GET /pod-labels");
    assert_eq!(
        String::from_utf8_lossy(&pod_labels.body),
        format!("cri_uid=0000-1111\ncri_name=pod-{id}\ncri_namespace=tests\n")
    );

    assert_execs_work(&env, &id);

    // A container that CRI's annotations put into this sandbox runs in the same VM, through the
    // same shim (no second shim, no second QEMU).
    let joined = support::unique_id("joined");
    let sandbox_annotation = format!("io.kubernetes.cri.sandbox-id={id}");
    let out = env.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &sandbox_annotation,
        IMAGE,
        &joined,
        "echo",
        "joined",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "joined");
    assert!(
        support::processes_mentioning(&format!("-id {joined}")).is_empty(),
        "a second shim was started for {joined}"
    );
    assert!(
        env.run_dir().join(&id).join("shared").is_dir()
            && !env
                .run_dir()
                .join(&id)
                .join("shared")
                .join(&joined)
                .exists(),
        "the joined container's rootfs is still shared"
    );
    assert_eq!(task_pid(&env, &id), qemu, "the sandbox's VM changed");

    kill_and_delete(&env, &id);
    assert_gone(qemu, "QEMU");
    assert_clean(&env, &id);
}

/// `ctr task exec`: output and exit status pass through, kill reaches only the exec'd process,
/// and a missing program fails clearly; the container's own process keeps running throughout.
fn assert_execs_work(env: &Containerd, id: &str) {
    let out = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo from-exec; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-exec");

    let mut sleeper = env
        .ctr_command(&["task", "exec", "--exec-id", "e2", id, "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ctr task exec sleep");
    // The kill succeeds once the exec runs (before: not found, or not started).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kill = env.ctr(&["task", "kill", "--exec-id", "e2", "-s", "SIGKILL", id]);
        if kill.status.success() {
            break;
        }
        if Instant::now() > deadline {
            let _ = sleeper.kill();
            panic!("ctr task kill --exec-id e2: {}", text(&kill));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = wait_with_timeout(&mut sleeper, Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(137),
        "the killed exec's ctr: {status:?}"
    );

    let out = env.ctr(&["task", "exec", "--exec-id", "e3", id, "/no/such/program"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/program"),
        "the error does not name the program: {}",
        text(&out)
    );

    let ls = env.ctr(&["task", "ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING")),
        "the container stopped with its execs: {}",
        text(&ls)
    );
}

#[test]
#[ignore = "boots the guest image under containerd: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn sigterm_to_the_shim_stops_its_sandbox() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);
    let id = support::unique_id("term");
    run_detached(&env, &id);
    let qemu = task_pid(&env, &id);
    let shim = shim_pid(&id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill -TERM the shim");
    assert_gone(shim, "the shim");
    assert_gone(qemu, "QEMU");
    // The shim's own teardown did it, not the `delete` containerd runs after a shim is gone.
    let log = env.log();
    assert!(
        log.lines()
            .any(|l| l.contains("sandbox stopped") && l.contains(&id)),
        "the shim did not stop its sandbox itself; containerd log:\n{log}"
    );
    let _ = env.ctr(&["task", "delete", &id]);
    let out = env.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "ctr container delete: {}", text(&out));
    assert_clean(&env, &id);
}

#[test]
#[ignore = "boots the guest image under containerd: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn after_kill_9_of_the_shim_delete_leaves_nothing() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start(&guest);
    let id = support::unique_id("crash");
    run_detached(&env, &id);
    let qemu = task_pid(&env, &id);
    let shim = shim_pid(&id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");

    // containerd notices the dead shim and runs `<shim> delete` itself; run it as containerd does
    // too, in case containerd has not got to it yet (it must be idempotent).
    let bundle = env
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task/default")
        .join(&id);
    if bundle.is_dir() {
        let socket = env.socket();
        let out = Command::new(support::bin("containerd-shim-kata-v2"))
            .current_dir(&bundle)
            .args(["-namespace", "default", "-address"])
            .arg(&socket)
            .args(["-publish-binary", "containerd", "-id", &id, "-bundle"])
            .arg(&bundle)
            .arg("delete")
            .env("TTRPC_ADDRESS", format!("{}.ttrpc", socket.display()))
            .env("KATA_SANDBOX_RUN_DIR", env.run_dir())
            .env("KATA_CONF_FILE", env.dir.path().join("configuration.toml"))
            .stdin(Stdio::null())
            .output()
            .expect("run the shim's delete");
        assert!(out.status.success(), "shim delete: {}", text(&out));
    }
    let _ = env.ctr(&["task", "delete", &id]);
    let out = env.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "ctr container delete: {}", text(&out));
    assert_gone(qemu, "QEMU");
    assert_gone(shim, "the shim");
    assert_clean(&env, &id);
}

#[test]
#[ignore = "boots the guest image under containerd: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_bad_configuration_fails_create_with_the_file_and_the_key() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let conf_dir = tempfile::tempdir().expect("a temporary directory");
    let conf = conf_dir.path().join("configuration.toml");
    std::fs::write(&conf, "[hypervisor.qemu]\ndefault_memroy = 256\n").expect("write the config");
    let env = Containerd::start_with(&guest, Some(&conf));
    let id = support::unique_id("badconf");
    let out = env.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "true"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&conf.display().to_string()) && err.contains("default_memroy"),
        "the error names neither the file nor the key: {err}"
    );
    let _ = env.ctr(&["container", "delete", &id]);
    assert_clean(&env, &id);
}
