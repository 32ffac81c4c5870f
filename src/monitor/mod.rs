//! kata-monitor: finds every sandbox on the node, scrapes each shim's management socket, labels
//! and merges the results, and serves them as one Prometheus target.
//!
//! - [`config`]: flags and settings;
//! - [`discovery`] and [`sandboxes`]: which sandboxes exist (inotify on the run directories);
//! - [`scrape`]: bounded, deadline-limited scraping of the shims;
//! - [`aggregate`] and [`render`]: relabelling, merging and writing the output;
//! - [`metrics`]: the monitor's own `kata_monitor_*` families;
//! - [`http`]: the endpoints, and [`listener`]: which connections get served.

pub(crate) mod aggregate;
pub mod config;
pub(crate) mod cri;
pub(crate) mod discovery;
pub(crate) mod http;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod render;
pub(crate) mod sandboxes;
pub(crate) mod scrape;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::aggregate::{host_labels, merge};
use self::config::{Config, MAX_SCRAPE_DEADLINE};
use self::metrics::MonitorMetrics;
use self::render::{ChunkSink, FamilyFilter, Format};
use self::sandboxes::{PodLabels, Sandbox, Sandboxes};
use self::scrape::{Endpoint, ScrapeError, Scraper};
use crate::metrics::exposition;
use crate::metrics::exposition::block::{parse_blocks, FamilyBlock};
use crate::metrics::text::registry_text;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("setting up the monitor's own metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    #[error("listening on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("waiting for signals: {0}")]
    Signals(std::io::Error),
}

/// What one answer of `/metrics` or `/metrics/cadvisor` asks for.
pub(crate) struct ScrapeRequest {
    /// One sandbox (`?sandbox=<id>`), or all.
    pub(crate) only: Option<Arc<Sandbox>>,
    /// How long the client waits (Prometheus' scrape timeout), capped by the monitor's own.
    pub(crate) budget: Option<Duration>,
    pub(crate) format: Format,
    pub(crate) filter: FamilyFilter,
    pub(crate) gzip: bool,
    pub(crate) endpoint: Endpoint,
}

/// The monitor's shared state.
pub(crate) struct Monitor {
    pub(crate) config: Config,
    pub(crate) sandboxes: Arc<Sandboxes>,
    pub(crate) metrics: Arc<MonitorMetrics>,
    pub(crate) scraper: Scraper,
}

impl Monitor {
    pub(crate) fn new(config: Config) -> Result<Monitor, MonitorError> {
        Ok(Monitor {
            scraper: Scraper::new(
                config.scrape_timeout,
                config.concurrency,
                match &config.runtime_endpoint {
                    Some(endpoint) => Some(Arc::new(cri::CriPods::new(endpoint)?)),
                    None => None,
                },
            ),
            sandboxes: Arc::new(Sandboxes::default()),
            metrics: Arc::new(MonitorMetrics::new()?),
            config,
        })
    }

