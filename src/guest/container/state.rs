//! One process of a container (its init, or one added by ExecProcess): pid, exit status, stdio,
//! and the pipes that start it.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use protobuf::Message;
use ttrpc::Code;

use super::cgroup::Cgroup;
use super::spawn::{self, Status};
use super::spec;
use super::stdio::Stdio;
use super::{status, RpcResult};
use crate::guest::reaper::{self, ExitWatch, Reaper};
use crate::protocols::oci;

/// Terminal size until the shim sends TtyWinResize, when the spec gives none.
const DEFAULT_ROWS: u16 = 24;
const DEFAULT_COLS: u16 = 80;

pub(crate) struct Process {
    /// For messages: `container "c1"` or `process "e1" of container "c1"`.
    pub(crate) id: String,
    pub(crate) pid: Pid,
    exit: ExitWatch,
    pub(crate) stdio: Stdio,
    /// The start and status pipes, until StartContainer used them.
    pending: tokio::sync::Mutex<Option<(OwnedFd, OwnedFd)>>,
}

impl Process {
    /// Validates the spec, then starts the init, which sets everything up and waits for start:
    /// any problem it finds (mounts, user, missing program) fails CreateContainer.
    pub(crate) async fn create_init(
        reaper: &Reaper,
        id: String,
        spec: oci::Spec,
    ) -> RpcResult<Process> {
        Self::launch(reaper, id, spec, None).await
    }

    /// Runs one more process in the namespaces of the container whose init is `target`, and in
    /// its `cgroup`: created and started at once (ExecProcess has no separate start).
    pub(crate) async fn exec(
        reaper: &Reaper,
        label: String,
        target: Pid,
        process: oci::Process,
        cgroup: Option<&Cgroup>,
    ) -> RpcResult<Process> {
        let mut spec = oci::Spec::new();
        // The exec'd process enters the container's root; "/" only satisfies validation.
        spec.Root.mut_or_insert_default().Path = "/".into();
        spec.Process = Some(process).into();
        let launched = Self::launch(reaper, label, spec, Some(target)).await?;
        if let Some(cgroup) = cgroup {
            // While it waits for start: the program and all it forks are counted and limited
            // from their first instruction.
            if let Err(err) = cgroup.add(launched.pid) {
                tracing::warn!(process = %launched.id, %err, "cannot move the process into the cgroup");
            }
        }
        launched.start().await?;
        Ok(launched)
    }

    async fn launch(
        reaper: &Reaper,
        id: String,
        spec: oci::Spec,
        exec_in: Option<Pid>,
    ) -> RpcResult<Process> {
        let invalid = |msg: String| status(Code::INVALID_ARGUMENT, msg);
        let config = spec::translate(&spec).map_err(|e| invalid(format!("{id}: {e}")))?;
        if !config.rootfs.is_dir() {
            return Err(invalid(format!(
                "{id}: Root.Path {} is not a directory in the guest",
                config.rootfs.display()
            )));
        }
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            status(Code::INTERNAL, format!("{id}: {what}: {e}"))
        };
        let (stdio, child) = if config.terminal {
            let size = spec.Process.ConsoleSize.as_ref();
            let rows = size.map_or(0, |s| s.Height).min(u16::MAX.into()) as u16;
            let cols = size.map_or(0, |s| s.Width).min(u16::MAX.into()) as u16;
            Stdio::terminal(
                if rows == 0 { DEFAULT_ROWS } else { rows },
                if cols == 0 { DEFAULT_COLS } else { cols },
            )
        } else {
            Stdio::pipes()
        }
        .map_err(|e| internal("creating stdio", &e))?;
        let bytes = spec
            .write_to_bytes()
            .map_err(|e| internal("encoding the spec", &e))?;
        let reaper = reaper.clone();
        let (spawned, reported) = tokio::task::spawn_blocking(move || {
            let spawned = match exec_in {
                None => spawn::spawn_init(&reaper, &bytes, child)?,
                Some(target) => spawn::spawn_exec(&reaper, target, &bytes, child)?,
            };
            let mut status_pipe = File::from(spawned.status.try_clone()?);
            let reported = spawn::read_status(&mut status_pipe)?;
            Ok::<_, std::io::Error>((spawned, reported))
        })
        .await
        .map_err(|e| internal("spawning the init", &e))?
        .map_err(|e| internal("spawning the init", &e))?;
        match reported {
            Status::Ready => Ok(Process {
                id,
                pid: spawned.pid,
                exit: spawned.exit,
                stdio,
                pending: tokio::sync::Mutex::new(Some((spawned.start, spawned.status))),
            }),
            Status::Error(msg) => Err(invalid(format!("creating {id}: {msg}"))),
            Status::Closed => Err(internal("the init", &"exited before it was ready")),
        }
    }

    /// Lets the init exec the program; an exec failure comes back as FAILED_PRECONDITION.
    pub(crate) async fn start(&self) -> RpcResult<()> {
        let id = &self.id;
        let (start, status_pipe) = self.pending.lock().await.take().ok_or_else(|| {
            status(
                Code::FAILED_PRECONDITION,
                format!("{id} was already started"),
            )
        })?;
        if self.exited().is_some() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{id} exited before it was started"),
            ));
        }
        let reported = tokio::task::spawn_blocking(move || {
            File::from(start).write_all(&[1])?;
            spawn::read_status(&mut File::from(status_pipe))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match reported {
            Ok(Status::Closed) => Ok(()),
            Ok(Status::Error(msg)) => Err(status(
                Code::FAILED_PRECONDITION,
                format!("starting {id}: {msg}"),
            )),
            Ok(Status::Ready) => Err(status(
                Code::INTERNAL,
                format!("starting {id}: unexpected message from its init"),
            )),
            Err(e) => Err(status(
                Code::FAILED_PRECONDITION,
                format!("starting {id}: its init is gone ({e})"),
            )),
        }
    }

    /// The exit code, once the process was reaped.
    pub(crate) fn exited(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit code (any number of callers, before or after the exit).
    pub(crate) async fn wait(&self) -> i32 {
        reaper::wait_exit(self.exit.clone()).await
    }

    /// Signals the process unless it already exited (then: nothing to do, no error).
    pub(crate) fn kill(&self, reaper: &Reaper, signal: Signal) {
        if let Err(err) = reaper.kill(self.pid, &self.exit, signal) {
            tracing::warn!(process = %self.id, %err, "signalling");
        }
    }
}
