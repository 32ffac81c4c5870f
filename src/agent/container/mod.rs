//! Running containers in the guest: the agent's side of CreateContainer .. RemoveContainer.
//!
//! - [`spec`]: OCI spec to init configuration (validation);
//! - [`spawn`]: clone + re-exec of the agent as the container's init;
//! - [`init`]: that init, which builds the container's view and execs the program at start;
//! - [`stdio`]: pipes or a pty, with blocking reads that return empty data at EOF;
//! - [`state`]: one container's process and its lifecycle;
//! - [`storage`]: sandbox storages (9p shares).

pub mod init;
pub mod spawn;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod storage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use ttrpc::Code;

use crate::agent::reaper::Reaper;
use crate::protocols::agent;
use state::Container;

/// How long DestroySandbox waits for each container to die after SIGKILL.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

pub type RpcResult<T> = ttrpc::Result<T>;

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// Every container of the sandbox, and the storages mounted for it.
pub struct Containers {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    storages: Mutex<Vec<PathBuf>>,
}

impl Containers {
    pub fn new(reaper: Reaper) -> Self {
        Containers {
            reaper,
            containers: Mutex::new(HashMap::new()),
            storages: Mutex::new(Vec::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container, or NOT_FOUND.
    pub fn get(&self, id: &str) -> RpcResult<Arc<Container>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id:?} not found")))
    }

    /// The container of a process; only the container's own process (exec_id empty or the
    /// container id) exists, as ExecProcess is not supported.
    pub fn process(&self, id: &str, exec_id: &str) -> RpcResult<Arc<Container>> {
        let container = self.get(id)?;
        if !exec_id.is_empty() && exec_id != id {
            return Err(status(
                Code::NOT_FOUND,
                format!("process {exec_id:?} of container {id:?} not found"),
            ));
        }
        Ok(container)
    }

    pub async fn create_sandbox(&self, req: &agent::CreateSandboxRequest) -> RpcResult<()> {
        // Validate every storage before mounting any.
        let mounts = req
            .storages
            .iter()
            .map(storage::ninep_mount)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        for m in mounts {
            let target = m.target.clone();
            tokio::task::spawn_blocking(move || storage::mount_9p(&m))
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            self.storages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(target);
        }
        Ok(())
    }

    /// Kills every container and unmounts the sandbox storages.
    pub async fn destroy_sandbox(&self) -> RpcResult<()> {
        let ids: Vec<String> = self.map().keys().cloned().collect();
        for id in ids {
            if let Err(err) = self.remove(&id, DESTROY_TIMEOUT).await {
                tracing::warn!(%id, ?err, "removing a container while destroying the sandbox");
            }
        }
        let targets: Vec<PathBuf> =
            std::mem::take(&mut *self.storages.lock().unwrap_or_else(|e| e.into_inner()));
        for target in targets.iter().rev() {
            storage::unmount(target);
        }
        Ok(())
    }

    pub async fn create(&self, req: agent::CreateContainerRequest) -> RpcResult<()> {
        let id = req.container_id.clone();
        if id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "container_id is empty"));
        }
        if self.map().contains_key(&id) {
            return Err(already_exists(&id));
        }
        let spec = req.OCI.into_option().ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                "CreateContainer without an OCI spec",
            )
        })?;
        let container = Container::create(&self.reaper, id.clone(), spec).await?;
        let mut map = self.map();
        if map.contains_key(&id) {
            // Lost a race with a concurrent create of the same id.
            drop(map);
            container.kill(&self.reaper, Signal::SIGKILL);
            return Err(already_exists(&id));
        }
        map.insert(id, Arc::new(container));
        Ok(())
    }

    pub async fn start(&self, id: &str) -> RpcResult<()> {
        self.get(id)?.start().await
    }

    /// Signals the container's process. Signalling a process that has already exited is not an
    /// error (the shim's kill after exit races with the exit anyway).
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32) -> RpcResult<()> {
        let container = self.process(id, exec_id)?;
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("invalid signal {signal}")))?;
        container.kill(&self.reaper, signal);
        Ok(())
    }

    /// Kills a container that still runs (SIGKILL), waits up to `timeout` (zero: no bound) for it
    /// to be reaped, and forgets it.
    pub async fn remove(&self, id: &str, timeout: Duration) -> RpcResult<()> {
        let container = self.get(id)?;
        container.kill(&self.reaper, Signal::SIGKILL);
        let wait = container.wait();
        if timeout.is_zero() {
            wait.await;
        } else if tokio::time::timeout(timeout, wait).await.is_err() {
            return Err(status(
                Code::DEADLINE_EXCEEDED,
                format!("container {id:?} did not exit within {timeout:?} of SIGKILL"),
            ));
        }
        self.map().remove(id);
        Ok(())
    }
}

fn already_exists(id: &str) -> ttrpc::Error {
    status(
        Code::ALREADY_EXISTS,
        format!("container {id:?} already exists"),
    )
}
