//! A pod's numbers, checked against their sources: traffic to the pod's IP against the guest's
//! `eth0` (shim metrics, task metrics) and the pod's veth (PodSandboxStats); memory and CPU of
//! containers against the guest cgroup files the test reads itself (ExecSync `cat`); the pod's
//! host cost against its cgroup and the VM's processes in /proc; kata-monitor's pod labels from
//! the shim and, for a shim without `/pod-labels`, from CRI.
//!
//! Needs the guest image (`make guest-image`; set `KSM_GUEST_DIR`, as `make test` does) and what
//! `make deps` installs. One VM boot in all.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::containerd::*;
use support::cri::{Kubelet, Pod};
use support::pod_checks::*;
use support::prom;

const MIB: u64 = 1 << 20;
/// What the `net` container's listener answers.
const GREETING: &str = "pod says hi\n";
/// Bytes sent to the pod.
const TRANSFER: usize = 4 << 20;

/// A shell command that waits for `/tmp/go` in its container, then runs `then`.
fn after_go(then: &str) -> Vec<String> {
    let script = format!("while [ ! -e /tmp/go ]; do sleep 0.1; done; {then}");
    vec!["sh".into(), "-c".into(), script]
}

fn run(pod: &Pod, name: &str, command: &[String]) -> String {
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    pod.run_container(name, &command)
}

struct MemoryFigures {
    working_set: u64,
    rss: u64,
}

fn cri_memory(pod: &Pod, id: &str) -> MemoryFigures {
    let stats = pod.container_stats(id);
    let memory = stats.memory.as_ref().expect("memory stats");
    MemoryFigures {
        working_set: memory
            .working_set_bytes
            .as_ref()
            .expect("working set")
            .value,
        rss: memory.rss_bytes.as_ref().expect("rss").value,
    }
}

fn cri_cpu_ns(pod: &Pod, id: &str) -> u64 {
    let stats = pod.container_stats(id);
    stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .expect("CPU stats")
        .value
}

/// Asserts `lo <= value <= hi` with a message.
fn assert_within(what: &str, value: u64, lo: u64, hi: u64) {
    assert!(
        lo <= value && value <= hi,
        "{what}: {value} is not within [{lo}, {hi}]"
    );
}

/// `kata-runtime metrics <id>` for a sandbox under `run_dir`.
fn shim_metrics(run_dir: &Path, id: &str) -> Vec<prom::Line> {
    let out = Command::new(support::bin("kata-runtime"))
        .args(["metrics", id])
        .env("KATA_SANDBOX_RUN_DIR", run_dir)
        .output()
        .expect("run kata-runtime");
    assert!(out.status.success(), "kata-runtime metrics: {}", text(&out));
    prom::samples(&String::from_utf8_lossy(&out.stdout))
}

fn guest_eth0(samples: &[prom::Line], item: &str) -> u64 {
    prom::value(
        samples,
        "kata_guest_netdev_stat",
        &[("interface", "eth0"), ("item", item)],
    )
    .unwrap_or_else(|| panic!("no kata_guest_netdev_stat for eth0 {item}")) as u64
}

/// rx bytes of the guest's eth0 in the container's Task stats, asked of its shim over the shim's
/// ttrpc socket (containerd 1.6's cgroups v2 `Metrics` has no network field, so `ctr task
/// metrics` drops it).
fn task_eth0_rx(env: &Containerd, id: &str) -> u64 {
    use containerd_shim::protos::api::StatsRequest;
    use containerd_shim::protos::cgroups_v2::metrics::Metrics;
    use containerd_shim::protos::protobuf::Message;
    use containerd_shim::protos::shim_async::{Client, TaskClient};

    let bundle = env
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(id);
    let address = std::fs::read_to_string(bundle.join("address")).expect("the task's shim address");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let reply = runtime.block_on(async {
        let client = Client::connect(address.trim())
            .await
            .expect("connect to the shim");
        let request = StatsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        TaskClient::new(client)
            .stats(
                containerd_shim::protos::ttrpc::context::with_timeout(10_000_000_000),
                &request,
            )
            .await
            .expect("Task Stats")
    });
    let any = reply.stats.as_ref().expect("stats in the reply");
    assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    let metrics = Metrics::parse_from_bytes(&any.value).expect("cgroups v2 metrics");
    metrics
        .network
        .iter()
        .find(|nic| nic.name == "eth0")
        .map(|nic| nic.rx_bytes)
        .unwrap_or_else(|| panic!("no eth0 in the task metrics: {:?}", metrics.network))
}

