//! Plays the VMM's side of hybrid vsock in front of a unix-socket agent: answers `CONNECT <port>\n`
//! and then relays bytes — or misbehaves in a chosen way, for fault injection.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `OK <port>\n`, then relay to the agent.
    Relay,
    /// A reply that is not `OK`.
    Garbage,
    /// Reads the CONNECT line and never answers.
    Silent,
    /// Closes the connection right after accepting it.
    Close,
}

pub struct Relay {
    pub socket: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `socket`; in `Relay` mode forwards each accepted stream to the unix socket `agent`.
pub fn start(socket: &Path, agent: &Path, mode: Mode) -> Relay {
    let listener = UnixListener::bind(socket).expect("bind the relay socket");
    let agent = agent.to_path_buf();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _ = handle(stream, &agent, mode).await;
            });
        }
    });
    Relay {
        socket: socket.to_path_buf(),
        task,
    }
}

async fn handle(stream: UnixStream, agent: &Path, mode: Mode) -> std::io::Result<()> {
    if let Mode::Close = mode {
        drop(stream);
        return Ok(());
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let port = line
        .trim()
        .strip_prefix("CONNECT ")
        .unwrap_or("?")
        .to_string();
    let mut stream = reader.into_inner();
    match mode {
        Mode::Relay => {
            stream.write_all(format!("OK {port}\n").as_bytes()).await?;
            let mut upstream = UnixStream::connect(agent).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
        }
        Mode::Garbage => {
            stream.write_all(b"ERR no such port\n").await?;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        Mode::Silent => tokio::time::sleep(std::time::Duration::from_secs(3600)).await,
        Mode::Close => {}
    }
    Ok(())
}
