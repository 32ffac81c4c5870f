//! One process collector for any pid and metric prefix (shim, hypervisor, agent, monitor).
//!
//! Everything is read from `/proc/<pid>` when a scrape asks; a process that is gone (or a file the
//! kernel does not offer) yields fewer families, never an error for the whole scrape.
//! Units: `_proc_status` memory items in bytes (context switches are counts), `_proc_stat` in clock
//! ticks, `_io_stat` in bytes or calls, `_netdev` in bytes or packets, `_total_time` in ticks,
//! `_total_vm` and `_total_rss` in bytes.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use super::family::{GaugeFamily, GaugeSpec};

/// Which process a collector watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The calling process (`/proc/self`), whatever its pid.
    SelfProcess,
    #[cfg_attr(not(feature = "host"), allow(dead_code))] // the guest watches only itself
    Pid(i32),
}

/// Kata's runtime and agent spell the `/proc/<pid>/io` items differently; each keeps its spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoItemNames {
    /// `readbytes`, `writebytes`, `cancelledwritebytes` (shim, hypervisor).
    #[cfg_attr(not(feature = "host"), allow(dead_code))] // the host's spelling
    Runtime,
    /// `read_bytes`, `write_bytes`, `cancelled_write_byte` (agent).
    Agent,
}

#[derive(Debug, Clone)]
pub(crate) struct ProcessCollectorOptions {
    /// Start of every HELP text, e.g. "Hypervisor process".
    pub(crate) title: &'static str,
    /// `_threads` and `_fds` families.
    pub(crate) threads_and_fds: bool,
    /// `_netdev{interface,item}` from the process's network namespace.
    pub(crate) netdev: bool,
    /// `_total_time`, `_total_vm`, `_total_rss` (the agent's summary gauges).
    pub(crate) totals: bool,
    pub(crate) io_item_names: IoItemNames,
}

// The shim's, the hypervisor's and the monitor's options are the host's; the guest uses `agent`.
#[cfg_attr(not(feature = "host"), allow(dead_code))]
impl ProcessCollectorOptions {
    pub(crate) fn shim() -> Self {
        ProcessCollectorOptions {
            title: "Kata containerd shim v2 process",
            threads_and_fds: true,
            netdev: true,
            totals: false,
            io_item_names: IoItemNames::Runtime,
        }
    }

    pub(crate) fn hypervisor() -> Self {
        ProcessCollectorOptions {
            title: "Hypervisor process",
            ..Self::shim()
        }
    }

    pub(crate) fn agent() -> Self {
        ProcessCollectorOptions {
            title: "Agent process",
            threads_and_fds: false,
            netdev: false,
            totals: true,
            io_item_names: IoItemNames::Agent,
        }
    }

    pub(crate) fn monitor() -> Self {
        ProcessCollectorOptions {
            title: "kata-monitor process",
            // The host's network counters are not the monitor's business.
            netdev: false,
            ..Self::shim()
        }
    }
}

struct Families {
    threads: Option<GaugeSpec>,
    fds: Option<GaugeSpec>,
    proc_status: GaugeSpec,
    proc_stat: GaugeSpec,
    io_stat: GaugeSpec,
    netdev: Option<GaugeSpec>,
    totals: Option<[GaugeSpec; 3]>,
}

pub(crate) struct ProcessCollector {
    target: Target,
    io_item_names: IoItemNames,
    families: Families,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    pub(crate) fn new(
        target: Target,
        prefix: &str,
        options: ProcessCollectorOptions,
    ) -> prometheus::Result<Self> {
        let title = options.title;
        let spec = |suffix: &str, help: String, labels: &'static [&'static str]| {
            GaugeSpec::new(&format!("{prefix}_{suffix}"), &help, labels)
        };
        let optional = |on: bool, suffix: &str, help: String, labels| -> prometheus::Result<_> {
            if on {
                spec(suffix, help, labels).map(Some)
            } else {
                Ok(None)
            }
        };
        let families = Families {
            threads: optional(
                options.threads_and_fds,
                "threads",
                format!("{title} threads."),
                &[],
            )?,
            fds: optional(
                options.threads_and_fds,
                "fds",
                format!("Open FDs of the {title}."),
                &[],
            )?,
            proc_status: spec(
                "proc_status",
                format!("{title} status (memory items in bytes)."),
                &["item"],
            )?,
            proc_stat: spec(
                "proc_stat",
                format!("{title} statistics (clock ticks)."),
                &["item"],
            )?,
            io_stat: spec("io_stat", format!("{title} IO statistics."), &["item"])?,
            netdev: optional(
                options.netdev,
                "netdev",
                format!("Network devices statistics of the {title}'s network namespace."),
                &["interface", "item"],
            )?,
            totals: if options.totals {
                Some([
                    spec(
                        "total_time",
                        format!("{title} total CPU time (clock ticks)."),
                        &[],
                    )?,
                    spec(
                        "total_vm",
                        format!("{title} total virtual memory (bytes)."),
                        &[],
                    )?,
                    spec(
                        "total_rss",
                        format!("{title} total resident set size (bytes)."),
                        &[],
                    )?,
                ])
            } else {
                None
            },
        };
        let mut descs = Vec::new();
        for spec in families.all() {
            descs.push(spec.desc.clone());
        }
        Ok(ProcessCollector {
            target,
            io_item_names: options.io_item_names,
            families,
            descs,
        })
    }

    fn process(&self) -> procfs::ProcResult<procfs::process::Process> {
        match self.target {
            Target::SelfProcess => procfs::process::Process::myself(),
            Target::Pid(pid) => procfs::process::Process::new(pid),
        }
    }
}

