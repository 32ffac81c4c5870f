//! One container of the sandbox as the shim tracks it: its bundle and its processes — the init
//! and those `exec` added — each with its stdio, status, and the exit that the waiter records
//! once the guest process ended and its output was drained.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::api::Status;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::stdio::StdioPaths;
use super::vm_fate::VmFate;
use crate::agent_client::AgentClient;
use crate::protocols::oci as grpc;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exit {
    pub(crate) status: u32,
    pub(crate) at: SystemTime,
}

pub(crate) struct Container {
    pub(crate) id: String,
    pub(crate) bundle: PathBuf,
    /// The pid containerd sees for the task (the VMM's: the guest's pids mean nothing on the host).
    pub(crate) pid: u32,
    /// The sandbox's agent, which runs this container.
    pub(crate) agent: Arc<AgentClient>,
    /// Whether the sandbox's VM still runs the guest.
    pub(crate) vm: Arc<VmFate>,
    /// The sandbox's shared directory, where this container's rootfs is bound.
    pub(crate) shared_dir: PathBuf,
    pub(crate) init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub(crate) fn new(
        id: String,
        bundle: PathBuf,
        stdio: StdioPaths,
        pid: u32,
        agent: Arc<AgentClient>,
        vm: Arc<VmFate>,
        shared_dir: PathBuf,
    ) -> Container {
        Container {
            id,
            bundle,
            pid,
            agent,
            vm,
            shared_dir,
            init: Arc::new(Process::new(String::new(), stdio, None)),
            execs: Mutex::new(HashMap::new()),
        }
    }

    /// The init for an empty exec id (or the container's own id), else an exec'd process.
    pub(crate) fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.id {
            return Some(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned()
    }

    /// Adds an exec'd process; false if one of that id exists.
    pub(crate) fn add_exec(&self, process: Arc<Process>) -> bool {
        let mut execs = lock(&self.execs);
        if execs.contains_key(&process.exec_id) {
            return false;
        }
        execs.insert(process.exec_id.clone(), process);
        true
    }

    pub(crate) fn remove_exec(&self, exec_id: &str) {
        lock(&self.execs).remove(exec_id);
    }
}

/// One process of a container, as containerd knows it.
pub(crate) struct Process {
    /// Empty for the container's init, else containerd's exec id.
    pub(crate) exec_id: String,
    pub(crate) stdio: StdioPaths,
    /// What the agent runs for an exec'd process (the init's is in the container's spec).
    pub(crate) spec: Option<grpc::Process>,
    started: Mutex<bool>,
    exit_tx: watch::Sender<Option<Exit>>,
    stdin_copy: Mutex<Option<JoinHandle<()>>>,
}

impl Process {
    pub(crate) fn new(exec_id: String, stdio: StdioPaths, spec: Option<grpc::Process>) -> Process {
        Process {
            exec_id,
            stdio,
            spec,
            started: Mutex::new(false),
            exit_tx: watch::channel(None).0,
            stdin_copy: Mutex::new(None),
        }
    }

    pub(crate) fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    pub(crate) fn status(&self) -> Status {
        if self.exit().is_some() {
            Status::STOPPED
        } else if *lock(&self.started) {
            Status::RUNNING
        } else {
            Status::CREATED
        }
    }

    pub(crate) fn mark_started(&self) {
        *lock(&self.started) = true;
    }

    pub(crate) fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Records the exit once; later calls keep the first.
    pub(crate) fn set_exit(&self, exit: Exit) -> bool {
        self.exit_tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(exit);
                true
            } else {
                false
            }
        })
    }

    /// Waits until the process ended and its output was drained.
    pub(crate) async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            // The sender lives as long as `self`, so this cannot fail while we borrow it.
            if rx.changed().await.is_err() {
                return Exit {
                    status: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }

    pub(crate) fn set_stdin_copy(&self, handle: Option<JoinHandle<()>>) {
        *lock(&self.stdin_copy) = handle;
    }

    /// Stops copying stdin (the process is gone).
    pub(crate) fn stop_stdin_copy(&self) {
        if let Some(handle) = lock(&self.stdin_copy).take() {
            handle.abort();
        }
    }

    /// The stdin copy, for CloseIO to let it finish.
    pub(crate) fn take_stdin_copy(&self) -> Option<JoinHandle<()>> {
        lock(&self.stdin_copy).take()
    }
}

/// A poisoned lock only means another task panicked while holding it; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        let url = "unix:///nonexistent/agent.sock".parse().expect("agent url");
        let agent = Arc::new(AgentClient::new(url, Default::default()));
        let stdio = StdioPaths::default();
        Container::new(
            "c1".into(),
            "/b".into(),
            stdio,
            1,
            agent,
            Arc::default(),
            "/s".into(),
        )
    }

    #[test]
    fn exec_ids_name_processes_and_the_init_is_the_empty_one() {
        let c = container();
        assert!(c.process("").is_some_and(|p| p.is_init()));
        assert!(c.process("c1").is_some_and(|p| p.is_init()));
        assert!(c.process("e1").is_none());
        let e1 = Arc::new(Process::new("e1".into(), StdioPaths::default(), None));
        assert!(c.add_exec(e1.clone()));
        let again = Arc::new(Process::new("e1".into(), StdioPaths::default(), None));
        assert!(!c.add_exec(again), "a second e1");
        assert!(c.process("e1").is_some_and(|p| Arc::ptr_eq(&p, &e1)));
        c.remove_exec("e1");
        assert!(c.process("e1").is_none());
    }

    #[tokio::test]
    async fn the_first_exit_counts_and_ends_waits() {
        let p = Arc::new(Process::new("e1".into(), StdioPaths::default(), None));
        assert_eq!(p.status(), Status::CREATED);
        p.mark_started();
        assert_eq!(p.status(), Status::RUNNING);
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await.status }
        });
        let at = SystemTime::now();
        assert!(p.set_exit(Exit { status: 5, at }));
        assert!(!p.set_exit(Exit { status: 9, at }));
        assert_eq!(waiter.await.expect("waiter"), 5);
        assert_eq!(p.status(), Status::STOPPED);
    }
}
