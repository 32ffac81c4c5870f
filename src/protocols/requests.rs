//! Short constructors for the agent requests that address a container or one of its processes
//! (an empty `exec_id` names the container's init), so callers name what they send in one line.

use super::agent::{
    CloseStdinRequest, ReadStreamRequest, RemoveContainerRequest, SignalProcessRequest,
    StartContainerRequest, StatsContainerRequest, TtyWinResizeRequest, WaitProcessRequest,
    WriteStreamRequest,
};

impl StartContainerRequest {
    pub fn of(container_id: &str) -> Self {
        StartContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        }
    }
}

impl StatsContainerRequest {
    pub fn of(container_id: &str) -> Self {
        StatsContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        }
    }
}

impl RemoveContainerRequest {
    /// The agent gives the container's processes `timeout_secs` (0: no bound) to die.
    pub fn of(container_id: &str, timeout_secs: u32) -> Self {
        RemoveContainerRequest {
            container_id: container_id.to_string(),
            timeout: timeout_secs,
            ..Default::default()
        }
    }
}

impl WaitProcessRequest {
    pub fn of(container_id: &str, exec_id: &str) -> Self {
        WaitProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        }
    }
}

impl SignalProcessRequest {
    pub fn of(container_id: &str, exec_id: &str, signal: u32) -> Self {
        SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            ..Default::default()
        }
    }
}

impl ReadStreamRequest {
    /// Up to `len` bytes of stdout or stderr.
    pub fn of(container_id: &str, exec_id: &str, len: u32) -> Self {
        ReadStreamRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            len,
            ..Default::default()
        }
    }
}

impl WriteStreamRequest {
    pub fn of(container_id: &str, exec_id: &str, data: Vec<u8>) -> Self {
        WriteStreamRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            data,
            ..Default::default()
        }
    }
}

impl CloseStdinRequest {
    pub fn of(container_id: &str, exec_id: &str) -> Self {
        CloseStdinRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        }
    }
}

impl TtyWinResizeRequest {
    pub fn of(container_id: &str, exec_id: &str, rows: u32, columns: u32) -> Self {
        TtyWinResizeRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            row: rows,
            column: columns,
            ..Default::default()
        }
    }
}
