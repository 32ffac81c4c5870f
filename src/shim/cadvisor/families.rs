//! cAdvisor's `container_*` families for the sandbox's containers: names, types, HELP and label
//! names as kubelet's `/metrics/cadvisor` has them (`tests/data/cadvisor_families.tsv` lists them
//! with their source), values from the guest's cgroups.

use std::time::{SystemTime, UNIX_EPOCH};

use super::book::{BookPage, ContainerCard};
use super::guest::{ContainerFigures, GuestFigures};
use crate::metrics::exposition::{Family, MetricType, Sample};

const NANOS: f64 = 1e9;

/// The series of every container of `page` the guest reported on; the pod's network series go
/// with its sandbox container (the one whose id is `sandbox_id`), as kubelet reports them on the
/// pause container.
pub(crate) fn build(
    page: &BookPage,
    sandbox_id: &str,
    figures: &GuestFigures,
    now: SystemTime,
) -> Vec<Family> {
    let mut out = Families::default();
    let (namespace, pod) = page
        .pod
        .as_ref()
        .map_or(("", ""), |p| (p.namespace.as_str(), p.name.as_str()));
    for (id, card) in &page.containers {
        let Some(container) = figures.containers.get(id) else {
            continue;
        };
        let base = base_labels(card, id, namespace, pod);
        container_series(&mut out, &base, card, container, now);
        if id == sandbox_id {
            network_series(&mut out, &base, figures);
        }
    }
    out.finish()
}

