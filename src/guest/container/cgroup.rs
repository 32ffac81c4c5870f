//! One cgroup v2 per container, so that StatsContainer can measure all of its processes.
//!
//! The parent is `/sys/fs/cgroup/kata` when /sys/fs/cgroup is a cgroup2 mount (the guest), or
//! `$KATA_AGENT_CGROUP_ROOT` (a directory in a cgroup2 hierarchy, e.g. a test's own sub-cgroup on
//! a host). Without either, containers run in the agent's cgroup and stats come from their
//! processes (see [`super::stats`]). Every failure here is logged, never fatal: a container
//! without a cgroup still runs.

use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Overrides the parent cgroup of the containers' cgroups.
pub(crate) const ROOT_ENV: &str = "KATA_AGENT_CGROUP_ROOT";

const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
const DEFAULT_ROOT: &str = "/sys/fs/cgroup/kata";
/// Controllers whose files StatsContainer reads.
const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// Where containers' cgroups go; `None` when cgroup2 is not usable.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    path: Option<PathBuf>,
}

impl CgroupRoot {
    /// Finds and prepares the parent cgroup; logs once when there is none.
    pub fn detect() -> Self {
        let root = match std::env::var_os(ROOT_ENV) {
            Some(dir) => PathBuf::from(dir),
            None if is_cgroup2(Path::new(CGROUP_MOUNT)) => PathBuf::from(DEFAULT_ROOT),
            None => {
                tracing::info!(
                    "{CGROUP_MOUNT} is not a cgroup2 mount: containers get no cgroup of their \
                     own, stats come from their processes"
                );
                return CgroupRoot { path: None };
            }
        };
        match prepare(&root) {
            Ok(()) => CgroupRoot { path: Some(root) },
            Err(err) => {
                tracing::warn!(
                    root = %root.display(),
                    %err,
                    "cannot use the cgroup root: containers get no cgroup of their own"
                );
                CgroupRoot { path: None }
            }
        }
    }

    /// Creates the container's cgroup; `None` (logged) if there is no root or it fails.
    pub(crate) fn create(&self, id: &str) -> Option<Cgroup> {
        let root = self.path.as_ref()?;
        if !is_safe_name(id) {
            tracing::warn!(%id, "container id unusable as a cgroup name: no cgroup");
            return None;
        }
        let path = root.join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => Some(Cgroup { path }),
            // A leftover of an earlier container with this id (it is empty or rmdir would have
            // worked): reuse it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Some(Cgroup { path }),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot create the container's cgroup");
                None
            }
        }
    }
}

/// A container's cgroup directory.
#[derive(Debug)]
pub(crate) struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process (and so its future children) into the cgroup.
    pub(crate) fn add(&self, pid: Pid) -> io::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.as_raw().to_string())
    }

    /// Removes the cgroup once its processes are gone; a zombie not yet reaped keeps it busy for
    /// a moment, hence the retries.
    pub(crate) async fn remove(&self) {
        let mut last = None;
        for _ in 0..20 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if let Some(err) = last {
            tracing::warn!(path = %self.path.display(), %err, "cannot remove the container's cgroup");
        }
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// A single path component that cannot escape the root.
fn is_safe_name(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Creates the root and enables the controllers StatsContainer reads, where available: in the
/// root's parent (so the root has them) and in the root (so its children have them).
fn prepare(root: &Path) -> io::Result<()> {
    std::fs::create_dir_all(root)?;
    if !is_cgroup2(root) {
        return Err(io::Error::other("not in a cgroup2 hierarchy"));
    }
    if let Some(parent) = root.parent().filter(|p| is_cgroup2(p)) {
        enable_controllers(parent);
    }
    enable_controllers(root);
    Ok(())
}

/// One write per controller: an unavailable one must not stop the others.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for name in CONTROLLERS {
        if !available.split_whitespace().any(|c| c == name) {
            continue;
        }
        if let Err(err) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{name}")) {
            tracing::debug!(dir = %dir.display(), controller = name, %err, "cannot enable");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_become_cgroups() {
        assert!(is_safe_name("abc-1_2.x"));
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b"] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
    }
}
