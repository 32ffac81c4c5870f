//! kata-monitor's `/metrics/cadvisor` for a VM pod: cAdvisor's families, types and label names
//! (checked against `tests/data/cadvisor_families.tsv`), `promtool check metrics`, a container
//! OOM-killed under its limit and resized live, and a real Prometheus scraping the monitor with
//! the shipped job (`deploy/prometheus/kata-monitor-cadvisor.yaml`), whose CPU rate and working
//! set are compared with the guest's cgroup files, read by the test inside the guest.
//!
//! Needs the guest image (`make guest-image`; `KSM_GUEST_DIR`, as `make test` sets) and what
//! `make deps` installs. One VM boot.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::containerd::*;
use support::cri::Kubelet;
use support::pod_checks::*;
use support::prom;

const MIB: i64 = 1 << 20;

/// One row of the reference list: a family's type and label names as kubelet serves them.
struct Reference {
    kind: String,
    labels: Vec<String>,
    help: String,
}

fn reference() -> BTreeMap<String, Reference> {
    let path = support::containerd::repo().join("tests/data/cadvisor_families.tsv");
    let text = std::fs::read_to_string(&path).expect("tests/data/cadvisor_families.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert!(cols.len() >= 4, "bad row in {}: {line:?}", path.display());
            let labels = cols[2]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            (
                cols[0].to_string(),
                Reference {
                    kind: cols[1].to_string(),
                    labels,
                    help: cols[3].to_string(),
                },
            )
        })
        .collect()
}

/// `# TYPE` (or `# HELP`, with `what` = "HELP") of every family in `text`.
fn headers(text: &str, what: &str) -> BTreeMap<String, String> {
    let prefix = format!("# {what} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// The series of `name` for the container called `container` of the pod `pod`.
fn series<'a>(
    all: &'a [prom::Line],
    name: &str,
    pod: &str,
    container: &str,
) -> Vec<&'a prom::Line> {
    all.iter()
        .filter(|l| {
            l.name == name
                && l.labels.get("pod").map(String::as_str) == Some(pod)
                && l.labels.get("container").map(String::as_str) == Some(container)
        })
        .collect()
}

fn one_value(all: &[prom::Line], name: &str, pod: &str, container: &str) -> Option<f64> {
    match series(all, name, pod, container).as_slice() {
        [line] => Some(line.value),
        [] => None,
        many => panic!("{name} of {container}: {} series: {many:?}", many.len()),
    }
}

fn limits(memory: i64) -> k8s_cri::v1::LinuxContainerResources {
    k8s_cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: memory,
        memory_swap_limit_in_bytes: memory,
        cpu_period: 100_000,
        cpu_shares: 512,
        ..Default::default()
    }
}

