//! Task stats: the agent's StatsContainer reply as containerd's cgroups v2 metrics.
//!
//! containerd (`ctr task metrics`, the CRI plugin) resolves the Any by its type URL through
//! typeurl, which knows gogo-registered messages by their bare full name, so the URL is
//! `io.containerd.cgroups.v2.Metrics` (no `type.googleapis.com/` prefix), as runc's shim sends it.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, NetworkStat, PidsStat,
};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

use crate::protocols::agent;

pub(crate) const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

const NANOS_PER_USEC: u64 = 1000;

/// The agent's figures in containerd's cgroups v2 message.
pub(crate) fn to_metrics(reply: &agent::StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cgroup) = reply.cgroup_stats.as_ref() {
        if let Some(usage) = cgroup.cpu_stats.as_ref().and_then(|c| c.cpu_usage.as_ref()) {
            let mut cpu = CPUStat::new();
            cpu.usage_usec = usage.total_usage / NANOS_PER_USEC;
            cpu.user_usec = usage.usage_in_usermode / NANOS_PER_USEC;
            cpu.system_usec = usage.usage_in_kernelmode / NANOS_PER_USEC;
            metrics.cpu = Some(cpu).into();
        }
        if let Some(mem) = cgroup.memory_stats.as_ref() {
            let mut memory = MemoryStat::new();
            memory.file = mem.cache;
            if let Some(data) = mem.usage.as_ref() {
                memory.usage = data.usage;
                memory.usage_limit = data.limit;
                memory.max_usage = data.max_usage;
                if data.failcnt > 0 {
                    let mut events = MemoryEvents::new();
                    events.max = data.failcnt;
                    metrics.memory_events = Some(events).into();
                }
            }
            metrics.memory = Some(memory).into();
        }
        if let Some(p) = cgroup.pids_stats.as_ref() {
            let mut pids = PidsStat::new();
            pids.current = p.current;
            pids.limit = p.limit;
            metrics.pids = Some(pids).into();
        }
    }
    metrics.network = reply
        .network_stats
        .iter()
        .map(|n| {
            let mut net = NetworkStat::new();
            net.name = n.name.clone();
            net.rx_bytes = n.rx_bytes;
            net.rx_packets = n.rx_packets;
            net.rx_errors = n.rx_errors;
            net.rx_dropped = n.rx_dropped;
            net.tx_bytes = n.tx_bytes;
            net.tx_packets = n.tx_packets;
            net.tx_errors = n.tx_errors;
            net.tx_dropped = n.tx_dropped;
            net
        })
        .collect();
    metrics
}

/// [`to_metrics`] packed for `StatsResponse.stats`.
pub(crate) fn to_any(reply: &agent::StatsContainerResponse) -> protobuf::Result<Any> {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.to_string();
    any.value = to_metrics(reply).write_to_bytes()?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> agent::StatsContainerResponse {
        let mut cgroup = agent::CgroupStats::new();
        let usage = cgroup
            .cpu_stats
            .mut_or_insert_default()
            .cpu_usage
            .mut_or_insert_default();
        usage.total_usage = 3_000_500;
        usage.usage_in_usermode = 2_000_000;
        usage.usage_in_kernelmode = 1_000_000;
        let memory = cgroup.memory_stats.mut_or_insert_default();
        memory.cache = 4096;
        let data = memory.usage.mut_or_insert_default();
        data.usage = 1 << 20;
        data.limit = u64::MAX;
        data.max_usage = 2 << 20;
        let pids = cgroup.pids_stats.mut_or_insert_default();
        pids.current = 2;
        pids.limit = 100;
        let mut net = agent::NetworkStats::new();
        net.name = "eth0".into();
        net.rx_bytes = 10;
        net.tx_packets = 3;
        let mut reply = agent::StatsContainerResponse::new();
        reply.cgroup_stats = Some(cgroup).into();
        reply.network_stats = vec![net];
        reply
    }

    #[test]
    fn agent_figures_become_cgroups_v2_metrics() {
        let any = to_any(&reply()).expect("encode");
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (3000, 2000, 1000)
        );
        assert_eq!(m.memory.usage, 1 << 20);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.max_usage, 2 << 20);
        assert_eq!(m.memory.file, 4096);
        assert!(m.memory_events.is_none());
        assert_eq!((m.pids.current, m.pids.limit), (2, 100));
        assert_eq!(m.network.len(), 1);
        assert_eq!(
            (
                m.network[0].name.as_str(),
                m.network[0].rx_bytes,
                m.network[0].tx_packets
            ),
            ("eth0", 10, 3)
        );
    }

    #[test]
    fn missing_sections_stay_unset() {
        let m = to_metrics(&agent::StatsContainerResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none());
        assert!(m.network.is_empty());
    }
}
