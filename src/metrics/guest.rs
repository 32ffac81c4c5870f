//! Guest OS collectors (`kata_guest_*`), read from the agent's own /proc at scrape time.
//!
//! Units: `cpu_time` in clock ticks (USER_HZ), `meminfo` in bytes (the `hugepages_*` items are page
//! counts), `netdev_stat` in bytes or packets, `load` as the kernel's load averages, `tasks` as
//! counts, `diskstat` as the kernel's counters (sectors, ms), `vm_stat` as `/proc/vmstat` reports it.

use super::family::{GaugeFamily, GaugeSpec};
use super::process::fill_netdev;

pub(crate) struct GuestCollector {
    cpu_time: GaugeSpec,
    meminfo: GaugeSpec,
    netdev: GaugeSpec,
    load: GaugeSpec,
    tasks: GaugeSpec,
    diskstat: GaugeSpec,
    vm_stat: GaugeSpec,
}

impl GuestCollector {
    pub(crate) fn new() -> prometheus::Result<Self> {
        Ok(GuestCollector {
            cpu_time: GaugeSpec::new(
                "kata_guest_cpu_time",
                "Guest CPU stat (clock ticks).",
                &["cpu", "item"],
            )?,
            meminfo: GaugeSpec::new(
                "kata_guest_meminfo",
                "Statistics about memory usage on the system (bytes).",
                &["item"],
            )?,
            netdev: GaugeSpec::new(
                "kata_guest_netdev_stat",
                "Guest net devices stats.",
                &["interface", "item"],
            )?,
            load: GaugeSpec::new("kata_guest_load", "Guest system load.", &["item"])?,
            tasks: GaugeSpec::new("kata_guest_tasks", "Guest system tasks.", &["item"])?,
            diskstat: GaugeSpec::new(
                "kata_guest_diskstat",
                "Disks stat in system.",
                &["disk", "item"],
            )?,
            vm_stat: GaugeSpec::new(
                "kata_guest_vm_stat",
                "Guest virtual memory stat.",
                &["item"],
            )?,
        })
    }

    /// Reads every source and appends its family as text. Each source is optional: one unreadable
    /// file must not empty the whole scrape.
    pub(crate) fn write_text(&self, out: &mut String) {
        match read("/proc/stat") {
            Ok(text) => cpu_time(&mut self.cpu_time.text_family(out), &text),
            Err(err) => unavailable("/proc/stat", &err),
        }
        match read("/proc/meminfo") {
            Ok(text) => meminfo(&mut self.meminfo.text_family(out), &text),
            Err(err) => unavailable("/proc/meminfo", &err),
        }
        match procfs::process::Process::myself().and_then(|p| p.dev_status()) {
            Ok(devices) => fill_netdev(&mut self.netdev.text_family(out), devices.values()),
            Err(err) => unavailable("/proc/net/dev", &err.to_string()),
        }
        match <procfs::LoadAverage as procfs::Current>::current() {
            Ok(load) => {
                let mut family = self.load.text_family(out);
                family.add(&["load1"], load.one as f64);
                family.add(&["load5"], load.five as f64);
                family.add(&["load15"], load.fifteen as f64);
                let mut family = self.tasks.text_family(out);
                family.add(&["cur"], load.cur as f64);
                family.add(&["max"], load.max as f64);
            }
            Err(err) => unavailable("/proc/loadavg", &err.to_string()),
        }
        match procfs::diskstats() {
            Ok(disks) => diskstat(&mut self.diskstat.text_family(out), &disks),
            Err(err) => unavailable("/proc/diskstats", &err.to_string()),
        }
        match read("/proc/vmstat") {
            Ok(text) => vm_stat(&mut self.vm_stat.text_family(out), &text),
            Err(err) => unavailable("/proc/vmstat", &err),
        }
    }
}

fn unavailable(source: &str, err: &str) {
    tracing::warn!(source, error = %err, "guest statistics unavailable");
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))
}

