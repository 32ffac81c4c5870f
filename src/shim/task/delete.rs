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
        self.cadvisor_book.remove(&req.id);

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_exec, add_running_container, ctx, exited, refusal, service, VMM_PID,
    };
    use super::*;

    fn delete(id: &str, exec_id: &str) -> DeleteRequest {
        DeleteRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_running_process_is_not_deleted() {
        let (shim, events) = service();
        let c1 = add_running_container(&shim, "c1");
        add_exec(&c1, "e1").mark_started();
        assert_eq!(
            refusal(shim.delete(&ctx(), delete("c1", "")).await),
            (
                Code::FAILED_PRECONDITION,
                r#"container "c1" is still running"#.to_string()
            )
        );
        assert_eq!(
            refusal(shim.delete(&ctx(), delete("c1", "e1")).await),
            (
                Code::FAILED_PRECONDITION,
                r#"exec "e1" of container "c1" is still running"#.to_string()
            )
        );
        assert!(c1.process("e1").is_some());
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn deleting_what_does_not_exist_is_not_found() {
        let (shim, _) = service();
        assert_eq!(
            refusal(shim.delete(&ctx(), delete("c9", "")).await),
            (Code::NOT_FOUND, r#"container "c9" not found"#.to_string())
        );
    }

    #[tokio::test]
    async fn a_deleted_exec_is_forgotten_quietly() {
        let (shim, events) = service();
        let c1 = add_running_container(&shim, "c1");
        let e1 = add_exec(&c1, "e1");
        e1.mark_started();
        exited(&e1, 2);
        let deleted = shim
            .delete(&ctx(), delete("c1", "e1"))
            .await
            .expect("delete");
        assert_eq!((deleted.pid, deleted.exit_status), (VMM_PID, 2));
        assert!(c1.process("e1").is_none());
        // Never started: deleting it ends it with status 0.
        let e2 = add_exec(&c1, "e2");
        let deleted = shim
            .delete(&ctx(), delete("c1", "e2"))
            .await
            .expect("delete");
        assert_eq!(deleted.exit_status, 0);
        assert_eq!(e2.exit().map(|exit| exit.status), Some(0));
        assert!(events.topics().is_empty(), "no TaskDelete for an exec");
    }

    #[tokio::test]
    async fn a_deleted_container_is_gone_even_when_its_vm_is() {
        let (shim, events) = service();
        let c1 = add_running_container(&shim, "c1");
        exited(&c1.init, 137);
        let deleted = shim.delete(&ctx(), delete("c1", "")).await.expect("delete");
        assert_eq!(deleted.exit_status, 137);
        assert_eq!(
            refusal(shim.delete(&ctx(), delete("c1", "")).await),
            (Code::NOT_FOUND, r#"container "c1" not found"#.to_string())
        );
        let event: TaskDelete = events.only(topics::TASK_DELETE_EVENT_TOPIC);
        assert_eq!(
            (event.container_id.as_str(), event.id.as_str()),
            ("c1", "c1")
        );
        assert_eq!((event.pid, event.exit_status), (VMM_PID, 137));
    }

    #[tokio::test]
    async fn shutdown_ends_the_shim_only_when_no_container_is_left() {
        let (shim, _) = service();
        add_running_container(&shim, "c1");
        shim.shutdown(&ctx(), Default::default())
            .await
            .expect("shutdown");
        let exits = tokio::time::timeout(Duration::from_millis(200), shim.exit.wait()).await;
        assert!(exits.is_err(), "the shim keeps serving c1");

        lock(&shim.containers).clear();
        shim.shutdown(&ctx(), Default::default())
            .await
            .expect("shutdown");
        tokio::time::timeout(Duration::from_secs(5), shim.exit.wait())
            .await
            .expect("the shim exits");
    }
}
