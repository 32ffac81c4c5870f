//! What a task RPC refuses or fails with, and the one place that turns it into the ttrpc status
//! containerd reads: the code says what kind of failure it was (containerd and `ctr` act on it),
//! the message is the error's text.

use std::fmt;
use std::sync::Arc;

use ttrpc::Code;

use super::super::config::ConfigError;
use super::super::container::{Container, Process};
use super::super::oci::SpecError;
use super::super::rootfs::RootfsError;
use super::super::sandbox::SandboxError;
use crate::agent_client::AgentError;
use crate::mgmt::paths::IdError;

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
            | TaskError::ResizePty { .. } => Code::INTERNAL,
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
