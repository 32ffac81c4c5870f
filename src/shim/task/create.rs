//! Create: the first container boots the sandbox (its VM and agent), every container then gets its
//! rootfs shared with the VM and is created by the agent; TaskCreate tells containerd.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::{CreateTaskRequest, CreateTaskResponse};
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::topics;

use super::error::TaskError;
use super::{lock, TaskService};
use crate::protocols::agent;
use crate::shim::cadvisor::ContainerCard;
use crate::shim::container::Container;
use crate::shim::oci;
use crate::shim::rootfs;
use crate::shim::sandbox::{self, Sandbox};
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
            let sandbox_spec = oci::sandbox_spec(&spec);
            self.cadvisor_book.set_pod(sandbox_spec.pod.clone());
            let sandbox = Sandbox::start(
                config,
                &req.id,
                &self.namespace,
                sandbox_spec,
                self.cadvisor_book.clone(),
            )
            .await
            .map_err(Box::new)?;
            *sandbox_slot = Some(sandbox);
            tokio::spawn(sandbox::watch_vm(self.sandbox.clone()));
        }
        let Some(sandbox) = sandbox_slot.as_ref() else {
            return Err(TaskError::SandboxGone);
        };
        let (agent, fate, shared_dir, pid) = (
            sandbox.agent.clone(),
            sandbox.fate.clone(),
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
            fate,
            shared_dir,
        ));
        lock(&self.containers).insert(req.id.clone(), container);
        self.cadvisor_book
            .add(&req.id, ContainerCard::from_spec(&spec, SystemTime::now()));

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use containerd_shim::Task;
    use ttrpc::Code;

    use super::super::testing::{
        add_container, ctx, refusal, service, service_with, NO_AGENT, SHIM_ID,
    };
    use super::*;
    use crate::shim::config::ConfigError;

    /// A bundle whose config.json runs `sh`, as a container of sandbox `sandbox_id` (CRI's
    /// annotations) or as a sandbox of its own.
    fn bundle(dir: &Path, sandbox_id: Option<&str>) -> String {
        let annotations = match sandbox_id {
            Some(id) => format!(
                r#","annotations":{{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"{id}"}}"#
            ),
            None => String::new(),
        };
        let spec = format!(
            r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["sh"],"user":{{"uid":0,"gid":0}}}},"root":{{"path":"rootfs"}}{annotations}}}"#
        );
        std::fs::write(dir.join("config.json"), spec).unwrap();
        dir.display().to_string()
    }

    fn create(id: &str, bundle: &str) -> CreateTaskRequest {
        CreateTaskRequest {
            id: id.to_string(),
            bundle: bundle.to_string(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_container_id_that_is_no_safe_path_component_is_refused() {
        let (shim, events) = service();
        let dir = tempfile::tempdir().unwrap();
        let reply = shim
            .create(&ctx(), create("../sb1", &bundle(dir.path(), None)))
            .await;
        assert_eq!(
            refusal(reply),
            (
                Code::INVALID_ARGUMENT,
                r#"invalid sandbox id "../sb1": only letters, digits, '.', '_' and '-' are allowed (no '/', no spaces)"#
                    .to_string()
            )
        );
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn a_shim_whose_configuration_did_not_load_refuses_create_with_the_reason() {
        let config = ConfigError::Invalid {
            path: "/etc/kata-containers/configuration.toml".into(),
            key: "hypervisor.qemu.path",
            why: "no such file".into(),
        };
        let (shim, events) = service_with(Err(Arc::new(config)));
        let dir = tempfile::tempdir().unwrap();
        let reply = shim
            .create(&ctx(), create("sb1", &bundle(dir.path(), None)))
            .await;
        assert_eq!(
            refusal(reply),
            (
                Code::FAILED_PRECONDITION,
                "configuration file /etc/kata-containers/configuration.toml: key hypervisor.qemu.path: no such file"
                    .to_string()
            )
        );
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn a_bundle_without_a_spec_is_an_invalid_argument() {
        let (shim, _) = service();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().display().to_string();
        let (code, message) = refusal(shim.create(&ctx(), create("sb1", &bundle)).await);
        assert_eq!(code, Code::INVALID_ARGUMENT);
        let expected = format!("reading the OCI spec {bundle}/config.json: ");
        assert!(message.starts_with(&expected), "{message}");
    }

    #[tokio::test]
    async fn a_spec_without_a_process_is_an_invalid_argument() {
        let (shim, _) = service();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"ociVersion":"1.0.2"}"#).unwrap();
        let bundle = dir.path().display().to_string();
        assert_eq!(
            refusal(shim.create(&ctx(), create("sb1", &bundle)).await),
            (
                Code::INVALID_ARGUMENT,
                format!("the OCI spec {bundle}/config.json has no process")
            )
        );
    }

    #[tokio::test]
    async fn a_container_id_in_use_already_exists() {
        let (shim, events) = service();
        add_container(&shim, "c1", NO_AGENT);
        let dir = tempfile::tempdir().unwrap();
        let reply = shim
            .create(&ctx(), create("c1", &bundle(dir.path(), Some(SHIM_ID))))
            .await;
        assert_eq!(
            refusal(reply),
            (
                Code::ALREADY_EXISTS,
                r#"container "c1" already exists"#.to_string()
            )
        );
        assert!(events.topics().is_empty());
    }

    #[tokio::test]
    async fn the_first_container_must_be_the_sandbox_this_shim_was_started_for() {
        let (shim, events) = service();
        let dir = tempfile::tempdir().unwrap();
        // A container of its own sandbox "c2", sent to the shim of "sb1".
        let reply = shim
            .create(&ctx(), create("c2", &bundle(dir.path(), None)))
            .await;
        assert_eq!(
            refusal(reply),
            (
                Code::FAILED_PRECONDITION,
                r#"sandbox "c2" is not running in this shim ("sb1")"#.to_string()
            )
        );
        // A container of sandbox "sb1" before the sandbox itself.
        let reply = shim
            .create(&ctx(), create("c3", &bundle(dir.path(), Some(SHIM_ID))))
            .await;
        assert_eq!(
            refusal(reply),
            (
                Code::FAILED_PRECONDITION,
                r#"sandbox "sb1" is not running in this shim ("sb1")"#.to_string()
            )
        );
        assert!(shim.sandbox.lock().await.is_none(), "no sandbox booted");
        assert!(events.topics().is_empty());
    }
}
