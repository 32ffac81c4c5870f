//! What a task RPC refuses or fails with, and the one place that turns it into the ttrpc status
//! containerd reads: the code says what kind of failure it was (containerd and `ctr` act on it),
//! the message is the error's text.

use std::fmt;
use std::sync::Arc;

use ttrpc::Code;

use crate::agent_client::AgentError;
use crate::mgmt::paths::IdError;
use crate::shim::config::ConfigError;
use crate::shim::container::{Container, Process};
use crate::shim::oci::SpecError;
use crate::shim::rootfs::RootfsError;
use crate::shim::sandbox::SandboxError;

/// A process as messages name it: `container "c1"` for the init, `exec "e1" of container "c1"`
/// for an exec'd one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessName {
    container_id: String,
    /// Empty for the init.
    exec_id: String,
}

impl ProcessName {
    pub(crate) fn of(container: &Container, process: &Process) -> ProcessName {
        ProcessName {
            container_id: container.id.clone(),
            exec_id: process.exec_id.clone(),
        }
    }
}

impl fmt::Display for ProcessName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exec_id.is_empty() {
            write!(f, "container {:?}", self.container_id)
        } else {
            write!(
                f,
                "exec {:?} of container {:?}",
                self.exec_id, self.container_id
            )
        }
    }
}

/// Agent and sandbox errors are boxed: they are large, and every RPC result carries this type.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    #[error("container {id:?} not found")]
    ContainerNotFound { id: String },
    #[error("process {exec_id:?} of container {id:?} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The shim's configuration did not load, so it cannot boot a sandbox.
    #[error(transparent)]
    Config(Arc<ConfigError>),
    /// The bundle's OCI spec, or the process spec of an exec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container {id:?} already exists")]
    ContainerExists { id: String },
    /// The first container of this shim is not the sandbox the shim was started for.
    #[error("sandbox {sandbox_id:?} is not running in this shim ({shim_id:?})")]
    ForeignSandbox { sandbox_id: String, shim_id: String },
    #[error(transparent)]
    Sandbox(#[from] Box<SandboxError>),
    #[error("the sandbox is gone")]
    SandboxGone,
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("creating container {id:?} in the VM: {source}")]
    CreateContainer { id: String, source: Box<AgentError> },
    #[error("{process} was already started")]
    AlreadyStarted { process: ProcessName },
    #[error("starting container {id:?} in the VM: {source}")]
    StartContainer { id: String, source: Box<AgentError> },
    /// The agent's own message says what is wrong (e.g. which program is missing).
    #[error("starting {process}: {}", agent_reason(.source))]
    StartExec {
        process: ProcessName,
        source: Box<AgentError>,
    },
    #[error("exec needs an exec id other than the container's")]
    ExecIdNotDistinct,
    #[error("container {id:?} is not running")]
    NotRunning { id: String },
    #[error("process {exec_id:?} of container {id:?} already exists")]
    ExecExists { id: String, exec_id: String },
    #[error("{process} is still running")]
    StillRunning { process: ProcessName },
    #[error("{process} already finished")]
    AlreadyFinished { process: ProcessName },
    /// The guest has no such process before Start.
    #[error("{process} was not started")]
    NotStarted { process: ProcessName },
    #[error("signalling {process}: {source}")]
    Signal {
        process: ProcessName,
        source: Box<AgentError>,
    },
    #[error("reading the stats of {id:?}: {source}")]
    ReadStats { id: String, source: Box<AgentError> },
    #[error("encoding the stats of {id:?}: {source}")]
    EncodeStats { id: String, source: protobuf::Error },
    #[error("updating the resources of {id:?}: {what}")]
    BadResources { id: String, what: String },
    #[error("updating the resources of {id:?}: {source}")]
    UpdateResources { id: String, source: Box<AgentError> },
    #[error("resizing the terminal of {process}: {source}")]
    ResizePty {
        process: ProcessName,
        source: Box<AgentError>,
    },
}

impl TaskError {
    /// The status code containerd gets for this error.
    pub(crate) fn code(&self) -> Code {
        match self {
            TaskError::ContainerNotFound { .. }
            | TaskError::ProcessNotFound { .. }
            | TaskError::AlreadyFinished { .. } => Code::NOT_FOUND,
            TaskError::InvalidId(_) | TaskError::Spec(_) | TaskError::ExecIdNotDistinct => {
                Code::INVALID_ARGUMENT
            }
            TaskError::Config(_)
            | TaskError::ForeignSandbox { .. }
            | TaskError::AlreadyStarted { .. }
            | TaskError::NotRunning { .. }
            | TaskError::StillRunning { .. }
            | TaskError::NotStarted { .. } => Code::FAILED_PRECONDITION,
            TaskError::ContainerExists { .. } | TaskError::ExecExists { .. } => {
                Code::ALREADY_EXISTS
            }
            TaskError::Sandbox(_) => Code::UNAVAILABLE,
            // A bad exec (missing program, bad user) is the caller's, not the shim's, failure.
            TaskError::StartExec { source, .. } => match source.code() {
                Some(code @ (Code::INVALID_ARGUMENT | Code::FAILED_PRECONDITION)) => code,
                _ => Code::INTERNAL,
            },
            TaskError::SandboxGone
            | TaskError::Rootfs(_)
            | TaskError::CreateContainer { .. }
            | TaskError::StartContainer { .. }
            | TaskError::Signal { .. }
            | TaskError::ReadStats { .. }
            | TaskError::EncodeStats { .. }
            | TaskError::UpdateResources { .. }
            | TaskError::ResizePty { .. } => Code::INTERNAL,
            TaskError::BadResources { .. } => Code::INVALID_ARGUMENT,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(err: TaskError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.to_string()))
    }
}

