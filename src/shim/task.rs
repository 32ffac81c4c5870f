//! The containerd task service (task API v2) of one sandbox's shim.
//!
//! Create boots the sandbox with its first container, later containers of the same sandbox join
//! it; every RPC's latency goes to `kata_shim_rpc_durations_histogram_milliseconds{action}`.
//! TaskCreate/Start/Exit/Delete and TaskExecAdded/ExecStarted events go to containerd through the
//! crate's publisher. `exec` adds a process to a running container: the agent runs it (in the
//! container's namespaces) at Start; every process RPC takes an `exec_id` to name it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use tokio::task::JoinHandle;
use ttrpc::Code;

use super::config::Config;
use super::container::{Container, Exit, Process};
use super::events::{timestamp, Events};
use super::metrics::registry::SHIM_RPC_DURATIONS;
use super::oci;
use super::rootfs;
use super::sandbox::{self, Sandbox, SandboxSlot};
use super::stdio::{self, OutStream, StdioPaths};
use super::waiter;
use crate::protocols::agent;

/// Seconds the agent gives a container's processes to die on RemoveContainer.
const REMOVE_TIMEOUT_SECS: u32 = 5;
/// The exit status of a process that could not be started (the shell's "cannot execute").
const NOT_STARTED_EXIT: u32 = 127;

pub struct TaskService {
    namespace: String,
    /// The id containerd started this shim for: the sandbox's id.
    shim_id: String,
    config: Result<Config, String>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    sandbox: SandboxSlot,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskService {
    pub fn new(
        namespace: String,
        shim_id: String,
        config: Result<Config, String>,
        publisher: RemotePublisher,
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
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| error(Code::NOT_FOUND, format!("container {id:?} not found")))
    }

