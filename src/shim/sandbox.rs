//! One sandbox: its VM, the agent client, the guest-side sandbox (shared directory mounted), and
//! the metrics server. Started by the first container's Create, stopped by Shutdown; `delete`
//! uses [`clean_up_leftovers`] when the shim that owned it is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cadvisor::ContainerBook;
use super::config::{self, Config};
use super::hypervisor::{self, CgroupError, CgroupPath, Nic, Vm, VmConfig, VmError};
use super::metrics::launch::{self, SandboxMetrics};
use super::metrics::registry;
use super::network::{self, NetworkError};
use super::oci::{GUEST_SHARED_DIR, SHARED_TAG};
use super::rootfs;
use super::vm_fate::{VmFate, VmLoss};
use crate::agent_client::{AgentClient, AgentError};
use crate::mgmt::server::{remove_sandbox_files, MgmtServer};
use crate::mgmt::PodIdentity;
use crate::protocols::agent;

/// How long shutdown waits for the guest to tear its sandbox down before the VM is stopped.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the other teardown steps, so a stuck one cannot keep the shim alive for ever.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    #[error("sandbox {id}: creating {path}: {source}")]
    Dir {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox {id}: starting the VM: {source}")]
    Vm { id: String, source: VmError },
    #[error("sandbox {id}: wiring the pod's network into the VM: {source}")]
    Network { id: String, source: NetworkError },
    #[error("sandbox {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("sandbox {id}: the agent refused CreateSandbox: {source}")]
    CreateSandbox { id: String, source: AgentError },
}

/// Where a sandbox's host-side directories are.
#[derive(Debug, Clone)]
pub(crate) struct SandboxDirs {
    pub(crate) run_dir: PathBuf,
    /// `<run dir>/<id>/shared`: exported to the guest as 9p tag `kataShared`.
    pub(crate) shared: PathBuf,
    /// `<run dir>/<id>/vm`: QEMU's and the vsock daemon's sockets and pid files.
    pub(crate) vm_state: PathBuf,
}

impl SandboxDirs {
    pub(crate) fn new(run_dir: &Path, id: &str) -> SandboxDirs {
        let dir = crate::mgmt::paths::sandbox_dir(run_dir, id);
        SandboxDirs {
            run_dir: run_dir.to_path_buf(),
            shared: dir.join("shared"),
            vm_state: dir.join("vm"),
        }
    }
}

pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) dirs: SandboxDirs,
    pub(crate) agent: Arc<AgentClient>,
    /// Whether the VM still runs the guest; every container of the sandbox shares it.
    pub(crate) fate: Arc<VmFate>,
    vm: Vm,
    mgmt: Option<MgmtServer>,
}