/// kubelet's labels (`containerPrometheusLabelsFunc`).
fn base_labels(
    card: &ContainerCard,
    id: &str,
    namespace: &str,
    pod: &str,
) -> Vec<(String, String)> {
    [
        ("container", card.container.as_str()),
        ("id", card.cgroup.as_str()),
        ("image", card.image.as_str()),
        ("name", id),
        ("namespace", namespace),
        ("pod", pod),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn container_series(
    out: &mut Families,
    base: &[(String, String)],
    card: &ContainerCard,
    c: &ContainerFigures,
    now: SystemTime,
) {
    use MetricType::{Counter, Gauge};
    let secs = |ns: u64| ns as f64 / NANOS;
    // cAdvisor without per-CPU figures (kubelet's set): one `cpu="total"` sample, once there is any.
    if c.cpu_total_ns > 0 {
        let total = secs(c.cpu_total_ns);
        out.add(CPU_USAGE, Counter, base, &[("cpu", "total")], total);
    }
    out.add(CPU_USER, Counter, base, &[], secs(c.cpu_user_ns));
    out.add(CPU_SYSTEM, Counter, base, &[], secs(c.cpu_system_ns));
    // cAdvisor has CFS figures only for a container with a CPU quota.
    if c.cpu_quota_us > 0 {
        out.add(CFS_PERIODS, Counter, base, &[], c.cfs_periods as f64);
        out.add(
            CFS_THROTTLED_PERIODS,
            Counter,
            base,
            &[],
            c.cfs_throttled_periods as f64,
        );
        out.add(
            CFS_THROTTLED_SECONDS,
            Counter,
            base,
            &[],
            secs(c.cfs_throttled_ns),
        );
        out.add(SPEC_CPU_QUOTA, Gauge, base, &[], c.cpu_quota_us as f64);
    }
    if c.cpu_period_us > 0 {
        out.add(SPEC_CPU_PERIOD, Gauge, base, &[], c.cpu_period_us as f64);
    }
    if c.cpu_weight > 0 {
        out.add(
            SPEC_CPU_SHARES,
            Gauge,
            base,
            &[],
            shares_of_weight(c.cpu_weight) as f64,
        );
    }
    out.add(MEMORY_CACHE, Gauge, base, &[], c.cache as f64);
    out.add(MEMORY_RSS, Gauge, base, &[], c.rss as f64);
    out.add(MEMORY_MAPPED_FILE, Gauge, base, &[], c.mapped_file as f64);
    out.add(MEMORY_SWAP, Gauge, base, &[], c.swap as f64);
    out.add(MEMORY_FAILCNT, Counter, base, &[], c.failcnt as f64);
    out.add(MEMORY_USAGE, Gauge, base, &[], c.memory_usage as f64);
    out.add(
        MEMORY_MAX_USAGE,
        Gauge,
        base,
        &[],
        c.memory_max_usage as f64,
    );
    out.add(MEMORY_WORKING_SET, Gauge, base, &[], c.working_set as f64);
    for (kind, scope, value) in [
        ("pgfault", "container", c.pgfault),
        ("pgmajfault", "container", c.pgmajfault),
        ("pgfault", "hierarchy", c.pgfault),
        ("pgmajfault", "hierarchy", c.pgmajfault),
    ] {
        let extra = [("failure_type", kind), ("scope", scope)];
        out.add(MEMORY_FAILURES, Counter, base, &extra, value as f64);
    }
    out.add(OOM_EVENTS, Counter, base, &[], c.oom_kills as f64);
    // As cAdvisor reports an unlimited container: 0.
    let limit = c.memory_limit.unwrap_or(0);
    out.add(SPEC_MEMORY_LIMIT, Gauge, base, &[], limit as f64);
    out.add(PROCESSES, Gauge, base, &[], c.processes as f64);
    out.add(THREADS, Gauge, base, &[], c.threads as f64);
    out.add(THREADS_MAX, Gauge, base, &[], c.threads_max as f64);
    for d in &c.devices {
        let extra = [("device", d.device.as_str())];
        out.add(FS_READS_BYTES, Counter, base, &extra, d.read_bytes as f64);
        out.add(FS_WRITES_BYTES, Counter, base, &extra, d.write_bytes as f64);
        out.add(FS_READS, Counter, base, &extra, d.reads as f64);
        out.add(FS_WRITES, Counter, base, &extra, d.writes as f64);
    }
    out.add(START_TIME, Gauge, base, &[], unix_seconds(card.created));
    out.add(LAST_SEEN, Gauge, base, &[], unix_seconds(now).trunc());
}

fn network_series(out: &mut Families, base: &[(String, String)], figures: &GuestFigures) {
    for i in &figures.interfaces {
        let extra = [("interface", i.name.as_str())];
        let mut add = |family: FamilyDef, value: u64| {
            out.add(family, MetricType::Counter, base, &extra, value as f64)
        };
        add(NET_RX_BYTES, i.rx_bytes);
        add(NET_RX_PACKETS, i.rx_packets);
        add(NET_RX_DROPPED, i.rx_dropped);
        add(NET_RX_ERRORS, i.rx_errors);
        add(NET_TX_BYTES, i.tx_bytes);
        add(NET_TX_PACKETS, i.tx_packets);
        add(NET_TX_DROPPED, i.tx_dropped);
        add(NET_TX_ERRORS, i.tx_errors);
    }
}

/// cgroup v2's cpu.weight back to v1 shares, the inverse of the conversion runc (and our agent)
/// applies, as cAdvisor reports `container_spec_cpu_shares` on cgroup v2.
fn shares_of_weight(weight: u64) -> u64 {
    2 + (weight.saturating_sub(1) * 262_142) / 9_999
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A family's name and HELP (its type is given where it is added).
type FamilyDef = (&'static str, &'static str);

const CPU_USAGE: FamilyDef = (
    "container_cpu_usage_seconds_total",
    "Cumulative cpu time consumed in seconds.",
);
const CPU_USER: FamilyDef = (
    "container_cpu_user_seconds_total",
    "Cumulative user cpu time consumed in seconds.",
);
const CPU_SYSTEM: FamilyDef = (
    "container_cpu_system_seconds_total",
    "Cumulative system cpu time consumed in seconds.",
);
const CFS_PERIODS: FamilyDef = (
    "container_cpu_cfs_periods_total",
    "Number of elapsed enforcement period intervals.",
);
const CFS_THROTTLED_PERIODS: FamilyDef = (
    "container_cpu_cfs_throttled_periods_total",
    "Number of throttled period intervals.",
);
const CFS_THROTTLED_SECONDS: FamilyDef = (
    "container_cpu_cfs_throttled_seconds_total",
    "Total time duration the container has been throttled.",
);
const SPEC_CPU_QUOTA: FamilyDef = ("container_spec_cpu_quota", "CPU quota of the container.");
const SPEC_CPU_PERIOD: FamilyDef = ("container_spec_cpu_period", "CPU period of the container.");
const SPEC_CPU_SHARES: FamilyDef = ("container_spec_cpu_shares", "CPU share of the container.");
const MEMORY_CACHE: FamilyDef = (
    "container_memory_cache",
    "Number of bytes of page cache memory.",
);
const MEMORY_RSS: FamilyDef = ("container_memory_rss", "Size of RSS in bytes.");
const MEMORY_MAPPED_FILE: FamilyDef = (
    "container_memory_mapped_file",
    "Size of memory mapped files in bytes.",
);
const MEMORY_SWAP: FamilyDef = ("container_memory_swap", "Container swap usage in bytes.");
const MEMORY_FAILCNT: FamilyDef = (
    "container_memory_failcnt",
    "Number of memory usage hits limits",
);
const MEMORY_USAGE: FamilyDef = (
    "container_memory_usage_bytes",
    "Current memory usage in bytes, including all memory regardless of when it was accessed",
);
const MEMORY_MAX_USAGE: FamilyDef = (
    "container_memory_max_usage_bytes",
    "Maximum memory usage recorded in bytes",
);
const MEMORY_WORKING_SET: FamilyDef = (
    "container_memory_working_set_bytes",
    "Current working set in bytes.",
);
const MEMORY_FAILURES: FamilyDef = (
    "container_memory_failures_total",
    "Cumulative count of memory allocation failures.",
);
const OOM_EVENTS: FamilyDef = (
    "container_oom_events_total",
    "Count of out of memory events observed for the container",
);
const SPEC_MEMORY_LIMIT: FamilyDef = (
    "container_spec_memory_limit_bytes",
    "Memory limit for the container.",
);
const PROCESSES: FamilyDef = (
    "container_processes",
    "Number of processes running inside the container.",
);
const THREADS: FamilyDef = (
    "container_threads",
    "Number of threads running inside the container",
);
const THREADS_MAX: FamilyDef = (
    "container_threads_max",
    "Maximum number of threads allowed inside the container, infinity if value is zero",
);
const FS_READS_BYTES: FamilyDef = (
    "container_fs_reads_bytes_total",
    "Cumulative count of bytes read",
);
const FS_WRITES_BYTES: FamilyDef = (
    "container_fs_writes_bytes_total",
    "Cumulative count of bytes written",
);
const FS_READS: FamilyDef = (
    "container_fs_reads_total",
    "Cumulative count of reads completed",
);
const FS_WRITES: FamilyDef = (
    "container_fs_writes_total",
    "Cumulative count of writes completed",
);
const START_TIME: FamilyDef = (
    "container_start_time_seconds",
    "Start time of the container since unix epoch in seconds.",
);
const LAST_SEEN: FamilyDef = (
    "container_last_seen",
    "Last time a container was seen by the exporter",
);
const NET_RX_BYTES: FamilyDef = (
    "container_network_receive_bytes_total",
    "Cumulative count of bytes received",
);
const NET_RX_PACKETS: FamilyDef = (
    "container_network_receive_packets_total",
    "Cumulative count of packets received",
);
const NET_RX_DROPPED: FamilyDef = (
    "container_network_receive_packets_dropped_total",
    "Cumulative count of packets dropped while receiving",
);
const NET_RX_ERRORS: FamilyDef = (
    "container_network_receive_errors_total",
    "Cumulative count of errors encountered while receiving",
);
const NET_TX_BYTES: FamilyDef = (
    "container_network_transmit_bytes_total",
    "Cumulative count of bytes transmitted",
);
const NET_TX_PACKETS: FamilyDef = (
    "container_network_transmit_packets_total",
    "Cumulative count of packets transmitted",
);
const NET_TX_DROPPED: FamilyDef = (
    "container_network_transmit_packets_dropped_total",
    "Cumulative count of packets dropped while transmitting",
);
const NET_TX_ERRORS: FamilyDef = (
    "container_network_transmit_errors_total",
    "Cumulative count of errors encountered while transmitting",
);

/// Families in the order they were first added, samples appended.
#[derive(Default)]
struct Families {
    families: Vec<Family>,
}

impl Families {
    fn add(
        &mut self,
        (name, help): FamilyDef,
        kind: MetricType,
        base: &[(String, String)],
        extra: &[(&str, &str)],
        value: f64,
    ) {
        let mut labels = base.to_vec();
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // As Prometheus' Go client writes them: sorted by name.
        labels.sort();
        let sample = Sample {
            name: name.to_string(),
            labels,
            value,
            timestamp_ms: None,
        };
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(family) => family.samples.push(sample),
            None => self.families.push(Family {
                name: name.to_string(),
                help: help.to_string(),
                kind,
                samples: vec![sample],
            }),
        }
    }

    fn finish(self) -> Vec<Family> {
        self.families
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest::InterfaceFigures;
    use super::*;
    use crate::mgmt::PodIdentity;

    fn page() -> BookPage {
        let mut page = BookPage {
            pod: Some(PodIdentity::from_parts("uid-1", "web-0", "shop")),
            ..Default::default()
        };
        for (id, name) in [("sb", ""), ("c1", "app")] {
            page.containers.insert(
                id.to_string(),
                ContainerCard {
                    container: name.to_string(),
                    image: "busybox".to_string(),
                    cgroup: format!("/kubepods/besteffort/poduid-1/{id}"),
                    created: UNIX_EPOCH + std::time::Duration::from_secs(1000),
                },
            );
        }
        page
    }

    #[test]
    fn series_carry_kubelets_labels_and_cadvisors_units() {
        let mut figures = GuestFigures::default();
        let c1 = ContainerFigures {
            cpu_total_ns: 2_500_000_000,
            cpu_quota_us: 50_000,
            cpu_period_us: 100_000,
            cpu_weight: 100,
            memory_limit: Some(32 << 20),
            working_set: 7,
            ..Default::default()
        };
        figures.containers.insert("c1".to_string(), c1);
        figures
            .containers
            .insert("sb".to_string(), ContainerFigures::default());
        figures.interfaces.push(InterfaceFigures {
            name: "eth0".to_string(),
            rx_bytes: 42,
            ..Default::default()
        });
        let families = build(&page(), "sb", &figures, UNIX_EPOCH);
        let find = |name: &str, id: &str| {
            families
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.samples.iter().find(|s| s.label("name") == Some(id)))
                .cloned()
        };
        let Some(cpu) = find("container_cpu_usage_seconds_total", "c1") else {
            panic!("no cpu series");
        };
        assert_eq!(cpu.value, 2.5);
        let names: Vec<&str> = cpu.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "container",
                "cpu",
                "id",
                "image",
                "name",
                "namespace",
                "pod"
            ]
        );
        assert_eq!(cpu.label("pod"), Some("web-0"));
        assert_eq!(cpu.label("namespace"), Some("shop"));
        assert_eq!(cpu.label("container"), Some("app"));
        assert_eq!(
            find("container_spec_cpu_quota", "c1").map(|s| s.value),
            Some(50_000.0)
        );
        assert_eq!(
            find("container_spec_cpu_shares", "c1").map(|s| s.value),
            Some(2597.0)
        );
        assert_eq!(
            find("container_spec_memory_limit_bytes", "c1").map(|s| s.value),
            Some(33_554_432.0)
        );
        assert_eq!(
            find("container_spec_memory_limit_bytes", "sb").map(|s| s.value),
            Some(0.0)
        );
        assert!(
            find("container_spec_cpu_quota", "sb").is_none(),
            "no quota, no CFS series"
        );
        assert_eq!(
            find("container_network_receive_bytes_total", "sb").map(|s| s.value),
            Some(42.0)
        );
        assert!(find("container_network_receive_bytes_total", "c1").is_none());
        assert_eq!(
            find("container_start_time_seconds", "c1").map(|s| s.value),
            Some(1000.0)
        );
    }

    #[test]
    fn containers_the_guest_did_not_report_have_no_series() {
        let families = build(&page(), "sb", &GuestFigures::default(), UNIX_EPOCH);
        assert!(families.is_empty());
    }

    #[test]
    fn weights_map_back_to_shares() {
        assert_eq!(shares_of_weight(1), 2);
        assert_eq!(shares_of_weight(10_000), 262_144);
        assert_eq!(shares_of_weight(39), 998);
    }
}
