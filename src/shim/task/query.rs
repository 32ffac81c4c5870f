//! What containerd asks about a task: State, Wait, Pids, Stats and Connect.

use containerd_shim::api::{
    ConnectRequest, ConnectResponse, PidsRequest, PidsResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, WaitRequest, WaitResponse,
};
use containerd_shim::protos::types::task::ProcessInfo;

use super::error::TaskError;
use super::{lock, TaskService};
use crate::protocols::agent;
use crate::shim::events::timestamp;
use crate::shim::stats;

impl TaskService {
    pub(super) async fn process_state(
        &self,
        req: StateRequest,
    ) -> Result<StateResponse, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let exit = process.exit();
        Ok(StateResponse {
            id: container.id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: container.pid,
            status: process.status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    /// Answers once the process ended and its output was drained.
    pub(super) async fn wait_process(&self, req: WaitRequest) -> Result<WaitResponse, TaskError> {
        let (_, process) = self.process(&req.id, &req.exec_id)?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    /// The VMM's pid only: the guest's pids mean nothing on the host.
    pub(super) async fn container_pids(&self, req: PidsRequest) -> Result<PidsResponse, TaskError> {
        let container = self.container(&req.id)?;
        Ok(PidsResponse {
            processes: vec![ProcessInfo {
                pid: container.pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    pub(super) async fn connect_task(
        &self,
        req: ConnectRequest,
    ) -> Result<ConnectResponse, TaskError> {
        let task_pid = match lock(&self.containers).get(&req.id) {
            Some(container) => container.pid,
            None => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    pub(super) async fn container_stats(
        &self,
        req: StatsRequest,
    ) -> Result<StatsResponse, TaskError> {
        let container = self.container(&req.id)?;
        let request = agent::StatsContainerRequest::of(&req.id);
        let reply = container
            .agent
            .stats_container(request)
            .await
            .map_err(|source| TaskError::ReadStats {
                id: req.id.clone(),
                source: Box::new(source),
            })?;
        let any = stats::to_any(&reply).map_err(|source| TaskError::EncodeStats {
            id: req.id.clone(),
            source,
        })?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }
}