impl Sandbox {
    /// Wires the pod's network, boots the VM, configures the guest's NICs, has the agent mount the
    /// shared directory, and starts the metrics server. On failure nothing of the sandbox is left
    /// behind.
    pub(crate) async fn start(
        config: &Config,
        id: &str,
        namespace: &str,
        spec: SandboxSpec,
        containers: Arc<ContainerBook>,
    ) -> Result<Sandbox, SandboxError> {
        let cgroup = match spec
            .cgroups_path
            .as_deref()
            .map(CgroupPath::parse)
            .transpose()
        {
            Ok(path) => path,
            Err(err @ CgroupError::SystemdPath { .. }) => {
                tracing::warn!(sandbox = id, "{err}: the VM runs in the shim's cgroups");
                None
            }
            Err(source) => {
                return Err(SandboxError::Cgroup {
                    id: id.to_string(),
                    source,
                })
            }
        };
        let dirs = SandboxDirs::new(&config.run_dir(), id);
        // The VM creates its own state directory (and refuses one that exists: leftovers).
        create_private_dir(&dirs.shared).map_err(|source| SandboxError::Dir {
            id: id.to_string(),
            path: dirs.shared.clone(),
            source,
        })?;
        let (pod_network, nics) = match &spec.netns {
            Some(netns) => match network::prepare(netns).await {
                Ok(prepared) => prepared,
                Err(source) => {
                    remove_dirs(&dirs, id);
                    return Err(SandboxError::Network {
                        id: id.to_string(),
                        source,
                    });
                }
            },
            None => Default::default(),
        };
        let started = Instant::now();
        let vm = match Vm::start(&vm_config(config, &dirs, nics, cgroup)).await {
            Ok(vm) => vm,
            Err(source) => {
                remove_dirs(&dirs, id);
                return Err(SandboxError::Vm {
                    id: id.to_string(),
                    source,
                });
            }
        };
        let vm_ready = started.elapsed();
        let agent = Arc::new(
            AgentClient::new(vm.agent_url().clone(), config.agent_timeouts())
                .with_durations(Some(registry::agent_rpc_durations())),
        );

        let started = Instant::now();
        if let Err(source) = pod_network.configure_guest(&agent).await {
            abandon(vm, &dirs, id).await;
            return Err(SandboxError::Network {
                id: id.to_string(),
                source,
            });
        }
        if let Err(source) = create_guest_sandbox(&agent, id).await {
            abandon(vm, &dirs, id).await;
            return Err(SandboxError::CreateSandbox {
                id: id.to_string(),
                source,
            });
        }
        let create_sandbox = started.elapsed();

        let started = Instant::now();
        // Metrics are an add-on: a sandbox runs even if its metrics server cannot start.
        let mgmt = match launch::start(SandboxMetrics {
            sandbox_id: id.to_string(),
            namespace: namespace.to_string(),
            run_dir: dirs.run_dir.clone(),
            hypervisor_pid: Some(vm.pid()),
            vsock_daemon_pid: vm.vsock_daemon_pid(),
            agent: agent.clone(),
            agent_text_limits: config.agent_text_limits(),
            abstract_socket: config.runtime.abstract_socket,
            pod: spec.pod,
            containers,
        })
        .await
        {
            Ok(server) => Some(server),
            Err(err) => {
                tracing::error!(sandbox = id, "metrics server not started: {err}");
                None
            }
        };
        // How long each step took, for the log (the sandbox benchmark prints this line).
        tracing::info!(
            sandbox = id,
            ?vm_ready,
            ?create_sandbox,
            metrics_server = ?started.elapsed(),
            vm = ?vm.timings(),
            "sandbox is up"
        );
        Ok(Sandbox {
            id: id.to_string(),
            dirs,
            agent,
            fate: Arc::default(),
            vm,
            mgmt,
        })
    }

    /// Why the VM can no longer run the guest ([`Vm::trouble`]); `None` once it is lost.
    pub(crate) fn vm_trouble(&mut self) -> Option<String> {
        if self.fate.loss().is_some() {
            return None;
        }
        self.vm.trouble()
    }

    /// Stops the VM and records it as lost, which ends the waits of the sandbox's processes; the
    /// rest of the sandbox stays for [`Sandbox::stop`].
    pub(crate) async fn lose_vm(&mut self, loss: VmLoss) {
        tracing::error!(
            sandbox = self.id,
            reason = loss.reason,
            "the VM cannot run the guest any more; stopping it"
        );
        if let Err(err) = self.vm.stop().await {
            tracing::warn!(sandbox = self.id, "stopping the VM: {err}");
        }
        self.fate.lose(loss);
    }

    /// The VMM's pid: what containerd sees as every task's pid.
    pub(crate) fn pid(&self) -> u32 {
        u32::try_from(self.vm.pid()).unwrap_or_default()
    }

