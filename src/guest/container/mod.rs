//! Running containers in the guest: the agent's side of CreateContainer .. RemoveContainer.
//!
//! - [`spec`]: OCI spec to init configuration (validation);
//! - [`spawn`]: clone + re-exec of the agent as the container's init;
//! - [`init`]: that init, which builds the container's view and execs the program at start;
//! - [`stdio`]: pipes or a pty, with blocking reads that return empty data at EOF;
//! - [`state`]: one process (a container's init or an exec'd one) and its lifecycle;
//! - [`storage`]: sandbox storages (9p shares);
//! - [`cgroup`], [`stats`], [`cgroup_stats`]: a cgroup v2 per container, and StatsContainer's
//!   figures (from that cgroup's files).
//!
//! What the shim can rely on:
//! - `OCI.Root.Path` is an absolute path in the guest (e.g. under a 9p share that CreateSandbox
//!   mounted); bind mount sources are guest paths too. Mounts: proc, sysfs, tmpfs, devtmpfs,
//!   mqueue, bind/rbind; devpts becomes a bind of the guest's /dev/pts (where the agent's ptys
//!   live); a cgroup mount (v1 or v2) is the guest's cgroup v2, so a container reads its own
//!   figures and limits at `/sys/fs/cgroup/kata/<id>`. /proc is always mounted, /dev always gets null, zero, full,
//!   random, urandom, tty. Rlimits, OOMScoreAdj, NoNewPrivileges apply; Linux.{MaskedPaths,
//!   ReadonlyPaths, Sysctl, Namespaces} are ignored (the VM is the isolation boundary).
//! - CreateContainer does all the setup and finds the program, so a missing program fails
//!   CreateContainer (INVALID_ARGUMENT); StartContainer only execs, and an exec failure comes back
//!   as FAILED_PRECONDITION (the process then exits 127).
//! - ReadStdout/ReadStderr block until data; empty data means EOF. With a terminal all output is
//!   on stdout and stderr is at EOF at once. A read the client abandons still consumes the data
//!   it gets, so keep one reader per stream.
//! - WaitProcess: exit code, or 128 + N after signal N; any number of times, before or after exit.
//! - SignalProcess after the exit succeeds (nothing to signal). An empty exec_id (or the container
//!   id) names the init; SIGKILL to it ends every process of the container.
//! - StatsContainer: CPU (ns, throttling), memory and pids of the container's cgroup (cpu.stat,
//!   memory.*, every memory.stat key in `MemoryStats.stats`, memory.events as described in
//!   [`crate::protocols::memory_events`], pids.*; from /proc where a controller is missing), and
//!   the guest's interfaces but lo.
//! - NOT_FOUND for unknown containers/processes, ALREADY_EXISTS for duplicates, INVALID_ARGUMENT
//!   for specs the agent cannot run.

pub mod cgroup;
pub(crate) mod cgroup_stats;
pub mod init;
pub(crate) mod limits;
pub mod spawn;
pub(crate) mod spec;
pub(crate) mod state;
pub(crate) mod stats;
pub(crate) mod stdio;
pub(crate) mod storage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use ttrpc::Code;

use crate::guest::reaper::Reaper;
use crate::protocols::agent;
use cgroup::{Cgroup, CgroupRoot};
use state::Process;

/// A container: its init (PID 1 of the container) and the processes ExecProcess added.
pub(crate) struct Container {
    pub(crate) init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Every process of the container is in it, when the guest has cgroup2.
    cgroup: Option<Cgroup>,
}

