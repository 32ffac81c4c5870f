//! A container's figures from the files of its cgroup v2: cpu.stat (time and throttling),
//! memory.current/.max/.peak/.stat/.events, memory.swap.*, pids.*, io.stat; and its CPU limits
//! (cpu.max, cpu.weight).
//!
//! Each figure the cgroup has replaces the caller's; what it lacks (a controller not enabled, a
//! file an older kernel does not write) stays as the caller had it. The memory.stat map holds the
//! keys the kernel wrote in this read and nothing else, so it cannot grow from call to call.

use std::collections::HashMap;
use std::path::Path;

use crate::protocols::{agent, memory_events};

const NANOS_PER_USEC: u64 = 1000;
/// A 6.x kernel writes about 70 keys into memory.stat; lines past this are not the kernel's.
const MAX_MEMORY_STAT_KEYS: usize = 256;
/// io.stat has a line per block device the cgroup used; a guest has a handful.
const MAX_IO_DEVICES: usize = 64;

/// Overlays the figures of the cgroup in `dir` on `stats`.
pub(super) fn overlay(dir: &Path, stats: &mut agent::CgroupStats) {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    if let Some(text) = read("cpu.stat") {
        cpu(&flat_keyed(&text), stats.cpu_stats.mut_or_insert_default());
    }
    if let Some(current) = read("memory.current").and_then(|t| parse_limit(&t)) {
        memory(current, &read, stats.memory_stats.mut_or_insert_default());
    }
    if let Some(text) = read("io.stat") {
        stats.blkio_stats = Some(io(&text)).into();
    }
    if let Some(current) = read("pids.current").and_then(|t| t.trim().parse().ok()) {
        let pids = stats.pids_stats.mut_or_insert_default();
        pids.current = current;
        // "max" means no limit: 0, as runc reports it.
        pids.limit = read("pids.max")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
    }
}

fn cpu(stat: &HashMap<String, u64>, cpu: &mut agent::CpuStats) {
    let nanos = |key: &str| {
        stat.get(key)
            .map(|usec| usec.saturating_mul(NANOS_PER_USEC))
    };
    let usage = cpu.cpu_usage.mut_or_insert_default();
    usage.total_usage = nanos("usage_usec").unwrap_or(usage.total_usage);
    usage.usage_in_usermode = nanos("user_usec").unwrap_or(usage.usage_in_usermode);
    usage.usage_in_kernelmode = nanos("system_usec").unwrap_or(usage.usage_in_kernelmode);
    // Only the cpu controller writes the throttling keys.
    if let Some(&periods) = stat.get("nr_periods") {
        let throttling = cpu.throttling_data.mut_or_insert_default();
        throttling.periods = periods;
        throttling.throttled_periods = stat.get("nr_throttled").copied().unwrap_or(0);
        throttling.throttled_time = nanos("throttled_usec").unwrap_or(0);
    }
}

/// The memory controller's files, `current` being memory.current: usage (limit "max" as
/// u64::MAX, failcnt from memory.events' max), swap likewise from memory.swap.*, every key of
/// memory.stat and the counts of memory.events (see [`memory_events`]).
fn memory(current: u64, read: &dyn Fn(&str) -> Option<String>, memory: &mut agent::MemoryStats) {
    let limit = |name: &str| read(name).and_then(|t| parse_limit(&t));
    let events = read("memory.events")
        .map(|t| flat_keyed(&t))
        .unwrap_or_default();
    let usage = memory.usage.mut_or_insert_default();
    usage.usage = current;
    usage.limit = limit("memory.max").unwrap_or(u64::MAX);
    // memory.peak: since Linux 5.19.
    usage.max_usage = limit("memory.peak").unwrap_or(0);
    usage.failcnt = events.get("max").copied().unwrap_or(0);

    let mut stats = read("memory.stat")
        .map(|t| flat_keyed(&t))
        .unwrap_or_default();
    memory.cache = stats.get("file").copied().unwrap_or(0);
    for key in memory_events::KEYS {
        if let Some(&count) = events.get(key) {
            stats.insert(memory_events::stats_key(key), count);
        }
    }
    memory.stats = stats;
    // cgroup v2 is always hierarchical (v1 had a knob).
    memory.use_hierarchy = true;

    // Swap alone, as cgroup v2 counts it (v1's memsw counted memory and swap together).
    if let Some(swap) = limit("memory.swap.current") {
        let data = memory.swap_usage.mut_or_insert_default();
        data.usage = swap;
        data.limit = limit("memory.swap.max").unwrap_or(u64::MAX);
        // memory.swap.peak: since Linux 6.5.
        data.max_usage = limit("memory.swap.peak").unwrap_or(0);
        data.failcnt = read("memory.swap.events")
            .and_then(|t| flat_keyed(&t).get("max").copied())
            .unwrap_or(0);
    }
}

