//! StatsContainer: a container's CPU, memory and pids figures from its cgroup v2 files, and the
//! guest's network interfaces.
//!
//! What a cgroup lacks (no memory or pids controller, e.g. in a host's hybrid hierarchy) is taken
//! from the cgroup's processes in /proc instead; a container without a cgroup is measured by its
//! init (CPU includes the children it reaped) and the init's threads.

use std::path::Path;

use nix::unistd::Pid;

use crate::protocols::agent;

const NANOS_PER_USEC: u64 = 1000;

/// Everything StatsContainer answers for a container whose cgroup is `cgroup` (if any) and whose
/// init is `init`.
pub fn container_stats(cgroup: Option<&Path>, init: Pid) -> agent::StatsContainerResponse {
    let mut reply = agent::StatsContainerResponse::new();
    reply.cgroup_stats = Some(match cgroup {
        Some(dir) => cgroup_stats(dir),
        None => process_stats(&[init], threads(init)),
    })
    .into();
    reply.network_stats = std::fs::read_to_string("/proc/net/dev")
        .map(|text| parse_net_dev(&text))
        .unwrap_or_default();
    reply
}

fn cgroup_stats(dir: &Path) -> agent::CgroupStats {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let pids: Vec<Pid> = read("cgroup.procs")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default();
    let thread_count = read("cgroup.threads").map_or(0, |t| t.lines().count() as u64);
    // Start from the processes' own figures, then prefer the cgroup's wherever it has them.
    let mut stats = process_stats(&pids, thread_count);
    if let Some(text) = read("cpu.stat") {
        let usage = stats
            .cpu_stats
            .mut_or_insert_default()
            .cpu_usage
            .mut_or_insert_default();
        let field = |key| flat_keyed(&text, key).map(|usec| usec.saturating_mul(NANOS_PER_USEC));
        usage.total_usage = field("usage_usec").unwrap_or(usage.total_usage);
        usage.usage_in_usermode = field("user_usec").unwrap_or(usage.usage_in_usermode);
        usage.usage_in_kernelmode = field("system_usec").unwrap_or(usage.usage_in_kernelmode);
    }
    if let Some(current) = read("memory.current").and_then(|t| parse_limit(&t)) {
        let memory = stats.memory_stats.mut_or_insert_default();
        let data = memory.usage.mut_or_insert_default();
        data.usage = current;
        data.limit = read("memory.max")
            .and_then(|t| parse_limit(&t))
            .unwrap_or(u64::MAX);
        data.max_usage = read("memory.peak")
            .and_then(|t| parse_limit(&t))
            .unwrap_or(0);
        data.failcnt = read("memory.events")
            .and_then(|t| flat_keyed(&t, "max"))
            .unwrap_or(0);
        memory.cache = read("memory.stat")
            .and_then(|t| flat_keyed(&t, "file"))
            .unwrap_or(0);
    }
    if let Some(current) = read("pids.current").and_then(|t| t.trim().parse().ok()) {
        let pids = stats.pids_stats.mut_or_insert_default();
        pids.current = current;
        // "max" means no limit: 0, as runc reports it.
        pids.limit = read("pids.max")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
    }
    stats
}

