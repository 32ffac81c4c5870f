//! Connecting a guest process's stdio to the FIFOs containerd created for it.
//!
//! stdout/stderr: the agent's ReadStdout/ReadStderr until it sends empty data (EOF), written to
//! the FIFO opened read-write (opening never blocks, even before `ctr` opened its end). stdin: the
//! FIFO opened read-only and non-blocking, so a missing writer does not block us, copied to
//! WriteStdin, then CloseStdin at EOF.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::agent_client::{AgentClient, AgentError};
use crate::protocols::agent;

/// How much one ReadStdout/ReadStderr asks for.
const READ_CHUNK: u32 = 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutStream {
    Stdout,
    Stderr,
}

/// The FIFO paths of one process (empty when containerd gave none, e.g. `ctr run -d`).
#[derive(Debug, Clone, Default)]
pub(crate) struct StdioPaths {
    pub(crate) stdin: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) terminal: bool,
}

/// Copies one output stream of a process of `container_id` (its init for an empty `exec_id`) to
/// `path` (or discards it, so the guest process never blocks on a full pipe) until the agent
/// reports EOF or fails.
pub(crate) fn copy_output(
    agent: Arc<AgentClient>,
    container_id: String,
    exec_id: String,
    stream: OutStream,
    path: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut fifo = if path.is_empty() {
            None
        } else {
            match pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(PathBuf::from(&path))
            {
                Ok(sender) => Some(sender),
                Err(err) => {
                    tracing::warn!(%path, "opening {stream:?} FIFO: {err}; output is discarded");
                    None
                }
            }
        };
        loop {
            let data = match read_stream(&agent, &container_id, &exec_id, stream).await {
                Ok(data) if data.is_empty() => break,
                Ok(data) => data,
                Err(err) => {
                    tracing::debug!(container_id, "{stream:?} ends: {err}");
                    break;
                }
            };
            if let Some(sender) = fifo.as_mut() {
                if let Err(err) = sender.write_all(&data).await {
                    tracing::warn!(%path, "writing {stream:?}: {err}; output is discarded");
                    fifo = None;
                }
            }
        }
        // Dropping our end is what lets `ctr` see EOF.
    })
}

async fn read_stream(
    agent: &AgentClient,
    container_id: &str,
    exec_id: &str,
    stream: OutStream,
) -> Result<Vec<u8>, AgentError> {
    let req = agent::ReadStreamRequest::of(container_id, exec_id, READ_CHUNK);
    let reply = match stream {
        OutStream::Stdout => agent.read_stdout(req).await?,
        OutStream::Stderr => agent.read_stderr(req).await?,
    };
    Ok(reply.data)
}

/// Copies `path` to the process's stdin, then closes it in the guest at EOF.
pub(crate) fn copy_input(
    agent: Arc<AgentClient>,
    container_id: String,
    exec_id: String,
    path: String,
) -> Option<JoinHandle<()>> {
    if path.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        // Non-blocking read-only open: succeeds without a writer, and (on Linux) reports EOF only
        // after a writer came and went.
        let mut fifo = match pipe::OpenOptions::new().open_receiver(PathBuf::from(&path)) {
            Ok(receiver) => receiver,
            Err(err) => {
                tracing::warn!(%path, "opening stdin FIFO: {err}");
                return;
            }
        };
        let mut buf = vec![0u8; READ_CHUNK as usize];
        loop {
            let n = match fifo.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // The agent writes all of it (or fails).
            let write = agent::WriteStreamRequest::of(&container_id, &exec_id, buf[..n].to_vec());
            if let Err(err) = agent.write_stdin(write).await {
                tracing::debug!(container_id, "stdin ends: {err}");
                return;
            }
        }
        let close = agent::CloseStdinRequest::of(&container_id, &exec_id);
        if let Err(err) = agent.close_stdin(close).await {
            tracing::debug!(container_id, "closing stdin: {err}");
        }
    }))
}
