//! Brings up one sandbox's metrics service: the registry's collectors, the scraper over the agent
//! client, and the management server. This is the call the shim makes once its sandbox is up.

use std::path::PathBuf;
use std::sync::Arc;

use super::registry;
use super::scrape::ShimScraper;
use crate::agent_client::AgentClient;
use crate::metrics::exposition::Limits;
use crate::mgmt::server::{MgmtConfig, MgmtError, MgmtServer, MgmtState};
use crate::mgmt::PodIdentity;
use crate::shim::cadvisor::{CadvisorSource, ContainerBook};

pub struct SandboxMetrics {
    pub sandbox_id: String,
    pub namespace: String,
    pub run_dir: PathBuf,
    /// The VMM process, watched by the `kata_hypervisor_*` families.
    pub hypervisor_pid: Option<i32>,
    /// The VM's vsock daemon (hybrid vsock), part of the pod's host cost.
    pub vsock_daemon_pid: Option<i32>,
    pub agent: Arc<AgentClient>,
    /// Bounds on the agent's metrics text.
    pub agent_text_limits: Limits,
    pub abstract_socket: bool,
    /// Pod labels for kata-monitor (see [`super::pod_identity_from_annotations`]).
    pub pod: Option<PodIdentity>,
    /// The sandbox's containers, for `/metrics/cadvisor` (empty: no container series).
    pub containers: Arc<ContainerBook>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("registering the sandbox's metric collectors: {0}")]
    Registry(#[from] prometheus::Error),
    #[error(transparent)]
    Server(#[from] MgmtError),
}

pub async fn start(sandbox: SandboxMetrics) -> Result<MgmtServer, LaunchError> {
    registry::register_shim_collectors()?;
    if let Some(pid) = sandbox.hypervisor_pid {
        registry::register_hypervisor(pid)?;
    }
    registry::set_vsock_daemon(sandbox.vsock_daemon_pid);
    let state = Arc::new(MgmtState {
        agent_url: sandbox.agent.url().to_string(),
        metrics: Box::new(ShimScraper::new(
            sandbox.agent.clone(),
            sandbox.agent_text_limits,
        )),
        pod: sandbox.pod,
        cadvisor: Some(Box::new(CadvisorSource {
            sandbox_id: sandbox.sandbox_id.clone(),
            agent: sandbox.agent.clone(),
            book: sandbox.containers,
        })),
    });
    let config = MgmtConfig {
        sandbox_id: sandbox.sandbox_id,
        namespace: sandbox.namespace,
        run_dir: sandbox.run_dir,
        abstract_socket: sandbox.abstract_socket,
    };
    Ok(MgmtServer::start(config, state).await?)
}