#[test]
#[ignore = "boots the guest image under containerd's CRI plugin, runs Prometheus: `make test` runs it"]
fn a_vm_pods_containers_have_cadvisors_series_for_prometheus() {
    let guest = support::guest_dir();
    let env = Containerd::start_cri(&guest);
    let kubelet = Kubelet::connect(&env);
    let pod = kubelet.run_pod("cadvisor");
    let busy = pod.run_container("busy", &["sh", "-c", "while :; do :; done"]);
    let anon = pod.run_container(
        "anon",
        &["sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 600"],
    );
    // A child that wants 64 MiB in a 32 MiB container: the guest's OOM killer ends the child (the
    // biggest process) and the container lives on.
    let capped = pod.create_container_with(
        "capped",
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do sleep 0.1; done; \
             dd if=/dev/zero of=/dev/null bs=64M count=1; exec sleep 600",
        ],
        Some(limits(32 * MIB)),
    );
    pod.start_container(&capped);
    wait_until("anon's 64 MiB", Duration::from_secs(60), || {
        guest_keyed(&pod, &anon, "memory.stat")["anon"] >= 64 << 20
    });

    let (_monitor, port) = start_monitor(&env.run_dir(), &[], &pod.id);
    let body = http_get(port, "/metrics/cadvisor");

    // Families, types and label names as kubelet's cAdvisor serves them; promtool finds no error.
    let reference = reference();
    let served = headers(&body, "TYPE");
    let helps = headers(&body, "HELP");
    assert!(!served.is_empty(), "no families: {body}");
    let all = prom::samples(&body);
    for (name, kind) in &served {
        let want = reference
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a cAdvisor family in the reference list"));
        assert_eq!(kind, &want.kind, "TYPE of {name}");
        assert_eq!(helps.get(name), Some(&want.help), "HELP of {name}");
        for line in all.iter().filter(|l| &l.name == name) {
            let got: BTreeSet<&str> = line.labels.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = want.labels.iter().map(String::as_str).collect();
            assert_eq!(got, want, "label names of {name}: {line:?}");
        }
    }
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_spec_memory_limit_bytes",
        "container_oom_events_total",
        "container_network_receive_bytes_total",
    ] {
        assert!(served.contains_key(name), "{name} missing: {body}");
    }
    // No error; a lint finding only where cAdvisor itself names a counter without `_total`.
    let report = support::promtool_check(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    eprintln!("promtool check metrics: {report:?}");
    for finding in report.lines().filter(|l| !l.trim().is_empty()) {
        let family = finding.split_whitespace().next().unwrap_or_default();
        let cadvisors_own = reference
            .get(family)
            .is_some_and(|r| r.kind == "counter" && !family.ends_with("_total"));
        assert!(cadvisors_own, "promtool: {finding}");
    }

    // kubelet's labels from CRI: every container of the pod, its image, the pod's namespace.
    let pod_name = "cadvisor";
    let names: BTreeSet<&str> = all
        .iter()
        .filter(|l| l.name == "container_last_seen")
        .filter_map(|l| l.labels.get("container").map(String::as_str))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["", "anon", "busy", "capped"]),
        "{body}"
    );
    let busy_cpu = series(&all, "container_cpu_usage_seconds_total", pod_name, "busy");
    let labels = &busy_cpu.first().expect("busy's CPU").labels;
    assert_eq!(labels["namespace"], "ksm-tests");
    assert_eq!(labels["name"], busy);
    assert_eq!(labels["cpu"], "total");
    assert!(labels["image"].contains("busybox"), "{labels:?}");
    assert!(labels["id"].ends_with(&busy), "{labels:?}");

    // The 32 MiB limit, an OOM kill counted once, then a live resize to 128 MiB.
    let limit = |text: &str| {
        one_value(
            &prom::samples(text),
            "container_spec_memory_limit_bytes",
            pod_name,
            "capped",
        )
    };
    assert_eq!(limit(&body), Some((32 * MIB) as f64));
    assert_eq!(
        one_value(&all, "container_oom_events_total", pod_name, "capped"),
        Some(0.0)
    );
    exec_text(&pod, &capped, &["touch", "/tmp/go"]);
    wait_until(
        "capped's OOM kill in the series",
        Duration::from_secs(60),
        || {
            let text = http_get(port, "/metrics/cadvisor");
            one_value(
                &prom::samples(&text),
                "container_oom_events_total",
                pod_name,
                "capped",
            ) == Some(1.0)
        },
    );
    assert_eq!(guest_keyed(&pod, &capped, "memory.events")["oom_kill"], 1);
    pod.update_resources(&capped, limits(128 * MIB));
    assert_eq!(
        limit(&http_get(port, "/metrics/cadvisor")),
        Some((128 * MIB) as f64)
    );

    // A real Prometheus with the shipped job: its rate and working set against the guest's files.
    let dir = support::temp_dir();
    let (_prometheus, prom_port) = start_prometheus(dir.path(), port);
    let selector = |container: &str| format!("{{pod=\"{pod_name}\",container=\"{container}\"}}");
    let first = format!("container_cpu_usage_seconds_total{}", selector("busy"));
    wait_until("Prometheus has busy's CPU", Duration::from_secs(60), || {
        !query(prom_port, &first).is_empty()
    });
    // An exec into the guest can take seconds on a loaded host, and the file is read somewhere
    // within it: each reading is bracketed, and the guest's rate bounded from both sides.
    let usage_usec = || {
        let start = Instant::now();
        let usec = guest_keyed(&pod, &busy, "cpu.stat")["usage_usec"] as f64;
        (usec, start, Instant::now())
    };
    let (usec_before, before_start, before_end) = usage_usec();
    std::thread::sleep(Duration::from_secs(12));
    let (usec_after, after_start, after_end) = usage_usec();
    let used = (usec_after - usec_before) / 1e6;
    let slowest = used / (after_end - before_start).as_secs_f64();
    let fastest = used / (after_start - before_end).as_secs_f64();
    let promql = format!(
        "rate(container_cpu_usage_seconds_total{}[12s])",
        selector("busy"),
    );
    let answer = query(prom_port, &promql);
    let [(labels, prom_rate)] = answer.as_slice() else {
        panic!("{promql}: {answer:?}");
    };
    eprintln!(
        "busy: Prometheus rate {prom_rate:.3}, guest cpu.stat rate {slowest:.3}..{fastest:.3}"
    );
    assert!(
        *prom_rate >= 0.8 * slowest && *prom_rate <= 1.2 * fastest,
        "{promql} = {prom_rate}, the guest's cpu.stat says {slowest}..{fastest}"
    );
    assert_eq!(
        labels.get("job").map(String::as_str),
        Some("kubelet"),
        "{labels:?}"
    );
    assert_eq!(
        labels.get("metrics_path").map(String::as_str),
        Some("/metrics/cadvisor"),
        "{labels:?}"
    );

    let working_set = format!("container_memory_working_set_bytes{}", selector("anon"));
    let answer = query(prom_port, &working_set);
    let guest_ws = guest_working_set(&pod, &anon) as f64;
    let [(_, prom_ws)] = answer.as_slice() else {
        panic!("{working_set}: {answer:?}");
    };
    eprintln!("anon: Prometheus working set {prom_ws}, guest {guest_ws}");
    assert!(
        (prom_ws - guest_ws).abs() <= 0.05 * guest_ws,
        "{working_set} = {prom_ws}, the guest's memory.current - inactive_file = {guest_ws}"
    );

    pod.stop();
    pod.remove();
    assert_clean(&env, &pod.id);
}

