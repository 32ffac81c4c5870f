//! StatsContainer: a container's CPU, memory and pids figures from its cgroup v2 files (read by
//! [`cgroup_stats`]), and the guest's network interfaces.
//!
//! What a cgroup lacks (no memory or pids controller, e.g. in a host's hybrid hierarchy) is taken
//! from the cgroup's processes in /proc instead; a container without a cgroup is measured by its
//! init (CPU includes the children it reaped) and the init's threads.

use std::path::Path;

use nix::unistd::Pid;
use procfs::net::DeviceStatus;
use procfs::process::Process;

use super::cgroup_stats;
use crate::protocols::agent;

/// Everything StatsContainer answers for a container whose cgroup is `cgroup` (if any) and whose
/// init is `init`.
pub(crate) fn container_stats(cgroup: Option<&Path>, init: Pid) -> agent::StatsContainerResponse {
    let mut reply = agent::StatsContainerResponse::new();
    reply.cgroup_stats = Some(cgroup_figures(cgroup, init)).into();
    reply.network_stats = guest_network();
    reply
}

/// StatsContainers' entry for one container: its cgroup figures, how many processes it has, and
/// its CPU limits (none known without a cgroup).
pub(crate) fn container_entry(id: &str, cgroup: Option<&Path>, init: Pid) -> agent::ContainerStats {
    let mut entry = agent::ContainerStats::new();
    entry.container_id = id.to_string();
    entry.cgroup_stats = Some(cgroup_figures(cgroup, init)).into();
    entry.processes = match cgroup {
        Some(dir) => cgroup_pids(dir).len() as u64,
        None => 1,
    };
    if let Some(dir) = cgroup {
        entry.cpu_limits = Some(cgroup_stats::cpu_limits(dir)).into();
    }
    entry
}

fn cgroup_figures(cgroup: Option<&Path>, init: Pid) -> agent::CgroupStats {
    match cgroup {
        Some(dir) => of_cgroup(dir),
        None => process_stats(&[init], threads(init)),
    }
}

/// The guest's interfaces but the loopback; none if /proc/net/dev cannot be read.
pub(crate) fn guest_network() -> Vec<agent::NetworkStats> {
    procfs::net::dev_status()
        .map(|devices| network_stats(devices.into_values()))
        .unwrap_or_default()
}

fn cgroup_pids(dir: &Path) -> Vec<Pid> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

fn of_cgroup(dir: &Path) -> agent::CgroupStats {
    let pids = cgroup_pids(dir);
    let thread_count =
        std::fs::read_to_string(dir.join("cgroup.threads")).map_or(0, |t| t.lines().count() as u64);
    // Start from the processes' own figures, then prefer the cgroup's wherever it has them.
    let mut stats = process_stats(&pids, thread_count);
    cgroup_stats::overlay(dir, &mut stats);
    stats
}