    /// One scrape: every sandbox (or only `only`), then the output written into `tx` by a blocking
    /// task. Returns once the scrape is done; the output follows as the client reads it.
    pub(crate) async fn scrape_into(&self, request: ScrapeRequest, tx: mpsc::Sender<Bytes>) {
        let ScrapeRequest {
            only,
            budget,
            format,
            filter,
            gzip,
            endpoint,
        } = request;
        let started = Instant::now();
        let budget = budget.map_or(MAX_SCRAPE_DEADLINE, |b| b.min(MAX_SCRAPE_DEADLINE));
        let single = only.is_some();
        let targets = match only {
            Some(sandbox) => vec![sandbox],
            None => self.sandboxes.all(),
        };
        let results = self
            .scraper
            .scrape_all(targets, started + budget, endpoint)
            .await;

        let mut sources: Vec<(String, Vec<FamilyBlock>)> = Vec::with_capacity(results.len() + 1);
        for scraped in results {
            let id = &scraped.sandbox.id;
            // A sandbox that left during the scrape gets no series back.
            let present = self.sandboxes.get(id).is_some();
            match scraped.result {
                Ok(ok) => {
                    if present {
                        self.metrics.sandbox_up.with_label_values(&[id]).set(1);
                    }
                    self.metrics.dropped_families.inc_by(ok.dropped as u64);
                    let host = match (endpoint, scraped.sandbox.pod()) {
                        // cAdvisor's series carry kubelet's labels, written by the shim.
                        (Endpoint::Cadvisor, _) => String::new(),
                        (Endpoint::Metrics, PodLabels::Known(Some(pod))) => {
                            host_labels(id, &pod.pairs())
                        }
                        (Endpoint::Metrics, _) => host_labels(id, &Default::default()),
                    };
                    sources.push((host, ok.body.families));
                }
                Err(ScrapeError::NotServed) => {
                    tracing::debug!(sandbox = %id, "no /metrics/cadvisor (an upstream shim)");
                }
                // Deleted while it was being scraped (discovery has not seen it go yet): a
                // sandbox that left, not one that failed.
                Err(err) if !present || scraped.sandbox.socket_is_gone() => {
                    tracing::debug!(sandbox = %id, error = %err, "sandbox left during the scrape");
                }
                Err(err) => {
                    tracing::warn!(sandbox = %id, reason = err.reason(), error = %err, "sandbox not scraped");
                    self.metrics.failed.inc();
                    self.metrics.sandbox_up.with_label_values(&[id]).set(0);
                }
            }
        }
        self.metrics.scrapes.inc();
        self.metrics
            .durations
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        if !single && endpoint == Endpoint::Metrics {
            sources.push((String::new(), own_blocks(&self.metrics.registry)));
        }

        let metrics = self.metrics.clone();
        // Writing hundreds of sandboxes' lines (and gzip) is CPU work: off the async threads.
        tokio::task::spawn_blocking(move || {
            let merged = merge(&sources);
            metrics.dropped_families.inc_by(merged.conflicts as u64);
            let mut sink = ChunkSink::new(tx, gzip);
            let written =
                render::write(&merged, format, &filter, &mut sink).and_then(|()| sink.finish());
            if written.is_err() {
                tracing::debug!("the client left before the whole answer was sent");
            }
        });
    }
}

/// The monitor's own registry as blocks, through the same text and parser as a shim's body
/// (labels kept: `kata_monitor_sandbox_up` has a `sandbox_id` of its own).
fn own_blocks(registry: &prometheus::Registry) -> Vec<FamilyBlock> {
    let parsed = registry_text(&registry.gather())
        .map_err(|e| e.to_string())
        .and_then(|text| {
            parse_blocks(&text, &exposition::Limits::default(), false).map_err(|e| e.to_string())
        });
    match parsed {
        Ok(parsed) => parsed.families,
        Err(err) => {
            tracing::error!(error = %err, "the monitor's own metrics are missing from this scrape");
            Vec::new()
        }
    }
}

/// Runs the monitor until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), MonitorError> {
    limit_malloc_arenas();
    if let Some(endpoint) = &config.runtime_endpoint {
        tracing::info!(
            endpoint = %endpoint,
            "pod labels come from the shims (/pod-labels); CRI is asked for those of shims that do not serve them"
        );
    }
    let listener =
        listener::bind(config.listen_address).map_err(|source| MonitorError::Listen {
            address: config.listen_address,
            source,
        })?;
    let monitor = Arc::new(Monitor::new(config)?);
    tracing::info!(
        address = %monitor.config.listen_address,
        run_dirs = ?monitor.config.run_dirs,
        "kata-monitor listening"
    );
    // First view before the first request.
    discovery::refresh(
        &monitor.config.run_dirs,
        &monitor.sandboxes,
        &monitor.metrics,
    );
    let discovery = tokio::spawn(discovery::run(
        monitor.config.run_dirs.clone(),
        monitor.sandboxes.clone(),
        monitor.metrics.clone(),
    ));
    let server = tokio::spawn(listener::serve(listener, monitor));
    let stopped = crate::signals::wait_for_termination().await;
    discovery.abort();
    server.abort();
    stopped.map_err(MonitorError::Signals)
}

/// glibc gives each thread that allocates its own arena, and freed memory stays in the arena that
/// had it. Shim bodies are parsed on varying blocking threads, so without a cap the peak RSS is
/// several times the live data; two arenas keep it close.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before the monitor's threads allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