/// CPU time and resident memory of `pids` from /proc; `threads` as the pids figure.
fn process_stats(pids: &[Pid], threads: u64) -> agent::CgroupStats {
    let ticks = clock_ticks();
    let page = page_size();
    let (mut user, mut system, mut rss) = (0u64, 0u64, 0u64);
    for pid in pids {
        let dir = format!("/proc/{}", pid.as_raw());
        if let Some((u, s)) = std::fs::read_to_string(format!("{dir}/stat"))
            .ok()
            .and_then(|t| parse_proc_stat_times(&t))
        {
            user = user.saturating_add(u);
            system = system.saturating_add(s);
        }
        if let Some(pages) = std::fs::read_to_string(format!("{dir}/statm"))
            .ok()
            .and_then(|t| {
                t.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        {
            rss = rss.saturating_add(pages.saturating_mul(page));
        }
    }
    let to_nanos = |t: u64| t.saturating_mul(1_000_000_000 / ticks.max(1));
    let mut stats = agent::CgroupStats::new();
    let usage = stats
        .cpu_stats
        .mut_or_insert_default()
        .cpu_usage
        .mut_or_insert_default();
    usage.usage_in_usermode = to_nanos(user);
    usage.usage_in_kernelmode = to_nanos(system);
    usage.total_usage = to_nanos(user.saturating_add(system));
    let memory = stats.memory_stats.mut_or_insert_default();
    let data = memory.usage.mut_or_insert_default();
    data.usage = rss;
    data.limit = u64::MAX;
    stats.pids_stats.mut_or_insert_default().current = threads;
    stats
}

fn threads(pid: Pid) -> u64 {
    std::fs::read_dir(format!("/proc/{}/task", pid.as_raw())).map_or(0, |d| d.count() as u64)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(100)
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(4096)
}

/// The value of `key` in a flat-keyed file ("key value" lines: cpu.stat, memory.stat, ...).
fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// A single number, or "max" (no limit) as u64::MAX.
fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

/// (utime + cutime, stime + cstime) in clock ticks from /proc/<pid>/stat: the children's part
/// counts what the process's reaped children used (a shell's finished commands).
fn parse_proc_stat_times(text: &str) -> Option<(u64, u64)> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime..cstime are fields 14..17.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(16)?, field(15)? + field(17)?))
}

/// Every interface of /proc/net/dev but the loopback.
fn parse_net_dev(text: &str) -> Vec<agent::NetworkStats> {
    // Two header lines, then "name: rx_bytes rx_packets rx_errs rx_drop fifo frame compressed
    // multicast tx_bytes tx_packets tx_errs tx_drop ...".
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, values) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = values
                .split_whitespace()
                .map(|w| w.parse().ok())
                .collect::<Option<_>>()?;
            if v.len() < 12 {
                return None;
            }
            let mut stats = agent::NetworkStats::new();
            stats.name = name.to_string();
            stats.rx_bytes = v[0];
            stats.rx_packets = v[1];
            stats.rx_errors = v[2];
            stats.rx_dropped = v[3];
            stats.tx_bytes = v[8];
            stats.tx_packets = v[9];
            stats.tx_errors = v[10];
            stats.tx_dropped = v[11];
            Some(stats)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files_and_limits() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(flat_keyed(cpu, "user_usec"), Some(1000));
        assert_eq!(flat_keyed(cpu, "usage"), None);
        assert_eq!(parse_limit("max\n"), Some(u64::MAX));
        assert_eq!(parse_limit("4096\n"), Some(4096));
        assert_eq!(parse_limit("x"), None);
    }

    #[test]
    fn proc_stat_times_include_reaped_children() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 20 10 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_stat_times(stat), Some((27, 13)));
        assert_eq!(parse_proc_stat_times("garbage"), None);
    }

    #[test]
    fn without_a_cgroup_the_init_is_measured() {
        let reply = container_stats(None, Pid::this());
        let stats = reply.cgroup_stats.as_ref().expect("cgroup stats");
        assert!(stats.memory_stats.usage.usage > 0, "{stats:?}");
        // The test harness runs this test on a thread of its own: at least two.
        assert!(stats.pids_stats.current >= 2, "{stats:?}");
    }

    #[test]
    fn net_dev_without_loopback() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\n  eth0: 100 2 3 4 0 0 0 0 200 5 6 7 0 0 0 0\n";
        let stats = parse_net_dev(text);
        assert_eq!(stats.len(), 1);
        let eth = &stats[0];
        assert_eq!(eth.name, "eth0");
        assert_eq!(
            (eth.rx_bytes, eth.rx_packets, eth.rx_errors, eth.rx_dropped),
            (100, 2, 3, 4)
        );
        assert_eq!(
            (eth.tx_bytes, eth.tx_packets, eth.tx_errors, eth.tx_dropped),
            (200, 5, 6, 7)
        );
    }
}
