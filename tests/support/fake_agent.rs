//! A lying or slow agent for fault injection: serves GetMetrics with whatever text the test chooses.
//! (Everything else is the real agent's job; tests of real behaviour use the real kata-agent.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kata_shim_metrics::protocols::{agent, agent_ttrpc, health, health_ttrpc};
use ttrpc::asynchronous::{Server, TtrpcContext};

pub struct FakeAgent {
    pub text: String,
    pub delay: Duration,
}

#[async_trait]
impl agent_ttrpc::AgentService for FakeAgent {
    async fn get_metrics(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetMetricsRequest,
    ) -> ttrpc::Result<agent::Metrics> {
        tokio::time::sleep(self.delay).await;
        let mut reply = agent::Metrics::new();
        reply.metrics = self.text.clone();
        Ok(reply)
    }
}

struct Healthy;

#[async_trait]
impl health_ttrpc::Health for Healthy {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut reply = health::HealthCheckResponse::new();
        reply.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(reply)
    }
}

/// Serves `agent` on `unix://<socket>` until the returned server is dropped.
pub async fn serve(socket: &Path, agent: FakeAgent) -> (Server, String) {
    let url = format!("unix://{}", socket.display());
    let mut server = Server::new()
        .bind(&url)
        .expect("bind the fake agent")
        .register_service(agent_ttrpc::create_agent_service(Arc::new(agent)))
        .register_service(health_ttrpc::create_health(Arc::new(Healthy)));
    server.start().await.expect("start the fake agent");
    (server, url)
}
