//! Pod overhead (`kata_shim_pod_overhead_cpu`, `kata_shim_pod_overhead_memory_in_bytes`): what a
//! sandbox costs the host beyond what its guest itself uses.
//!
//! - CPU, in percent of one CPU: the CPU time the shim and the hypervisor used on the host, minus the
//!   busy CPU time the guest reports, over the time between two scrapes.
//! - Memory, in bytes: the resident memory of the shim and the hypervisor, minus the guest's used
//!   memory (MemTotal - MemAvailable).
//!
//! Both need the guest's figures of the same scrape: a scrape without them (agent down) reports no
//! overhead rather than a wrong one, and the first scrape has no CPU interval yet.

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
}

pub(crate) struct PodOverhead {
    cpu: GaugeSpec,
    memory: GaugeSpec,
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
            state: Mutex::new(State::default()),
        })
    }

    /// Recomputes the overhead from this scrape's guest figures and the host processes now.
    pub(crate) fn update(&self, guest: Option<GuestUsage>, hypervisor_pid: Option<i32>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let host = guest.and_then(|guest| Some((guest, host_usage(hypervisor_pid)?)));
        let Some((guest, (host_ticks, host_rss))) = host else {
            *state = State::default();
            return;
        };
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

/// CPU ticks and resident bytes of this process (the shim) plus the hypervisor, if it is readable.
fn host_usage(hypervisor_pid: Option<i32>) -> Option<(u64, f64)> {
    let hypervisor_pid = hypervisor_pid?;
    let page_size = procfs::page_size() as f64;
    let mut ticks = 0;
    let mut rss = 0.0;
    for process in [
        procfs::process::Process::myself(),
        procfs::process::Process::new(hypervisor_pid),
    ] {
        let stat = process.and_then(|p| p.stat()).ok()?;
        ticks += stat.utime + stat.stime;
        rss += stat.rss as f64 * page_size;
    }
    Some((ticks, rss))
}

impl Collector for PodOverhead {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.cpu.desc, &self.memory.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
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
";
        let families = parse(text, &Limits::default()).unwrap().families;
        assert_eq!(
            GuestUsage::from_families(&families),
            Some(GuestUsage {
                busy_ticks: 15.0,
                used_memory_bytes: 400.0
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
    fn no_guest_figures_means_no_overhead_families() {
        let overhead = PodOverhead::new().unwrap();
        let child = std::process::id() as i32;
        let guest = GuestUsage {
            busy_ticks: 0.0,
            used_memory_bytes: 0.0,
        };
        overhead.update(Some(guest), Some(child));
        let names: Vec<String> = overhead
            .collect()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(
            names,
            ["kata_shim_pod_overhead_memory_in_bytes"],
            "no CPU interval yet"
        );
        overhead.update(Some(guest), Some(child));
        assert_eq!(overhead.collect().len(), 2);
        overhead.update(None, Some(child));
        assert!(overhead.collect().is_empty());
    }
}