/// The agent's own message when it answered with a status, else what went wrong on the way.
fn agent_reason(err: &AgentError) -> String {
    err.message()
        .map_or_else(|| err.to_string(), str::to_string)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::agent::transport::TransportError;
    use crate::shim::hypervisor::VmError;

    fn exec_e1() -> ProcessName {
        ProcessName {
            container_id: "c1".into(),
            exec_id: "e1".into(),
        }
    }

    fn init_c1() -> ProcessName {
        ProcessName {
            container_id: "c1".into(),
            exec_id: String::new(),
        }
    }

    /// An agent that answered ExecProcess with a status of its own.
    fn agent_status(code: Code, message: &str) -> Box<AgentError> {
        Box::new(AgentError::Rpc {
            action: "grpc.ExecProcessRequest",
            url: "vsock://3:1024".into(),
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(code, message)),
        })
    }

    fn agent_unreachable() -> Box<AgentError> {
        Box::new(AgentError::Transport(TransportError::Connect {
            url: "vsock://3:1024".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        }))
    }

    /// What containerd reads from the error.
    fn status(err: TaskError) -> (Code, String) {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(status) => (
                status.code.enum_value().expect("a known code"),
                status.message,
            ),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn processes_are_named_as_containerd_users_know_them() {
        assert_eq!(init_c1().to_string(), r#"container "c1""#);
        assert_eq!(exec_e1().to_string(), r#"exec "e1" of container "c1""#);
    }

    #[test]
    fn refusals_the_caller_can_act_on_keep_their_codes_and_messages() {
        let id = crate::mgmt::paths::validate_id("a/b").expect_err("a slash");
        let config = ConfigError::Invalid {
            path: "/etc/kata-containers/configuration.toml".into(),
            key: "hypervisor.qemu.default_memory",
            why: "must be at least 64".into(),
        };
        let cases = [
            (
                TaskError::ContainerNotFound { id: "c9".into() },
                Code::NOT_FOUND,
                r#"container "c9" not found"#,
            ),
            (
                TaskError::ProcessNotFound {
                    id: "c1".into(),
                    exec_id: "e9".into(),
                },
                Code::NOT_FOUND,
                r#"process "e9" of container "c1" not found"#,
            ),
            (
                TaskError::AlreadyFinished { process: init_c1() },
                Code::NOT_FOUND,
                r#"container "c1" already finished"#,
            ),
            (
                TaskError::from(id),
                Code::INVALID_ARGUMENT,
                r#"invalid sandbox id "a/b": only letters, digits, '.', '_' and '-' are allowed (no '/', no spaces)"#,
            ),
            (
                TaskError::from(SpecError::NoProcess {
                    path: "/b/config.json".into(),
                }),
                Code::INVALID_ARGUMENT,
                "the OCI spec /b/config.json has no process",
            ),
            (
                TaskError::ExecIdNotDistinct,
                Code::INVALID_ARGUMENT,
                "exec needs an exec id other than the container's",
            ),
            (
                TaskError::Config(Arc::new(config)),
                Code::FAILED_PRECONDITION,
                "configuration file /etc/kata-containers/configuration.toml: key hypervisor.qemu.default_memory: must be at least 64",
            ),
            (
                TaskError::ForeignSandbox {
                    sandbox_id: "sb2".into(),
                    shim_id: "sb1".into(),
                },
                Code::FAILED_PRECONDITION,
                r#"sandbox "sb2" is not running in this shim ("sb1")"#,
            ),
            (
                TaskError::AlreadyStarted { process: exec_e1() },
                Code::FAILED_PRECONDITION,
                r#"exec "e1" of container "c1" was already started"#,
            ),
            (
                TaskError::NotRunning { id: "c1".into() },
                Code::FAILED_PRECONDITION,
                r#"container "c1" is not running"#,
            ),
            (
                TaskError::StillRunning { process: init_c1() },
                Code::FAILED_PRECONDITION,
                r#"container "c1" is still running"#,
            ),
            (
                TaskError::NotStarted { process: exec_e1() },
                Code::FAILED_PRECONDITION,
                r#"exec "e1" of container "c1" was not started"#,
            ),
            (
                TaskError::ContainerExists { id: "c1".into() },
                Code::ALREADY_EXISTS,
                r#"container "c1" already exists"#,
            ),
            (
                TaskError::ExecExists {
                    id: "c1".into(),
                    exec_id: "e1".into(),
                },
                Code::ALREADY_EXISTS,
                r#"process "e1" of container "c1" already exists"#,
            ),
        ];
        for (err, code, message) in cases {
            assert_eq!(status(err), (code, message.to_string()));
        }
    }

    #[test]
    fn a_sandbox_that_cannot_start_is_unavailable() {
        let err = TaskError::from(Box::new(SandboxError::Vm {
            id: "sb1".into(),
            source: VmError::Config("vcpus 0 is out of range (1 to 255)".into()),
        }));
        assert_eq!(
            status(err),
            (
                Code::UNAVAILABLE,
                "sandbox sb1: starting the VM: invalid VM configuration: vcpus 0 is out of range (1 to 255)"
                    .to_string()
            )
        );
    }

    #[test]
    fn failures_of_the_shim_or_the_vm_are_internal() {
        let cases = [
            (TaskError::SandboxGone, "the sandbox is gone".to_string()),
            (
                TaskError::from(RootfsError::Bind {
                    from: PathBuf::from("/b/rootfs"),
                    to: PathBuf::from("/s/c1/rootfs"),
                    source: io::Error::from_raw_os_error(libc::EPERM),
                }),
                "sharing /b/rootfs with the VM at /s/c1/rootfs: Operation not permitted (os error 1)"
                    .to_string(),
            ),
            (
                TaskError::CreateContainer {
                    id: "c1".into(),
                    source: agent_unreachable(),
                },
                r#"creating container "c1" in the VM: connecting to the agent at vsock://3:1024: connection refused"#
                    .to_string(),
            ),
            (
                TaskError::StartContainer {
                    id: "c1".into(),
                    source: Box::new(AgentError::Timeout {
                        action: "grpc.StartContainerRequest",
                        url: "vsock://3:1024".into(),
                        timeout: Duration::from_secs(30),
                    }),
                },
                r#"starting container "c1" in the VM: agent call grpc.StartContainerRequest to vsock://3:1024 did not finish within 30s"#
                    .to_string(),
            ),
            (
                TaskError::Signal {
                    process: exec_e1(),
                    source: agent_unreachable(),
                },
                r#"signalling exec "e1" of container "c1": connecting to the agent at vsock://3:1024: connection refused"#
                    .to_string(),
            ),
            (
                TaskError::ReadStats {
                    id: "c1".into(),
                    source: agent_unreachable(),
                },
                r#"reading the stats of "c1": connecting to the agent at vsock://3:1024: connection refused"#
                    .to_string(),
            ),
            (
                TaskError::EncodeStats {
                    id: "c1".into(),
                    source: protobuf::Error::from(io::Error::from(io::ErrorKind::WriteZero)),
                },
                r#"encoding the stats of "c1": write zero"#.to_string(),
            ),
            (
                TaskError::ResizePty {
                    process: init_c1(),
                    source: agent_unreachable(),
                },
                r#"resizing the terminal of container "c1": connecting to the agent at vsock://3:1024: connection refused"#
                    .to_string(),
            ),
        ];
        for (err, message) in cases {
            assert_eq!(status(err), (Code::INTERNAL, message));
        }
    }

    #[test]
    fn a_bad_exec_keeps_the_agents_code_and_message() {
        for code in [Code::INVALID_ARGUMENT, Code::FAILED_PRECONDITION] {
            let err = TaskError::StartExec {
                process: exec_e1(),
                source: agent_status(code, "executable file not found in $PATH"),
            };
            assert_eq!(
                status(err),
                (
                    code,
                    r#"starting exec "e1" of container "c1": executable file not found in $PATH"#
                        .to_string()
                )
            );
        }
    }

    #[test]
    fn an_exec_the_agent_fails_otherwise_is_internal() {
        let err = TaskError::StartExec {
            process: exec_e1(),
            source: agent_status(Code::NOT_FOUND, "container c1 not found"),
        };
        assert_eq!(
            status(err),
            (
                Code::INTERNAL,
                r#"starting exec "e1" of container "c1": container c1 not found"#.to_string()
            )
        );
        let err = TaskError::StartExec {
            process: exec_e1(),
            source: agent_unreachable(),
        };
        assert_eq!(
            status(err),
            (
                Code::INTERNAL,
                r#"starting exec "e1" of container "c1": connecting to the agent at vsock://3:1024: connection refused"#
                    .to_string()
            )
        );
    }

    #[test]
    fn the_cause_stays_reachable_as_the_source() {
        let err = TaskError::Signal {
            process: init_c1(),
            source: agent_status(Code::NOT_FOUND, "no such process"),
        };
        let source = err.source().expect("a source");
        let agent = source
            .downcast_ref::<Box<AgentError>>()
            .expect("the agent's error");
        assert_eq!(agent.code(), Some(Code::NOT_FOUND));

        let config = TaskError::Config(Arc::new(ConfigError::Read {
            path: "/etc/k.toml".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        }));
        let io = config.source().expect("the io error");
        assert_eq!(io.to_string(), "permission denied");
    }
}