    /// The container and its process named by `exec_id` (the init for an empty one).
    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Process>)> {
        let container = self.container(id)?;
        let process = container.process(exec_id).ok_or_else(|| {
            error(
                Code::NOT_FOUND,
                format!("process {exec_id:?} of container {id:?} not found"),
            )
        })?;
        Ok((container, process))
    }

    async fn do_create(&self, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        crate::mgmt::paths::validate_id(&req.id)
            .map_err(|err| error(Code::INVALID_ARGUMENT, err.to_string()))?;
        let config = self
            .config
            .as_ref()
            .map_err(|err| error(Code::FAILED_PRECONDITION, err.clone()))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec =
            oci::load(&bundle).map_err(|err| error(Code::INVALID_ARGUMENT, err.to_string()))?;
        let agent_spec = oci::to_agent_spec(&spec, &req.id, &bundle)
            .map_err(|err| error(Code::INVALID_ARGUMENT, err.to_string()))?;
        if lock(&self.containers).contains_key(&req.id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("container {:?} already exists", req.id),
            ));
        }

        // The first container brings the sandbox up; the lock makes concurrent creates wait for it.
        let mut sandbox_slot = self.sandbox.lock().await;
        let booted_here = sandbox_slot.is_none();
        if booted_here {
            let sandbox_id = oci::sandbox_of(&spec).unwrap_or_else(|| req.id.clone());
            if sandbox_id != req.id || sandbox_id != self.shim_id {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "sandbox {sandbox_id:?} is not running in this shim ({:?})",
                        self.shim_id
                    ),
                ));
            }
            let sandbox =
                Sandbox::start(config, &req.id, &self.namespace, oci::pod_identity(&spec))
                    .await
                    .map_err(|err| error(Code::UNAVAILABLE, err.to_string()))?;
            *sandbox_slot = Some(sandbox);
        }
        let Some(sandbox) = sandbox_slot.as_ref() else {
            return Err(error(Code::INTERNAL, "the sandbox is gone"));
        };
        let (agent, shared_dir, pid) = (
            sandbox.agent.clone(),
            sandbox.dirs.shared.clone(),
            sandbox.pid(),
        );

        let created = async {
            rootfs::share(&req.rootfs, &bundle, &shared_dir, &req.id)
                .await
                .map_err(|err| error(Code::INTERNAL, err.to_string()))?;
            let create = agent::CreateContainerRequest {
                container_id: req.id.clone(),
                exec_id: req.id.clone(),
                OCI: Some(agent_spec).into(),
                ..Default::default()
            };
            let result = agent.create_container(create).await;
            if let Err(err) = result {
                rootfs::unshare(Some(&bundle), &shared_dir, &req.id);
                return Err(error(
                    Code::INTERNAL,
                    format!("creating container {:?} in the VM: {err}", req.id),
                ));
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

    async fn do_start(&self, req: StartRequest) -> TtrpcResult<StartResponse> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        if process.status() != Status::CREATED {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("{} was already started", describe(&container, &process)),
            ));
        }
        if process.is_init() {
            self.start_init(container).await
        } else {
            self.start_exec(container, process).await
        }
    }

    async fn start_init(&self, container: Arc<Container>) -> TtrpcResult<StartResponse> {
        // Output readers first, so nothing the process writes early is lost.
        let (out, err) = copy_outputs(&container, &container.init);
        let start = agent::StartContainerRequest::of(&container.id);
        if let Err(e) = container.agent.start_container(start).await {
            out.abort();
            err.abort();
            return Err(error(
                Code::INTERNAL,
                format!("starting container {:?} in the VM: {e}", container.id),
            ));
        }
        self.watch(container.clone(), container.init.clone(), out, err);
        self.events
            .publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: container.id.clone(),
                    pid: container.pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(StartResponse {
            pid: container.pid,
            ..Default::default()
        })
    }

    /// The agent's ExecProcess both creates and starts the process, so it runs here, at Start.
    async fn start_exec(
        &self,
        container: Arc<Container>,
        process: Arc<Process>,
    ) -> TtrpcResult<StartResponse> {
        let exec = agent::ExecProcessRequest {
            container_id: container.id.clone(),
            exec_id: process.exec_id.clone(),
            process: process.spec.clone().into(),
            ..Default::default()
        };
        if let Err(e) = container.agent.exec_process(exec).await {
            // Nothing runs and nothing will report an exit: end waits (runc's shim does too).
            process.set_exit(Exit {
                status: NOT_STARTED_EXIT,
                at: SystemTime::now(),
            });
            let code = match e.code() {
                Some(code @ (Code::INVALID_ARGUMENT | Code::FAILED_PRECONDITION)) => code,
                _ => Code::INTERNAL,
            };
            // The agent's own message says what is wrong (e.g. which program is missing).
            let reason = e.message().map_or_else(|| e.to_string(), str::to_string);
            return Err(error(
                code,
                format!("starting {}: {reason}", describe(&container, &process)),
            ));
        }
        // The agent knows the process only now; its output waits in the guest's pipes.
        let (out, err) = copy_outputs(&container, &process);
        self.watch(container.clone(), process.clone(), out, err);
        self.events
            .publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: container.id.clone(),
                    exec_id: process.exec_id.clone(),
                    pid: container.pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(StartResponse {
            pid: container.pid,
            ..Default::default()
        })
    }

    /// A started process: copy its stdin, and have a waiter report its exit.
    fn watch(
        &self,
        container: Arc<Container>,
        process: Arc<Process>,
        out: JoinHandle<()>,
        err: JoinHandle<()>,
    ) {
        process.mark_started();
        process.set_stdin_copy(stdio::copy_input(
            container.agent.clone(),
            container.id.clone(),
            process.exec_id.clone(),
            process.stdio.stdin.clone(),
        ));
        tokio::spawn(waiter::wait_for_exit(
            container,
            process,
            self.events.clone(),
            out,
            err,
        ));
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let container = self.container(&req.id)?;
        if req.exec_id.is_empty() || req.exec_id == req.id {
            return Err(error(
                Code::INVALID_ARGUMENT,
                "exec needs an exec id other than the container's",
            ));
        }
        if container.init.status() != Status::RUNNING {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {:?} is not running", req.id),
            ));
        }
        let json = req.spec.as_ref().map(|any| any.value.as_slice());
        let mut spec = oci::exec_process(json.unwrap_or_default())
            .map_err(|err| error(Code::INVALID_ARGUMENT, err.to_string()))?;
        // The FIFOs containerd made follow the request's terminal flag.
        spec.Terminal = req.terminal;
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let process = Arc::new(Process::new(req.exec_id.clone(), stdio, Some(spec)));
        if !container.add_exec(process) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!(
                    "process {:?} of container {:?} already exists",
                    req.exec_id, req.id
                ),
            ));
        }
        self.events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn do_delete(&self, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let exit = match process.status() {
            Status::RUNNING => {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("{} is still running", describe(&container, &process)),
                ))
            }
            // Never started: nothing will report an exit, so the delete does.
            _ => process.exit().unwrap_or(Exit {
                status: 0,
                at: SystemTime::now(),
            }),
        };
        process.set_exit(exit);
        let deleted = DeleteResponse {
            pid: container.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        };
        if !process.is_init() {
            // Like runc's shim: an exec's delete only forgets it, and publishes no TaskDelete.
            container.remove_exec(&process.exec_id);
            return Ok(deleted);
        }
        let remove = agent::RemoveContainerRequest::of(&req.id, REMOVE_TIMEOUT_SECS);
        if let Err(err) = container.agent.remove_container(remove).await {
            // The VM may already be gone; the host side is cleaned up regardless.
            tracing::warn!(container = req.id, "RemoveContainer: {err}");
        }
        rootfs::unshare(Some(&container.bundle), &container.shared_dir, &req.id);
        lock(&self.containers).remove(&req.id);

        self.events
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id,
                    pid: container.pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(deleted)
    }

    async fn do_shutdown(&self) -> TtrpcResult<Empty> {
        if !lock(&self.containers).is_empty() {
            // Other containers of the sandbox still run here.
            return Ok(Empty::new());
        }
        // The teardown runs on its own task: ttrpc drops a handler at containerd's deadline (a few
        // seconds), and a teardown cut short would leave the VM running and the shim alive.
        let slot = self.sandbox.clone();
        let exit = self.exit.clone();
        tokio::spawn(async move {
            sandbox::stop_in(&slot).await;
            exit.signal();
        });
        Ok(Empty::new())
    }
}