fn pod_rx(pod: &Pod) -> u64 {
    let stats = pod.stats();
    let network = stats
        .linux
        .and_then(|l| l.network)
        .expect("pod network stats");
    let interface = network.default_interface.expect("the pod's interface");
    assert_eq!(interface.name, "eth0");
    interface.rx_bytes.expect("rx bytes").value
}

/// Sends `TRANSFER` bytes to `ip:port` from containerd's network namespace (where CNI's bridge
/// is) and returns what the pod answered.
fn send_to_pod(env: &Containerd, ip: &str, port: u16) -> String {
    let netns = Path::new("/run/netns").join(env.netns().expect("a CRI containerd"));
    let addr = format!("{ip}:{port}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("open containerd's netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the netns");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5)) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("connect {addr}: {err}; again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(err) => panic!("the pod does not answer on {addr}: {err}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        stream.write_all(&vec![b'x'; TRANSFER]).expect("send");
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("the answer");
        answer
    })
    .join()
    .expect("the sending thread")
}

/// utime + stime of `pid` in nanoseconds, from /proc/<pid>/stat.
fn process_cpu_ns(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of the file; `after_comm` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    ticks * 1_000_000_000 / hz
}

/// The v1 (or v2) cgroup path of `pid` for controller `controller`, from /proc/<pid>/cgroup.
fn cgroup_of(pid: i32, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    text.lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("pid {pid} has no {controller} cgroup: {text}"))
}

/// The cri_* labels on the monitor's `kata_guest_load` sample of `sandbox` (None: unlabelled).
fn monitor_pod_labels(port: u16, sandbox: &str) -> [Option<String>; 3] {
    let samples = prom::samples(&http_get(port, "/metrics"));
    let line = samples
        .iter()
        .find(|l| {
            l.name == "kata_guest_load"
                && l.labels.get("sandbox_id").map(String::as_str) == Some(sandbox)
        })
        .unwrap_or_else(|| panic!("no kata_guest_load of {sandbox} from the monitor"));
    ["cri_name", "cri_namespace", "cri_uid"].map(|name| line.labels.get(name).cloned())
}

