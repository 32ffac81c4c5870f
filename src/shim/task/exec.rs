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
