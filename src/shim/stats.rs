//! Task stats: the agent's StatsContainer reply as containerd's cgroups v2 metrics.
//!
//! containerd (`ctr task metrics`, the CRI plugin) resolves the Any by its type URL through
//! typeurl, which knows gogo-registered messages by their bare full name, so the URL is
//! `io.containerd.cgroups.v2.Metrics` (no `type.googleapis.com/` prefix), as runc's shim sends it.
//!
//! The CRI plugin computes `ContainerStats` (what `kubectl top` shows) from it: working set =
//! `usage - inactive_file`, rss = `anon`, page faults = `pgfault`/`pgmajfault`, CPU from
//! `usage_usec`; so every `MemoryStat` field comes from the guest cgroup's memory.stat, which the
//! agent sends key by key.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, NetworkStat, PidsStat,
};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

use crate::protocols::{agent, memory_events};

pub(crate) const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

const NANOS_PER_USEC: u64 = 1000;

/// memory.stat keys by the `MemoryStat` field containerd's cgroups library fills from them.
type Field = fn(&mut MemoryStat) -> &mut u64;
const MEMORY_STAT_KEYS: [(&str, Field); 29] = [
    ("anon", |m| &mut m.anon),
    ("file", |m| &mut m.file),
    ("kernel_stack", |m| &mut m.kernel_stack),
    ("slab", |m| &mut m.slab),
    ("sock", |m| &mut m.sock),
    ("shmem", |m| &mut m.shmem),
    ("file_mapped", |m| &mut m.file_mapped),
    ("file_dirty", |m| &mut m.file_dirty),
    ("file_writeback", |m| &mut m.file_writeback),
    ("anon_thp", |m| &mut m.anon_thp),
    ("inactive_anon", |m| &mut m.inactive_anon),
    ("active_anon", |m| &mut m.active_anon),
    ("inactive_file", |m| &mut m.inactive_file),
    ("active_file", |m| &mut m.active_file),
    ("unevictable", |m| &mut m.unevictable),
    ("slab_reclaimable", |m| &mut m.slab_reclaimable),
    ("slab_unreclaimable", |m| &mut m.slab_unreclaimable),
    ("pgfault", |m| &mut m.pgfault),
    ("pgmajfault", |m| &mut m.pgmajfault),
    ("workingset_nodereclaim", |m| &mut m.workingset_nodereclaim),
    ("pgrefill", |m| &mut m.pgrefill),
    ("pgscan", |m| &mut m.pgscan),
    ("pgsteal", |m| &mut m.pgsteal),
    ("pgactivate", |m| &mut m.pgactivate),
    ("pgdeactivate", |m| &mut m.pgdeactivate),
    ("pglazyfree", |m| &mut m.pglazyfree),
    ("pglazyfreed", |m| &mut m.pglazyfreed),
    ("thp_fault_alloc", |m| &mut m.thp_fault_alloc),
    ("thp_collapse_alloc", |m| &mut m.thp_collapse_alloc),
];

/// Counters Linux 5.9 split into `<key>_anon` and `<key>_file`: their sum where the kernel no
/// longer writes the whole.
const MEMORY_STAT_SPLIT_KEYS: [(&str, Field); 2] = [
    ("workingset_refault", |m| &mut m.workingset_refault),
    ("workingset_activate", |m| &mut m.workingset_activate),
];

/// memory.events keys by their `MemoryEvents` field.
type EventField = fn(&mut MemoryEvents) -> &mut u64;
const MEMORY_EVENTS: [(&str, EventField); 6] = [
    ("low", |e| &mut e.low),
    ("high", |e| &mut e.high),
    ("max", |e| &mut e.max),
    ("oom", |e| &mut e.oom),
    ("oom_kill", |e| &mut e.oom_kill),
    ("oom_group_kill", |e| &mut e.oom_group_kill),
];