/// Runs one task RPC and records its latency under `action`.
async fn timed<T>(action: &str, rpc: impl Future<Output = TtrpcResult<T>>) -> TtrpcResult<T> {
    let started = Instant::now();
    let result = rpc.await;
    SHIM_RPC_DURATIONS
        .with_label_values(&[action])
        .observe(started.elapsed().as_secs_f64() * 1000.0);
    match &result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            tracing::info!(action, code = ?status.code, "task RPC failed: {}", status.message)
        }
        Err(err) => tracing::info!(action, "task RPC failed: {err}"),
        Ok(_) => {}
    }
    result
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        timed("create", self.do_create(req)).await
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        timed("start", self.do_start(req)).await
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        timed("state", async {
            let (c, p) = self.process(&req.id, &req.exec_id)?;
            let exit = p.exit();
            Ok(StateResponse {
                id: c.id.clone(),
                bundle: c.bundle.display().to_string(),
                pid: c.pid,
                status: p.status().into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map(|e| e.status).unwrap_or_default(),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                exec_id: req.exec_id,
                ..Default::default()
            })
        })
        .await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        timed("kill", async {
            let (c, p) = self.process(&req.id, &req.exec_id)?;
            match p.status() {
                Status::STOPPED => {
                    return Err(error(
                        Code::NOT_FOUND,
                        format!("{} already finished", describe(&c, &p)),
                    ))
                }
                // The guest has no such process before Start.
                Status::CREATED if !p.is_init() => {
                    return Err(error(
                        Code::FAILED_PRECONDITION,
                        format!("{} was not started", describe(&c, &p)),
                    ))
                }
                _ => {}
            }
            c.agent
                .signal_process(agent::SignalProcessRequest::of(
                    &req.id, &p.exec_id, req.signal,
                ))
                .await
                .map_err(|err| {
                    error(
                        Code::INTERNAL,
                        format!("signalling {}: {err}", describe(&c, &p)),
                    )
                })?;
            Ok(Empty::new())
        })
        .await
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        timed("wait", async {
            let (_, p) = self.process(&req.id, &req.exec_id)?;
            let exit = p.wait().await;
            Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            })
        })
        .await
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        timed("delete", self.do_delete(req)).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        timed("pids", async {
            let c = self.container(&req.id)?;
            Ok(PidsResponse {
                processes: vec![ProcessInfo {
                    pid: c.pid,
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
        .await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        timed("connect", async {
            let task_pid = match lock(&self.containers).get(&req.id) {
                Some(c) => c.pid,
                None => 0,
            };
            Ok(ConnectResponse {
                shim_pid: std::process::id(),
                task_pid,
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            })
        })
        .await
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        timed("shutdown", self.do_shutdown()).await
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        timed("stats", async {
            let c = self.container(&req.id)?;
            let stats = agent::StatsContainerRequest::of(&req.id);
            let reply = c.agent.stats_container(stats).await.map_err(|err| {
                error(
                    Code::INTERNAL,
                    format!("reading the stats of {:?}: {err}", req.id),
                )
            })?;
            let any = super::stats::to_any(&reply).map_err(|err| {
                error(
                    Code::INTERNAL,
                    format!("encoding the stats of {:?}: {err}", req.id),
                )
            })?;
            Ok(StatsResponse {
                stats: Some(any).into(),
                ..Default::default()
            })
        })
        .await
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        timed("close_io", async {
            let (_, p) = self.process(&req.id, &req.exec_id)?;
            if req.stdin {
                // Let the copy finish what the FIFO still holds; it closes stdin in the guest at EOF.
                if let Some(copy) = p.take_stdin_copy() {
                    tokio::spawn(async move {
                        let abort = copy.abort_handle();
                        if tokio::time::timeout(waiter::DRAIN_TIMEOUT, copy)
                            .await
                            .is_err()
                        {
                            abort.abort();
                        }
                    });
                }
            }
            Ok(Empty::new())
        })
        .await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        timed("resize_pty", async {
            let (c, p) = self.process(&req.id, &req.exec_id)?;
            let resize = agent::TtyWinResizeRequest::of(&req.id, &p.exec_id, req.height, req.width);
            c.agent.tty_win_resize(resize).await.map_err(|err| {
                error(
                    Code::INTERNAL,
                    format!("resizing the terminal of {}: {err}", describe(&c, &p)),
                )
            })?;
            Ok(Empty::new())
        })
        .await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        timed("exec", self.do_exec(req)).await
    }
}

/// Copies the process's stdout and stderr to containerd's FIFOs.
fn copy_outputs(container: &Container, process: &Process) -> (JoinHandle<()>, JoinHandle<()>) {
    let copy = |stream, path: &str| {
        stdio::copy_output(
            container.agent.clone(),
            container.id.clone(),
            process.exec_id.clone(),
            stream,
            path.to_string(),
        )
    };
    (
        copy(OutStream::Stdout, &process.stdio.stdout),
        copy(OutStream::Stderr, &process.stdio.stderr),
    )
}

/// "container "c1"" or "exec "e1" of container "c1"", for messages.
fn describe(container: &Container, process: &Process) -> String {
    if process.is_init() {
        format!("container {:?}", container.id)
    } else {
        format!("exec {:?} of container {:?}", process.exec_id, container.id)
    }
}

fn error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// A poisoned lock only means another task panicked while holding it; the map is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The sandbox directory layout this shim would use for `id` (for `delete`).
pub fn shared_dir_of(run_dir: &Path, sandbox_id: &str) -> PathBuf {
    sandbox::SandboxDirs::new(run_dir, sandbox_id).shared
}
