//! Exec: adds a process to a running container. Only the shim knows it until Start, which has the
//! agent run it; TaskExecAdded tells containerd.

use std::sync::Arc;

use containerd_shim::api::{Empty, ExecProcessRequest, Status};
use containerd_shim::protos::events::task::TaskExecAdded;
use containerd_shim::protos::topics;

use super::error::TaskError;
use super::TaskService;
use crate::shim::container::Process;
use crate::shim::oci;
use crate::shim::stdio::StdioPaths;

impl TaskService {
    pub(super) async fn exec_process(&self, req: ExecProcessRequest) -> Result<Empty, TaskError> {
        let container = self.container(&req.id)?;
        if req.exec_id.is_empty() || req.exec_id == req.id {
            return Err(TaskError::ExecIdNotDistinct);
        }
        if container.init.status() != Status::RUNNING {
            return Err(TaskError::NotRunning { id: req.id });
        }
        let json = req.spec.as_ref().map(|any| any.value.as_slice());
        let mut spec = oci::exec_process(json.unwrap_or_default())?;
        // The FIFOs containerd made follow the request's terminal flag.
        spec.Terminal = req.terminal;
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let process = Arc::new(Process::new(req.exec_id.clone(), stdio, Some(spec)));
        if !container.add_exec(process) {
            return Err(TaskError::ExecExists {
                id: req.id,
                exec_id: req.exec_id,
            });
        }
        self.events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_container, add_running_container, ctx, exited, refusal, service, NO_AGENT,
    };
    use super::*;

    /// Exec `exec_id` in container `id`, running `args` (as containerd sends it: OCI process JSON).
    fn exec(id: &str, exec_id: &str, args: &str) -> ExecProcessRequest {
        let spec = format!(r#"{{"cwd":"/","args":{args},"user":{{"uid":0,"gid":0}}}}"#);
        ExecProcessRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            spec: Some(Any {
                value: spec.into_bytes(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn exec_into_an_unknown_container_is_not_found() {
        let (shim, _) = service();
        assert_eq!(
            refusal(shim.exec(&ctx(), exec("c9", "e1", r#"["sh"]"#)).await),
            (Code::NOT_FOUND, r#"container "c9" not found"#.to_string())
        );
    }

    #[tokio::test]
    async fn an_exec_needs_an_id_of_its_own() {
        let (shim, events) = service();
        add_running_container(&shim, "c1");
        for exec_id in ["", "c1"] {
            assert_eq!(
                refusal(shim.exec(&ctx(), exec("c1", exec_id, r#"["sh"]"#)).await),
                (
                    Code::INVALID_ARGUMENT,
                    "exec needs an exec id other than the container's".to_string()
                ),
                "exec id {exec_id:?}"
            );
        }
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn exec_needs_a_running_container() {
        let (shim, _) = service();
        let c1 = add_container(&shim, "c1", NO_AGENT);
        assert_eq!(
            refusal(shim.exec(&ctx(), exec("c1", "e1", r#"["sh"]"#)).await),
            (
                Code::FAILED_PRECONDITION,
                r#"container "c1" is not running"#.to_string()
            )
        );
        c1.init.mark_started();
        exited(&c1.init, 0);
        assert_eq!(
            refusal(shim.exec(&ctx(), exec("c1", "e1", r#"["sh"]"#)).await),
            (
                Code::FAILED_PRECONDITION,
                r#"container "c1" is not running"#.to_string()
            )
        );
        assert!(c1.process("e1").is_none());
    }

    #[tokio::test]
    async fn an_exec_without_a_program_is_an_invalid_argument() {
        let (shim, _) = service();
        add_running_container(&shim, "c1");
        assert_eq!(
            refusal(shim.exec(&ctx(), exec("c1", "e1", "[]")).await),
            (
                Code::INVALID_ARGUMENT,
                "the exec's OCI process: no args".to_string()
            )
        );
    }

    #[tokio::test]
    async fn an_exec_id_is_added_once_and_announced_once() {
        let (shim, events) = service();
        let c1 = add_running_container(&shim, "c1");
        let mut request = exec("c1", "e1", r#"["sh","-c","true"]"#);
        request.terminal = true;
        shim.exec(&ctx(), request).await.expect("the first exec");
        let e1 = c1.process("e1").expect("e1 added");
        assert_eq!(e1.status(), Status::CREATED);
        let spec = e1.spec.as_ref().expect("the process to run");
        assert_eq!(spec.Args, ["sh", "-c", "true"]);
        assert!(spec.Terminal, "follows the request's terminal flag");

        assert_eq!(
            refusal(shim.exec(&ctx(), exec("c1", "e1", r#"["sh"]"#)).await),
            (
                Code::ALREADY_EXISTS,
                r#"process "e1" of container "c1" already exists"#.to_string()
            )
        );
        let added: TaskExecAdded = events.only(topics::TASK_EXEC_ADDED_EVENT_TOPIC);
        assert_eq!(
            (added.container_id.as_str(), added.exec_id.as_str()),
            ("c1", "e1")
        );
        assert_eq!(events.topics().len(), 1);
    }
}
