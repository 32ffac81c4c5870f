//! What a pod costs the host and what it uses inside, side by side, and the overhead between them.
//!
//! - Host: `kata_shim_pod_host_cpu_seconds_total` and `kata_shim_pod_host_memory_bytes`, the CPU
//!   time and resident memory of the shim, the hypervisor and the vsock daemon (the processes a VM
//!   pod adds to the node).
//! - Guest: `kata_shim_pod_guest_cpu_seconds_total` (busy time of all guest CPUs),
//!   `kata_shim_pod_guest_memory_bytes` (MemTotal - MemAvailable) and
//!   `kata_shim_pod_guest_page_cache_bytes` (the guest's page cache, which sits in guest RAM that
//!   the host holds resident).
//! - Overhead (Kata's names): `kata_shim_pod_overhead_memory_in_bytes` = host memory - guest
//!   memory, `kata_shim_pod_overhead_cpu` = host CPU - guest CPU between two scrapes, in percent
//!   of one CPU.
//!
//! Guest figures and overhead need the guest's text of the same scrape: a scrape without it (agent
//! down) reports none of them rather than wrong ones, and the first scrape has no CPU interval.

use std::sync::Mutex;
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use crate::metrics::exposition::Family;
use crate::metrics::family::GaugeSpec;

/// Guest CPU items that count as busy time (`guest`/`guest_nice` are already inside `user`/`nice`).
const GUEST_BUSY_ITEMS: [&str; 6] = ["user", "nice", "system", "irq", "softirq", "steal"];

/// What the guest reported in one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GuestUsage {
    /// Busy CPU time of all guest CPUs, in clock ticks.
    pub(crate) busy_ticks: f64,
    pub(crate) used_memory_bytes: f64,
    pub(crate) page_cache_bytes: f64,
}

impl GuestUsage {
    /// Reads `kata_guest_cpu_time{cpu="total"}` and `kata_guest_meminfo` out of the agent's families.
    pub(crate) fn from_families(families: &[Family]) -> Option<GuestUsage> {
        let family = |name: &str| families.iter().find(|f| f.name == name);
        let cpu = family("kata_guest_cpu_time")?;
        let busy_ticks = cpu
            .samples
            .iter()
            .filter(|s| s.label("cpu") == Some("total"))
            .filter(|s| {
                s.label("item")
                    .is_some_and(|i| GUEST_BUSY_ITEMS.contains(&i))
            })
            .map(|s| s.value)
            .sum();
        let meminfo = family("kata_guest_meminfo")?;
        let item = |name: &str| {
            meminfo
                .samples
                .iter()
                .find(|s| s.label("item") == Some(name))
                .map(|s| s.value)
        };
        let used_memory_bytes = item("mem_total")? - item("mem_available")?;
        Some(GuestUsage {
            busy_ticks,
            used_memory_bytes,
            page_cache_bytes: item("cached").unwrap_or(0.0),
        })
    }
}

/// The host side at one moment: CPU ticks and resident bytes of the shim and the hypervisor.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    host_ticks: u64,
    guest_ticks: f64,
}

#[derive(Default)]
struct State {
    last: Option<Reading>,
    cpu_percent: Option<f64>,
    memory_bytes: Option<f64>,
    /// CPU ticks and resident bytes of the host processes, at the last scrape.
    host: Option<(u64, f64)>,
    guest: Option<GuestUsage>,
}

pub(crate) struct PodOverhead {
    cpu: GaugeSpec,
    memory: GaugeSpec,
    host_cpu: Desc,
    host_memory: GaugeSpec,
    guest_cpu: Desc,
    guest_memory: GaugeSpec,
    guest_page_cache: GaugeSpec,
    state: Mutex<State>,
}

impl PodOverhead {
    pub(crate) fn new() -> prometheus::Result<Self> {
        Ok(PodOverhead {
            cpu: GaugeSpec::new(
                "kata_shim_pod_overhead_cpu",
                "Kata Pod overhead for CPU resources(percent).",
                &[],
            )?,
            memory: GaugeSpec::new(
                "kata_shim_pod_overhead_memory_in_bytes",
                "Kata Pod overhead for memory resources(bytes).",
                &[],
            )?,
            host_cpu: counter_desc(
                "kata_shim_pod_host_cpu_seconds_total",
                "CPU time the pod's host processes (shim, hypervisor, vsock daemon) used (seconds).",
            )?,
            host_memory: GaugeSpec::new(
                "kata_shim_pod_host_memory_bytes",
                "Resident memory of the pod's host processes (shim, hypervisor, vsock daemon) (bytes).",
                &[],
            )?,
            guest_cpu: counter_desc(
                "kata_shim_pod_guest_cpu_seconds_total",
                "Busy CPU time of all the guest's CPUs (seconds).",
            )?,
            guest_memory: GaugeSpec::new(
                "kata_shim_pod_guest_memory_bytes",
                "Memory the guest uses: MemTotal - MemAvailable (bytes).",
                &[],
            )?,
            guest_page_cache: GaugeSpec::new(
                "kata_shim_pod_guest_page_cache_bytes",
                "The guest's page cache, resident on the host as guest RAM (bytes).",
                &[],
            )?,
            state: Mutex::new(State::default()),
        })
    }

