//! The host's client of the guest agent: one lazily opened ttrpc connection, a deadline on every
//! call, each call's latency reported to the histogram the client was given, and a fresh
//! connection after the old one failed. The calls themselves are one table ([`rpcs`]).

mod error;
mod rpcs;

use std::future::Future;
use std::time::Duration;

use prometheus::HistogramVec;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use self::error::AgentError;
use crate::agent::transport;
use crate::agent::url::AgentUrl;
use crate::protocols::agent_ttrpc::AgentServiceClient;
use crate::protocols::health;
use crate::protocols::health_ttrpc::HealthClient;

/// Deadlines for agent calls. Metrics have a short one of their own: a scrape must never wait long.
#[derive(Debug, Clone)]
pub struct AgentTimeouts {
    /// Connecting (and the hybrid vsock handshake) when a call finds no open connection.
    pub connect: Duration,
    /// A whole GetMetrics call, connection included.
    pub metrics: Duration,
    /// Any other call, connection included.
    pub request: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        AgentTimeouts {
            connect: Duration::from_secs(1),
            metrics: Duration::from_secs(1),
            request: Duration::from_secs(30),
        }
    }
}

/// ttrpc's own deadline is set this much later than ours, so that ours fires first and the failure
/// reads as a timeout rather than as an RPC error.
const RPC_DEADLINE_MARGIN: Duration = Duration::from_millis(200);

/// Where a client reports how long each call took: a histogram in milliseconds with one `action`
/// label (the shim's `kata_shim_agent_rpc_durations_histogram_milliseconds`).
#[derive(Clone)]
pub struct RpcDurations(pub HistogramVec);

impl std::fmt::Debug for RpcDurations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcDurations")
    }
}

#[derive(Clone)]
struct AgentConnection {
    agent: AgentServiceClient,
    health: HealthClient,
}

pub struct AgentClient {
    url: AgentUrl,
    timeouts: AgentTimeouts,
    /// Where each call's latency goes, by action (`grpc.<Name>Request`), if anywhere.
    durations: Option<RpcDurations>,
    connection: Mutex<Option<AgentConnection>>,
}

impl AgentClient {
    pub fn new(url: AgentUrl, timeouts: AgentTimeouts) -> Self {
        AgentClient {
            url,
            timeouts,
            durations: None,
            connection: Mutex::new(None),
        }
    }

    /// Reports every call's latency to `durations`.
    pub fn with_durations(mut self, durations: Option<RpcDurations>) -> Self {
        self.durations = durations;
        self
    }

    pub(crate) fn url(&self) -> &AgentUrl {
        &self.url
    }

    /// One health check; succeeds only if the agent says it is serving.
    pub async fn serving(&self) -> Result<(), AgentError> {
        let reply = self.check(health::CheckRequest::new()).await?;
        match reply.status.enum_value() {
            Ok(health::health_check_response::ServingStatus::SERVING) => Ok(()),
            other => Err(AgentError::NotServing {
                url: self.url.to_string(),
                status: format!("{other:?}"),
            }),
        }
    }

    /// Forgets the current connection; the next call opens a new one.
    pub(crate) async fn disconnect(&self) {
        self.connection.lock().await.take();
    }

    /// Runs one agent call: connects if needed, bounds the whole call by `timeout` (`None`: only
    /// connecting is bounded, for calls that block until something happens in the guest), records
    /// its latency under `action`, and drops the connection after a failure that may have broken it.
    async fn call<T, F, Fut>(
        &self,
        action: &'static str,
        timeout: Option<Duration>,
        rpc: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(AgentConnection, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        // Recorded when dropped: a call cut short by its caller still counts.
        let _timer = CallTimer {
            durations: self.durations.as_ref(),
            action,
            started: Instant::now(),
        };
        let attempt = async {
            let conn = self
                .connect(timeout.unwrap_or(self.timeouts.connect))
                .await?;
            // No ttrpc deadline at all for blocking calls: the agent would otherwise cut them short.
            let ctx = timeout.map_or_else(ttrpc::context::Context::default, |t| {
                ttrpc::context::with_duration(t + RPC_DEADLINE_MARGIN)
            });
            rpc(conn, ctx).await.map_err(|source| AgentError::Rpc {
                action,
                url: self.url.to_string(),
                source,
            })
        };
        let result = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(AgentError::Timeout {
                        action,
                        url: self.url.to_string(),
                        timeout,
                    })
                }),
            None => attempt.await,
        };
        if let Err(err) = &result {
            if err.breaks_connection() {
                self.disconnect().await;
            }
        }
        result
    }

    async fn connect(&self, timeout: Duration) -> Result<AgentConnection, AgentError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let socket = transport::connect(&self.url, self.timeouts.connect.min(timeout)).await?;
        let client = ttrpc::asynchronous::Client::new(socket);
        let conn = AgentConnection {
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// Observes one call's latency when it ends, however it ends.
struct CallTimer<'a> {
    durations: Option<&'a RpcDurations>,
    action: &'static str,
    started: Instant,
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        if let Some(RpcDurations(histogram)) = self.durations {
            histogram
                .with_label_values(&[self.action])
                .observe(self.started.elapsed().as_secs_f64() * 1000.0);
        }
    }
}