impl Families {
    fn all(&self) -> Vec<&GaugeSpec> {
        let mut all = vec![&self.proc_status, &self.proc_stat, &self.io_stat];
        all.extend(self.threads.iter());
        all.extend(self.fds.iter());
        all.extend(self.netdev.iter());
        if let Some(totals) = &self.totals {
            all.extend(totals.iter());
        }
        all
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let process = match self.process() {
            Ok(process) => process,
            Err(err) => {
                tracing::debug!(target_process = ?self.target, error = %err, "process is not readable");
                return Vec::new();
            }
        };
        let f = &self.families;
        let mut out = Vec::new();

        match process.stat() {
            Ok(stat) => {
                if let Some(threads) = &f.threads {
                    out.push(threads.single(stat.num_threads as f64));
                }
                let mut family = f.proc_stat.family();
                for (item, value) in [
                    ("utime", stat.utime),
                    ("stime", stat.stime),
                    ("cutime", stat.cutime as u64),
                    ("cstime", stat.cstime as u64),
                ] {
                    family.add(&[item], value as f64);
                }
                out.push(family.finish());
                if let Some([time, vm, rss]) = &f.totals {
                    out.push(time.single((stat.utime + stat.stime) as f64));
                    out.push(vm.single(stat.vsize as f64));
                    out.push(rss.single((stat.rss * procfs::page_size()) as f64));
                }
            }
            Err(err) => tracing::debug!(error = %err, "reading the process's stat"),
        }

        if let Some(fds) = &f.fds {
            match process.fd_count() {
                Ok(count) => out.push(fds.single(count as f64)),
                Err(err) => tracing::debug!(error = %err, "counting the process's fds"),
            }
        }

        match process.status() {
            Ok(status) => out.push(status_family(&f.proc_status, &status)),
            Err(err) => tracing::debug!(error = %err, "reading the process's status"),
        }

        // /proc/<pid>/io needs ptrace access; without it the family is left out.
        if let Ok(io) = process.io() {
            let names = match self.io_item_names {
                IoItemNames::Runtime => ["readbytes", "writebytes", "cancelledwritebytes"],
                IoItemNames::Agent => ["read_bytes", "write_bytes", "cancelled_write_byte"],
            };
            let mut family = f.io_stat.family();
            for (item, value) in [
                ("rchar", io.rchar),
                ("wchar", io.wchar),
                ("syscr", io.syscr),
                ("syscw", io.syscw),
                (names[0], io.read_bytes),
                (names[1], io.write_bytes),
                (names[2], io.cancelled_write_bytes),
            ] {
                family.add(&[item], value as f64);
            }
            out.push(family.finish());
        }

        if let Some(netdev) = &f.netdev {
            match process.dev_status() {
                Ok(devices) => out.push(netdev_family(netdev, devices.values())),
                Err(err) => tracing::debug!(error = %err, "reading the process's net/dev"),
            }
        }
        out
    }
}

const KIB: f64 = 1024.0;

fn status_family(spec: &GaugeSpec, status: &procfs::process::Status) -> MetricFamily {
    let memory = [
        ("vmpeak", status.vmpeak),
        ("vmsize", status.vmsize),
        ("vmlck", status.vmlck),
        ("vmpin", status.vmpin),
        ("vmhwm", status.vmhwm),
        ("vmrss", status.vmrss),
        ("rssanon", status.rssanon),
        ("rssfile", status.rssfile),
        ("rssshmem", status.rssshmem),
        ("vmdata", status.vmdata),
        ("vmstk", status.vmstk),
        ("vmexe", status.vmexe),
        ("vmlib", status.vmlib),
        ("vmpte", status.vmpte),
        ("vmswap", status.vmswap),
        ("hugetlbpages", status.hugetlbpages),
    ];
    let counts = [
        ("voluntary_ctxt_switches", status.voluntary_ctxt_switches),
        (
            "nonvoluntary_ctxt_switches",
            status.nonvoluntary_ctxt_switches,
        ),
    ];
    let mut family = spec.family();
    for (item, kib) in memory {
        if let Some(kib) = kib {
            family.add(&[item], kib as f64 * KIB);
        }
    }
    for (item, count) in counts {
        if let Some(count) = count {
            family.add(&[item], count as f64);
        }
    }
    family.finish()
}

