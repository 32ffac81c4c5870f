//! The agent's StatsContainers answer, checked: it is guest data. Only containers the shim asked
//! for count (each once), interface names must be names, and lists are capped, so a guest can
//! neither add a series for a container that does not exist nor grow a scrape without bound.

use std::collections::HashMap;

use crate::protocols::{agent, memory_events};

/// A guest has a few interfaces and block devices; more are not believed.
const MAX_INTERFACES: usize = 16;
const MAX_DEVICES: usize = 16;

/// One container's figures, in cAdvisor's units where they differ (nanoseconds kept as such).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ContainerFigures {
    pub(crate) cpu_total_ns: u64,
    pub(crate) cpu_user_ns: u64,
    pub(crate) cpu_system_ns: u64,
    pub(crate) cfs_periods: u64,
    pub(crate) cfs_throttled_periods: u64,
    pub(crate) cfs_throttled_ns: u64,
    pub(crate) memory_usage: u64,
    pub(crate) memory_max_usage: u64,
    pub(crate) working_set: u64,
    pub(crate) rss: u64,
    pub(crate) cache: u64,
    pub(crate) mapped_file: u64,
    pub(crate) swap: u64,
    pub(crate) failcnt: u64,
    pub(crate) oom_kills: u64,
    pub(crate) pgfault: u64,
    pub(crate) pgmajfault: u64,
    /// memory.max; `None` when unlimited.
    pub(crate) memory_limit: Option<u64>,
    pub(crate) processes: u64,
    pub(crate) threads: u64,
    /// pids.max; 0 when unlimited.
    pub(crate) threads_max: u64,
    /// cpu.max; quota 0 when unlimited.
    pub(crate) cpu_quota_us: u64,
    pub(crate) cpu_period_us: u64,
    pub(crate) cpu_weight: u64,
    pub(crate) devices: Vec<DeviceFigures>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct DeviceFigures {
    /// `major:minor` (the guest's device numbers; the host has no name for them).
    pub(crate) device: String,
    pub(crate) read_bytes: u64,
    pub(crate) write_bytes: u64,
    pub(crate) reads: u64,
    pub(crate) writes: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct InterfaceFigures {
    pub(crate) name: String,
    pub(crate) rx_bytes: u64,
    pub(crate) rx_packets: u64,
    pub(crate) rx_dropped: u64,
    pub(crate) rx_errors: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) tx_packets: u64,
    pub(crate) tx_dropped: u64,
    pub(crate) tx_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct GuestFigures {
    pub(crate) containers: HashMap<String, ContainerFigures>,
    pub(crate) interfaces: Vec<InterfaceFigures>,
}

/// What of `reply` can be believed, for the containers `asked` for.
pub(crate) fn check(reply: &agent::StatsContainersResponse, asked: &[String]) -> GuestFigures {
    let mut figures = GuestFigures::default();
    for entry in &reply.containers {
        let id = &entry.container_id;
        if asked.contains(id) && !figures.containers.contains_key(id) {
            figures.containers.insert(id.clone(), container(entry));
        }
    }
    for stats in &reply.network_stats {
        let known = figures.interfaces.iter().any(|i| i.name == stats.name);
        if figures.interfaces.len() < MAX_INTERFACES && is_interface_name(&stats.name) && !known {
            figures.interfaces.push(interface(stats));
        }
    }
    figures
}

fn container(entry: &agent::ContainerStats) -> ContainerFigures {
    let cgroup = entry.cgroup_stats.as_ref().cloned().unwrap_or_default();
    let cpu = cgroup.cpu_stats.as_ref().cloned().unwrap_or_default();
    let usage = cpu.cpu_usage.as_ref().cloned().unwrap_or_default();
    let throttling = cpu.throttling_data.as_ref().cloned().unwrap_or_default();
    let memory = cgroup.memory_stats.as_ref().cloned().unwrap_or_default();
    let data = memory.usage.as_ref().cloned().unwrap_or_default();
    let stat = |key: &str| memory.stats.get(key).copied().unwrap_or(0);
    let pids = cgroup.pids_stats.as_ref().cloned().unwrap_or_default();
    let limits = entry.cpu_limits.as_ref().cloned().unwrap_or_default();
    ContainerFigures {
        cpu_total_ns: usage.total_usage,
        cpu_user_ns: usage.usage_in_usermode,
        cpu_system_ns: usage.usage_in_kernelmode,
        cfs_periods: throttling.periods,
        cfs_throttled_periods: throttling.throttled_periods,
        cfs_throttled_ns: throttling.throttled_time,
        memory_usage: data.usage,
        memory_max_usage: data.max_usage,
        // As cAdvisor and the CRI plugin compute it: usage less the inactive page cache.
        working_set: data.usage.saturating_sub(stat("inactive_file")),
        rss: stat("anon"),
        cache: stat("file"),
        mapped_file: stat("file_mapped"),
        swap: memory.swap_usage.as_ref().map_or(0, |s| s.usage),
        failcnt: data.failcnt,
        oom_kills: stat(&memory_events::stats_key("oom_kill")),
        pgfault: stat("pgfault"),
        pgmajfault: stat("pgmajfault"),
        memory_limit: Some(data.limit).filter(|&l| l != 0 && l != u64::MAX),
        processes: entry.processes,
        threads: pids.current,
        threads_max: pids.limit,
        cpu_quota_us: limits.quota_us,
        cpu_period_us: limits.period_us,
        cpu_weight: limits.weight,
        devices: devices(cgroup.blkio_stats.as_ref()),
    }
}

/// io.stat's figures per device, the first [`MAX_DEVICES`] devices named.
fn devices(blkio: Option<&agent::BlkioStats>) -> Vec<DeviceFigures> {
    let Some(blkio) = blkio else {
        return Vec::new();
    };
    let mut devices: Vec<DeviceFigures> = Vec::new();
    let entries = blkio
        .io_service_bytes_recursive
        .iter()
        .map(|e| (e, true))
        .chain(blkio.io_serviced_recursive.iter().map(|e| (e, false)));
    for (entry, bytes) in entries {
        let name = format!("{}:{}", entry.major, entry.minor);
        let index = match devices.iter().position(|d| d.device == name) {
            Some(index) => index,
            None if devices.len() < MAX_DEVICES => {
                devices.push(DeviceFigures {
                    device: name,
                    ..Default::default()
                });
                devices.len() - 1
            }
            None => continue,
        };
        let Some(device) = devices.get_mut(index) else {
            continue;
        };
        let slot = match (entry.op.as_str(), bytes) {
            ("read", true) => &mut device.read_bytes,
            ("write", true) => &mut device.write_bytes,
            ("read", false) => &mut device.reads,
            ("write", false) => &mut device.writes,
            _ => continue,
        };
        *slot = entry.value;
    }
    devices
}

fn interface(stats: &agent::NetworkStats) -> InterfaceFigures {
    InterfaceFigures {
        name: stats.name.clone(),
        rx_bytes: stats.rx_bytes,
        rx_packets: stats.rx_packets,
        rx_dropped: stats.rx_dropped,
        rx_errors: stats.rx_errors,
        tx_bytes: stats.tx_bytes,
        tx_packets: stats.tx_packets,
        tx_dropped: stats.tx_dropped,
        tx_errors: stats.tx_errors,
    }
}

/// A Linux interface name: 1 to 15 bytes, printable, no '/', ':' or whitespace.
fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'"' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, anon: u64) -> agent::ContainerStats {
        let mut entry = agent::ContainerStats::new();
        entry.container_id = id.to_string();
        let memory = entry
            .cgroup_stats
            .mut_or_insert_default()
            .memory_stats
            .mut_or_insert_default();
        memory.stats.insert("anon".to_string(), anon);
        memory.stats.insert("inactive_file".to_string(), 10);
        let usage = memory.usage.mut_or_insert_default();
        usage.usage = 100;
        usage.limit = u64::MAX;
        entry
    }

    fn nic(name: &str) -> agent::NetworkStats {
        let mut stats = agent::NetworkStats::new();
        stats.name = name.to_string();
        stats.rx_bytes = 5;
        stats
    }

    #[test]
    fn only_asked_containers_count_once_and_names_are_checked() {
        let mut reply = agent::StatsContainersResponse::new();
        reply.containers = vec![entry("a", 1), entry("a", 2), entry("stranger", 3)];
        reply.network_stats = vec![
            nic("eth0"),
            nic("eth0"),
            nic("bad name"),
            nic("x/y"),
            nic(""),
        ];
        reply
            .network_stats
            .extend((0..40).map(|i| nic(&format!("n{i}"))));
        let figures = check(&reply, &["a".to_string(), "b".to_string()]);
        assert_eq!(figures.containers.len(), 1);
        let a = &figures.containers["a"];
        assert_eq!((a.rss, a.working_set, a.memory_limit), (1, 90, None));
        assert_eq!(figures.interfaces.len(), MAX_INTERFACES);
        assert_eq!(figures.interfaces[0].name, "eth0");
        assert!(figures
            .interfaces
            .iter()
            .all(|i| is_interface_name(&i.name)));
    }

    #[test]
    fn io_stat_entries_become_devices_capped() {
        let mut blkio = agent::BlkioStats::new();
        for minor in 0..40u64 {
            for (op, value) in [("read", 1), ("write", 2)] {
                blkio
                    .io_service_bytes_recursive
                    .push(agent::BlkioStatsEntry {
                        major: 254,
                        minor,
                        op: op.to_string(),
                        value: value * 100,
                        ..Default::default()
                    });
                blkio.io_serviced_recursive.push(agent::BlkioStatsEntry {
                    major: 254,
                    minor,
                    op: op.to_string(),
                    value,
                    ..Default::default()
                });
            }
        }
        let devices = devices(Some(&blkio));
        assert_eq!(devices.len(), MAX_DEVICES);
        assert_eq!(
            devices[0],
            DeviceFigures {
                device: "254:0".to_string(),
                read_bytes: 100,
                write_bytes: 200,
                reads: 1,
                writes: 2
            }
        );
    }
}
