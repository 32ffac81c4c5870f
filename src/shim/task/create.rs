//! Create: the first container boots the sandbox (its VM and agent), every container then gets its
//! rootfs shared with the VM and is created by the agent; TaskCreate tells containerd.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::api::{CreateTaskRequest, CreateTaskResponse};
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::topics;

use super::error::TaskError;
use super::{lock, TaskService};
use crate::protocols::agent;
use crate::shim::container::Container;
use crate::shim::oci;
use crate::shim::rootfs;
use crate::shim::sandbox::Sandbox;
use crate::shim::stdio::StdioPaths;

impl TaskService {
    pub(super) async fn create_task(
        &self,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, TaskError> {
        crate::mgmt::paths::validate_id(&req.id)?;
        let config = self
            .config
            .as_ref()
            .map_err(|err| TaskError::Config(err.clone()))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = oci::load(&bundle)?;
        let agent_spec = oci::to_agent_spec(&spec, &req.id, &bundle)?;
        if lock(&self.containers).contains_key(&req.id) {
            return Err(TaskError::ContainerExists { id: req.id });
        }

        // The first container brings the sandbox up; the lock makes concurrent creates wait for it.
        let mut sandbox_slot = self.sandbox.lock().await;
        let booted_here = sandbox_slot.is_none();
        if booted_here {
            let sandbox_id = oci::sandbox_of(&spec).unwrap_or_else(|| req.id.clone());
            if sandbox_id != req.id || sandbox_id != self.shim_id {
                return Err(TaskError::ForeignSandbox {
                    sandbox_id,
                    shim_id: self.shim_id.clone(),
                });
            }
            let sandbox =
                Sandbox::start(config, &req.id, &self.namespace, oci::pod_identity(&spec))
                    .await
                    .map_err(Box::new)?;
            *sandbox_slot = Some(sandbox);
        }
        let Some(sandbox) = sandbox_slot.as_ref() else {
            return Err(TaskError::SandboxGone);
        };
        let (agent, shared_dir, pid) = (
            sandbox.agent.clone(),
            sandbox.dirs.shared.clone(),
            sandbox.pid(),
        );

        let created = async {
            rootfs::share(&req.rootfs, &bundle, &shared_dir, &req.id).await?;
            let create = agent::CreateContainerRequest {
                container_id: req.id.clone(),
                exec_id: req.id.clone(),
                OCI: Some(agent_spec).into(),
                ..Default::default()
            };
            if let Err(source) = agent.create_container(create).await {
                rootfs::unshare(Some(&bundle), &shared_dir, &req.id);
                return Err(TaskError::CreateContainer {
                    id: req.id.clone(),
                    source: Box::new(source),
                });
            }
            Ok(())
        }
        .await;
        if let Err(err) = created {
            if booted_here {
                if let Some(sandbox) = sandbox_slot.take() {
                    sandbox.stop().await;
                }
            }
            return Err(err);
        }
        drop(sandbox_slot);

        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let container = Arc::new(Container::new(
            req.id.clone(),
            bundle,
            stdio,
            pid,
            agent,
            shared_dir,
        ));
        lock(&self.containers).insert(req.id.clone(), container);

        self.events
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: Some(TaskIO {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        terminal: req.terminal,
                        ..Default::default()
                    })
                    .into(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }
}
