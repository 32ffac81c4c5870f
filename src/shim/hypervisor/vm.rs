//! A QEMU sandbox VM's lifecycle: starting the vsock daemon and QEMU, waiting for the agent, and
//! stopping both again (or killing them when the [`Vm`] is dropped).
//!
//! The agent is reached over vsock. With `/dev/vhost-vsock` the guest gets a `vhost-vsock-pci`
//! device and a free context id, and the agent is `vsock://<cid>:1024`. Without it (nested or
//! restricted hosts), a `vhost-device-vsock` daemon per VM serves a `vhost-user-vsock-pci` device
//! and joins unix connections on `<state_dir>/vm.vsock` to guest ports (hybrid vsock:
//! `hvsock://<state_dir>/vm.vsock:1024`); QEMU's guest memory must then be a shared memfd so that
//! the daemon can map it.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::accel::resolve_accel;
use super::child_process::{child_pid, signal_child, spawn_detached, stop_child, STOP_GRACE};
use super::cmdline::{qemu_args, VsockDevice};
use super::config_checks::{check_config, check_socket_path};
use super::console_gate::{ConsoleGate, CONSOLE_POLL};
use super::leftovers::{write_cgroup_record, write_pid_file};
use super::logs::{log_file, log_tail};
use super::qmp::qmp_quit;
use super::relay_watch::RelayWatch;
use super::sandbox_cgroup::SandboxCgroup;
use super::state_files::{
    CONSOLE_LOG, DAEMON_LOG, DAEMON_PID, HYBRID_VSOCK_SOCKET, QEMU_LOG, QMP_SOCKET,
    VHOST_USER_SOCKET,
};
use super::vsock_cid::{find_free_cid, VHOST_VSOCK_DEVICE};
use super::{Accel, BootTimings, VmConfig, VmError};
use crate::agent::url::{AgentUrl, DEFAULT_AGENT_PORT};
use crate::agent_client::{AgentClient, AgentTimeouts, RpcDurations};

/// How many times a boot starts the VM when the vsock daemon stops relaying (see `relay_watch`).
const BOOT_ATTEMPTS: u32 = 3;
/// The longest a boot health check waits for one answer before it tries again.
const MAX_HEALTH_CHECK_PATIENCE: Duration = Duration::from_secs(8);
/// The guest context id given to the vsock daemon (each VM has its own daemon).
const HYBRID_GUEST_CID: u32 = 3;
/// How long the vsock daemon may take to create its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU gets after `quit` before [`Vm::stop`] suspects the vsock daemon holds it up.
const QUIT_WAIT: Duration = Duration::from_secs(1);

/// A running sandbox VM. Dropping it without [`Vm::stop`] kills its processes and removes its state
/// directory (best effort, without waiting).
pub struct Vm {
    state_dir: PathBuf,
    agent_url: AgentUrl,
    timings: BootTimings,
    accel: Accel,
    qemu: Option<Child>,
    qemu_pid: i32,
    daemon: Option<Child>,
    daemon_pid: Option<i32>,
    /// Where QEMU and the daemon run, when the configuration names a cgroup.
    cgroup: Option<SandboxCgroup>,
    /// Set once the state directory is ours to remove (we created it).
    owns_state_dir: bool,
    /// Whether the vsock daemon still relays (see [`Vm::trouble`]).
    relay: Option<RelayWatch>,
}