    /// Tears the sandbox down: guest sandbox, metrics server, VM, and every file of it.
    pub(crate) async fn stop(mut self) {
        tracing::info!(sandbox = self.id, "stopping the sandbox");
        if self.fate.loss().is_none() {
            self.destroy_guest_sandbox().await;
        }
        if let Some(mgmt) = self.mgmt {
            if tokio::time::timeout(STEP_TIMEOUT, mgmt.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(sandbox = self.id, "the metrics server did not stop in time");
            }
        }
        registry::unregister_hypervisor();
        match tokio::time::timeout(STEP_TIMEOUT * 3, self.vm.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(sandbox = self.id, "stopping the VM: {err}"),
            Err(_) => {
                tracing::warn!(sandbox = self.id, "the VM did not stop in time; killing it");
                clean_up_leftovers(&self.dirs.run_dir, &self.id);
            }
        }
        remove_dirs(&self.dirs, &self.id);
        tracing::info!(sandbox = self.id, "sandbox stopped");
    }
}

impl Sandbox {
    async fn destroy_guest_sandbox(&self) {
        let destroy = self
            .agent
            .destroy_sandbox(agent::DestroySandboxRequest::new());
        match tokio::time::timeout(DESTROY_TIMEOUT, destroy).await {
            Ok(Ok(_)) => {}
            // The guest powers off as it answers: a connection that ends is what we asked for.
            Ok(Err(err)) if err.code().is_none() => {
                tracing::debug!(sandbox = self.id, "DestroySandbox: {err}")
            }
            Ok(Err(err)) => tracing::warn!(sandbox = self.id, "DestroySandbox: {err}"),
            Err(_) => tracing::warn!(
                sandbox = self.id,
                "DestroySandbox: no answer within {DESTROY_TIMEOUT:?}"
            ),
        }
    }
}

/// How often the watchdog looks at the VM's processes.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The slot's watchdog, for as long as it holds a sandbox whose VM runs: a VM that can no longer
/// run the guest ([`Sandbox::vm_trouble`]) is stopped and lost, within one interval.
pub(crate) async fn watch_vm(slot: SandboxSlot) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let mut guard = slot.lock().await;
        let Some(sandbox) = guard.as_mut() else {
            return;
        };
        if sandbox.fate.loss().is_some() {
            return;
        }
        if let Some(reason) = sandbox.vm_trouble() {
            sandbox
                .lose_vm(VmLoss {
                    reason,
                    killed: false,
                })
                .await;
            return;
        }
    }
}

/// What the sandbox container's OCI spec says about the sandbox.
#[derive(Debug, Default)]
pub(crate) struct SandboxSpec {
    /// Pod labels for kata-monitor, from the CRI annotations.
    pub(crate) pod: Option<PodIdentity>,
    /// The network namespace CNI set up for the pod; without one the VM gets no NIC.
    pub(crate) netns: Option<PathBuf>,
    /// The sandbox container's `linux.cgroupsPath` (under kubelet's pod cgroup): QEMU and the
    /// vsock daemon run there, so the VM's host cost is the pod's (Kata's `sandbox_cgroup_only`).
    /// A systemd driver's path (slice:prefix:name) is logged and left out; a path that leaves
    /// the hierarchy fails the start.
    pub(crate) cgroups_path: Option<String>,
}

/// Stops a VM whose sandbox failed to come up, and removes the sandbox's files.
async fn abandon(mut vm: Vm, dirs: &SandboxDirs, id: &str) {
    if let Err(err) = vm.stop().await {
        tracing::warn!(sandbox = id, "stopping the VM: {err}");
    }
    remove_dirs(dirs, id);
}

/// The shim's one sandbox, shared by the task service (which starts it) and the shim's exit path.
pub(crate) type SandboxSlot = Arc<tokio::sync::Mutex<Option<Sandbox>>>;

/// Stops the slot's sandbox, if any. The lock is held throughout, so a second caller (Shutdown
/// racing SIGTERM) returns only once the first one's teardown is done.
pub(crate) async fn stop_in(slot: &SandboxSlot) {
    let mut sandbox = slot.lock().await;
    if let Some(sandbox) = sandbox.take() {
        sandbox.stop().await;
    }
}