const CPU_ITEMS: [&str; 10] = [
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guest_nice",
];

/// `cpu` lines of /proc/stat: the aggregate line becomes cpu="total", `cpuN` becomes cpu="N" (so
/// offline CPUs, which have no line, have no series).
pub(crate) fn cpu_time(family: &mut GaugeFamily<'_>, proc_stat: &str) {
    for line in proc_stat.lines().filter(|l| l.starts_with("cpu")) {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let cpu = match &name[3..] {
            "" => "total",
            n if n.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => continue,
        };
        for (item, value) in CPU_ITEMS.iter().zip(fields) {
            if let Ok(value) = value.parse::<u64>() {
                family.add(&[cpu, item], value as f64);
            }
        }
    }
}

/// /proc/meminfo with Kata's item names (`MemTotal` → `mem_total`, `Active(anon)` → `active_anon`).
pub(crate) fn meminfo(family: &mut GaugeFamily<'_>, meminfo: &str) {
    for line in meminfo.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let Some(Ok(number)) = parts.next().map(str::parse::<u64>) else {
            continue;
        };
        let value = match parts.next() {
            Some("kB") => number as f64 * 1024.0,
            None => number as f64,
            Some(_) => continue,
        };
        let item = meminfo_item(key);
        if !item.is_empty() && item.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            family.add(&[&item], value);
        }
    }
}

/// Kata's (procfs') names for /proc/meminfo keys; the irregular ones are listed, the rest follow
/// CamelCase → snake_case.
pub(crate) fn meminfo_item(key: &str) -> String {
    let irregular = [
        ("KReclaimable", "k_reclaimable"),
        ("SReclaimable", "s_reclaimable"),
        ("SUnreclaim", "s_unreclaim"),
        ("HugePages_Total", "hugepages_total"),
        ("HugePages_Free", "hugepages_free"),
        ("HugePages_Rsvd", "hugepages_rsvd"),
        ("HugePages_Surp", "hugepages_surp"),
        ("AnonHugePages", "anon_hugepages"),
        ("ShmemHugePages", "shmem_hugepages"),
        ("FileHugePages", "file_hugepages"),
        ("Percpu", "per_cpu"),
        ("DirectMap4k", "direct_map_4k"),
        ("DirectMap2M", "direct_map_2M"),
        ("DirectMap4M", "direct_map_4M"),
        ("DirectMap1G", "direct_map_1G"),
    ];
    if let Some((_, item)) = irregular.iter().find(|(k, _)| *k == key) {
        return item.to_string();
    }
    let mut item = String::with_capacity(key.len() + 4);
    let mut previous_lower = false;
    for c in key.chars() {
        match c {
            '(' => {
                item.push('_');
                previous_lower = false;
            }
            ')' => {}
            c if c.is_ascii_uppercase() => {
                if previous_lower {
                    item.push('_');
                }
                item.push(c.to_ascii_lowercase());
                previous_lower = false;
            }
            c => {
                item.push(c);
                previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            }
        }
    }
    item
}

fn diskstat(family: &mut GaugeFamily<'_>, disks: &[procfs::DiskStat]) {
    for disk in disks {
        let always = [
            ("reads", disk.reads),
            ("merged", disk.merged),
            ("sectors_read", disk.sectors_read),
            ("time_reading", disk.time_reading),
            ("writes", disk.writes),
            ("writes_merged", disk.writes_merged),
            ("sectors_written", disk.sectors_written),
            ("time_writing", disk.time_writing),
            ("in_progress", disk.in_progress),
            ("time_in_progress", disk.time_in_progress),
            ("weighted_time_in_progress", disk.weighted_time_in_progress),
        ];
        for (item, value) in always {
            family.add(&[&disk.name, item], value as f64);
        }
        let newer_kernels = [
            ("discards", disk.discards),
            ("discards_merged", disk.discards_merged),
            ("sectors_discarded", disk.sectors_discarded),
            ("time_discarding", disk.time_discarding),
            ("flushes", disk.flushes),
            ("time_flushing", disk.time_flushing),
        ];
        for (item, value) in newer_kernels {
            if let Some(value) = value {
                family.add(&[&disk.name, item], value as f64);
            }
        }
    }
}