/// `<prefix>_netdev` or `kata_guest_netdev_stat`: the 16 counters of `/proc/net/dev` per interface.
pub(crate) fn netdev_family<'a>(
    spec: &GaugeSpec,
    devices: impl Iterator<Item = &'a procfs::net::DeviceStatus>,
) -> MetricFamily {
    let mut family = spec.family();
    fill_netdev(&mut family, devices);
    family.finish()
}

/// Every device's counters, with Kata's item names.
pub(crate) fn fill_netdev<'a>(
    family: &mut GaugeFamily<'_>,
    devices: impl Iterator<Item = &'a procfs::net::DeviceStatus>,
) {
    for dev in devices {
        for (item, value) in [
            ("recv_bytes", dev.recv_bytes),
            ("recv_packets", dev.recv_packets),
            ("recv_errs", dev.recv_errs),
            ("recv_drop", dev.recv_drop),
            ("recv_fifo", dev.recv_fifo),
            ("recv_frame", dev.recv_frame),
            ("recv_compressed", dev.recv_compressed),
            ("recv_multicast", dev.recv_multicast),
            ("sent_bytes", dev.sent_bytes),
            ("sent_packets", dev.sent_packets),
            ("sent_errs", dev.sent_errs),
            ("sent_drop", dev.sent_drop),
            ("sent_fifo", dev.sent_fifo),
            ("sent_colls", dev.sent_colls),
            ("sent_carrier", dev.sent_carrier),
            ("sent_compressed", dev.sent_compressed),
        ] {
            family.add(&[&dev.name, item], value as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(families: &[MetricFamily], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = families.iter().find(|f| f.name() == name)?;
        family
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_gauge().value())
    }

    #[test]
    fn descriptors_cover_every_family_and_names_are_unique() {
        for options in [
            ProcessCollectorOptions::shim(),
            ProcessCollectorOptions::agent(),
            ProcessCollectorOptions::monitor(),
        ] {
            let collector =
                ProcessCollector::new(Target::SelfProcess, "kata_test", options).unwrap();
            let names: Vec<&str> = collector
                .desc()
                .iter()
                .map(|d| d.fq_name.as_str())
                .collect();
            let unique: std::collections::HashSet<_> = names.iter().collect();
            assert_eq!(unique.len(), names.len());
            for family in collector.collect() {
                assert!(
                    names.contains(&family.name()),
                    "{} has no descriptor",
                    family.name()
                );
            }
            // Registering twice in one registry must fail only for the second, same-named collector.
            let registry = prometheus::Registry::new();
            registry.register(Box::new(collector)).unwrap();
        }
    }

    #[test]
    fn values_match_proc_of_a_child_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until exec completes the child is a copy of this test process.
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim()
            != "sleep"
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let collector = ProcessCollector::new(
            Target::Pid(pid),
            "kata_hypervisor",
            ProcessCollectorOptions::hypervisor(),
        )
        .unwrap();
        let families = collector.collect();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |key: &str| -> f64 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        assert_eq!(
            gauge(&families, "kata_hypervisor_threads", &[]),
            Some(field("Threads:"))
        );
        assert_eq!(
            gauge(
                &families,
                "kata_hypervisor_proc_status",
                &[("item", "vmsize")]
            ),
            Some(field("VmSize:") * 1024.0)
        );
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count() as f64;
        assert_eq!(gauge(&families, "kata_hypervisor_fds", &[]), Some(fds));
        assert!(gauge(
            &families,
            "kata_hypervisor_netdev",
            &[("interface", "lo"), ("item", "recv_bytes")]
        )
        .is_some());
        child.kill().unwrap();
        child.wait().unwrap();
        // Gone: no families, no panic.
        assert!(collector.collect().is_empty());
    }

    #[test]
    fn agent_options_use_agent_io_names_and_totals() {
        let collector = ProcessCollector::new(
            Target::SelfProcess,
            "kata_agent",
            ProcessCollectorOptions::agent(),
        )
        .unwrap();
        let families = collector.collect();
        assert!(gauge(
            &families,
            "kata_agent_io_stat",
            &[("item", "cancelled_write_byte")]
        )
        .is_some());
        assert!(gauge(&families, "kata_agent_total_vm", &[]).unwrap() > 0.0);
        assert!(gauge(&families, "kata_agent_threads", &[]).is_none());
    }
}
