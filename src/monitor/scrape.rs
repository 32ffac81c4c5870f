//! Scrapes many shims at once: at most `concurrency` connections, each under the per-shim timeout,
//! the whole round under one deadline. Every sandbox gets an outcome; none is dropped silently and
//! none can hold up the others.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::aggregate::{cadvisor_body, shim_body, ShimBody, CADVISOR_PREFIX};
use super::cri::CriPods;
use super::sandboxes::{PodLabels, Sandbox};
use crate::metrics::exposition::block::parse_blocks;
use crate::metrics::exposition::{ExpositionError, Limits};
use crate::mgmt::client::{self, ClientError, GetOptions};
use crate::mgmt::PodIdentity;

/// Largest shim body read (a busy sandbox's is well under 1 MiB).
pub(crate) const MAX_SHIM_BODY: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ScrapeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the shim answered {0}")]
    Status(StatusCode),
    #[error("the shim's metrics are not valid text: not UTF-8: {0}")]
    NotUtf8(#[source] std::str::Utf8Error),
    #[error("the shim's metrics are not valid text: {0}")]
    Refused(#[from] ExpositionError),
    /// Nothing usable in a non-empty body; `first_drop` says why its first family was dropped.
    #[error("the shim's metrics are not valid text: {first_drop}")]
    NoFamilies { first_drop: String },
    #[error("the shim's metrics are not valid text: parser task failed: {0}")]
    ParserTask(#[source] tokio::task::JoinError),
    #[error("not scraped before the scrape deadline")]
    Deadline,
    /// The shim does not have the endpoint (an upstream Kata shim has no `/metrics/cadvisor`).
    #[error("the shim does not serve this endpoint")]
    NotServed,
}

impl ScrapeError {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Client(ClientError::Timeout { .. }) => "timeout",
            ScrapeError::Client(ClientError::TooLarge { .. }) => "too_large",
            ScrapeError::Client(ClientError::Connect { .. }) => "connect",
            ScrapeError::Client(
                ClientError::Http { .. }
                | ClientError::Request { .. }
                | ClientError::Body { .. }
                | ClientError::Gzip { .. },
            ) => "http",
            ScrapeError::Status(_) => "status",
            ScrapeError::NotUtf8(_)
            | ScrapeError::Refused(_)
            | ScrapeError::NoFamilies { .. }
            | ScrapeError::ParserTask(_) => "malformed",
            ScrapeError::Deadline => "deadline",
            ScrapeError::NotServed => "not_served",
        }
    }
}

/// Which of a shim's bodies a scrape reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/metrics`: the sandbox's `kata_*` families, labelled with the sandbox by the monitor.
    Metrics,
    /// `/metrics/cadvisor`: its containers' `container_*` series, which carry kubelet's labels.
    Cadvisor,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Metrics => "/metrics",
            Endpoint::Cadvisor => "/metrics/cadvisor",
        }
    }
}

/// One sandbox's result.
pub(crate) struct Scraped {
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) result: Result<ScrapedBody, ScrapeError>,
}

pub(crate) struct ScrapedBody {
    pub(crate) body: ShimBody,
    /// Families of this body that were dropped (invalid, reserved, repeated).
    pub(crate) dropped: usize,
}

/// Bodies up to this size are parsed on the thread that read them (a real shim's is ~65 KB).
const PARSE_INLINE_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub(crate) struct Scraper {
    pub(crate) timeout: Duration,
    /// Shared by every scrape in flight, so two Prometheus servers do not double the load.
    pub(crate) permits: Arc<Semaphore>,
    /// Parses at once: one per CPU, since more only hold more parsed bodies in memory.
    parse_permits: Arc<Semaphore>,
    pub(crate) limits: Limits,
    cri: Option<Arc<CriPods>>,
}

impl Scraper {
    /// `cri`: where to ask for the pod labels of shims that do not serve `/pod-labels`.
    pub(crate) fn new(timeout: Duration, concurrency: usize, cri: Option<Arc<CriPods>>) -> Self {
        let limits = shim_body_limits();
        Scraper {
            timeout,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            parse_permits: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            limits,
            cri,
        }
    }

