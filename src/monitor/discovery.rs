//! Finds sandboxes by watching the run directories: a sandbox is there while
//! `<run dir>/<id>/shim-monitor.sock` is a socket. inotify (via `notify`) makes changes visible at
//! once; a slow rescan catches what inotify cannot report (a run directory created later, a socket
//! made before the watch on its new directory was in place).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::metrics::MonitorMetrics;
use super::sandboxes::Sandboxes;
use crate::mgmt::paths::{self, SocketAddress};

/// Rescan period, whatever inotify says.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Events that come together (a directory and its socket) are handled together.
const SETTLE: Duration = Duration::from_millis(20);

/// Every sandbox socket in `run_dirs`; when an id is in two directories, the first directory wins.
pub(crate) fn scan(run_dirs: &[PathBuf]) -> BTreeMap<String, SocketAddress> {
    let mut found = BTreeMap::new();
    for dir in run_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            // Directories that are not sandboxes (bad names, no socket) are ignored.
            let Some(id) = name.to_str() else { continue };
            if paths::validate_id(id).is_err() || found.contains_key(id) {
                continue;
            }
            let socket = paths::file_socket_path(dir, id);
            let is_socket = std::fs::symlink_metadata(&socket)
                .map(|meta| meta.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                found.insert(id.to_string(), SocketAddress::File(socket));
            }
        }
    }
    found
}

/// Applies one scan to the registry and the monitor's gauges.
pub(crate) fn refresh(run_dirs: &[PathBuf], sandboxes: &Sandboxes, metrics: &MonitorMetrics) {
    let changes = sandboxes.replace_all(scan(run_dirs));
    for id in &changes.added {
        tracing::info!(sandbox = %id, "sandbox found");
    }
    for id in &changes.removed {
        tracing::info!(sandbox = %id, "sandbox gone");
        metrics.forget(id);
    }
    metrics.running_shims.set(sandboxes.len() as i64);
}

/// Keeps `sandboxes` in step with the run directories until the task is dropped.
pub(crate) async fn run(
    run_dirs: Vec<PathBuf>,
    sandboxes: Arc<Sandboxes>,
    metrics: Arc<MonitorMetrics>,
) {
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(move |_event| {
        // A full channel already means "rescan": nothing is lost.
        let _ = wake.try_send(());
    }) {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(error = %err, "inotify is not available; discovery rescans every second");
            None
        }
    };
    // Watched directories by identity, so a run directory removed and made again is watched anew.
    let mut watched: HashMap<PathBuf, (u64, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = woken.recv() => {
                tokio::time::sleep(SETTLE).await;
                while woken.try_recv().is_ok() {}
            }
        }
        if let Some(watcher) = watcher.as_mut() {
            update_watches(watcher, &run_dirs, &mut watched);
        }
        let dirs = run_dirs.clone();
        let (s, m) = (sandboxes.clone(), metrics.clone());
        // Directory reads are blocking calls.
        let _ = tokio::task::spawn_blocking(move || refresh(&dirs, &s, &m)).await;
    }
}

fn update_watches(
    watcher: &mut impl Watcher,
    run_dirs: &[PathBuf],
    watched: &mut HashMap<PathBuf, (u64, u64)>,
) {
    for dir in run_dirs {
        let identity = dir_identity(dir);
        let current = watched.get(dir).copied();
        if identity == current {
            continue;
        }
        if current.is_some() {
            let _ = watcher.unwatch(dir);
            watched.remove(dir);
        }
        if let Some(identity) = identity {
            match watcher.watch(dir, RecursiveMode::Recursive) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "watching run directory");
                    watched.insert(dir.clone(), identity);
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot watch run directory")
                }
            }
        }
    }
}

fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(|meta| meta.is_dir())
        .map(|meta| (meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_with_a_socket_are_sandboxes() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("sbs");
        let other = root.path().join("kata");
        for dir in ["good", "nosocket", "bad..name", "twice"] {
            std::fs::create_dir_all(run.join(dir)).unwrap();
        }
        std::fs::create_dir_all(other.join("twice")).unwrap();
        std::fs::create_dir_all(other.join("second")).unwrap();
        let _l1 =
            std::os::unix::net::UnixListener::bind(run.join("good/shim-monitor.sock")).unwrap();
        let _l2 = std::os::unix::net::UnixListener::bind(run.join("bad..name/shim-monitor.sock"))
            .unwrap();
        let _l3 =
            std::os::unix::net::UnixListener::bind(run.join("twice/shim-monitor.sock")).unwrap();
        let _l4 =
            std::os::unix::net::UnixListener::bind(other.join("twice/shim-monitor.sock")).unwrap();
        let _l5 =
            std::os::unix::net::UnixListener::bind(other.join("second/shim-monitor.sock")).unwrap();
        std::fs::write(run.join("nosocket/shim-monitor.sock"), "not a socket").unwrap();

        let found = scan(&[run.clone(), other.clone(), root.path().join("missing")]);
        let ids: Vec<&str> = found.keys().map(String::as_str).collect();
        assert_eq!(ids, vec!["good", "second", "twice"]);
        assert_eq!(
            found["twice"],
            SocketAddress::File(run.join("twice/shim-monitor.sock"))
        );
    }
}
