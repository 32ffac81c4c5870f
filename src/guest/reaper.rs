//! The agent's only caller of `waitpid`: a SIGCHLD-driven loop that reaps every child.
//!
//! As PID 1 of the guest the agent inherits every orphan, so it must reap pids it never started.
//! Pids it did start are registered with [`Reaper::spawn`], which forks while holding the lock
//! that the reap loop also takes: a child that exits at once is still found registered.
//! Everything in the agent that starts a process must go through `spawn`; a child started any
//! other way (e.g. `std::process::Command`) would have its status stolen by this loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// `None` while the process runs; `Some(exit code)` once it was reaped.
pub(crate) type ExitWatch = watch::Receiver<Option<i32>>;

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, watch::Sender<Option<i32>>>>>,
}

impl Reaper {
    /// Starts the reap loop on the current tokio runtime.
    pub fn start() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let looped = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Children may have exited before the handler was installed: reap first.
                looped.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Runs `fork` (which must start exactly one child and return its pid) under the reaper's
    /// lock and registers the pid, so its status cannot be reaped before it is claimed.
    pub(crate) fn spawn<E>(
        &self,
        fork: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, ExitWatch), E> {
        let mut waiters = self.lock();
        let pid = fork()?;
        let (tx, rx) = watch::channel(None);
        waiters.insert(pid.as_raw(), tx);
        Ok((pid, rx))
    }

    /// Sends `signal` to a registered child that has not been reaped yet; a no-op afterwards.
    /// Checked under the reaper's lock, so a reaped (and maybe reused) pid is never signalled.
    pub(crate) fn kill(&self, pid: Pid, exit: &ExitWatch, signal: Signal) -> nix::Result<()> {
        let _waiters = self.lock();
        if exit.borrow().is_some() {
            return Ok(());
        }
        match nix::sys::signal::kill(pid, signal) {
            Err(Errno::ESRCH) => Ok(()),
            other => other,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, watch::Sender<Option<i32>>>> {
        // A panic elsewhere while holding the map must not stop reaping.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every exited child; one SIGCHLD may stand for several exits.
    fn reap_all(&self) {
        loop {
            let mut waiters = self.lock();
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!(%err, "waitpid failed");
                    return;
                }
                Ok(status) => {
                    let Some((pid, code)) = exit_code(status) else {
                        continue;
                    };
                    match waiters.remove(&pid.as_raw()) {
                        Some(tx) => {
                            tracing::debug!(pid = pid.as_raw(), code, "child exited");
                            tx.send_replace(Some(code));
                        }
                        None => tracing::debug!(pid = pid.as_raw(), code, "reaped an orphan"),
                    }
                }
            }
        }
    }
}

/// The shell's convention: a normal exit gives its code, death by signal N gives 128 + N.
pub(crate) fn exit_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Waits until the process behind `exit` was reaped; any number of waiters, before or after.
pub(crate) async fn wait_exit(mut exit: ExitWatch) -> i32 {
    // The sender lives in the reaper's map until the exit is sent; an error (dropped sender)
    // means the agent is shutting down.
    let _ = exit.wait_for(Option::is_some).await;
    let code = *exit.borrow();
    code.unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some((pid, 3)));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((pid, 137))
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
