//! The containerd task service (task API v2) of one sandbox's shim.
//!
//! Create boots the sandbox with its first container, later containers of the same sandbox join
//! it; every RPC's latency goes to `kata_shim_rpc_durations_histogram_milliseconds{action}`.
//! TaskCreate/Start/Exit/Delete and TaskExecAdded/ExecStarted events go to containerd through the
//! crate's publisher. `exec` adds a process to a running container: the agent runs it (in the
//! container's namespaces) at Start; every process RPC takes an `exec_id` to name it.
//!
//! This module holds the service's state and the `Task` trait's adapters, which time each RPC and
//! turn a `TaskError` into the status containerd reads; the submodules hold what each RPC does.

mod control;
mod create;
mod delete;
mod error;
mod exec;
mod query;
mod start;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};

use self::error::TaskError;
use super::cadvisor::ContainerBook;
use super::config::{Config, ConfigError};
use super::container::{Container, Process};
use super::events::{Events, Publisher};
use super::metrics::registry::SHIM_RPC_DURATIONS;
use super::sandbox::{self, SandboxSlot};

/// `pub` only because it is the shim's `Shim::T` (see `service.rs`); its API is crate-private.
pub struct TaskService {
    namespace: String,
    /// The id containerd started this shim for: the sandbox's id.
    shim_id: String,
    /// Kept as loaded: a shim whose configuration is broken still serves, and refuses Create.
    config: Result<Config, Arc<ConfigError>>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    sandbox: SandboxSlot,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The containers as `/metrics/cadvisor` labels them (shared with the sandbox's server).
    cadvisor_book: Arc<ContainerBook>,
}

impl TaskService {
    pub(crate) fn new(
        namespace: String,
        shim_id: String,
        config: Result<Config, Arc<ConfigError>>,
        publisher: impl Publisher + 'static,
        exit: Arc<ExitSignal>,
        sandbox: SandboxSlot,
    ) -> TaskService {
        TaskService {
            events: Arc::new(Events::new(publisher, namespace.clone())),
            namespace,
            shim_id,
            config,
            exit,
            sandbox,
            containers: Mutex::new(HashMap::new()),
            cadvisor_book: Arc::default(),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::ContainerNotFound { id: id.to_string() })
    }

    /// The container and its process named by `exec_id` (the init for an empty one).
    fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), TaskError> {
        let container = self.container(id)?;
        let process = container
            .process(exec_id)
            .ok_or_else(|| TaskError::ProcessNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
        Ok((container, process))
    }
}

/// Runs one task RPC, records its latency under `action`, and answers a failure with its status.
async fn timed<T>(action: &str, rpc: impl Future<Output = Result<T, TaskError>>) -> TtrpcResult<T> {
    let started = Instant::now();
    let result = rpc.await;
    SHIM_RPC_DURATIONS
        .with_label_values(&[action])
        .observe(started.elapsed().as_secs_f64() * 1000.0);
    result.map_err(|err| {
        tracing::info!(action, code = ?err.code(), "task RPC failed: {err}");
        err.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        timed("create", self.create_task(req)).await
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        timed("start", self.start_process(req)).await
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        timed("state", self.process_state(req)).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        timed("kill", self.kill_process(req)).await
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        timed("wait", self.wait_process(req)).await
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        timed("delete", self.delete_process(req)).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        timed("pids", self.container_pids(req)).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        timed("connect", self.connect_task(req)).await
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        timed("shutdown", self.shut_down()).await
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        timed("stats", self.container_stats(req)).await
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        timed("close_io", self.close_process_io(req)).await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        timed("resize_pty", self.resize_process_pty(req)).await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        timed("exec", self.exec_process(req)).await
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        timed("update", self.update_resources(req)).await
    }
}

/// A poisoned lock only means another task panicked while holding it; the map is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The sandbox directory layout this shim would use for `id` (for `delete`).
pub(crate) fn shared_dir_of(run_dir: &Path, sandbox_id: &str) -> PathBuf {
    sandbox::SandboxDirs::new(run_dir, sandbox_id).shared
}