/// Prometheus on a free loopback port with the shipped job, its Kubernetes discovery (which
/// Debian's Prometheus is built without) replaced by the monitor's address, with the pod labels
/// the job's relabelling keeps.
fn start_prometheus(dir: &std::path::Path, monitor_port: u16) -> (support::Proc, u16) {
    let job = shipped_job(
        "kata-monitor-cadvisor.yaml",
        "pod",
        &format!(
            "      - targets: ['127.0.0.1:{monitor_port}']\n        labels:\n          \
             __meta_kubernetes_pod_label_app_kubernetes_io_name: kata-monitor\n          \
             __meta_kubernetes_pod_node_name: test-node\n"
        ),
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n{job}"),
    )
    .expect("write prometheus.yml");
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .expect("run promtool check config");
    assert!(
        check.status.success(),
        "promtool check config: {}",
        text(&check)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    let prometheus = support::Proc {
        child,
        name: "prometheus".into(),
    };
    // Prometheus listens before it is ready and answers 503 until its TSDB is open.
    wait_until("Prometheus is ready", Duration::from_secs(60), || {
        let response = prometheus_get(port, "/-/ready");
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
    });
    (prometheus, port)
}

/// The whole HTTP response to a GET, or "" while nothing listens.
fn prometheus_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// An instant query: each series' labels and value.
fn query(port: u16, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let response = prometheus_get(port, &format!("/api/v1/query?query={encoded}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|series| {
            let labels = series["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect()
}

/// The other shipped job (kubelet's cAdvisor job on Kata nodes) is a valid configuration. Debian's
/// Prometheus is built without Kubernetes discovery, so a static target stands in for it.
#[test]
fn the_shipped_kubelet_job_is_a_valid_prometheus_configuration() {
    let job = shipped_job(
        "kubelet-cadvisor-give-way.yaml",
        "node",
        "      - targets: ['127.0.0.1:10250']\n",
    );
    let dir = support::temp_dir();
    let config = dir.path().join("kubelet.yml");
    std::fs::write(&config, job).expect("write the job");
    let check = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&config)
        .output()
        .expect("run promtool (Debian's prometheus package)");
    assert!(
        check.status.success(),
        "promtool check config: {}",
        text(&check)
    );
}

/// A job of `deploy/prometheus/`, its `kubernetes_sd_configs` (role `role`) replaced by static
/// targets (`targets`: the lines under `static_configs:`).
fn shipped_job(file: &str, role: &str, targets: &str) -> String {
    let shipped = support::containerd::repo()
        .join("deploy/prometheus")
        .join(file);
    let job = std::fs::read_to_string(&shipped).expect("the shipped scrape job");
    let discovery = format!("    kubernetes_sd_configs:\n      - role: {role}\n");
    assert!(
        job.contains(&discovery),
        "{} changed its discovery",
        shipped.display()
    );
    job.replace(&discovery, &format!("    static_configs:\n{targets}"))
}
