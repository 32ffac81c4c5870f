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

    pub async fn create_sandbox(&self, req: agent::CreateSandboxRequest) -> Result<(), AgentError> {
        self.call(
            "create_sandbox",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.create_sandbox(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.call(
            "destroy_sandbox",
            self.timeouts.request,
            |conn, ctx| async move {
                conn.agent
                    .destroy_sandbox(ctx, &agent::DestroySandboxRequest::new())
                    .await
            },
        )
        .await
        .map(drop)
    }

    /// Prepares the container (everything but exec'ing its program); `OCI.Root.Path` must be the
    /// rootfs path inside the guest.
    pub async fn create_container(
        &self,
        req: agent::CreateContainerRequest,
    ) -> Result<(), AgentError> {
        self.call(
            "create_container",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.create_container(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = container_id.to_string();
        self.call(
            "start_container",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.start_container(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    /// Kills the container if it runs and forgets it; the agent waits up to `timeout_secs` (0: no
    /// bound) for the exit, and the call's own deadline is that plus the request deadline.
    pub async fn remove_container(
        &self,
        container_id: &str,
        timeout_secs: u32,
    ) -> Result<(), AgentError> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = container_id.to_string();
        req.timeout = timeout_secs;
        let deadline = self.timeouts.request + Duration::from_secs(timeout_secs.into());
        self.call("remove_container", deadline, |conn, ctx| async move {
            conn.agent.remove_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// The container's resource usage measured in the guest (cgroup and network figures).
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, AgentError> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = container_id.to_string();
        self.call(
            "stats_container",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.stats_container(ctx, &req).await },
        )
        .await
    }

    pub async fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<(), AgentError> {
        self.call(
            "exec_process",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.exec_process(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    /// Signals the process; signalling one that already exited succeeds.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), AgentError> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        req.signal = signal;
        self.call(
            "signal_process",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.signal_process(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    /// Blocks until the process exits: its exit code, or 128 + N when signal N killed it.
    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        let reply = self
            .call_unbounded("wait_process", |conn, ctx| async move {
                conn.agent.wait_process(ctx, &req).await
            })
            .await?;
        Ok(reply.status)
    }

    /// Up to `len` bytes of the process's stdout, waiting for data; empty means EOF.
    pub async fn read_stdout(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, AgentError> {
        let req = read_request(container_id, exec_id, len);
        let reply = self
            .call_unbounded("read_stdout", |conn, ctx| async move {
                conn.agent.read_stdout(ctx, &req).await
            })
            .await?;
        Ok(reply.data)
    }

    /// Like [`read_stdout`](Self::read_stdout); a terminal process's stderr is at EOF at once.
    pub async fn read_stderr(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, AgentError> {
        let req = read_request(container_id, exec_id, len);
        let reply = self
            .call_unbounded("read_stderr", |conn, ctx| async move {
                conn.agent.read_stderr(ctx, &req).await
            })
            .await?;
        Ok(reply.data)
    }

    /// Writes all of `data` to the process's stdin; the number of bytes written.
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<u32, AgentError> {
        let mut req = agent::WriteStreamRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        req.data = data;
        let reply = self
            .call(
                "write_stdin",
                self.timeouts.request,
                |conn, ctx| async move { conn.agent.write_stdin(ctx, &req).await },
            )
            .await?;
        Ok(reply.len)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        self.call(
            "close_stdin",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.close_stdin(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let mut req = agent::TtyWinResizeRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        req.row = rows;
        req.column = columns;
        self.call(
            "tty_win_resize",
            self.timeouts.request,
            |conn, ctx| async move { conn.agent.tty_win_resize(ctx, &req).await },
        )
        .await
        .map(drop)
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
        self.call_with(action, Some(timeout), rpc).await
    }

    /// Like [`call`](Self::call) without a deadline (only connecting is bounded), for calls that
    /// block until something happens in the guest: WaitProcess, ReadStdout, ReadStderr.
    pub async fn call_unbounded<T, F, Fut>(
        &self,
        action: &'static str,
        rpc: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(AgentConnection, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        self.call_with(action, None, rpc).await
    }

    async fn call_with<T, F, Fut>(
        &self,
        action: &'static str,
        timeout: Option<Duration>,
        rpc: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(AgentConnection, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let started = Instant::now();
        let attempt = async {
            let conn = self
                .connect(timeout.unwrap_or(self.timeouts.connect))
                .await?;
            // ttrpc's own deadline is set a little later, so that ours fires first and the
            // failure reads as a timeout rather than as an RPC error. No deadline at all for
            // blocking calls: the agent would otherwise cut them short.
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

fn read_request(container_id: &str, exec_id: &str, len: u32) -> agent::ReadStreamRequest {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = container_id.to_string();
    req.exec_id = exec_id.to_string();
    req.len = len;
    req
}

impl AgentError {
    /// The status code the agent answered with, if the call got that far (e.g. NOT_FOUND).
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => status.code.enum_value().ok(),
            _ => None,
        }
    }

    /// The agent's own error message, if it answered with a status.
    pub fn message(&self) -> Option<&str> {
        match self {
            AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(&status.message),
            _ => None,
        }
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