    /// Scrapes `sandboxes`; results come back in the same order.
    pub(crate) async fn scrape_all(
        &self,
        sandboxes: Vec<Arc<Sandbox>>,
        deadline: Instant,
        endpoint: Endpoint,
    ) -> Vec<Scraped> {
        let mut tasks = JoinSet::new();
        for (index, sandbox) in sandboxes.iter().enumerate() {
            let (scraper, sandbox) = (self.clone(), sandbox.clone());
            tasks.spawn(async move {
                let Ok(Ok(_permit)) =
                    tokio::time::timeout_at(deadline, scraper.permits.clone().acquire_owned())
                        .await
                else {
                    return (index, Err(ScrapeError::Deadline));
                };
                let timeout = scraper
                    .timeout
                    .min(deadline.saturating_duration_since(Instant::now()));
                (index, scraper.scrape_one(&sandbox, timeout, endpoint).await)
            });
        }
        let mut results: Vec<Option<Result<ScrapedBody, ScrapeError>>> =
            sandboxes.iter().map(|_| None).collect();
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok((index, result)))) => {
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(result);
                    }
                }
                // A panicked task: its slot stays empty and counts as a failure below.
                Ok(Some(Err(err))) => tracing::error!(error = %err, "scrape task failed"),
                Ok(None) => break,
                Err(_) => {
                    tasks.abort_all();
                    break;
                }
            }
        }
        sandboxes
            .into_iter()
            .zip(results)
            .map(|(sandbox, result)| Scraped {
                sandbox,
                result: result.unwrap_or(Err(ScrapeError::Deadline)),
            })
            .collect()
    }

    async fn scrape_one(
        &self,
        sandbox: &Sandbox,
        timeout: Duration,
        endpoint: Endpoint,
    ) -> Result<ScrapedBody, ScrapeError> {
        let started = Instant::now();
        let options = GetOptions {
            timeout,
            max_body: MAX_SHIM_BODY,
            gzip: false,
        };
        if endpoint == Endpoint::Metrics && sandbox.pod() == PodLabels::Unknown {
            learn_pod_labels(sandbox, &options, self.cri.as_deref()).await;
        }
        let options = GetOptions {
            timeout: timeout.saturating_sub(started.elapsed()),
            ..options
        };
        let response = client::get(&sandbox.socket, endpoint.path(), &options).await?;
        if endpoint == Endpoint::Cadvisor && response.status == StatusCode::NOT_FOUND {
            return Err(ScrapeError::NotServed);
        }
        if response.status != StatusCode::OK {
            return Err(ScrapeError::Status(response.status));
        }
        let limits = self.limits.clone();
        let Ok(_parsing) = self.parse_permits.clone().acquire_owned().await else {
            return Err(ScrapeError::Deadline);
        };
        let inline = response.body.len() <= PARSE_INLINE_BYTES;
        let parse = move || match endpoint {
            Endpoint::Metrics => parse_body(&response.body, &limits),
            Endpoint::Cadvisor => parse_cadvisor_body(&response.body, &limits),
        };
        // A typical body parses in a fraction of a millisecond: handing it to another thread
        // would cost about as much (hundreds per scrape). A large one is CPU work long enough to
        // stall the sockets this thread drives, so it goes to the blocking pool.
        if inline {
            return parse();
        }
        tokio::task::spawn_blocking(parse)
            .await
            .map_err(ScrapeError::ParserTask)?
    }
}

/// What a shim's body may hold.
pub(crate) fn shim_body_limits() -> Limits {
    Limits {
        max_bytes: MAX_SHIM_BODY,
        max_samples: 200_000,
        ..Limits::default()
    }
}

