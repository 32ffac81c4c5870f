//! The shim's `/metrics/cadvisor`: cAdvisor's `container_*` series for each container of the
//! sandbox, measured in the guest and labelled as kubelet labels a runc container's, so that the
//! dashboards and rules built on kubelet's cAdvisor series see a VM pod's containers.
//!
//! - [`book`]: the containers and their kubelet labels, from their OCI specs (host data);
//! - [`guest`]: the agent's StatsContainers answer, checked (guest data);
//! - [`families`]: the series.
//!
//! One StatsContainers call per scrape, under the agent's metrics deadline, whatever the number
//! of containers.

pub(crate) mod book;
mod families;
mod guest;

use std::sync::Arc;
use std::time::SystemTime;

pub use book::ContainerBook;
pub(crate) use book::ContainerCard;

use crate::agent_client::AgentClient;
use crate::metrics::exposition::encode;
use crate::mgmt::server::MetricsSource;
use crate::protocols::agent;

pub(crate) struct CadvisorSource {
    pub(crate) sandbox_id: String,
    pub(crate) agent: Arc<AgentClient>,
    pub(crate) book: Arc<ContainerBook>,
}

#[async_trait::async_trait]
impl MetricsSource for CadvisorSource {
    /// The containers' series; none (an empty body) when the agent did not answer in time, so a
    /// scrape never waits past the deadline nor shows figures that are not the guest's.
    async fn render(&self) -> String {
        let page = self.book.page();
        if page.containers.is_empty() {
            return String::new();
        }
        let asked: Vec<String> = page.containers.keys().cloned().collect();
        let request = agent::StatsContainersRequest {
            container_ids: asked.clone(),
            ..Default::default()
        };
        let reply = match self.agent.stats_containers(request).await {
            Ok(reply) => reply,
            Err(err) => {
                tracing::debug!(sandbox = %self.sandbox_id, %err, "no container stats for /metrics/cadvisor");
                return String::new();
            }
        };
        let figures = guest::check(&reply, &asked);
        let families = families::build(&page, &self.sandbox_id, &figures, SystemTime::now());
        let mut out = String::with_capacity(16 * 1024);
        encode(&families, &mut out);
        out
    }
}
