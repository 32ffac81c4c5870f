//! Acting on a started process: Kill (a signal through the agent), CloseIO (end its stdin),
//! ResizePty (its terminal's size) and Update (its container's limits, in the guest).

use containerd_shim::api::{
    CloseIORequest, Empty, KillRequest, ResizePtyRequest, Status, UpdateTaskRequest,
};

use super::error::{ProcessName, TaskError};
use super::TaskService;
use crate::protocols::agent;
use crate::shim::oci;
use crate::shim::vm_fate::VmLoss;
use crate::shim::waiter;

const SIGKILL: u32 = 9;
/// How long a SIGKILL of the sandbox's container waits for the agent before it stops the VM.
const FORCED_KILL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

impl TaskService {
    pub(super) async fn kill_process(&self, req: KillRequest) -> Result<Empty, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let name = || ProcessName::of(&container, &process);
        match process.status() {
            Status::STOPPED => return Err(TaskError::AlreadyFinished { process: name() }),
            // The guest has no such process before Start.
            Status::CREATED if !process.is_init() => {
                return Err(TaskError::NotStarted { process: name() })
            }
            _ => {}
        }
        let signal = agent::SignalProcessRequest::of(&req.id, &process.exec_id, req.signal);
        let sent = container.agent.signal_process(signal);
        // SIGKILL of the sandbox's own container may not wait on the guest: it has a deadline of
        // its own and, with the agent unreachable (a frozen or broken guest), stops the VM.
        let forced = req.signal == SIGKILL && process.is_init() && container.id == self.shim_id;
        if !forced {
            sent.await.map_err(|source| TaskError::Signal {
                process: name(),
                source: Box::new(source),
            })?;
            return Ok(Empty::new());
        }
        let failure = match tokio::time::timeout(FORCED_KILL_DEADLINE, sent).await {
            Ok(Ok(_)) => return Ok(Empty::new()),
            // The agent answered (e.g. the process is gone already): nothing to force.
            Ok(Err(source)) if source.code().is_some() => {
                return Err(TaskError::Signal {
                    process: name(),
                    source: Box::new(source),
                })
            }
            Ok(Err(source)) => source.to_string(),
            Err(_) => format!("no answer within {FORCED_KILL_DEADLINE:?}"),
        };
        if let Some(sandbox) = self.sandbox.lock().await.as_mut() {
            sandbox
                .lose_vm(VmLoss {
                    reason: format!("SIGKILL while the agent cannot be reached ({failure})"),
                    killed: true,
                })
                .await;
        }
        Ok(Empty::new())
    }

    pub(super) async fn close_process_io(&self, req: CloseIORequest) -> Result<Empty, TaskError> {
        let (_, process) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            // Let the copy finish what the FIFO still holds; it closes stdin in the guest at EOF.
            if let Some(copy) = process.take_stdin_copy() {
                tokio::spawn(async move {
                    let abort = copy.abort_handle();
                    if tokio::time::timeout(waiter::DRAIN_TIMEOUT, copy)
                        .await
                        .is_err()
                    {
                        abort.abort();
                    }
                });
            }
        }
        Ok(Empty::new())
    }

    /// CRI's UpdateContainerResources: containerd sends the new OCI `LinuxResources` as JSON.
    pub(super) async fn update_resources(
        &self,
        req: UpdateTaskRequest,
    ) -> Result<Empty, TaskError> {
        let container = self.container(&req.id)?;
        let bad = |what: String| TaskError::BadResources {
            id: req.id.clone(),
            what,
        };
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| bad("the request has no resources".to_string()))?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| {
                bad(format!(
                    "{} is not OCI LinuxResources JSON: {e}",
                    any.type_url
                ))
            })?;
        let update = agent::UpdateContainerRequest {
            container_id: req.id.clone(),
            resources: Some(oci::agent_resources(&resources)).into(),
            ..Default::default()
        };
        container
            .agent
            .update_container(update)
            .await
            .map_err(|source| TaskError::UpdateResources {
                id: req.id.clone(),
                source: Box::new(source),
            })?;
        Ok(Empty::new())
    }

    pub(super) async fn resize_process_pty(
        &self,
        req: ResizePtyRequest,
    ) -> Result<Empty, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let resize =
            agent::TtyWinResizeRequest::of(&req.id, &process.exec_id, req.height, req.width);
        container
            .agent
            .tty_win_resize(resize)
            .await
            .map_err(|source| TaskError::ResizePty {
                process: ProcessName::of(&container, &process),
                source: Box::new(source),
            })?;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_container, add_exec, add_running_container, ctx, exited, refusal, service, NO_AGENT,
        NO_AGENT_ERROR,
    };
    use super::*;

    fn kill(id: &str, exec_id: &str) -> KillRequest {
        KillRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: 9,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn killing_what_does_not_exist_is_not_found() {
        let (shim, _) = service();
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c9", "")).await),
            (Code::NOT_FOUND, r#"container "c9" not found"#.to_string())
        );
        add_running_container(&shim, "c1");
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c1", "e9")).await),
            (
                Code::NOT_FOUND,
                r#"process "e9" of container "c1" not found"#.to_string()
            )
        );
    }

    #[tokio::test]
    async fn a_process_that_finished_cannot_be_killed() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        let e1 = add_exec(&c1, "e1");
        e1.mark_started();
        exited(&e1, 0);
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c1", "e1")).await),
            (
                Code::NOT_FOUND,
                r#"exec "e1" of container "c1" already finished"#.to_string()
            )
        );
        exited(&c1.init, 137);
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c1", "")).await),
            (
                Code::NOT_FOUND,
                r#"container "c1" already finished"#.to_string()
            )
        );
    }

    #[tokio::test]
    async fn an_exec_not_started_yet_cannot_be_killed() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        add_exec(&c1, "e1");
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c1", "e1")).await),
            (
                Code::FAILED_PRECONDITION,
                r#"exec "e1" of container "c1" was not started"#.to_string()
            )
        );
    }

    #[tokio::test]
    async fn signals_for_a_created_or_running_process_go_to_the_agent() {
        let (shim, _) = service();
        // The guest already has a created container's init, so the signal is the agent's to judge.
        add_container(&shim, "c1", NO_AGENT);
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c1", "")).await),
            (
                Code::INTERNAL,
                format!(r#"signalling container "c1": {NO_AGENT_ERROR}"#)
            )
        );
        let c2 = add_running_container(&shim, "c2");
        add_exec(&c2, "e1").mark_started();
        assert_eq!(
            refusal(shim.kill(&ctx(), kill("c2", "e1")).await),
            (
                Code::INTERNAL,
                format!(r#"signalling exec "e1" of container "c2": {NO_AGENT_ERROR}"#)
            )
        );
    }

    #[tokio::test]
    async fn resources_must_be_oci_json_and_go_to_the_agent() {
        use protobuf::well_known_types::any::Any;
        let (shim, _) = service();
        add_running_container(&shim, "c1");
        let update = |value: &str| UpdateTaskRequest {
            id: "c1".to_string(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                    .to_string(),
                value: value.as_bytes().to_vec(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let (code, message) = refusal(shim.update(&ctx(), update("{not json")).await);
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert!(
            message.starts_with(r#"updating the resources of "c1": types.containerd.io/opencontainers/runtime-spec/1/LinuxResources is not OCI LinuxResources JSON"#),
            "{message}"
        );
        assert_eq!(
            refusal(
                shim.update(&ctx(), update(r#"{"memory": {"limit": 1048576}}"#))
                    .await
            ),
            (
                Code::INTERNAL,
                format!(r#"updating the resources of "c1": {NO_AGENT_ERROR}"#)
            )
        );
    }

    #[tokio::test]
    async fn a_terminal_the_agent_cannot_resize_is_internal() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        add_exec(&c1, "e1").mark_started();
        let resize = ResizePtyRequest {
            id: "c1".to_string(),
            exec_id: "e1".to_string(),
            width: 80,
            height: 24,
            ..Default::default()
        };
        assert_eq!(
            refusal(shim.resize_pty(&ctx(), resize).await),
            (
                Code::INTERNAL,
                format!(
                    r#"resizing the terminal of exec "e1" of container "c1": {NO_AGENT_ERROR}"#
                )
            )
        );
    }

    #[tokio::test]
    async fn closing_stdin_needs_the_process_and_nothing_else() {
        let (shim, _) = service();
        let close = |exec_id: &str| CloseIORequest {
            id: "c1".to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
            ..Default::default()
        };
        assert_eq!(
            refusal(shim.close_io(&ctx(), close("")).await),
            (Code::NOT_FOUND, r#"container "c1" not found"#.to_string())
        );
        add_running_container(&shim, "c1");
        // A process without stdin has no copy to end.
        shim.close_io(&ctx(), close("")).await.expect("close_io");
    }
}