/// Reads a shim's `/metrics` body into a sandbox's blocks.
pub(crate) fn parse_body(body: &[u8], limits: &Limits) -> Result<ScrapedBody, ScrapeError> {
    let text = std::str::from_utf8(body).map_err(ScrapeError::NotUtf8)?;
    let parsed = parse_blocks(text, limits, true)?;
    // A live shim always has its own families: nothing usable means the body was garbage.
    if parsed.families.is_empty() && !text.trim().is_empty() {
        let first_drop = parsed
            .dropped
            .first()
            .map_or_else(|| "no metric families".to_string(), |d| d.reason.clone());
        return Err(ScrapeError::NoFamilies { first_drop });
    }
    let (body, dropped) = shim_body(parsed.families);
    Ok(ScrapedBody {
        body,
        dropped: dropped + parsed.dropped.len(),
    })
}

/// Reads a shim's `/metrics/cadvisor` body: only `container_*` families count (others are
/// dropped), and an empty body is a sandbox without containers yet.
pub(crate) fn parse_cadvisor_body(
    body: &[u8],
    limits: &Limits,
) -> Result<ScrapedBody, ScrapeError> {
    let text = std::str::from_utf8(body).map_err(ScrapeError::NotUtf8)?;
    let parsed = parse_blocks(text, limits, true)?;
    let (families, foreign): (Vec<_>, Vec<_>) = parsed
        .families
        .into_iter()
        .partition(|f| f.name.starts_with(CADVISOR_PREFIX));
    let (body, dropped) = cadvisor_body(families);
    Ok(ScrapedBody {
        body,
        dropped: dropped + foreign.len() + parsed.dropped.len(),
    })
}

/// Asks the shim for its pod labels once. A shim without them (404: not a pod, or an upstream shim
/// without `/pod-labels`) has none, unless CRI knows the sandbox.
async fn learn_pod_labels(sandbox: &Sandbox, options: &GetOptions, cri: Option<&CriPods>) {
    let options = GetOptions {
        max_body: 4096,
        ..options.clone()
    };
    match client::get(&sandbox.socket, "/pod-labels", &options).await {
        Ok(response) if response.status == StatusCode::OK => {
            let text = String::from_utf8_lossy(&response.body);
            let pod = PodIdentity::from_text(&text);
            sandbox.set_pod(PodLabels::Known((!pod.is_empty()).then_some(pod)));
        }
        Ok(response) if response.status == StatusCode::NOT_FOUND => match cri {
            None => sandbox.set_pod(PodLabels::Known(None)),
            Some(cri) => match cri.pod_of(&sandbox.id, options.timeout).await {
                Ok(pod) => sandbox.set_pod(PodLabels::Known(pod)),
                // Asked again on the next scrape.
                Err(err) => {
                    tracing::debug!(sandbox = %sandbox.id, error = %err, "pod labels not read from CRI")
                }
            },
        },
        Ok(response) => {
            tracing::debug!(sandbox = %sandbox.id, status = %response.status, "pod labels not served");
        }
        Err(err) => tracing::debug!(sandbox = %sandbox.id, error = %err, "pod labels not read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Scraper::new(Duration::from_secs(1), 1, None).limits
    }

    #[test]
    fn garbage_is_a_failure_and_a_good_body_keeps_its_families() {
        for bad in [
            &b"this { is not \"prometheus text\n"[..],
            b"\xff\xfe",
            b"# TYPE x gauge\nx{ 1\n",
        ] {
            let err = parse_body(bad, &limits()).err().expect("refused");
            assert_eq!(err.reason(), "malformed");
        }
        let good = b"# TYPE process_open_fds gauge\nprocess_open_fds 7\n\
            # TYPE kata_guest_load gauge\nkata_guest_load{sandbox_id=\"forged\",item=\"1m\"} 0.5\n\
            # TYPE kata_monitor_scrape_count counter\nkata_monitor_scrape_count 9\n";
        let scraped = parse_body(good, &limits()).expect("accepted");
        let names: Vec<&str> = scraped
            .body
            .families
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, vec!["kata_guest_load", "kata_shim_process_open_fds"]);
        assert_eq!(scraped.dropped, 1, "the shim may not fill kata_monitor_*");
        let mut out = String::new();
        scraped.body.families[0]
            .samples
            .write_lines("sandbox_id=\"real\"", &mut out);
        assert_eq!(
            out,
            "kata_guest_load{item=\"1m\",sandbox_id=\"real\"} 0.5\n"
        );
    }
}