#[test]
#[ignore = "boots the guest image under containerd's CRI plugin: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_pods_figures_match_the_guest_and_its_host_cost_is_the_pods() {
    let guest = support::guest_dir();
    let env = Containerd::start_cri(&guest);
    let kubelet = Kubelet::connect(&env);
    let pod = kubelet.run_pod("figures");
    let ip = pod
        .status()
        .status
        .and_then(|s| s.network)
        .expect("pod network")
        .ip;
    let listen =
        format!("echo -n '{GREETING}' | nc -l -p 9000 | wc -c > /tmp/received; exec sleep 600");
    let net = run(&pod, "net", &["sh".into(), "-c".into(), listen]);
    let anon = run(
        &pod,
        "anon",
        &after_go("dd if=/dev/zero bs=64M count=1 | sleep 600"),
    );
    let file = run(
        &pod,
        "file",
        &after_go(
            "dd if=/dev/zero of=/tmp/f bs=1M count=64 && sync && touch /tmp/done; exec sleep 600",
        ),
    );
    let busy = run(&pod, "busy", &after_go("while :; do :; done"));

    // Network: the pod answers on its IP; each counter of the path moved by the transfer.
    let run_dir = env.run_dir();
    let guest_rx = guest_eth0(&shim_metrics(&run_dir, &pod.id), "recv_bytes");
    let task_rx = task_eth0_rx(&env, &net);
    let veth_rx = pod_rx(&pod);
    assert_eq!(send_to_pod(&env, &ip, 9000), GREETING);
    wait_until("the listener's count", Duration::from_secs(20), || {
        pod.exec_sync(&net, &["cat", "/tmp/received"]).exit_code == 0
            && exec_text(&pod, &net, &["cat", "/tmp/received"]).trim() == TRANSFER.to_string()
    });
    let moved = |what: &str, before: u64, after: u64| {
        eprintln!("{what}: +{} bytes", after - before);
        assert!(
            after >= before + TRANSFER as u64,
            "{what} rose by {} < {TRANSFER}",
            after.saturating_sub(before)
        );
    };
    moved(
        "kata_guest_netdev_stat eth0 recv_bytes",
        guest_rx,
        guest_eth0(&shim_metrics(&run_dir, &pod.id), "recv_bytes"),
    );
    moved("task metrics eth0 rx", task_rx, task_eth0_rx(&env, &net));
    moved("PodSandboxStats eth0 rx", veth_rx, pod_rx(&pod));

    // Memory: 64 MiB of anonymous memory moves the working set and rss by about that.
    let anon_before = cri_memory(&pod, &anon);
    exec_text(&pod, &anon, &["touch", "/tmp/go"]);
    wait_until("anon's 64 MiB", Duration::from_secs(30), || {
        guest_keyed(&pod, &anon, "memory.stat")["anon"] >= 64 * MIB
    });
    let guest_before = guest_working_set(&pod, &anon);
    let anon_after = cri_memory(&pod, &anon);
    let guest_after = guest_working_set(&pod, &anon);
    eprintln!(
        "anon: working set {} -> {} (guest {guest_before}..{guest_after}), rss {} -> {}",
        anon_before.working_set, anon_after.working_set, anon_before.rss, anon_after.rss
    );
    assert_within(
        "anon's working set - the guest's usage - inactive_file",
        anon_after.working_set,
        guest_before.min(guest_after) - MIB,
        guest_before.max(guest_after) + MIB,
    );
    assert_within(
        "anon's working set growth",
        anon_after.working_set - anon_before.working_set,
        62 * MIB,
        72 * MIB,
    );
    assert_within(
        "anon's rss growth",
        anon_after.rss - anon_before.rss,
        62 * MIB,
        72 * MIB,
    );
    let guest_anon = guest_keyed(&pod, &anon, "memory.stat")["anon"];
    assert_within(
        "anon's rss - the guest's anon",
        anon_after.rss,
        guest_anon - MIB,
        guest_anon + MIB,
    );

    // A 64 MiB file moves neither. The rootfs is 9p without a guest cache, so the guest keeps
    // (almost) no page cache for it; that page cache is subtracted (usage - inactive_file) is
    // checked where there is some, in tests/agent_containers.rs on the host.
    let file_before = cri_memory(&pod, &file);
    let stat_before = guest_keyed(&pod, &file, "memory.stat");
    exec_text(&pod, &file, &["touch", "/tmp/go"]);
    wait_until("file's 64 MiB written", Duration::from_secs(60), || {
        pod.exec_sync(&file, &["test", "-e", "/tmp/done"]).exit_code == 0
    });
    let written = exec_text(&pod, &file, &["wc", "-c", "/tmp/f"]);
    assert_eq!(
        written.split_whitespace().next(),
        Some("67108864"),
        "{written}"
    );
    let stat_after = guest_keyed(&pod, &file, "memory.stat");
    let file_after = cri_memory(&pod, &file);
    let guest_ws = guest_working_set(&pod, &file);
    eprintln!(
        "file: working set {} -> {} (guest {guest_ws}), rss {} -> {}, guest file {} -> {}, inactive_file {} -> {}",
        file_before.working_set,
        file_after.working_set,
        file_before.rss,
        file_after.rss,
        stat_before["file"],
        stat_after["file"],
        stat_before["inactive_file"],
        stat_after["inactive_file"]
    );
    assert!(
        file_after.working_set < file_before.working_set + 4 * MIB,
        "a file write moved the working set by {} bytes",
        file_after
            .working_set
            .saturating_sub(file_before.working_set)
    );
    assert!(
        file_after.rss < file_before.rss + 4 * MIB,
        "a file write moved rss by {} bytes",
        file_after.rss.saturating_sub(file_before.rss)
    );
    assert_within(
        "file's working set - the guest's usage - inactive_file",
        file_after.working_set,
        guest_ws.saturating_sub(2 * MIB),
        guest_ws + 2 * MIB,
    );

    // CPU: a busy loop's CPU time follows the time it has been running.
    let cpu_before = cri_cpu_ns(&pod, &busy);
    exec_text(&pod, &busy, &["touch", "/tmp/go"]);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let guest_usec_before = guest_keyed(&pod, &busy, "cpu.stat")["usage_usec"];
    let cpu_after = cri_cpu_ns(&pod, &busy);
    let elapsed = started.elapsed().as_nanos() as u64;
    let guest_usec_after = guest_keyed(&pod, &busy, "cpu.stat")["usage_usec"];
    eprintln!(
        "busy: {} ms of CPU in {} ms",
        (cpu_after - cpu_before) / 1_000_000,
        elapsed / 1_000_000
    );
    assert_within(
        "busy's CPU - the guest's cpu.stat usage_usec",
        cpu_after,
        guest_usec_before * 1000,
        guest_usec_after * 1000,
    );
    // One guest vCPU shared with the agent and the other containers: at least half of it.
    assert_within(
        "busy's CPU over the elapsed time",
        cpu_after - cpu_before,
        elapsed / 2,
        elapsed + elapsed / 10,
    );

    // The pod's host cost: QEMU and the vsock daemon are in the sandbox's cgroup under the pod's,
    // and PodSandboxStats reads that pod cgroup.
    let qemu = the_pods_qemu(&env, &pod);
    let sandbox_cgroup = format!("{}/{}", pod.cgroup_parent(), pod.id);
    for controller in ["cpu", "memory", "pids"] {
        assert_eq!(
            cgroup_of(qemu, controller),
            sandbox_cgroup,
            "QEMU's {controller} cgroup"
        );
    }
    let qemu_cpu = process_cpu_ns(qemu);
    let pod_stats = pod.stats();
    let listed = pod.list_stats();
    let pod_cgroup_cpu = pod.cgroup_cpu_ns();
    let pod_cpu_of = |stats: &k8s_cri::v1::PodSandboxStats| {
        stats
            .linux
            .as_ref()
            .and_then(|l| l.cpu.as_ref())
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .expect("the pod's CPU")
            .value
    };
    let pod_cpu = pod_cpu_of(&pod_stats);
    assert_eq!(listed.len(), 1, "ListPodSandboxStats for the pod's id");
    assert_within(
        "ListPodSandboxStats' CPU, read after PodSandboxStats",
        pod_cpu_of(&listed[0]),
        pod_cpu,
        pod_cgroup_cpu,
    );
    let linux = pod_stats.linux.expect("linux pod stats");
    eprintln!("pod CPU {pod_cpu} ns; QEMU's before {qemu_cpu} ns; the pod cgroup's after {pod_cgroup_cpu} ns");
    assert_within(
        "the pod's CPU",
        pod_cpu,
        qemu_cpu - qemu_cpu / 20,
        pod_cgroup_cpu,
    );
    let pod_ws = linux
        .memory
        .and_then(|m| m.working_set_bytes)
        .expect("the pod's working set")
        .value;
    let qemu_resident = support::proc_field(&format!("/proc/{qemu}/status"), "RssAnon")
        + support::proc_field(&format!("/proc/{qemu}/status"), "RssShmem");
    eprintln!("pod working set {pod_ws}; QEMU's anon + shmem {qemu_resident} KiB");
    assert!(
        pod_ws >= qemu_resident * 1024 * 8 / 10,
        "the pod's working set {pod_ws} is below QEMU's resident guest memory {qemu_resident} KiB"
    );

    // kata-monitor: the pod's labels from the shim's /pod-labels ...
    let socket = env.socket().display().to_string();
    let endpoint = ["--runtime-endpoint", socket.as_str()];
    let want = [
        Some("figures".to_string()),
        Some("ksm-tests".to_string()),
        Some(pod.uid.clone()),
    ];
    let (monitor, port) = start_monitor(&run_dir, &endpoint, &pod.id);
    assert_eq!(
        monitor_pod_labels(port, &pod.id),
        want,
        "labels from /pod-labels"
    );
    drop(monitor);
    {
        // ... and from CRI for a shim that has no /pod-labels (as an upstream Kata shim): the metrics
        // server example under the pod's sandbox id, with an agent of its own and no annotations.
        let upstream = support::temp_dir();
        let upstream_run = upstream.path().join("sbs");
        std::fs::create_dir_all(&upstream_run).expect("a run dir");
        let (_agent, agent_url) = support::start_agent(upstream.path());
        let _shim = support::start_shim(support::ShimOptions {
            sandbox_id: &pod.id,
            agent_url: &agent_url,
            run_dir: &upstream_run,
            hypervisor_pid: None,
            metrics_timeout: "5s",
            extra: vec!["--no-abstract".into()],
        });
        let (without_cri, port) = start_monitor(&upstream_run, &[], &pod.id);
        assert_eq!(
            monitor_pod_labels(port, &pod.id),
            [None, None, None],
            "a shim without /pod-labels and no CRI: no pod labels"
        );
        drop(without_cri);
        let (_monitor, port) = start_monitor(&upstream_run, &endpoint, &pod.id);
        assert_eq!(monitor_pod_labels(port, &pod.id), want, "labels from CRI");
    }
    pod.stop();
    pod.remove();
    assert_clean(&env, &pod.id);
}

