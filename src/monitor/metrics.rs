//! kata-monitor's own families (`kata_monitor_*`), in a registry of their own.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::metrics::process::{ProcessCollector, ProcessCollectorOptions, Target};

pub(crate) struct MonitorMetrics {
    pub(crate) registry: Registry,
    pub(crate) running_shims: IntGauge,
    pub(crate) scrapes: IntCounter,
    pub(crate) failed: IntCounter,
    pub(crate) durations: Histogram,
    pub(crate) sandbox_up: IntGaugeVec,
    pub(crate) dropped_families: IntCounter,
}

impl MonitorMetrics {
    pub(crate) fn new() -> Result<MonitorMetrics, prometheus::Error> {
        let registry = Registry::new();
        let running_shims = IntGauge::new(
            "kata_monitor_running_shim_count",
            "Running shim count(running sandboxes).",
        )?;
        let scrapes = IntCounter::new("kata_monitor_scrape_count", "Scape count.")?;
        let failed = IntCounter::new(
            "kata_monitor_scrape_failed_count",
            "Failed scape count: every sandbox that could not be scraped, once per scrape.",
        )?;
        // Kata's buckets: 1, 2, 4, ... 512 ms.
        let durations = Histogram::with_opts(
            HistogramOpts::new(
                "kata_monitor_scrape_durations_histogram_milliseconds",
                "Time used to scrape from shims",
            )
            .buckets(exponential_buckets(1.0, 2.0, 10)?),
        )?;
        let sandbox_up = IntGaugeVec::new(
            Opts::new(
                "kata_monitor_sandbox_up",
                "1 if the sandbox's shim answered the last scrape with usable metrics, 0 if not.",
            ),
            &["sandbox_id"],
        )?;
        let dropped_families = IntCounter::new(
            "kata_monitor_dropped_families_total",
            "Metric families from shims that were dropped as invalid, reserved or conflicting.",
        )?;
        registry.register(Box::new(running_shims.clone()))?;
        registry.register(Box::new(scrapes.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(sandbox_up.clone()))?;
        registry.register(Box::new(dropped_families.clone()))?;
        // The standard process families under Kata's names (kata_monitor_process_*) ...
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "kata_monitor",
            ),
        ))?;
        // ... and the project's own process collector, as for the shim. Optional: a clash with
        // the names above must not stop the monitor.
        let own = ProcessCollector::new(
            Target::SelfProcess,
            "kata_monitor",
            ProcessCollectorOptions::monitor(),
        )
        .and_then(|collector| registry.register(Box::new(collector)));
        if let Err(err) = own {
            tracing::warn!(error = %err, "kata_monitor process details are not available");
        }
        Ok(MonitorMetrics {
            registry,
            running_shims,
            scrapes,
            failed,
            durations,
            sandbox_up,
            dropped_families,
        })
    }

    /// A sandbox left: its `kata_monitor_sandbox_up` series goes with it.
    pub(crate) fn forget(&self, sandbox_id: &str) {
        let _ = self.sandbox_up.remove_label_values(&[sandbox_id]);
    }
}