impl Container {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long DestroySandbox waits for each container to die after SIGKILL.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type RpcResult<T> = ttrpc::Result<T>;

pub(crate) fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// Every container of the sandbox, and the storages mounted for it.
pub struct Containers {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    storages: Mutex<Vec<PathBuf>>,
    cgroups: CgroupRoot,
}

impl Containers {
    pub(crate) fn new(reaper: Reaper, cgroups: CgroupRoot) -> Self {
        Containers {
            reaper,
            cgroups,
            containers: Mutex::new(HashMap::new()),
            storages: Mutex::new(Vec::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container, or NOT_FOUND.
    pub(crate) fn get(&self, id: &str) -> RpcResult<Arc<Container>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id:?} not found")))
    }

    /// A process of a container: its init for an empty exec_id (or one equal to the container
    /// id), else a process started by ExecProcess.
    pub(crate) fn process(&self, id: &str, exec_id: &str) -> RpcResult<Arc<Process>> {
        let container = self.get(id)?;
        if exec_id.is_empty() || exec_id == id {
            return Ok(container.init.clone());
        }
        let exec = container.execs().get(exec_id).cloned();
        exec.ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec_id:?} of container {id:?} not found"),
            )
        })
    }

    /// Starts one more process in a running container's namespaces.
    pub(crate) async fn exec(&self, req: agent::ExecProcessRequest) -> RpcResult<()> {
        let id = &req.container_id;
        let exec_id = req.exec_id.clone();
        let container = self.get(id)?;
        if exec_id.is_empty() || exec_id == *id {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "ExecProcess needs an exec_id other than the container id",
            ));
        }
        if container.execs().contains_key(&exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("process {exec_id:?} of container {id:?} already exists"),
            ));
        }
        if container.init.exited().is_some() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id:?} is not running"),
            ));
        }
        let process = req
            .process
            .into_option()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "ExecProcess without a process"))?;
        let label = format!("process {exec_id:?} of container {id:?}");
        let launched = Process::exec(
            &self.reaper,
            label,
            container.init.pid,
            process,
            container.cgroup.as_ref(),
        )
        .await?;
        let mut execs = container.execs();
        if execs.contains_key(&exec_id) {
            drop(execs);
            launched.kill(&self.reaper, Signal::SIGKILL);
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("process {exec_id:?} of container {id:?} already exists"),
            ));
        }
        execs.insert(exec_id, Arc::new(launched));
        Ok(())
    }

    pub(crate) async fn create_sandbox(&self, req: &agent::CreateSandboxRequest) -> RpcResult<()> {
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

    pub(crate) async fn create(&self, req: agent::CreateContainerRequest) -> RpcResult<()> {
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
        let resources = spec
            .Linux
            .as_ref()
            .and_then(|linux| linux.Resources.as_ref())
            .cloned();
        let init = Process::create_init(&self.reaper, format!("container {id:?}"), spec).await?;
        // The init waits for StartContainer now: moved in before it execs, everything the
        // program starts is in the cgroup.
        let cgroup = self
            .cgroups
            .create(&id)
            .and_then(|cgroup| match cgroup.add(init.pid) {
                Ok(()) => Some(cgroup),
                Err(err) => {
                    tracing::warn!(%id, %err, "cannot move the container's init into its cgroup");
                    None
                }
            });
        if let (Some(cgroup), Some(resources)) = (&cgroup, &resources) {
            // Before the program runs: it never sees itself without its limits.
            if let Err(err) = limits::apply(cgroup.path(), resources) {
                init.kill(&self.reaper, Signal::SIGKILL);
                cgroup.remove().await;
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!("container {id:?}: {err}"),
                ));
            }
        }
        let mut map = self.map();
        if map.contains_key(&id) {
            // Lost a race with a concurrent create of the same id (whose cgroup this is too).
            drop(map);
            init.kill(&self.reaper, Signal::SIGKILL);
            return Err(already_exists(&id));
        }
        let container = Container {
            init: Arc::new(init),
            execs: Mutex::new(HashMap::new()),
            cgroup,
        };
        map.insert(id, Arc::new(container));
        Ok(())
    }

    pub(crate) async fn start(&self, id: &str) -> RpcResult<()> {
        self.get(id)?.init.start().await
    }

    /// Signals the container's process. Signalling a process that has already exited is not an
    /// error (the shim's kill after exit races with the exit anyway).
    pub(crate) fn signal(&self, id: &str, exec_id: &str, signal: u32) -> RpcResult<()> {
        let process = self.process(id, exec_id)?;
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("invalid signal {signal}")))?;
        process.kill(&self.reaper, signal);
        Ok(())
    }

    /// Kills a container that still runs (SIGKILL to its init takes the whole pid namespace,
    /// exec'd processes too), waits up to `timeout` (zero: no bound) for the init to be reaped,
    /// and forgets the container.
    pub(crate) async fn remove(&self, id: &str, timeout: Duration) -> RpcResult<()> {
        let container = self.get(id)?;
        let init = container.init.clone();
        init.kill(&self.reaper, Signal::SIGKILL);
        let wait = init.wait();
        if timeout.is_zero() {
            wait.await;
        } else if tokio::time::timeout(timeout, wait).await.is_err() {
            return Err(status(
                Code::DEADLINE_EXCEEDED,
                format!("container {id:?} did not exit within {timeout:?} of SIGKILL"),
            ));
        }
        self.map().remove(id);
        if let Some(cgroup) = &container.cgroup {
            cgroup.remove().await;
        }
        Ok(())
    }

    /// UpdateContainer: the container's new limits, in its cgroup.
    pub(crate) async fn update(
        &self,
        id: &str,
        resources: &crate::protocols::oci::LinuxResources,
    ) -> RpcResult<()> {
        let container = self.get(id)?;
        let Some(cgroup) = &container.cgroup else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id:?} has no cgroup to apply limits to"),
            ));
        };
        limits::apply(cgroup.path(), resources)
            .map_err(|err| status(Code::INVALID_ARGUMENT, format!("container {id:?}: {err}")))
    }

    /// The container's resource usage (see the module docs).
    pub(crate) async fn stats(&self, id: &str) -> RpcResult<agent::StatsContainerResponse> {
        let container = self.get(id)?;
        let pid = container.init.pid;
        tokio::task::spawn_blocking(move || {
            stats::container_stats(container.cgroup.as_ref().map(Cgroup::path), pid)
        })
        .await
        .map_err(|e| status(Code::INTERNAL, format!("reading the stats of {id:?}: {e}")))
    }

    /// StatsContainers: the entries of the listed containers this agent runs (at most
    /// [`MAX_STATS_CONTAINERS`]), unknown ids left out, and the guest's interfaces once.
    pub(crate) async fn stats_many(
        &self,
        ids: &[String],
    ) -> RpcResult<agent::StatsContainersResponse> {
        let known: Vec<(String, Option<PathBuf>, Pid)> = {
            let map = self.map();
            ids.iter()
                .take(MAX_STATS_CONTAINERS)
                .filter_map(|id| {
                    let c = map.get(id)?;
                    let cgroup = c.cgroup.as_ref().map(|g| g.path().to_path_buf());
                    Some((id.clone(), cgroup, c.init.pid))
                })
                .collect()
        };
        tokio::task::spawn_blocking(move || {
            let mut reply = agent::StatsContainersResponse::new();
            reply.containers = known
                .iter()
                .map(|(id, cgroup, pid)| stats::container_entry(id, cgroup.as_deref(), *pid))
                .collect();
            reply.network_stats = stats::guest_network();
            reply
        })
        .await
        .map_err(|e| {
            status(
                Code::INTERNAL,
                format!("reading the containers' stats: {e}"),
            )
        })
    }
}

/// A sandbox runs tens of containers at most; a longer list is cut here.
const MAX_STATS_CONTAINERS: usize = 256;

fn already_exists(id: &str) -> ttrpc::Error {
    status(
        Code::ALREADY_EXISTS,
        format!("container {id:?} already exists"),
    )
}
