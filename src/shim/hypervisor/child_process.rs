//! The VM's child processes (QEMU, the vsock daemon): spawning them detached with their output in
//! a log, signalling them, and stopping them with a grace period.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procfs::process::Process;
use tokio::process::{Child, Command};

use super::VmError;

/// How long a process gets to exit after a polite request, before SIGKILL.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(3);

/// Spawns `cmd` in a process group of its own (no terminal signals from the shim's group), with
/// stdin from /dev/null and its output in `log`.
pub(super) fn spawn_detached(
    mut cmd: Command,
    log: std::fs::File,
    what: &str,
    program: &Path,
) -> Result<Child, VmError> {
    let err_log = log
        .try_clone()
        .map_err(|e| VmError::io(format!("duplicating the log of {what}"), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| VmError::io(format!("starting {what} ({})", program.display()), e))
}

pub(super) fn child_pid(child: &Child) -> i32 {
    child.id().map(|id| id as i32).unwrap_or(0)
}

pub(super) fn signal_child(child: &Child, signal: Signal) {
    if let Some(id) = child.id() {
        let _ = kill(Pid::from_raw(id as i32), signal);
    }
}

/// Waits up to the grace period, then SIGKILLs and waits.
pub(super) async fn stop_child(child: &mut Child, what: &str) {
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
        return;
    }
    let state = child
        .id()
        .and_then(|pid| Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok())
        .map(|stat| stat.state.to_string())
        .unwrap_or_default();
    tracing::warn!("{what} did not exit within {STOP_GRACE:?} (state {state:?}); killing it");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