/// CPU time and resident memory of `pids` from /proc; `threads` as the pids figure.
fn process_stats(pids: &[Pid], threads: u64) -> agent::CgroupStats {
    let ticks = clock_ticks();
    let page = page_size();
    let (mut user, mut system, mut rss) = (0u64, 0u64, 0u64);
    for pid in pids {
        let Ok(process) = Process::new(pid.as_raw()) else {
            continue;
        };
        if let Ok(stat) = process.stat() {
            user = user.saturating_add(with_children(stat.utime, stat.cutime));
            system = system.saturating_add(with_children(stat.stime, stat.cstime));
        }
        if let Ok(statm) = process.statm() {
            rss = rss.saturating_add(statm.resident.saturating_mul(page));
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

/// A process's own clock ticks plus its reaped children's (cutime or cstime: what a shell's
/// finished commands used). procfs gives the children's part signed; a negative one counts as 0.
fn with_children(own: u64, children: i64) -> u64 {
    own.saturating_add(u64::try_from(children).unwrap_or(0))
}

/// The number of threads of `pid` (its /proc/<pid>/task entries).
fn threads(pid: Pid) -> u64 {
    Process::new(pid.as_raw())
        .and_then(|process| process.tasks())
        .map_or(0, |tasks| tasks.count() as u64)
}

fn clock_ticks() -> u64 {
    sysconf_or(procfs::ticks_per_second(), 100)
}

fn page_size() -> u64 {
    sysconf_or(procfs::page_size(), 4096)
}

/// A sysconf value from procfs, or `fallback` when sysconf failed: procfs casts its -1 to u64.
fn sysconf_or(value: u64, fallback: u64) -> u64 {
    Some(value)
        .filter(|v| (1..=i64::MAX as u64).contains(v))
        .unwrap_or(fallback)
}

/// Every interface but the loopback, by name (procfs gives /proc/net/dev's lines unordered).
fn network_stats(devices: impl IntoIterator<Item = DeviceStatus>) -> Vec<agent::NetworkStats> {
    let mut stats: Vec<agent::NetworkStats> = devices
        .into_iter()
        .filter(|device| device.name != "lo")
        .map(|device| {
            let mut stats = agent::NetworkStats::new();
            stats.name = device.name;
            stats.rx_bytes = device.recv_bytes;
            stats.rx_packets = device.recv_packets;
            stats.rx_errors = device.recv_errs;
            stats.rx_dropped = device.recv_drop;
            stats.tx_bytes = device.sent_bytes;
            stats.tx_packets = device.sent_packets;
            stats.tx_errors = device.sent_errs;
            stats.tx_dropped = device.sent_drop;
            stats
        })
        .collect();
    stats.sort_by(|a, b| a.name.cmp(&b.name));
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime, stime, cutime, cstime (fields 14..17 of /proc/<pid>/stat) read without procfs.
    fn stat_ticks(pid: u32) -> [u64; 4] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The command name may hold spaces and parentheses: field 3 starts after the last ')'.
        let fields: Vec<&str> = text[text.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        [14, 15, 16, 17].map(|n| fields[n - 3].parse().unwrap())
    }

    /// VmRSS of /proc/<pid>/status in bytes.
    fn vm_rss(pid: u32) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = text
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kib * 1024
    }

    #[test]
    fn an_init_without_a_cgroup_counts_the_children_it_reaped() {
        // A shell that runs a CPU-bound subshell to the end (reaping it), then becomes sleep:
        // its children's time stays with it across the exec.
        let script =
            "(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done); echo done; exec sleep 60";
        let mut child = std::process::Command::new("sh")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "done\n");
        // Let the exec happen: the figures below are those of `sleep` and its reaped subshell.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap() != "sleep\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "sh never exec'd sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        // `sleep` may still be faulting its pages in after the exec: bracket the call.
        let rss_before = vm_rss(child.id());
        let before = stat_ticks(child.id());
        let reply = container_stats(None, Pid::from_raw(child.id() as i32));
        let after = stat_ticks(child.id());
        let rss_after = vm_rss(child.id());
        let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .count() as u64;
        child.kill().unwrap();
        child.wait().unwrap();

        // SAFETY: sysconf has no memory effects.
        let tick_ns = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let [utime, stime, cutime, cstime] = before;
        assert!(cutime + cstime > 0, "the subshell used no CPU: {before:?}");
        let stats = reply.cgroup_stats.as_ref().unwrap();
        let cpu = stats.cpu_stats.cpu_usage.as_ref().unwrap();
        let [utime2, stime2, cutime2, cstime2] = after;
        assert!(
            (utime + cutime) * tick_ns <= cpu.usage_in_usermode
                && cpu.usage_in_usermode <= (utime2 + cutime2) * tick_ns,
            "{cpu:?} vs {before:?}..{after:?}"
        );
        assert!(
            (stime + cstime) * tick_ns <= cpu.usage_in_kernelmode
                && cpu.usage_in_kernelmode <= (stime2 + cstime2) * tick_ns,
            "{cpu:?} vs {before:?}..{after:?}"
        );
        assert_eq!(
            cpu.total_usage,
            cpu.usage_in_usermode + cpu.usage_in_kernelmode
        );
        let memory = stats.memory_stats.usage.as_ref().unwrap();
        let rss = rss_before.min(rss_after)..=rss_before.max(rss_after);
        assert!(
            rss.contains(&memory.usage),
            "{} not in {rss:?}",
            memory.usage
        );
        assert_eq!(memory.limit, u64::MAX);
        assert_eq!(stats.pids_stats.current, tasks);
    }

    #[test]
    fn a_failed_sysconf_gives_the_fallback() {
        assert_eq!(sysconf_or(100, 7), 100);
        assert_eq!(sysconf_or(0, 7), 7);
        assert_eq!(sysconf_or(-1i64 as u64, 7), 7);
    }

    #[test]
    fn negative_children_times_count_as_none() {
        assert_eq!(with_children(7, 20), 27);
        assert_eq!(with_children(7, -1), 7);
        assert_eq!(with_children(u64::MAX, 5), u64::MAX);
    }

    #[test]
    fn without_a_cgroup_the_init_is_measured() {
        let reply = container_stats(None, Pid::this());
        let stats = reply.cgroup_stats.as_ref().expect("cgroup stats");
        assert!(stats.memory_stats.usage.usage > 0, "{stats:?}");
        // The test harness runs this test on a thread of its own: at least two.
        assert!(stats.pids_stats.current >= 2, "{stats:?}");
    }

    /// A device whose every counter differs, so that a field read from the wrong one shows.
    fn device(name: &str, base: u64) -> DeviceStatus {
        DeviceStatus {
            name: name.to_string(),
            recv_bytes: base + 1,
            recv_packets: base + 2,
            recv_errs: base + 3,
            recv_drop: base + 4,
            recv_fifo: base + 5,
            recv_frame: base + 6,
            recv_compressed: base + 7,
            recv_multicast: base + 8,
            sent_bytes: base + 9,
            sent_packets: base + 10,
            sent_errs: base + 11,
            sent_drop: base + 12,
            sent_fifo: base + 13,
            sent_colls: base + 14,
            sent_carrier: base + 15,
            sent_compressed: base + 16,
        }
    }

    #[test]
    fn interfaces_but_the_loopback_by_name() {
        let stats = network_stats([device("eth1", 200), device("lo", 0), device("eth0", 100)]);
        let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        let eth = &stats[0];
        // /proc/net/dev's columns: rx bytes, packets, errs, drop are the 1st to 4th, tx bytes,
        // packets, errs, drop the 9th to 12th.
        assert_eq!(
            (eth.rx_bytes, eth.rx_packets, eth.rx_errors, eth.rx_dropped),
            (101, 102, 103, 104)
        );
        assert_eq!(
            (eth.tx_bytes, eth.tx_packets, eth.tx_errors, eth.tx_dropped),
            (109, 110, 111, 112)
        );
    }

    /// The interface names of /proc/net/dev but lo, sorted, read without procfs.
    fn proc_net_dev_names() -> Vec<String> {
        let text = std::fs::read_to_string("/proc/net/dev").unwrap();
        let mut names: Vec<String> = text
            .lines()
            .skip(2)
            .filter_map(|line| Some(line.split_once(':')?.0.trim().to_string()))
            .filter(|name| name != "lo")
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_reply_lists_the_interfaces_of_proc_net_dev_but_lo() {
        // Interfaces may come and go on the host meanwhile: retry until none did around the call.
        for _ in 0..10 {
            let before = proc_net_dev_names();
            let reply = container_stats(None, Pid::this());
            if before != proc_net_dev_names() {
                continue;
            }
            let names: Vec<&str> = reply
                .network_stats
                .iter()
                .map(|n| n.name.as_str())
                .collect();
            assert_eq!(names, before);
            return;
        }
        panic!("the host's interfaces kept changing");
    }
}
