//! Start: the init is started by the agent's StartContainer, an exec'd process by its ExecProcess
//! (which creates and starts it at once). Either way its output is copied to containerd's FIFOs,
//! its stdin from them, and a waiter reports its exit.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::{StartRequest, StartResponse, Status};
use containerd_shim::protos::events::task::{TaskExecStarted, TaskStart};
use containerd_shim::protos::topics;
use tokio::task::JoinHandle;

use super::error::{ProcessName, TaskError};
use super::TaskService;
use crate::protocols::agent;
use crate::shim::container::{Container, Exit, Process};
use crate::shim::stdio::{self, OutStream};
use crate::shim::waiter;

/// The exit status of a process that could not be started (the shell's "cannot execute").
const NOT_STARTED_EXIT: u32 = 127;

impl TaskService {
    pub(super) async fn start_process(
        &self,
        req: StartRequest,
    ) -> Result<StartResponse, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        if process.status() != Status::CREATED {
            return Err(TaskError::AlreadyStarted {
                process: ProcessName::of(&container, &process),
            });
        }
        if process.is_init() {
            self.start_init(container).await
        } else {
            self.start_exec(container, process).await
        }
    }

    async fn start_init(&self, container: Arc<Container>) -> Result<StartResponse, TaskError> {
        // Output readers first, so nothing the process writes early is lost.
        let (out, err) = copy_outputs(&container, &container.init);
        let start = agent::StartContainerRequest::of(&container.id);
        if let Err(source) = container.agent.start_container(start).await {
            out.abort();
            err.abort();
            return Err(TaskError::StartContainer {
                id: container.id.clone(),
                source: Box::new(source),
            });
        }
        self.watch(container.clone(), container.init.clone(), out, err);
        self.events
            .publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: container.id.clone(),
                    pid: container.pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(StartResponse {
            pid: container.pid,
            ..Default::default()
        })
    }

    /// The agent's ExecProcess both creates and starts the process, so it runs here, at Start.
    async fn start_exec(
        &self,
        container: Arc<Container>,
        process: Arc<Process>,
    ) -> Result<StartResponse, TaskError> {
        let exec = agent::ExecProcessRequest {
            container_id: container.id.clone(),
            exec_id: process.exec_id.clone(),
            process: process.spec.clone().into(),
            ..Default::default()
        };
        if let Err(source) = container.agent.exec_process(exec).await {
            // Nothing runs and nothing will report an exit: end waits (runc's shim does too).
            process.set_exit(Exit {
                status: NOT_STARTED_EXIT,
                at: SystemTime::now(),
            });
            return Err(TaskError::StartExec {
                process: ProcessName::of(&container, &process),
                source: Box::new(source),
            });
        }
        // The agent knows the process only now; its output waits in the guest's pipes.
        let (out, err) = copy_outputs(&container, &process);
        self.watch(container.clone(), process.clone(), out, err);
        self.events
            .publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: container.id.clone(),
                    exec_id: process.exec_id.clone(),
                    pid: container.pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(StartResponse {
            pid: container.pid,
            ..Default::default()
        })
    }

    /// A started process: copy its stdin, and have a waiter report its exit.
    fn watch(
        &self,
        container: Arc<Container>,
        process: Arc<Process>,
        out: JoinHandle<()>,
        err: JoinHandle<()>,
    ) {
        process.mark_started();
        process.set_stdin_copy(stdio::copy_input(
            container.agent.clone(),
            container.id.clone(),
            process.exec_id.clone(),
            process.stdio.stdin.clone(),
        ));
        tokio::spawn(waiter::wait_for_exit(
            container,
            process,
            self.events.clone(),
            out,
            err,
        ));
    }
}

/// Copies the process's stdout and stderr to containerd's FIFOs.
fn copy_outputs(container: &Container, process: &Process) -> (JoinHandle<()>, JoinHandle<()>) {
    let copy = |stream, path: &str| {
        stdio::copy_output(
            container.agent.clone(),
            container.id.clone(),
            process.exec_id.clone(),
            stream,
            path.to_string(),
        )
    };
    (
        copy(OutStream::Stdout, &process.stdio.stdout),
        copy(OutStream::Stderr, &process.stdio.stderr),
    )
}

#[cfg(test)]
mod tests {
    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_container, add_exec, add_running_container, ctx, exited, refusal, refusing_agent,
        service, NO_AGENT, NO_AGENT_ERROR,
    };
    use super::*;

    fn start(id: &str, exec_id: &str) -> StartRequest {
        StartRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn starting_what_does_not_exist_is_not_found() {
        let (shim, _) = service();
        assert_eq!(
            refusal(shim.start(&ctx(), start("c9", "")).await),
            (Code::NOT_FOUND, r#"container "c9" not found"#.to_string())
        );
        add_container(&shim, "c1", NO_AGENT);
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "e9")).await),
            (
                Code::NOT_FOUND,
                r#"process "e9" of container "c1" not found"#.to_string()
            )
        );
    }

    #[tokio::test]
    async fn a_process_starts_only_once() {
        let (shim, events) = service();
        let c1 = add_running_container(&shim, "c1");
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "")).await),
            (
                Code::FAILED_PRECONDITION,
                r#"container "c1" was already started"#.to_string()
            )
        );
        // An exec that ran and ended is not started again either.
        let e1 = add_exec(&c1, "e1");
        exited(&e1, 0);
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "e1")).await),
            (
                Code::FAILED_PRECONDITION,
                r#"exec "e1" of container "c1" was already started"#.to_string()
            )
        );
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn an_init_the_agent_cannot_start_stays_created() {
        let (shim, events) = service();
        let c1 = add_container(&shim, "c1", NO_AGENT);
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "")).await),
            (
                Code::INTERNAL,
                format!(r#"starting container "c1" in the VM: {NO_AGENT_ERROR}"#)
            )
        );
        assert_eq!(c1.init.status(), Status::CREATED);
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn an_exec_the_agent_refuses_ends_with_127_and_the_agents_code_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let missing = r#"exec: "nope": executable file not found in $PATH"#;
        let (_agent, url) = refusing_agent(
            &dir.path().join("agent.sock"),
            Code::INVALID_ARGUMENT,
            missing,
        )
        .await;
        let (shim, events) = service();
        let c1 = add_container(&shim, "c1", &url);
        c1.init.mark_started();
        let e1 = add_exec(&c1, "e1");
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "e1")).await),
            (
                Code::INVALID_ARGUMENT,
                format!(r#"starting exec "e1" of container "c1": {missing}"#)
            )
        );
        // Waits end: nothing runs that could report an exit later.
        assert_eq!(e1.exit().map(|exit| exit.status), Some(127));
        assert_eq!(e1.status(), Status::STOPPED);
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn an_exec_the_agent_cannot_be_reached_for_is_internal() {
        let (shim, _) = service();
        let c1 = add_running_container(&shim, "c1");
        let e1 = add_exec(&c1, "e1");
        assert_eq!(
            refusal(shim.start(&ctx(), start("c1", "e1")).await),
            (
                Code::INTERNAL,
                format!(r#"starting exec "e1" of container "c1": {NO_AGENT_ERROR}"#)
            )
        );
        assert_eq!(e1.exit().map(|exit| exit.status), Some(127));
    }
}