/// Removes what a sandbox of `id` left when its shim died: VM processes (by their pid files),
/// container mounts, sockets and directories. Safe to run when nothing is left.
pub(crate) fn clean_up_leftovers(run_dir: &Path, id: &str) {
    let dirs = SandboxDirs::new(run_dir, id);
    if let Err(err) = hypervisor::kill_leftovers(&dirs.vm_state) {
        tracing::warn!(sandbox = id, "killing the VM's leftovers: {err}");
    }
    remove_dirs(&dirs, id);
}

fn remove_dirs(dirs: &SandboxDirs, id: &str) {
    rootfs::unshare_all(&dirs.shared);
    if dirs.vm_state.is_dir() {
        let _ = std::fs::remove_dir_all(&dirs.vm_state);
    }
    if let Err(err) = remove_sandbox_files(&dirs.run_dir, id) {
        tracing::warn!("removing the sandbox's files: {err}");
    }
}

async fn create_guest_sandbox(agent: &AgentClient, id: &str) -> Result<(), AgentError> {
    let req = agent::CreateSandboxRequest {
        hostname: id.chars().take(63).collect(),
        sandbox_id: id.to_string(),
        storages: vec![agent::Storage {
            driver: "9p".to_string(),
            source: SHARED_TAG.to_string(),
            fstype: "9p".to_string(),
            mount_point: GUEST_SHARED_DIR.to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    agent.create_sandbox(req).await.map(drop)
}

fn vm_config(
    config: &Config,
    dirs: &SandboxDirs,
    nics: Vec<Nic>,
    cgroup: Option<CgroupPath>,
) -> VmConfig {
    let qemu = &config.hypervisor.qemu;
    VmConfig {
        qemu_path: qemu.path.clone(),
        kernel: qemu.kernel.clone(),
        initrd: qemu.initrd.clone(),
        memory_mib: qemu.default_memory,
        vcpus: qemu.default_vcpus,
        accel: match qemu.accel {
            config::Accel::Auto => hypervisor::Accel::Auto,
            config::Accel::Kvm => hypervisor::Accel::Kvm,
            config::Accel::Tcg => hypervisor::Accel::Tcg,
        },
        vsock_daemon: qemu.vsock_daemon.clone(),
        agent_durations: Some(registry::agent_rpc_durations()),
        share_dir: dirs.shared.clone(),
        state_dir: dirs.vm_state.clone(),
        boot_timeout: qemu.boot_timeout.0,
        kernel_params: if qemu.kernel_params.is_empty() {
            hypervisor::DEFAULT_KERNEL_PARAMS.to_string()
        } else {
            qemu.kernel_params.clone()
        },
        nics,
        cgroup,
    }
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose run directory is `dir` and whose guest kernel does not exist, so
    /// that a start gets no further than the VM's configuration check.
    fn config(dir: &Path) -> Config {
        let mut config = Config::default();
        config.runtime.sandbox_run_dir = Some(dir.to_path_buf());
        config.hypervisor.qemu.kernel = dir.join("no-kernel");
        config
    }

    fn in_cgroup(path: &str) -> SandboxSpec {
        SandboxSpec {
            cgroups_path: Some(path.to_string()),
            ..SandboxSpec::default()
        }
    }

    #[tokio::test]
    async fn a_cgroups_path_leaving_the_hierarchy_fails_the_start_before_anything_exists() {
        let dir = tempfile::tempdir().unwrap();
        let result = Sandbox::start(
            &config(dir.path()),
            "sb",
            "ns",
            in_cgroup("/a/../../b"),
            Arc::default(),
        )
        .await;
        let Err(err @ SandboxError::Cgroup { .. }) = result else {
            panic!("expected a cgroup error");
        };
        assert!(err.to_string().contains("/a/../../b"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_systemd_drivers_path_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let spec = in_cgroup("system.slice:cri-containerd:sb");
        let result = Sandbox::start(&config(dir.path()), "sb", "ns", spec, Arc::default()).await;
        // Past the cgroup, up to the VM's check of its kernel.
        let Err(SandboxError::Vm {
            source: VmError::MissingFile { .. },
            ..
        }) = result
        else {
            panic!("expected the missing kernel");
        };
    }
}
