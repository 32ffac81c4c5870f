//! What can go wrong with one agent call, and the short reasons the shim counts failures by.

use std::time::Duration;

use crate::agent::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("agent call {action} to {url} did not finish within {timeout:?}")]
    Timeout {
        action: &'static str,
        url: String,
        timeout: Duration,
    },
    #[error("agent call {action} to {url} failed: {source}")]
    Rpc {
        action: &'static str,
        url: String,
        source: ttrpc::Error,
    },
    #[error("agent at {url} reports it is not serving (health status {status})")]
    NotServing { url: String, status: String },
}

impl AgentError {
    /// A short label for counting failures.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AgentError::Transport(TransportError::Timeout { .. }) | AgentError::Timeout { .. } => {
                "timeout"
            }
            AgentError::Transport(_) => "connect",
            AgentError::Rpc { .. } => "rpc",
            AgentError::NotServing { .. } => "not_serving",
        }
    }

    /// The status code the agent answered with, if the call got that far (e.g. NOT_FOUND).
    pub fn code(&self) -> Option<ttrpc::Code> {
        self.status()
            .and_then(|status| status.code.enum_value().ok())
    }

    /// The agent's own error message, if it answered with a status.
    pub fn message(&self) -> Option<&str> {
        self.status().map(|status| status.message.as_str())
    }

    fn status(&self) -> Option<&ttrpc::proto::Status> {
        match self {
            AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status),
            _ => None,
        }
    }

    /// A status the agent sent back leaves the connection usable; anything else may not.
    pub(super) fn breaks_connection(&self) -> bool {
        self.status().is_none() && !matches!(self, AgentError::NotServing { .. })
    }
}