impl Vm {
    /// Starts the VM and waits until its agent answers `grpc.Health/Check`. On any failure, whatever
    /// was started is killed and the state directory removed.
    pub async fn start(cfg: &VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        check_config(cfg)?;
        let hybrid = !Path::new(VHOST_VSOCK_DEVICE).exists();
        for name in [QMP_SOCKET, VHOST_USER_SOCKET, HYBRID_VSOCK_SOCKET] {
            check_socket_path(&cfg.state_dir.join(name))?;
        }
        if cfg.state_dir.exists() {
            return Err(VmError::StateDirExists(cfg.state_dir.clone()));
        }
        if let Some(parent) = cfg.state_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| VmError::io(format!("creating directory {}", parent.display()), e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(|e| {
                VmError::io(
                    format!("creating VM state directory {}", cfg.state_dir.display()),
                    e,
                )
            })?;
        let mut vm = Vm {
            state_dir: cfg.state_dir.clone(),
            agent_url: AgentUrl::Hvsock {
                path: cfg.state_dir.join(HYBRID_VSOCK_SOCKET),
                port: DEFAULT_AGENT_PORT,
            },
            timings: BootTimings::default(),
            accel: cfg.accel,
            qemu: None,
            qemu_pid: 0,
            daemon: None,
            daemon_pid: None,
            cgroup: None,
            owns_state_dir: true,
            relay: None,
        };
        match vm.boot(cfg, hybrid, started).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                vm.kill_now().await;
                Err(err)
            }
        }
    }

    /// Where the guest's agent answers.
    pub fn agent_url(&self) -> &AgentUrl {
        &self.agent_url
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.qemu_pid
    }

    /// The vsock daemon's process id, when the VM uses one.
    pub fn vsock_daemon_pid(&self) -> Option<i32> {
        self.daemon_pid
    }

    /// The accelerator QEMU runs with (never [`Accel::Auto`] once started).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// Why the VM can no longer run its guest, if it cannot: QEMU or the vsock daemon exited (and
    /// is reaped here, so no zombie is left to be reported as running), or the daemon lost the
    /// thread that relays (its process then lives on, but relays nothing). `None` while
    /// both run, also when QEMU is merely stopped (the guest resumes on SIGCONT).
    pub(crate) fn trouble(&mut self) -> Option<String> {
        let qemu = self.qemu.as_mut()?;
        if let Ok(Some(status)) = qemu.try_wait() {
            return Some(format!("QEMU (pid {}) exited: {status}", self.qemu_pid));
        }
        let daemon = self.daemon.as_mut()?;
        if let Ok(Some(status)) = daemon.try_wait() {
            return Some(format!(
                "the vsock daemon (pid {}) exited: {status}",
                self.daemon_pid.unwrap_or_default()
            ));
        }
        self.relay_lost()
    }

    /// Why the vsock daemon relays nothing any more although it runs (see [`RelayWatch`]).
    fn relay_lost(&mut self) -> Option<String> {
        let log = self.state_dir.join(DAEMON_LOG);
        self.relay.as_mut()?.lost(&log)
    }

    /// Stops QEMU (QMP `quit`, then SIGTERM, then SIGKILL), then the vsock daemon, and removes the
    /// sandbox cgroup and the state directory. Calling it again does nothing.
    pub async fn stop(&mut self) -> Result<(), VmError> {
        if let Some(mut qemu) = self.qemu.take() {
            let quit = tokio::time::timeout(STOP_GRACE, qmp_quit(&self.state_dir.join(QMP_SOCKET)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "QMP did not answer"))
                .and_then(|r| r);
            if let Err(err) = quit {
                tracing::debug!("QMP quit failed ({err}); sending SIGTERM to QEMU");
                signal_child(&qemu, Signal::SIGTERM);
            }
            let exited = tokio::time::timeout(QUIT_WAIT, qemu.wait()).await.is_ok();
            if !exited {
                // With guest connections still open, QEMU's vhost-user teardown waits on the vsock
                // daemon: take the daemon away (nothing of it outlives the VM) and QEMU goes on.
                if let Some(mut daemon) = self.daemon.take() {
                    tracing::debug!(
                        "QEMU still running after quit; killing the vsock daemon first"
                    );
                    let _ = daemon.start_kill();
                    let _ = tokio::time::timeout(STOP_GRACE, daemon.wait()).await;
                }
                stop_child(&mut qemu, "QEMU").await;
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            signal_child(&daemon, Signal::SIGTERM);
            stop_child(&mut daemon, "the vsock daemon").await;
        }
        let cgroup = self.remove_cgroup();
        let state_dir = self.remove_state_dir();
        cgroup.and(state_dir)
    }

    async fn boot(
        &mut self,
        cfg: &VmConfig,
        hybrid: bool,
        started: Instant,
    ) -> Result<(), VmError> {
        if let Some(path) = &cfg.cgroup {
            // Recorded before it exists, so that `delete` after a crash finds even half of it.
            write_cgroup_record(&self.state_dir, path)?;
            self.cgroup = Some(SandboxCgroup::create(path.clone())?);
        }
        // The accelerator next: the KVM probe boots a VM of its own.
        let probe_started = Instant::now();
        self.accel = resolve_accel(cfg).await?;
        self.timings.accel_probe = probe_started.elapsed();

        // One deadline for every attempt: a retry does not extend the boot timeout.
        let deadline = Instant::now() + cfg.boot_timeout;
        let mut attempt = 1;
        let qemu_started = loop {
            let vsock = self.start_vsock(cfg, hybrid).await?;
            let qemu_started = Instant::now();
            self.start_qemu(cfg, vsock)?;
            match self
                .wait_for_agent(cfg.boot_timeout, deadline, cfg.agent_durations.clone())
                .await
            {
                Ok(()) => break qemu_started,
                // The daemon's known fault (see `relay_watch`) is not the guest's: boot afresh.
                Err(VmError::RelayLost { why, .. }) if attempt < BOOT_ATTEMPTS => {
                    tracing::warn!(attempt, "starting the VM again: {why}");
                    self.kill_processes().await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        };
        self.timings.qemu_to_agent = qemu_started.elapsed();
        self.timings.total = started.elapsed();
        tracing::info!(
            pid = self.qemu_pid,
            accel = %self.accel,
            agent = %self.agent_url,
            boot_ms = self.timings.qemu_to_agent.as_millis() as u64,
            "VM ready"
        );
        Ok(())
    }

    /// The vsock device for QEMU: a vhost-user daemon of our own, or a free context id of the
    /// host's vhost-vsock.
    async fn start_vsock(&mut self, cfg: &VmConfig, hybrid: bool) -> Result<VsockDevice, VmError> {
        if hybrid {
            let daemon_started = Instant::now();
            self.start_daemon(cfg).await?;
            self.timings.vsock_daemon = daemon_started.elapsed();
            return Ok(VsockDevice::VhostUser);
        }
        let cid = find_free_cid().map_err(|e| {
            VmError::io(
                format!("finding a free vsock context id in {VHOST_VSOCK_DEVICE}"),
                e,
            )
        })?;
        self.agent_url = AgentUrl::Vsock {
            cid,
            port: DEFAULT_AGENT_PORT,
        };
        Ok(VsockDevice::Vhost { cid })
    }

    async fn start_daemon(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let vhu = self.state_dir.join(VHOST_USER_SOCKET);
        let uds = self.state_dir.join(HYBRID_VSOCK_SOCKET);
        for stale in [&vhu, &uds] {
            let _ = std::fs::remove_file(stale);
        }
        let log = log_file(&self.state_dir.join(DAEMON_LOG))?;
        let mut cmd = Command::new(&cfg.vsock_daemon);
        cmd.arg("--guest-cid")
            .arg(HYBRID_GUEST_CID.to_string())
            .arg("--socket")
            .arg(&vhu)
            .arg("--uds-path")
            .arg(&uds);
        let child = spawn_detached(
            cmd,
            log,
            "the vsock daemon",
            &cfg.vsock_daemon,
            &[],
            self.cgroup.as_ref(),
        )?;
        let pid = child_pid(&child);
        self.daemon_pid = Some(pid);
        self.daemon = Some(child);
        self.relay = Some(RelayWatch::new(pid));
        write_pid_file(&self.state_dir.join(DAEMON_PID), pid)?;

        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        while !vhu.exists() {
            if let Some(err) = self.daemon_exited() {
                return Err(err);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: "the vsock daemon",
                    timeout: DAEMON_START_TIMEOUT,
                    reason: format!("{} was not created", vhu.display()),
                    log_name: DAEMON_LOG,
                    log_tail: log_tail(&self.state_dir.join(DAEMON_LOG)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The vsock daemon's exit, if it has exited (the VM cannot work without it).
    fn daemon_exited(&mut self) -> Option<VmError> {
        let status = self.daemon.as_mut()?.try_wait().ok()??;
        Some(VmError::Exited {
            what: "the vsock daemon",
            status: status.to_string(),
            log_name: DAEMON_LOG,
            log_tail: log_tail(&self.state_dir.join(DAEMON_LOG)),
        })
    }

    fn start_qemu(&mut self, cfg: &VmConfig, vsock: VsockDevice) -> Result<(), VmError> {
        let args = qemu_args(cfg, self.accel, vsock, &self.state_dir);
        let log = log_file(&self.state_dir.join(QEMU_LOG))?;
        let mut cmd = Command::new(&cfg.qemu_path);
        cmd.args(&args);
        tracing::debug!(qemu = %cfg.qemu_path.display(), args = ?args, "starting QEMU");
        let taps: Vec<_> = cfg.nics.iter().map(|nic| &nic.tap).collect();
        let child = spawn_detached(
            cmd,
            log,
            "QEMU",
            &cfg.qemu_path,
            &taps,
            self.cgroup.as_ref(),
        )?;
        self.qemu_pid = child_pid(&child);
        self.qemu = Some(child);
        Ok(())
    }

    /// Health checks until one succeeds; fails at once when QEMU or the daemon exits, or the daemon
    /// stops relaying.
    async fn wait_for_agent(
        &mut self,
        timeout: Duration,
        deadline: Instant,
        durations: Option<RpcDurations>,
    ) -> Result<(), VmError> {
        // No CONNECT before the guest says its agent listens (see `console_gate`). Each attempt
        // then waits a little longer (1 s, 2 s, 4 s, then 8 s), and one that gives up leaves its
        // CONNECT pending rather than closing it (see `agent::transport`): one answered late must
        // not find our side closed.
        let mut patience = Duration::from_secs(1);
        let hybrid = matches!(self.agent_url, AgentUrl::Hvsock { .. });
        let mut console_gate = ConsoleGate::new(hybrid, timeout);
        loop {
            if let Some(qemu) = self.qemu.as_mut() {
                if let Ok(Some(status)) = qemu.try_wait() {
                    return Err(self.exited("QEMU", status.to_string()));
                }
            }
            if let Some(err) = self.daemon_exited() {
                return Err(err);
            }
            if let Some(why) = self.relay_lost() {
                return Err(VmError::RelayLost {
                    why,
                    log_tail: self.console_tail(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !console_gate.open(&self.state_dir.join(CONSOLE_LOG)) && !left.is_zero() {
                tokio::time::sleep(CONSOLE_POLL.min(left)).await;
                continue;
            }
            let patience_now = patience.min(left);
            patience = (patience * 2).min(MAX_HEALTH_CHECK_PATIENCE);
            let client = AgentClient::new(
                self.agent_url.clone(),
                AgentTimeouts {
                    connect: patience_now,
                    metrics: patience_now,
                    request: patience_now,
                },
            )
            .with_durations(durations.clone());
            let attempt = Instant::now();
            let err = match tokio::time::timeout(patience_now, client.serving()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer to a health check within {patience_now:?}"),
            };
            tracing::debug!(
                took_ms = attempt.elapsed().as_millis() as u64,
                "agent not ready yet: {err}"
            );
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: "the guest's agent",
                    timeout,
                    reason: err,
                    log_name: "console.log and the vsock daemon's log",
                    log_tail: format!(
                        "{}\n--- {DAEMON_LOG} (tail) ---\n{}",
                        self.console_tail(),
                        log_tail(&self.state_dir.join(DAEMON_LOG))
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }

    fn exited(&self, what: &'static str, status: String) -> VmError {
        let console = self.console_tail();
        let qemu_log = log_tail(&self.state_dir.join(QEMU_LOG));
        VmError::Exited {
            what,
            status,
            log_name: "console.log and qemu.log",
            log_tail: format!("{console}\n--- qemu.log (tail) ---\n{qemu_log}"),
        }
    }

    fn console_tail(&self) -> String {
        log_tail(&self.state_dir.join(CONSOLE_LOG))
    }

    /// SIGKILL everything and remove the sandbox cgroup and the state directory (the failure
    /// path of `start`).
    async fn kill_now(&mut self) {
        self.kill_processes().await;
        if let Err(err) = self.remove_cgroup() {
            tracing::warn!("{err}");
        }
        let _ = self.remove_state_dir();
    }

    /// SIGKILL QEMU and the vsock daemon, and wait a little for them to go.
    async fn kill_processes(&mut self) {
        for mut child in [self.qemu.take(), self.daemon.take()].into_iter().flatten() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
        }
        self.daemon_pid = None;
        self.relay = None;
    }

    fn remove_cgroup(&mut self) -> Result<(), VmError> {
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove()?;
        }
        self.cgroup = None;
        Ok(())
    }

    fn remove_state_dir(&mut self) -> Result<(), VmError> {
        if !self.owns_state_dir {
            return Ok(());
        }
        match std::fs::remove_dir_all(&self.state_dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(VmError::io(
                    format!("removing VM state directory {}", self.state_dir.display()),
                    err,
                ))
            }
        }
        self.owns_state_dir = false;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.daemon.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.start_kill();
        }
        if self.remove_cgroup().is_err() {
            // The killed processes may still be exiting: the state directory's pid files and
            // cgroup record stay for `delete` (kill_leftovers) to finish the job.
            return;
        }
        let _ = self.remove_state_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_can_move_between_tasks() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<Vm>();
    }
}
