//! Whether the vsock daemon still relays, judged by more than its pid existing.
//!
//! vhost-device-vsock 0.3 moves every packet of a VM on one thread named `vring_worker`. That thread
//! can end while the process lives on, and from then on no connection is answered:
//! - it panics when a late guest answer finds the host side of a CONNECT closed (the panic is in
//!   the daemon's log);
//! - it returns silently when a host connection arrives after QEMU gave the daemon the guest's
//!   memory but before the guest's queues are ready (a few milliseconds of every boot; a loaded
//!   host widens them). Nothing is logged; only the thread is gone.

use std::path::Path;

use super::logs::LogWatch;

/// The thread name of a vhost-user-backend queue worker.
const WORKER_THREAD: &str = "vring_worker";

/// Watches one daemon process: its threads and its log.
pub(super) struct RelayWatch {
    pid: i32,
    /// Set once a worker thread was seen: a daemon whose threads are named otherwise (another
    /// version) is then never judged by their absence.
    worker_seen: bool,
    log: LogWatch,
}

impl RelayWatch {
    pub(super) fn new(pid: i32) -> RelayWatch {
        RelayWatch {
            pid,
            worker_seen: false,
            log: LogWatch::default(),
        }
    }

    /// Why the daemon relays nothing any more, if it does not; `None` while it may still relay
    /// (also when the process is gone: its exit is the caller's to report).
    pub(super) fn lost(&mut self, log: &Path) -> Option<String> {
        if let Some(line) = self.log.find(log, "panicked") {
            return Some(format!(
                "the vsock daemon (pid {}) lost a thread: {line}",
                self.pid
            ));
        }
        match worker_threads(self.pid) {
            Some(0) if self.worker_seen => Some(format!(
                "the vsock daemon (pid {}) has no {WORKER_THREAD} thread any more: it relays nothing",
                self.pid
            )),
            Some(0) | None => None,
            Some(_) => {
                self.worker_seen = true;
                None
            }
        }
    }
}

/// How many threads of `pid` are queue workers; `None` when its thread list cannot be read.
fn worker_threads(pid: i32) -> Option<usize> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let count = tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == WORKER_THREAD)
        })
        .count();
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn named_thread(name: &str) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ = stopped.recv();
            })
            .expect("a thread");
        (stop, handle)
    }

    #[test]
    fn a_worker_that_ends_is_a_lost_relay_and_one_never_seen_is_not() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = dir.path().join("daemon.log");
        std::fs::write(&log, "").expect("the log");
        let pid = std::process::id() as i32;
        let mut watch = RelayWatch::new(pid);
        // This test process has no worker thread yet: not judged by a name it never had.
        assert_eq!(watch.lost(&log), None);

        let (stop, handle) = named_thread(WORKER_THREAD);
        // A thread's name is set from inside the thread: wait until /proc shows it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while worker_threads(pid) == Some(0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(watch.lost(&log), None, "a running worker relays");

        stop.send(()).expect("the worker waits");
        handle.join().expect("the worker ends");
        // A joined thread may linger in /proc for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lost = loop {
            match watch.lost(&log) {
                Some(lost) => break lost,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                None => panic!("the ended worker was not noticed"),
            }
        };
        assert!(lost.contains("no vring_worker thread"), "{lost}");
    }

    #[test]
    fn a_panic_in_the_log_is_a_lost_relay() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = dir.path().join("daemon.log");
        std::fs::write(
            &log,
            "thread 'vring_worker' panicked at src/vsock_conn.rs:238:58:\nBrokenPipe\n",
        )
        .expect("the log");
        let lost = RelayWatch::new(1).lost(&log).expect("a panic");
        assert!(
            lost.contains("lost a thread") && lost.contains("panicked"),
            "{lost}"
        );
    }
}