fn vm_stat(family: &mut GaugeFamily<'_>, vmstat: &str) {
    for line in vmstat.lines() {
        let mut parts = line.split_whitespace();
        let (Some(item), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let Ok(value) = value.parse::<i64>() {
            if item.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                family.add(&[item], value as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::MetricFamily;

    fn values(family: &MetricFamily) -> Vec<(Vec<String>, f64)> {
        family
            .get_metric()
            .iter()
            .map(|m| {
                (
                    m.get_label()
                        .iter()
                        .map(|l| l.value().to_string())
                        .collect(),
                    m.get_gauge().value(),
                )
            })
            .collect()
    }

    #[test]
    fn meminfo_names_follow_kata() {
        for (key, item) in [
            ("MemTotal", "mem_total"),
            ("Active(anon)", "active_anon"),
            ("Committed_AS", "committed_as"),
            ("NFS_Unstable", "nfs_unstable"),
            ("DirectMap2M", "direct_map_2M"),
            ("ShmemPmdMapped", "shmem_pmd_mapped"),
            ("SwapCached", "swap_cached"),
            ("Hugepagesize", "hugepagesize"),
            ("VmallocChunk", "vmalloc_chunk"),
            ("KReclaimable", "k_reclaimable"),
        ] {
            assert_eq!(meminfo_item(key), item, "{key}");
        }
    }

    #[test]
    fn meminfo_converts_kb_to_bytes_and_keeps_counts() {
        let spec = GaugeSpec::new("m", "h", &["item"]).unwrap();
        let mut family = spec.family();
        meminfo(
            &mut family,
            "MemTotal:  2048 kB\nHugePages_Total:  3\nBogus line\nX: y kB\n",
        );
        let family = family.finish();
        assert_eq!(
            values(&family),
            vec![
                (vec!["mem_total".into()], 2048.0 * 1024.0),
                (vec!["hugepages_total".into()], 3.0)
            ]
        );
    }

    #[test]
    fn cpu_time_has_each_cpu_and_total() {
        let spec = GaugeSpec::new("c", "h", &["cpu", "item"]).unwrap();
        let text = "cpu  10 0 5 100 0 0 0 0 0 0\ncpu0 6 0 3 50 0 0 0 0 0 0\ncpu2 4 0 2 50 0 0 0 0 0 0\nintr 1\n";
        let mut family = spec.family();
        cpu_time(&mut family, text);
        let family = family.finish();
        let cpus: std::collections::BTreeSet<String> = values(&family)
            .into_iter()
            .map(|(l, _)| l[0].clone())
            .collect();
        assert_eq!(
            cpus,
            ["0", "2", "total"].iter().map(|s| s.to_string()).collect()
        );
        assert!(values(&family).contains(&(vec!["total".into(), "idle".into()], 100.0)));
    }

    #[test]
    fn collector_reads_this_machine() {
        let collector = GuestCollector::new().unwrap();
        let mut text = String::new();
        collector.write_text(&mut text);
        for name in [
            "kata_guest_cpu_time",
            "kata_guest_meminfo",
            "kata_guest_netdev_stat",
            "kata_guest_load",
            "kata_guest_tasks",
            "kata_guest_vm_stat",
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {name} gauge\n")),
                "{name} missing from\n{text}"
            );
        }
        #[cfg(feature = "host")]
        {
            let parsed = crate::metrics::exposition::parse(&text, &Default::default()).unwrap();
            assert!(parsed.dropped.is_empty(), "{:?}", parsed.dropped);
        }
    }
}
