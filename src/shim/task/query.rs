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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use containerd_shim::api::Status;
    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_exec, add_running_container, ctx, exited, refusal, service, NO_AGENT_ERROR, VMM_PID,
    };
    use super::*;

    #[tokio::test]
    async fn the_state_of_an_exec_that_ended_says_how() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        let e1 = add_exec(&c1, "e1");
        e1.mark_started();
        exited(&e1, 3);
        let state = StateRequest {
            id: "c1".to_string(),
            exec_id: "e1".to_string(),
            ..Default::default()
        };
        let state = shim.state(&ctx(), state).await.expect("state");
        assert_eq!(state.id, "c1");
        assert_eq!(state.exec_id, "e1");
        assert_eq!(state.bundle, "/nonexistent/bundle/c1");
        assert_eq!(state.pid, VMM_PID);
        assert_eq!(state.status.enum_value(), Ok(Status::STOPPED));
        assert_eq!(state.exit_status, 3);
        assert!(state.exited_at.is_some());
    }

    #[tokio::test]
    async fn queries_about_an_unknown_task_are_not_found() {
        let (shim, _) = service();
        let state = StateRequest {
            id: "c9".to_string(),
            ..Default::default()
        };
        let pids = PidsRequest {
            id: "c9".to_string(),
            ..Default::default()
        };
        let stats = StatsRequest {
            id: "c9".to_string(),
            ..Default::default()
        };
        let not_found = (Code::NOT_FOUND, r#"container "c9" not found"#.to_string());
        assert_eq!(refusal(shim.state(&ctx(), state).await), not_found);
        assert_eq!(refusal(shim.pids(&ctx(), pids).await), not_found);
        assert_eq!(refusal(shim.stats(&ctx(), stats).await), not_found);
        add_running_container(&shim, "c1");
        let wait = WaitRequest {
            id: "c1".to_string(),
            exec_id: "e9".to_string(),
            ..Default::default()
        };
        assert_eq!(
            refusal(shim.wait(&ctx(), wait).await),
            (
                Code::NOT_FOUND,
                r#"process "e9" of container "c1" not found"#.to_string()
            )
        );
    }

    #[tokio::test]
    async fn wait_answers_with_the_recorded_exit() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        let wait = WaitRequest {
            id: "c1".to_string(),
            ..Default::default()
        };
        let context = ctx();
        let waiting = shim.wait(&context, wait);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err(), "no answer before the exit");
        exited(&c1.init, 137);
        let exit = waiting.await.expect("wait");
        assert_eq!(exit.exit_status, 137);
    }

    #[tokio::test]
    async fn the_host_sees_the_vmm_as_the_tasks_process() {
        let (shim, _) = service();
        add_running_container(&shim, "c1");
        let pids = PidsRequest {
            id: "c1".to_string(),
            ..Default::default()
        };
        let pids = shim.pids(&ctx(), pids).await.expect("pids");
        let pids: Vec<u32> = pids.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [VMM_PID]);

        let connect = |id: &str| ConnectRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let known = shim.connect(&ctx(), connect("c1")).await.expect("connect");
        assert_eq!(known.shim_pid, std::process::id());
        assert_eq!(known.task_pid, VMM_PID);
        let unknown = shim.connect(&ctx(), connect("c9")).await.expect("connect");
        assert_eq!(unknown.task_pid, 0);
    }

    #[tokio::test]
    async fn stats_the_agent_cannot_give_are_internal() {
        let (shim, _) = service();
        add_running_container(&shim, "c1");
        let stats = StatsRequest {
            id: "c1".to_string(),
            ..Default::default()
        };
        assert_eq!(
            refusal(shim.stats(&ctx(), stats).await),
            (
                Code::INTERNAL,
                format!(r#"reading the stats of "c1": {NO_AGENT_ERROR}"#)
            )
        );
    }
}