    /// Recomputes the overhead from this scrape's guest figures and the host processes now.
    /// `host_pids`: the hypervisor and the vsock daemon (the shim counts itself).
    pub(crate) fn update(&self, guest: Option<GuestUsage>, host_pids: &[i32]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let host_now = host_usage(host_pids);
        let both = guest.and_then(|guest| Some((guest, host_now?)));
        let Some((guest, (host_ticks, host_rss))) = both else {
            *state = State {
                host: host_now,
                guest,
                ..State::default()
            };
            return;
        };
        state.host = host_now;
        state.guest = Some(guest);
        let now = Reading {
            at: Instant::now(),
            host_ticks,
            guest_ticks: guest.busy_ticks,
        };
        state.cpu_percent = state
            .last
            .map(|last| cpu_percent(&last, &now, procfs::ticks_per_second()));
        state.memory_bytes = Some((host_rss - guest.used_memory_bytes).max(0.0));
        state.last = Some(now);
    }
}

/// Host CPU beyond the guest's busy time between two readings, in percent of one CPU.
fn cpu_percent(last: &Reading, now: &Reading, ticks_per_second: u64) -> f64 {
    let seconds = now.at.duration_since(last.at).as_secs_f64();
    if seconds <= 0.0 || ticks_per_second == 0 {
        return 0.0;
    }
    let host = now.host_ticks.saturating_sub(last.host_ticks) as f64;
    let guest = (now.guest_ticks - last.guest_ticks).max(0.0);
    ((host - guest).max(0.0) / (seconds * ticks_per_second as f64) * 100.0).max(0.0)
}

/// CPU ticks and resident bytes of this process (the shim) plus `pids`; `None` without a
/// hypervisor or when one of them cannot be read (it exited: the VM is going).
fn host_usage(pids: &[i32]) -> Option<(u64, f64)> {
    if pids.is_empty() {
        return None;
    }
    let page_size = procfs::page_size() as f64;
    let mut ticks = 0;
    let mut rss = 0.0;
    let processes = pids
        .iter()
        .map(|&pid| procfs::process::Process::new(pid))
        .chain([procfs::process::Process::myself()]);
    for process in processes {
        let stat = process.and_then(|p| p.stat()).ok()?;
        ticks += stat.utime + stat.stime;
        rss += stat.rss as f64 * page_size;
    }
    Some((ticks, rss))
}

fn counter_desc(name: &str, help: &str) -> prometheus::Result<Desc> {
    Desc::new(
        name.to_string(),
        help.to_string(),
        Vec::new(),
        std::collections::HashMap::new(),
    )
}

/// A counter family with one unlabelled sample.
fn counter(desc: &Desc, value: f64) -> MetricFamily {
    let mut counter = prometheus::proto::Counter::default();
    counter.set_value(value);
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(prometheus::proto::MetricType::COUNTER);
    let mut metric = prometheus::proto::Metric::default();
    metric.set_counter(counter);
    family.mut_metric().push(metric);
    family
}