/// The agent's figures in containerd's cgroups v2 message. The reply is guest data: whatever it
/// lacks is 0, and nothing in it is more than copied (or summed, saturating).
pub(crate) fn to_metrics(reply: &agent::StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cgroup) = reply.cgroup_stats.as_ref() {
        if let Some(cpu) = cgroup.cpu_stats.as_ref() {
            metrics.cpu = Some(cpu_stat(cpu)).into();
        }
        if let Some(mem) = cgroup.memory_stats.as_ref() {
            metrics.memory = Some(memory_stat(mem)).into();
            metrics.memory_events = memory_events_of(mem).into();
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

fn cpu_stat(cpu: &agent::CpuStats) -> CPUStat {
    let mut stat = CPUStat::new();
    let usage = &cpu.cpu_usage;
    stat.usage_usec = usage.total_usage / NANOS_PER_USEC;
    stat.user_usec = usage.usage_in_usermode / NANOS_PER_USEC;
    stat.system_usec = usage.usage_in_kernelmode / NANOS_PER_USEC;
    let throttling = &cpu.throttling_data;
    stat.nr_periods = throttling.periods;
    stat.nr_throttled = throttling.throttled_periods;
    stat.throttled_usec = throttling.throttled_time / NANOS_PER_USEC;
    stat
}

fn memory_stat(mem: &agent::MemoryStats) -> MemoryStat {
    let key = |name: &str| mem.stats.get(name).copied();
    let mut stat = MemoryStat::new();
    for (name, field) in MEMORY_STAT_KEYS {
        *field(&mut stat) = key(name).unwrap_or(0);
    }
    for (name, field) in MEMORY_STAT_SPLIT_KEYS {
        *field(&mut stat) = key(name).unwrap_or_else(|| {
            let part = |kind: &str| key(&format!("{name}_{kind}")).unwrap_or(0);
            part("anon").saturating_add(part("file"))
        });
    }
    // An agent that sends no map still sends memory.stat's file as `cache`.
    if key("file").is_none() {
        stat.file = mem.cache;
    }
    let usage = &mem.usage;
    stat.usage = usage.usage;
    stat.usage_limit = usage.limit;
    stat.max_usage = usage.max_usage;
    let swap = &mem.swap_usage;
    stat.swap_usage = swap.usage;
    stat.swap_limit = swap.limit;
    stat.swap_max_usage = swap.max_usage;
    stat
}

/// memory.events' counts, where the agent sent any (see [`memory_events`]); `max` also from
/// Kata's `failcnt`.
fn memory_events_of(mem: &agent::MemoryStats) -> Option<MemoryEvents> {
    let mut events = MemoryEvents::new();
    let mut any = false;
    for (name, field) in MEMORY_EVENTS {
        if let Some(&count) = mem.stats.get(&memory_events::stats_key(name)) {
            *field(&mut events) = count;
            any = true;
        }
    }
    if events.max == 0 && mem.usage.failcnt > 0 {
        events.max = mem.usage.failcnt;
        any = true;
    }
    any.then_some(events)
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

    /// What the agent sends for a cgroup v2 with cpu, memory and pids controllers: every figure
    /// different, so that one read from the wrong key shows.
    fn reply() -> agent::StatsContainerResponse {
        let mut cgroup = agent::CgroupStats::new();
        let cpu = cgroup.cpu_stats.mut_or_insert_default();
        let usage = cpu.cpu_usage.mut_or_insert_default();
        usage.total_usage = 3_000_500;
        usage.usage_in_usermode = 2_000_000;
        usage.usage_in_kernelmode = 1_000_000;
        let throttling = cpu.throttling_data.mut_or_insert_default();
        throttling.periods = 40;
        throttling.throttled_periods = 3;
        throttling.throttled_time = 1_500_999;
        let memory = cgroup.memory_stats.mut_or_insert_default();
        memory.cache = 4096;
        let data = memory.usage.mut_or_insert_default();
        data.usage = 1 << 20;
        data.limit = 64 << 20;
        data.max_usage = 2 << 20;
        data.failcnt = 33;
        let swap = memory.swap_usage.mut_or_insert_default();
        swap.usage = 8192;
        swap.limit = u64::MAX;
        swap.max_usage = 12288;
        // memory.stat's names as the kernel's cgroup-v2.rst lists them.
        let kernel_names = [
            "anon",
            "file",
            "kernel_stack",
            "slab",
            "sock",
            "shmem",
            "file_mapped",
            "file_dirty",
            "file_writeback",
            "anon_thp",
            "inactive_anon",
            "active_anon",
            "inactive_file",
            "active_file",
            "unevictable",
            "slab_reclaimable",
            "slab_unreclaimable",
            "pgfault",
            "pgmajfault",
            "workingset_nodereclaim",
            "pgrefill",
            "pgscan",
            "pgsteal",
            "pgactivate",
            "pgdeactivate",
            "pglazyfree",
            "pglazyfreed",
            "thp_fault_alloc",
            "thp_collapse_alloc",
        ];
        memory.stats = kernel_names
            .iter()
            .enumerate()
            .map(|(i, key)| (key.to_string(), 1000 + i as u64))
            .chain(
                [
                    ("workingset_refault_anon", 5),
                    ("workingset_refault_file", 6),
                    ("workingset_activate", 70),
                    ("workingset_activate_anon", 1),
                    ("memory.events.low", 11),
                    ("memory.events.high", 12),
                    ("memory.events.max", 13),
                    ("memory.events.oom", 14),
                    ("memory.events.oom_kill", 15),
                    ("memory.events.oom_group_kill", 16),
                    ("not_a_key", 99),
                ]
                .map(|(k, v)| (k.to_string(), v)),
            )
            .collect();
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
        assert_eq!(
            (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec),
            (40, 3, 1500)
        );
        let mem = &m.memory;
        assert_eq!(
            (mem.usage, mem.usage_limit, mem.max_usage),
            (1 << 20, 64 << 20, 2 << 20)
        );
        assert_eq!(
            (mem.swap_usage, mem.swap_limit, mem.swap_max_usage),
            (8192, u64::MAX, 12288)
        );
        // In the order of the names above: anon got 1000, file 1001, ... thp_collapse_alloc 1028.
        let fields = [
            mem.anon,
            mem.file,
            mem.kernel_stack,
            mem.slab,
            mem.sock,
            mem.shmem,
            mem.file_mapped,
            mem.file_dirty,
            mem.file_writeback,
            mem.anon_thp,
            mem.inactive_anon,
            mem.active_anon,
            mem.inactive_file,
            mem.active_file,
            mem.unevictable,
            mem.slab_reclaimable,
            mem.slab_unreclaimable,
            mem.pgfault,
            mem.pgmajfault,
            mem.workingset_nodereclaim,
            mem.pgrefill,
            mem.pgscan,
            mem.pgsteal,
            mem.pgactivate,
            mem.pgdeactivate,
            mem.pglazyfree,
            mem.pglazyfreed,
            mem.thp_fault_alloc,
            mem.thp_collapse_alloc,
        ];
        assert_eq!(fields.to_vec(), (1000..1029).collect::<Vec<u64>>());
        // Split by the kernel: the sum; whole: as sent.
        assert_eq!((mem.workingset_refault, mem.workingset_activate), (11, 70));
        let e = &m.memory_events;
        assert_eq!(
            (e.low, e.high, e.max, e.oom, e.oom_kill, e.oom_group_kill),
            (11, 12, 13, 14, 15, 16)
        );
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
    fn an_agent_without_the_map_still_gives_file_and_the_limit_count() {
        let mut memory = agent::MemoryStats::new();
        memory.cache = 4096;
        memory.usage.mut_or_insert_default().failcnt = 7;
        let m = memory_stat(&memory);
        assert_eq!(
            (m.file, m.anon, m.inactive_file, m.pgfault),
            (4096, 0, 0, 0)
        );
        let events = memory_events_of(&memory).expect("failcnt counts as max");
        assert_eq!((events.max, events.oom_kill), (7, 0));
        assert!(memory_events_of(&agent::MemoryStats::new()).is_none());
    }

    #[test]
    fn extreme_guest_figures_neither_panic_nor_wrap() {
        let mut reply = reply();
        let cgroup = reply.cgroup_stats.as_mut().unwrap();
        cgroup
            .cpu_stats
            .mut_or_insert_default()
            .throttling_data
            .mut_or_insert_default()
            .throttled_time = u64::MAX;
        let memory = cgroup.memory_stats.as_mut().unwrap();
        for key in ["workingset_refault_anon", "workingset_refault_file"] {
            memory.stats.insert(key.to_string(), u64::MAX);
        }
        let m = to_metrics(&reply);
        assert_eq!(m.cpu.throttled_usec, u64::MAX / 1000);
        assert_eq!(m.memory.workingset_refault, u64::MAX);
    }

    #[test]
    fn missing_sections_stay_unset() {
        let m = to_metrics(&agent::StatsContainerResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none());
        assert!(m.memory_events.is_none());
        assert!(m.network.is_empty());
        let mut empty = agent::StatsContainerResponse::new();
        empty.cgroup_stats = Some(agent::CgroupStats::new()).into();
        let m = to_metrics(&empty);
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none());
    }
}
