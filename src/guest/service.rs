//! The agent's ttrpc services (`grpc.AgentService`, `grpc.Health`) and the server that listens for them.

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ttrpc::asynchronous::{Server, TtrpcContext};

use super::container::cgroup::CgroupRoot;
use super::container::{status, stdio, Containers};
use super::metrics::AgentMetrics;
use super::network::Network;
use super::reaper::Reaper;
use crate::agent::url::AgentUrl;
use crate::protocols::empty::Empty;
use crate::protocols::{agent, agent_ttrpc, health, health_ttrpc, types};

pub struct AgentService {
    metrics: AgentMetrics,
    containers: Arc<Containers>,
    network: Network,
}

impl AgentService {
    /// `reaper` must be the agent's one reaper (see [`Reaper`]): container processes are its
    /// children. `cgroups`: where containers' cgroups go ([`CgroupRoot::detect`]).
    pub fn new(reaper: Reaper, cgroups: CgroupRoot) -> Result<Self, prometheus::Error> {
        Ok(AgentService {
            metrics: AgentMetrics::new()?,
            containers: Arc::new(Containers::new(reaper, cgroups)),
            network: Network::default(),
        })
    }

    /// The containers, e.g. to kill them all when a host agent stops.
    pub fn containers(&self) -> Arc<Containers> {
        self.containers.clone()
    }
}

fn empty() -> Empty {
    Empty::new()
}

fn internal_error(what: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, what))
}

#[async_trait]
impl agent_ttrpc::AgentService for AgentService {
    async fn get_metrics(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetMetricsRequest,
    ) -> ttrpc::Result<agent::Metrics> {
        let text = self
            .metrics
            .render()
            .map_err(|e| internal_error(format!("gathering guest metrics: {e}")))?;
        let mut reply = agent::Metrics::new();
        reply.metrics = text;
        Ok(reply)
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.create_sandbox(&req).await.map(|_| empty())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.destroy_sandbox().await.map(|_| empty())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.create(req).await.map(|_| empty())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .start(&req.container_id)
            .await
            .map(|_| empty())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let timeout = Duration::from_secs(req.timeout.into());
        self.containers
            .remove(&req.container_id, timeout)
            .await
            .map(|_| empty())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let resources = req.resources.into_option().unwrap_or_default();
        self.containers
            .update(&req.container_id, &resources)
            .await
            .map(|_| empty())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        self.containers.stats(&req.container_id).await
    }

    async fn stats_containers(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StatsContainersRequest,
    ) -> ttrpc::Result<agent::StatsContainersResponse> {
        self.containers.stats_many(&req.container_ids).await
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.exec(req).await.map(|_| empty())
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal)
            .map(|_| empty())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        let mut reply = agent::WaitProcessResponse::new();
        reply.status = process.wait().await;
        Ok(reply)
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WriteStreamRequest,
    ) -> ttrpc::Result<agent::WriteStreamResponse> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        let written = stdio::write(&process.stdio.stdin, &req.data)
            .await
            .map_err(|e| stream_error(&req.container_id, "writing stdin", e))?;
        let mut reply = agent::WriteStreamResponse::new();
        reply.len = u32::try_from(written).unwrap_or(u32::MAX);
        Ok(reply)
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        let data = stdio::read(&process.stdio.stdout, req.len)
            .await
            .map_err(|e| stream_error(&req.container_id, "reading stdout", e))?;
        let mut reply = agent::ReadStreamResponse::new();
        reply.data = data;
        Ok(reply)
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        let data = stdio::read(&process.stdio.stderr, req.len)
            .await
            .map_err(|e| stream_error(&req.container_id, "reading stderr", e))?;
        let mut reply = agent::ReadStreamResponse::new();
        reply.data = data;
        Ok(reply)
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        // Dropping the agent's end gives the process EOF (on a pty: only our writer goes away).
        process.stdio.stdin.lock().await.take();
        Ok(empty())
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        self.network.update_interface(&req).await
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        self.network.update_routes(&req).await
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: agent::TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let process = self.containers.process(&req.container_id, &req.exec_id)?;
        let rows = u16::try_from(req.row).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.column).unwrap_or(u16::MAX);
        process.stdio.resize(rows, cols).map_err(|e| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "resizing the terminal of container {:?}: {e}",
                    req.container_id
                ),
            )
        })?;
        Ok(empty())
    }
}

fn stream_error(id: &str, what: &str, err: std::io::Error) -> ttrpc::Error {
    let code = if err.kind() == std::io::ErrorKind::BrokenPipe {
        ttrpc::Code::FAILED_PRECONDITION
    } else {
        ttrpc::Code::INTERNAL
    };
    status(code, format!("{what} of container {id:?}: {err}"))
}

pub(crate) struct HealthService;

#[async_trait]
impl health_ttrpc::Health for HealthService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut reply = health::HealthCheckResponse::new();
        reply.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(reply)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        let mut reply = health::VersionCheckResponse::new();
        reply.agent_version = env!("CARGO_PKG_VERSION").to_string();
        reply.grpc_version = "ttrpc".to_string();
        Ok(reply)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the agent cannot listen on {url}: only vsock:// and unix:// addresses can be served")]
    Unsupported { url: String },
    #[error("listening on {url}: {source}")]
    Listen { url: String, source: ttrpc::Error },
    #[error("setting up the agent's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Starts serving both services on `url`; the returned server runs until dropped or shut down.
pub async fn serve(url: &AgentUrl, service: AgentService) -> Result<Server, ServeError> {
    let listen_err = |source| ServeError::Listen {
        url: url.to_string(),
        source,
    };
    match url {
        AgentUrl::Unix { path } if !path.as_os_str().as_bytes().starts_with(b"@") => {
            // A socket file left by an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
        }
        AgentUrl::Unix { .. } | AgentUrl::Vsock { .. } => {}
        AgentUrl::Hvsock { .. } => {
            return Err(ServeError::Unsupported {
                url: url.to_string(),
            });
        }
    }
    let mut server = Server::new()
        .bind(&url.to_string())
        .map_err(listen_err)?
        .register_service(agent_ttrpc::create_agent_service(Arc::new(service)))
        .register_service(health_ttrpc::create_health(Arc::new(HealthService)));
    server.start().await.map_err(listen_err)?;
    Ok(server)
}
