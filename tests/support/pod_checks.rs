//! Checks on a CRI pod from outside: its QEMU in /proc, containerd's verbose info, its network
//! namespace (`ip -j` through nsenter), ExecSync output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::containerd::{text, Containerd};
use super::cri::Pod;

/// Waits until `done` holds, failing with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU processes of this containerd's sandboxes (their command lines name its run directory).
pub fn qemus(env: &Containerd) -> Vec<i32> {
    super::processes_mentioning(&format!("{}/", env.run_dir().display()))
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("qemu"))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The one QEMU of the pod, checked from /proc: exactly one runs, and it is the pod's.
pub fn the_pods_qemu(env: &Containerd, pod: &Pod) -> i32 {
    let found = qemus(env);
    assert_eq!(found.len(), 1, "QEMU processes for the pod: {found:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", found[0])).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&pod.id),
        "QEMU {} does not run the pod's sandbox {}",
        found[0],
        pod.id
    );
    found[0]
}

/// containerd's verbose `info` of a container or pod (its pid, runtime spec, CNI result).
pub fn info(map: &std::collections::HashMap<String, String>) -> serde_json::Value {
    let text = map.get("info").expect("verbose info");
    serde_json::from_str(text).expect("info is JSON")
}

/// The task pid containerd has for container `id` (our shim reports the VM's).
pub fn cri_task_pid(pod: &Pod, id: &str) -> i64 {
    let status = pod.container_status(id);
    info(&status.info)["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in the info of {id}: {:?}", status.info))
}

/// The pod's network namespace, as CRI put it in the sandbox's runtime spec.
pub fn pod_netns(pod: &Pod) -> PathBuf {
    let info = info(&pod.status().info);
    let namespaces = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .expect("namespaces in the sandbox spec");
    let path = namespaces
        .iter()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .expect("a network namespace path in the sandbox spec");
    PathBuf::from(path)
}

/// `ip -j <args>` inside the network namespace at `netns`, parsed.
pub fn ip_in(netns: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-j"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nsenter ip");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("ip -j prints JSON")
}

pub fn exec_text(pod: &Pod, id: &str, cmd: &[&str]) -> String {
    let reply = pod.exec_sync(id, cmd);
    assert_eq!(reply.exit_code, 0, "{cmd:?} in {id}: {reply:?}");
    String::from_utf8_lossy(&reply.stdout).into_owned()
}

/// One plain HTTP/1.0 GET to 127.0.0.1:`port`; returns the body of a 200.
pub fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to kata-monitor");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}"
    );
    body.to_string()
}

/// kata-monitor on a free loopback port watching `run_dir`, with `extra` flags; returns it once
/// it lists `sandbox`.
pub fn start_monitor(run_dir: &Path, extra: &[&str], sandbox: &str) -> (super::Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(super::bin("kata-monitor"))
        .args(["--listen-address", &format!("127.0.0.1:{port}")])
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--log-level", "warn"])
        .args(extra)
        .spawn()
        .expect("start kata-monitor");
    let monitor = super::Proc {
        child,
        name: "kata-monitor".into(),
    };
    wait_until(
        "kata-monitor lists the pod",
        Duration::from_secs(20),
        || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http_get(port, "/sandboxes").lines().any(|id| id == sandbox)
        },
    );
    (monitor, port)
}

/// A container's cgroup in the guest, as its own /proc/self/cgroup names it (cgroup v2).
pub fn guest_cgroup(pod: &Pod, id: &str) -> String {
    let text = exec_text(pod, id, &["cat", "/proc/self/cgroup"]);
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in {id}'s /proc/self/cgroup: {text:?}"));
    format!("/sys/fs/cgroup{}", path.trim())
}

/// `key value` lines of a guest cgroup file.
pub fn guest_keyed(pod: &Pod, id: &str, file: &str) -> BTreeMap<String, u64> {
    let path = format!("{}/{file}", guest_cgroup(pod, id));
    exec_text(pod, id, &["cat", &path])
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

pub fn guest_value(pod: &Pod, id: &str, file: &str) -> u64 {
    let path = format!("{}/{file}", guest_cgroup(pod, id));
    let text = exec_text(pod, id, &["cat", &path]);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path} in {id}: {text:?}"))
}

/// The guest cgroup's working set as containerd computes it: usage − inactive_file.
pub fn guest_working_set(pod: &Pod, id: &str) -> u64 {
    let usage = guest_value(pod, id, "memory.current");
    let inactive_file = guest_keyed(pod, id, "memory.stat")["inactive_file"];
    usage.saturating_sub(inactive_file)
}
