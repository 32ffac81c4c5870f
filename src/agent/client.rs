//! The shim's client of the guest agent: one lazily opened ttrpc connection, a deadline on every
//! call, latency recorded per request type, and a fresh connection after the old one failed.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::transport::{self, TransportError};
use super::url::AgentUrl;
use crate::metrics::registry::AGENT_RPC_DURATIONS;
use crate::protocols::agent_ttrpc::AgentServiceClient;
use crate::protocols::health_ttrpc::HealthClient;
use crate::protocols::{agent, health};

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

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("agent call {action} to {url} did not finish within {timeout:?}")]
    Timeout {
        action: &'static str,
        url: String,
        timeout: Duration,
    },
    #[error("agent call {action} to {url} failed: {source}")]
    Rpc {
        action: &'static str,
        url: String,
        source: ttrpc::Error,
    },
    #[error("agent at {url} reports it is not serving (health status {status})")]
    NotServing { url: String, status: String },
}

impl AgentError {
    /// A short label for counting failures.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::Transport(TransportError::Timeout { .. }) | AgentError::Timeout { .. } => {
                "timeout"
            }
            AgentError::Transport(_) => "connect",
            AgentError::Rpc { .. } => "rpc",
            AgentError::NotServing { .. } => "not_serving",
        }
    }
}

const RPC_DEADLINE_MARGIN: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct AgentConnection {
    pub agent: AgentServiceClient,
    pub health: HealthClient,
}

pub struct AgentClient {
    url: AgentUrl,
    timeouts: AgentTimeouts,
    connection: Mutex<Option<AgentConnection>>,
}

impl AgentClient {
    pub fn new(url: AgentUrl, timeouts: AgentTimeouts) -> Self {
        AgentClient {
            url,
            timeouts,
            connection: Mutex::new(None),
        }
    }

    pub fn url(&self) -> &AgentUrl {
        &self.url
    }

    pub fn timeouts(&self) -> &AgentTimeouts {
        &self.timeouts
    }

    /// The agent's Prometheus text, within the metrics deadline.
    pub async fn get_metrics(&self) -> Result<String, AgentError> {
        let timeout = self.timeouts.metrics;
        let reply = self
            .call("grpc.GetMetricsRequest", timeout, |conn, ctx| async move {
                conn.agent
                    .get_metrics(ctx, &agent::GetMetricsRequest::new())
                    .await
            })
            .await?;
        Ok(reply.metrics)
    }

    /// One health check within `timeout`; succeeds only if the agent says it is serving.
    pub async fn check(&self, timeout: Duration) -> Result<(), AgentError> {
        let reply = self
            .call("grpc.CheckRequest", timeout, |conn, ctx| async move {
                conn.health.check(ctx, &health::CheckRequest::new()).await
            })
            .await?;
        match reply.status.enum_value() {
            Ok(health::health_check_response::ServingStatus::SERVING) => Ok(()),
            other => Err(AgentError::NotServing {
                url: self.url.to_string(),
                status: format!("{other:?}"),
            }),
        }
    }

    /// Health checks until one succeeds or `timeout` runs out (a booting VM's agent is not up yet).
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.min(self.timeouts.connect.max(Duration::from_millis(500)));
            let err = match self.check(attempt).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() + pause >= deadline {
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Runs one agent call: connects if needed, bounds the whole call by `timeout`, records its
    /// latency under `action`, and drops the connection after a failure that may have broken it.
    pub async fn call<T, F, Fut>(
        &self,
        action: &'static str,
        timeout: Duration,
        rpc: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(AgentConnection, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            let conn = self.connect(timeout).await?;
            // ttrpc's own deadline is set a little later, so that ours fires first and the
            // failure reads as a timeout rather than as an RPC error.
            let ctx = ttrpc::context::with_duration(timeout + RPC_DEADLINE_MARGIN);
            rpc(conn, ctx).await.map_err(|source| AgentError::Rpc {
                action,
                url: self.url.to_string(),
                source,
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(AgentError::Timeout {
                action,
                url: self.url.to_string(),
                timeout,
            })
        });
        AGENT_RPC_DURATIONS
            .with_label_values(&[action])
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        if let Err(err) = &result {
            if breaks_connection(err) {
                self.disconnect().await;
            }
        }
        result
    }

    /// Forgets the current connection; the next call opens a new one.
    pub async fn disconnect(&self) {
        self.connection.lock().await.take();
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

/// A status the agent sent back leaves the connection usable; anything else may not.
fn breaks_connection(err: &AgentError) -> bool {
    !matches!(
        err,
        AgentError::Rpc {
            source: ttrpc::Error::RpcStatus(_),
            ..
        } | AgentError::NotServing { .. }
    )
}