impl Collector for PodOverhead {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.cpu.desc,
            &self.memory.desc,
            &self.host_cpu,
            &self.host_memory.desc,
            &self.guest_cpu,
            &self.guest_memory.desc,
            &self.guest_page_cache.desc,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let ticks_per_second = procfs::ticks_per_second().max(1) as f64;
        if let Some((ticks, rss)) = state.host {
            out.push(counter(&self.host_cpu, ticks as f64 / ticks_per_second));
            out.push(self.host_memory.single(rss));
        }
        if let Some(guest) = state.guest {
            out.push(counter(
                &self.guest_cpu,
                guest.busy_ticks / ticks_per_second,
            ));
            out.push(self.guest_memory.single(guest.used_memory_bytes));
            out.push(self.guest_page_cache.single(guest.page_cache_bytes));
        }
        if let Some(cpu) = state.cpu_percent {
            out.push(self.cpu.single(cpu));
        }
        if let Some(memory) = state.memory_bytes {
            out.push(self.memory.single(memory));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::{parse, Limits};
    use std::time::Duration;

    #[test]
    fn guest_usage_reads_total_busy_ticks_and_used_memory() {
        let text = "\
kata_guest_cpu_time{cpu=\"0\",item=\"user\"} 999
kata_guest_cpu_time{cpu=\"total\",item=\"user\"} 10
kata_guest_cpu_time{cpu=\"total\",item=\"system\"} 5
kata_guest_cpu_time{cpu=\"total\",item=\"idle\"} 1000
kata_guest_cpu_time{cpu=\"total\",item=\"guest\"} 7
kata_guest_meminfo{item=\"mem_total\"} 1000
kata_guest_meminfo{item=\"mem_available\"} 600
kata_guest_meminfo{item=\"cached\"} 300
";
        let families = parse(text, &Limits::default()).unwrap().families;
        assert_eq!(
            GuestUsage::from_families(&families),
            Some(GuestUsage {
                busy_ticks: 15.0,
                used_memory_bytes: 400.0,
                page_cache_bytes: 300.0,
            })
        );
        assert_eq!(GuestUsage::from_families(&families[..1]), None);
    }

    #[test]
    fn cpu_overhead_is_host_time_beyond_guest_time_per_interval() {
        let at = Instant::now();
        let last = Reading {
            at,
            host_ticks: 100,
            guest_ticks: 50.0,
        };
        let now = Reading {
            at: at + Duration::from_secs(2),
            host_ticks: 160,
            guest_ticks: 90.0,
        };
        // (60 host - 40 guest) ticks over 2 s at 100 ticks/s: 10% of one CPU.
        assert!((cpu_percent(&last, &now, 100) - 10.0).abs() < 1e-9);
        // A guest busier than the host (clock skew, rounding) is no negative overhead.
        let busy = Reading {
            guest_ticks: 500.0,
            ..now
        };
        assert_eq!(cpu_percent(&last, &busy, 100), 0.0);
    }

    #[test]
    fn host_and_guest_side_by_side_and_no_overhead_without_the_guest() {
        let overhead = PodOverhead::new().unwrap();
        let child = std::process::id() as i32;
        let guest = GuestUsage {
            busy_ticks: 250.0,
            used_memory_bytes: 1000.0,
            page_cache_bytes: 300.0,
        };
        let names = |overhead: &PodOverhead| -> Vec<String> {
            let mut names: Vec<String> = overhead
                .collect()
                .iter()
                .map(|f| f.name().to_string())
                .collect();
            names.sort();
            names
        };
        overhead.update(Some(guest), &[child]);
        assert_eq!(
            names(&overhead),
            [
                "kata_shim_pod_guest_cpu_seconds_total",
                "kata_shim_pod_guest_memory_bytes",
                "kata_shim_pod_guest_page_cache_bytes",
                "kata_shim_pod_host_cpu_seconds_total",
                "kata_shim_pod_host_memory_bytes",
                "kata_shim_pod_overhead_memory_in_bytes",
            ],
            "no CPU interval yet"
        );
        let value = |name: &str| -> f64 {
            let families = overhead.collect();
            let family = families.iter().find(|f| f.name() == name).unwrap();
            let metric = &family.get_metric()[0];
            metric.get_gauge().value() + metric.get_counter().value()
        };
        // The overhead is the host figure less the guest's, in the same scrape.
        let host = value("kata_shim_pod_host_memory_bytes");
        assert_eq!(
            value("kata_shim_pod_overhead_memory_in_bytes"),
            (host - 1000.0).max(0.0)
        );
        let ticks = procfs::ticks_per_second() as f64;
        assert_eq!(
            value("kata_shim_pod_guest_cpu_seconds_total"),
            250.0 / ticks
        );
        assert_eq!(value("kata_shim_pod_guest_page_cache_bytes"), 300.0);
        overhead.update(Some(guest), &[child]);
        assert_eq!(names(&overhead).len(), 7);
        // Without the guest's text: the host side only.
        overhead.update(None, &[child]);
        assert_eq!(
            names(&overhead),
            [
                "kata_shim_pod_host_cpu_seconds_total",
                "kata_shim_pod_host_memory_bytes"
            ]
        );
        // Without a hypervisor: the guest side only.
        overhead.update(Some(guest), &[]);
        assert_eq!(names(&overhead).len(), 3);
    }
}