/// io.stat's lines, `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`: bytes and operations per
/// device and direction; other keys (discards) are left out.
fn io(text: &str) -> agent::BlkioStats {
    let mut blkio = agent::BlkioStats::new();
    for line in text.lines().take(MAX_IO_DEVICES) {
        let mut words = line.split_whitespace();
        let Some((major, minor)) = words.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let Ok(value) = value.parse() else {
                continue;
            };
            let (list, op) = match key {
                "rbytes" => (&mut blkio.io_service_bytes_recursive, "read"),
                "wbytes" => (&mut blkio.io_service_bytes_recursive, "write"),
                "rios" => (&mut blkio.io_serviced_recursive, "read"),
                "wios" => (&mut blkio.io_serviced_recursive, "write"),
                _ => continue,
            };
            list.push(agent::BlkioStatsEntry {
                major,
                minor,
                op: op.to_string(),
                value,
                ..Default::default()
            });
        }
    }
    blkio
}

/// cpu.max (`<quota> <period>`, quota `max` when unlimited: 0) and cpu.weight; what a cgroup
/// without the cpu controller lacks stays 0.
pub(super) fn cpu_limits(dir: &Path) -> agent::CpuLimits {
    let mut limits = agent::CpuLimits::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cpu.max")) {
        let mut words = text.split_whitespace();
        limits.quota_us = words.next().and_then(|q| q.parse().ok()).unwrap_or(0);
        limits.period_us = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    }
    limits.weight = std::fs::read_to_string(dir.join("cpu.weight"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    limits
}

/// The "key value" lines of a flat-keyed file (cpu.stat, memory.stat, memory.events, ...), at
/// most [`MAX_MEMORY_STAT_KEYS`] of them; a line that is not a key and a number is skipped.
fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            words.next().is_none().then(|| (key.to_string(), value))
        })
        .take(MAX_MEMORY_STAT_KEYS)
        .collect()
}