fn resources(memory: i64, quota: i64) -> k8s_cri::v1::LinuxContainerResources {
    k8s_cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: memory,
        // kubelet's swap limit for a pod without swap: the memory limit.
        memory_swap_limit_in_bytes: memory,
        cpu_quota: quota,
        cpu_period: 100_000,
        cpu_shares: 256,
        ..Default::default()
    }
}

#[test]
#[ignore = "boots the guest image under containerd's CRI plugin: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_containers_limits_hold_in_the_guest_and_change_live() {
    let guest = support::guest_dir();
    let env = Containerd::start_cri(&guest);
    let kubelet = Kubelet::connect(&env);
    let pod = kubelet.run_pod("limits");
    let capped = pod.create_container_with(
        "capped",
        &after_go("exec dd if=/dev/zero of=/dev/null bs=96M count=1")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        Some(resources(48 << 20, 50_000)),
    );
    pod.start_container(&capped);
    let cgroup = guest_cgroup(&pod, &capped);
    let read = |file: &str| exec_text(&pod, &capped, &["cat", &format!("{cgroup}/{file}")]);
    assert_eq!(read("memory.max").trim(), (48u64 << 20).to_string());
    assert_eq!(read("memory.swap.max").trim(), "0");
    assert_eq!(read("cpu.max").trim(), "50000 100000");
    // 256 shares (a quarter CPU requested) is cgroup v2 weight 10.
    assert_eq!(read("cpu.weight").trim(), "10");

    // An in-place resize reaches the guest.
    pod.update_resources(&capped, resources(64 << 20, 20_000));
    assert_eq!(read("memory.max").trim(), (64u64 << 20).to_string());
    assert_eq!(read("cpu.max").trim(), "20000 100000");

    // 96 MiB in a 64 MiB container: the guest's OOM killer ends it, and the cgroups count it
    // (the parent of the containers' cgroups, since the container's goes with its task).
    let watcher = run(&pod, "watcher", &["sleep".into(), "600".into()]);
    let parent = cgroup
        .rsplit_once('/')
        .expect("a parent cgroup")
        .0
        .to_string();
    let oom_kills = || -> u64 {
        let events = exec_text(&pod, &watcher, &["cat", &format!("{parent}/memory.events")]);
        events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no oom_kill in memory.events: {events}"))
    };
    let oom_kills_before = oom_kills();
    exec_text(&pod, &capped, &["touch", "/tmp/go"]);
    wait_until("capped is OOM-killed", Duration::from_secs(60), || {
        pod.container_status(&capped)
            .status
            .is_some_and(|s| s.state() == k8s_cri::v1::ContainerState::ContainerExited)
    });
    let status = pod.container_status(&capped).status.expect("a status");
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(oom_kills(), oom_kills_before + 1, "the guest's OOM kills");

    pod.stop();
    pod.remove();
    assert_clean(&env, &pod.id);
}
