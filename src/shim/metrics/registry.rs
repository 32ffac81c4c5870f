//! The shim's global Prometheus registry and the metrics the shim updates itself.
//!
//! One shim serves one sandbox, so one process-wide registry (as in Kata's Go shim) is enough: the
//! shim's own process collector is registered once, the hypervisor's when its VM is up.

use std::sync::Mutex;

use lazy_static::lazy_static;
use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

use super::overhead::PodOverhead;
use crate::agent_client::RpcDurations;
use crate::metrics::process::{ProcessCollector, ProcessCollectorOptions, Target};

/// Kata's buckets for its millisecond histograms: 1, 2, 4, ... 512 ms.
fn millisecond_buckets() -> Vec<f64> {
    exponential_buckets(1.0, 2.0, 10).unwrap_or_default()
}

fn histogram_vec(name: &str, help: &str) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(millisecond_buckets());
    let metric = HistogramVec::new(opts, &["action"]).expect("static histogram definition");
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("register a static histogram once");
    metric
}

lazy_static! {
    /// Everything the shim serves on `/metrics` (besides the agent's families) lives here.
    pub static ref REGISTRY: Registry = Registry::new();

    /// Latency of each call to the agent, by request type (`grpc.GetMetricsRequest`, ...).
    pub(crate) static ref AGENT_RPC_DURATIONS: HistogramVec = histogram_vec(
        "kata_shim_agent_rpc_durations_histogram_milliseconds",
        "RPC latency distributions.",
    );

    /// Latency of each containerd task RPC the shim serves, by action (`create`, `start`, ...).
    pub(crate) static ref SHIM_RPC_DURATIONS: HistogramVec = histogram_vec(
        "kata_shim_rpc_durations_histogram_milliseconds",
        "RPC latency distributions.",
    );

    /// 1 when the last scrape got the agent's metrics, 0 when they are missing from it.
    pub(crate) static ref AGENT_METRICS_UP: IntGauge = {
        let gauge = IntGauge::new(
            "kata_shim_agent_metrics_up",
            "1 if the last scrape included the agent's metrics, 0 if the agent could not be read.",
        )
        .expect("static gauge definition");
        REGISTRY.register(Box::new(gauge.clone())).expect("register a static gauge once");
        gauge
    };

    /// Scrapes that lost the agent's metrics, by reason (connect, timeout, rpc, too_large, ...).
    pub(crate) static ref AGENT_METRICS_ERRORS: IntCounterVec = {
        let counter = IntCounterVec::new(
            Opts::new(
                "kata_shim_agent_metrics_errors_total",
                "Scrapes whose agent metrics were missing, by reason.",
            ),
            &["reason"],
        )
        .expect("static counter definition");
        REGISTRY.register(Box::new(counter.clone())).expect("register a static counter once");
        counter
    };

    /// Families of the agent's text that were refused (invalid, duplicated, or outside its namespaces).
    pub(crate) static ref AGENT_FAMILIES_DROPPED: IntCounter = {
        let counter = IntCounter::new(
            "kata_shim_agent_metrics_dropped_families_total",
            "Metric families from the agent that were dropped as invalid, duplicated or not allowed.",
        )
        .expect("static counter definition");
        REGISTRY.register(Box::new(counter.clone())).expect("register a static counter once");
        counter
    };

    /// The sandbox's cost beyond its guest, updated by each scrape (see [`super::overhead`]).
    pub(crate) static ref POD_OVERHEAD: PodOverhead = PodOverhead::new().expect("static gauge definitions");

    /// The pid whose hypervisor collector is registered, so a new VM replaces the old one.
    static ref HYPERVISOR_PID: Mutex<Option<i32>> = Mutex::new(None);

    /// The VM's vsock daemon (hybrid vsock), counted in the pod's host cost.
    static ref VSOCK_DAEMON_PID: Mutex<Option<i32>> = Mutex::new(None);
}

/// Where the shim's agent clients report their calls' latency ([`AGENT_RPC_DURATIONS`]).
pub fn agent_rpc_durations() -> RpcDurations {
    RpcDurations(AGENT_RPC_DURATIONS.clone())
}

/// Registers the shim's own process families: `kata_shim_*` and the unprefixed `process_*`.
/// Also touches the lazily created shim metrics so they appear from the first scrape on.
pub fn register_shim_collectors() -> Result<(), prometheus::Error> {
    let shim = ProcessCollector::new(
        Target::SelfProcess,
        "kata_shim",
        ProcessCollectorOptions::shim(),
    )?;
    register_or_keep(Box::new(shim))?;
    register_or_keep(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    register_or_keep(Box::new(PodOverheadCollector))?;
    lazy_static::initialize(&AGENT_RPC_DURATIONS);
    lazy_static::initialize(&SHIM_RPC_DURATIONS);
    lazy_static::initialize(&AGENT_METRICS_UP);
    lazy_static::initialize(&AGENT_METRICS_ERRORS);
    lazy_static::initialize(&AGENT_FAMILIES_DROPPED);
    Ok(())
}

/// Points the `kata_hypervisor_*` families at `pid` (replacing an earlier hypervisor, if any).
pub fn register_hypervisor(pid: i32) -> Result<(), prometheus::Error> {
    let mut current = HYPERVISOR_PID
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if current.take().is_some() {
        // Fails only if it was never registered; either way it is gone afterwards.
        let _ = REGISTRY.unregister(hypervisor_collector(pid)?);
    }
    REGISTRY.register(hypervisor_collector(pid)?)?;
    *current = Some(pid);
    Ok(())
}

/// The hypervisor pid the `kata_hypervisor_*` families watch, if any.
pub(crate) fn hypervisor_pid() -> Option<i32> {
    *HYPERVISOR_PID
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts the VM's vsock daemon in the pod's host cost (see [`super::overhead`]).
pub(crate) fn set_vsock_daemon(pid: Option<i32>) {
    *VSOCK_DAEMON_PID
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = pid;
}

/// The VM's host processes besides the shim: the hypervisor, then the vsock daemon; none without
/// a hypervisor.
pub(crate) fn host_pids() -> Vec<i32> {
    let Some(hypervisor) = hypervisor_pid() else {
        return Vec::new();
    };
    let daemon = *VSOCK_DAEMON_PID
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    std::iter::once(hypervisor).chain(daemon).collect()
}

/// Removes the hypervisor families (the VM is gone).
pub(crate) fn unregister_hypervisor() {
    let mut current = HYPERVISOR_PID
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    set_vsock_daemon(None);
    if let Some(pid) = current.take() {
        if let Ok(collector) = hypervisor_collector(pid) {
            let _ = REGISTRY.unregister(collector);
        }
    }
}

// `Registry::unregister` matches collectors by their descriptors, which do not depend on the pid:
// a fresh collector stands for the registered one when it has to be removed.
fn hypervisor_collector(
    pid: i32,
) -> Result<Box<dyn prometheus::core::Collector>, prometheus::Error> {
    Ok(Box::new(ProcessCollector::new(
        Target::Pid(pid),
        "kata_hypervisor",
        ProcessCollectorOptions::hypervisor(),
    )?))
}

/// The registry owns its collectors; this one hands it the shared [`POD_OVERHEAD`].
struct PodOverheadCollector;

impl prometheus::core::Collector for PodOverheadCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        POD_OVERHEAD.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        POD_OVERHEAD.collect()
    }
}

fn register_or_keep(
    collector: Box<dyn prometheus::core::Collector>,
) -> Result<(), prometheus::Error> {
    match REGISTRY.register(collector) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => Ok(()),
        Err(err) => Err(err),
    }
}