/// A single number, or "max" (no limit) as u64::MAX.
fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files_and_limits() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nbad x\nodd 1 2\n";
        let keys = flat_keyed(cpu);
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(keys.get("user_usec"), Some(&1000));
        let many: String = (0..1000).map(|i| format!("k{i} {i}\n")).collect();
        assert_eq!(flat_keyed(&many).len(), MAX_MEMORY_STAT_KEYS);
        assert_eq!(parse_limit("max\n"), Some(u64::MAX));
        assert_eq!(parse_limit("4096\n"), Some(4096));
        assert_eq!(parse_limit("x"), None);
    }

    /// A directory holding the files of a cgroup v2 with cpu, memory and pids controllers, as a
    /// 6.x kernel writes them (memory.stat shortened).
    fn cgroup_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            (
                "cpu.stat",
                "usage_usec 7000\nuser_usec 5000\nsystem_usec 2000\nnr_periods 40\n\
                 nr_throttled 3\nthrottled_usec 1500\nnr_bursts 0\nburst_usec 0\n",
            ),
            ("memory.current", "10485760\n"),
            ("memory.max", "67108864\n"),
            ("memory.peak", "20971520\n"),
            (
                "memory.stat",
                "anon 6291456\nfile 4194304\nkernel 262144\nshmem 0\ninactive_file 3145728\n\
                 active_file 1048576\nworkingset_refault_anon 2\nworkingset_refault_file 5\n\
                 pgfault 1234\npgmajfault 7\n",
            ),
            (
                "memory.events",
                "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\nsock_throttled 9\n",
            ),
            ("memory.swap.current", "4096\n"),
            ("memory.swap.max", "max\n"),
            ("memory.swap.events", "high 0\nmax 8\nfail 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
        ];
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn every_file_of_the_cgroup_lands_in_its_field() {
        let dir = cgroup_dir();
        let mut stats = agent::CgroupStats::new();
        overlay(dir.path(), &mut stats);

        let usage = stats.cpu_stats.cpu_usage.as_ref().unwrap();
        assert_eq!(
            (
                usage.total_usage,
                usage.usage_in_usermode,
                usage.usage_in_kernelmode
            ),
            (7_000_000, 5_000_000, 2_000_000)
        );
        let throttling = stats.cpu_stats.throttling_data.as_ref().unwrap();
        assert_eq!(
            (
                throttling.periods,
                throttling.throttled_periods,
                throttling.throttled_time
            ),
            (40, 3, 1_500_000)
        );

        let memory = stats.memory_stats.as_ref().unwrap();
        let data = memory.usage.as_ref().unwrap();
        assert_eq!(
            (data.usage, data.limit, data.max_usage, data.failcnt),
            (10 << 20, 64 << 20, 20 << 20, 3)
        );
        assert_eq!(memory.cache, 4 << 20);
        assert!(memory.use_hierarchy);
        let swap = memory.swap_usage.as_ref().unwrap();
        assert_eq!(
            (swap.usage, swap.limit, swap.max_usage, swap.failcnt),
            (4096, u64::MAX, 0, 8)
        );
        let mut keys: Vec<(&str, u64)> =
            memory.stats.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("active_file", 1 << 20),
                ("anon", 6 << 20),
                ("file", 4 << 20),
                ("inactive_file", 3 << 20),
                ("kernel", 256 << 10),
                ("memory.events.high", 2),
                ("memory.events.low", 1),
                ("memory.events.max", 3),
                ("memory.events.oom", 4),
                ("memory.events.oom_group_kill", 6),
                ("memory.events.oom_kill", 5),
                ("pgfault", 1234),
                ("pgmajfault", 7),
                ("shmem", 0),
                ("workingset_refault_anon", 2),
                ("workingset_refault_file", 5),
            ]
        );
        let pids = stats.pids_stats.as_ref().unwrap();
        assert_eq!((pids.current, pids.limit), (3, 0));
    }

    #[test]
    fn a_cgroup_without_controllers_keeps_the_callers_figures() {
        // What a host's hybrid hierarchy offers: cpu.stat's base keys only.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 9\nuser_usec 4\n").unwrap();
        let mut stats = agent::CgroupStats::new();
        let usage = stats
            .cpu_stats
            .mut_or_insert_default()
            .cpu_usage
            .mut_or_insert_default();
        usage.usage_in_kernelmode = 77;
        stats
            .memory_stats
            .mut_or_insert_default()
            .usage
            .mut_or_insert_default()
            .usage = 5;
        overlay(dir.path(), &mut stats);
        let usage = stats.cpu_stats.cpu_usage.as_ref().unwrap();
        assert_eq!(
            (
                usage.total_usage,
                usage.usage_in_usermode,
                usage.usage_in_kernelmode
            ),
            (9000, 4000, 77)
        );
        assert!(stats.cpu_stats.throttling_data.is_none());
        let memory = stats.memory_stats.as_ref().unwrap();
        assert_eq!(memory.usage.usage, 5);
        assert!(memory.stats.is_empty() && memory.swap_usage.is_none());
        assert!(stats.pids_stats.is_none());
    }
}
