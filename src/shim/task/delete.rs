//! Delete and Shutdown: a deleted exec is only forgotten; a deleted container is removed from the
//! VM and its rootfs unshared; Shutdown, once no container is left, stops the sandbox and the shim.

use std::time::SystemTime;

use containerd_shim::api::{DeleteRequest, DeleteResponse, Empty, Status};
use containerd_shim::protos::events::task::TaskDelete;
use containerd_shim::protos::topics;

use super::error::{ProcessName, TaskError};
use super::{lock, TaskService};
use crate::protocols::agent;
use crate::shim::container::Exit;
use crate::shim::events::timestamp;
use crate::shim::rootfs;
use crate::shim::sandbox;

/// Seconds the agent gives a container's processes to die on RemoveContainer.
const REMOVE_TIMEOUT_SECS: u32 = 5;

impl TaskService {
    pub(super) async fn delete_process(
        &self,
        req: DeleteRequest,
    ) -> Result<DeleteResponse, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let exit = match process.status() {
            Status::RUNNING => {
                return Err(TaskError::StillRunning {
                    process: ProcessName::of(&container, &process),
                })
            }
            // Never started: nothing will report an exit, so the delete does.
            _ => process.exit().unwrap_or(Exit {
                status: 0,
                at: SystemTime::now(),
            }),
        };
        process.set_exit(exit);
        let deleted = DeleteResponse {
            pid: container.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        };
        if !process.is_init() {
            // Like runc's shim: an exec's delete only forgets it, and publishes no TaskDelete.
            container.remove_exec(&process.exec_id);
            return Ok(deleted);
        }
        let remove = agent::RemoveContainerRequest::of(&req.id, REMOVE_TIMEOUT_SECS);
        if let Err(err) = container.agent.remove_container(remove).await {
            // The VM may already be gone; the host side is cleaned up regardless.
            tracing::warn!(container = req.id, "RemoveContainer: {err}");
        }
        rootfs::unshare(Some(&container.bundle), &container.shared_dir, &req.id);
        lock(&self.containers).remove(&req.id);

        self.events
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id,
                    pid: container.pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(deleted)
    }

    pub(super) async fn shut_down(&self) -> Result<Empty, TaskError> {
        if !lock(&self.containers).is_empty() {
            // Other containers of the sandbox still run here.
            return Ok(Empty::new());
        }
        // The teardown runs on its own task: ttrpc drops a handler at containerd's deadline (a few
        // seconds), and a teardown cut short would leave the VM running and the shim alive.
        let slot = self.sandbox.clone();
        let exit = self.exit.clone();
        tokio::spawn(async move {
            sandbox::stop_in(&slot).await;
            exit.signal();
        });
        Ok(Empty::new())
    }
}
