//! The agent's ttrpc services (`grpc.AgentService`, `grpc.Health`) and the server that listens for them.

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::asynchronous::{Server, TtrpcContext};

use super::url::AgentUrl;
use crate::metrics::agent::AgentMetrics;
use crate::protocols::{agent, agent_ttrpc, health, health_ttrpc};

pub struct AgentService {
    metrics: AgentMetrics,
}

impl AgentService {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(AgentService {
            metrics: AgentMetrics::new()?,
        })
    }
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
}

pub struct HealthService;

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
