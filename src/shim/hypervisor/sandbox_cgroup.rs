//! The sandbox's cgroup on the host (Kata's `sandbox_cgroup_only`): QEMU and the vsock daemon run
//! in the `linux.cgroupsPath` of the sandbox container's spec, so that what the VM costs the host
//! is counted (and limited) in the pod's cgroup, where kubelet and containerd look for it.
//!
//! The path is created under every cgroup hierarchy mounted on the host, as containerd's cgroups
//! library and kubelet's cgroupfs driver lay pods out: each cgroup v1 hierarchy (cpu, cpuacct,
//! memory, pids, ..., named ones such as name=systemd) and the v2 unified one. A child joins them
//! all between fork and exec (it writes "0", meaning itself, into each `cgroup.procs`, opened
//! beforehand), so no moment of it runs outside. Removal takes the last component only, once its
//! processes are gone: the parents (kubelet's pod cgroup) are not ours.

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// How long [`SandboxCgroup::remove`] retries a cgroup that a process still leaves.
const REMOVE_RETRIES: u32 = 25;
const REMOVE_RETRY_EVERY: Duration = Duration::from_millis(20);

/// `pub` because [`super::VmError`] carries it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups path {path:?} has the systemd driver's form (slice:prefix:name), which is not supported")]
    SystemdPath { path: String },
    #[error("cgroups path {path:?} is unusable: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("reading the cgroup mounts in /proc/self/mountinfo: {0}")]
    Mounts(#[source] procfs::ProcError),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl CgroupError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
        let path = path.to_path_buf();
        move |source| CgroupError::Io {
            action,
            path,
            source,
        }
    }
}

/// A cgroupfs driver's cgroups path (e.g. `/kubepods/besteffort/pod<uid>/<sandbox id>`), made
/// relative to each hierarchy's root; relative paths are taken from the root too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupPath(PathBuf);

impl CgroupPath {
    pub(crate) fn parse(text: &str) -> Result<CgroupPath, CgroupError> {
        let invalid = |reason| CgroupError::InvalidPath {
            path: text.to_string(),
            reason,
        };
        if text.contains(':') {
            return Err(CgroupError::SystemdPath {
                path: text.to_string(),
            });
        }
        if text.contains('\0') {
            return Err(invalid("it holds a NUL byte"));
        }
        let mut relative = PathBuf::new();
        for component in Path::new(text).components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => relative.push(name),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(invalid("it leaves the hierarchy with \"..\""))
                }
            }
        }
        if relative.as_os_str().is_empty() {
            return Err(invalid("it names the root cgroup"));
        }
        Ok(CgroupPath(relative))
    }

    pub(crate) fn as_path(&self) -> &Path {
        &self.0
    }
}

/// One mounted hierarchy.
#[derive(Debug)]
struct Hierarchy {
    mount: PathBuf,
    /// A v1 cpuset hierarchy: a new cgroup there has no CPUs or memory nodes until given some.
    cpuset: bool,
}

/// Every cgroup hierarchy mounted in this mount namespace, each once (a hierarchy can be mounted
/// at several places).
fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(CgroupError::Mounts)?;
    let mut seen = Vec::new();
    let mut found = Vec::new();
    for mount in mounts {
        if !matches!(mount.fs_type.as_str(), "cgroup" | "cgroup2") || seen.contains(&mount.majmin) {
            continue;
        }
        seen.push(mount.majmin.clone());
        found.push(Hierarchy {
            cpuset: mount.fs_type == "cgroup" && mount.super_options.contains_key("cpuset"),
            mount: mount.mount_point,
        });
    }
    Ok(found)
}

/// The sandbox's cgroup: one directory per hierarchy.
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    path: CgroupPath,
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// Creates `path` (and the parents it lacks) under every mounted hierarchy; one that exists
    /// already (a leftover of this sandbox) is used as it is. On failure, what was created here
    /// is removed again.
    pub(crate) fn create(path: CgroupPath) -> Result<SandboxCgroup, CgroupError> {
        let mut created = Vec::new();
        let mut dirs = Vec::new();
        for hierarchy in hierarchies()? {
            match create_in(&hierarchy, path.as_path(), &mut created) {
                Ok(dir) => dirs.push(dir),
                Err(err) => {
                    for dir in created.iter().rev() {
                        let _ = std::fs::remove_dir(dir);
                    }
                    return Err(err);
                }
            }
        }
        if dirs.is_empty() {
            tracing::warn!(path = %path.0.display(), "no cgroup hierarchy is mounted: the VM runs in the shim's cgroups");
        }
        Ok(SandboxCgroup { path, dirs })
    }

    /// `path` in every mounted hierarchy, without creating anything (to remove a crashed shim's).
    pub(crate) fn existing(path: CgroupPath) -> Result<SandboxCgroup, CgroupError> {
        let dirs = hierarchies()?
            .into_iter()
            .map(|h| h.mount.join(path.as_path()))
            .collect();
        Ok(SandboxCgroup { path, dirs })
    }

    pub(crate) fn path(&self) -> &CgroupPath {
        &self.path
    }

    /// The cgroup's directory in each hierarchy.
    #[cfg(test)]
    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Each directory's `cgroup.procs`, open for writing (and closed at exec), for [`join`].
    pub(crate) fn open_procs(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                File::options()
                    .write(true)
                    .open(&procs)
                    .map_err(CgroupError::io("opening", &procs))
            })
            .collect()
    }

    /// Removes the cgroup's directory in every hierarchy (those already gone count as removed),
    /// retrying briefly while an exiting process still holds one. Every directory is tried; the
    /// first failure is returned.
    pub(crate) fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for dir in &self.dirs {
            if let Err(err) = remove_dir(dir) {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` are `procs`. Runs in a child
/// between fork and exec, so it does nothing but write(2) and allocates nothing.
pub(crate) fn join(procs: &[File]) -> io::Result<()> {
    for file in procs {
        match nix::unistd::write(file, b"0") {
            Ok(1) => {}
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Err(errno) => return Err(io::Error::from_raw_os_error(errno as i32)),
        }
    }
    Ok(())
}

/// Creates `path` under `hierarchy` level by level, noting in `created` what it made.
fn create_in(
    hierarchy: &Hierarchy,
    path: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<PathBuf, CgroupError> {
    let mut dir = hierarchy.mount.clone();
    for name in path.iter() {
        let parent = dir.clone();
        dir.push(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(CgroupError::io("creating cgroup", &dir)(err)),
        }
        // Every level, as containerd's cgroups library does: an empty one anywhere up the path
        // would leave the sandbox's empty too.
        if hierarchy.cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                inherit_if_empty(&parent, &dir, file)?;
            }
        }
    }
    Ok(dir)
}

/// Gives a new v1 cpuset cgroup its parent's CPUs or memory nodes (as containerd's cgroups
/// library does): with none, no process could join it.
fn inherit_if_empty(parent: &Path, dir: &Path, file: &str) -> Result<(), CgroupError> {
    let own = dir.join(file);
    let current = std::fs::read_to_string(&own).map_err(CgroupError::io("reading", &own))?;
    if !current.trim().is_empty() {
        return Ok(());
    }
    let from = parent.join(file);
    let value = std::fs::read_to_string(&from).map_err(CgroupError::io("reading", &from))?;
    std::fs::write(&own, value.trim()).map_err(CgroupError::io("writing", &own))
}

fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    let mut attempts = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && attempts < REMOVE_RETRIES => {
                attempts += 1;
                std::thread::sleep(REMOVE_RETRY_EVERY);
            }
            Err(err) => return Err(CgroupError::io("removing cgroup", dir)(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_taken_from_the_root_and_others_refused() {
        let path = CgroupPath::parse("/kubepods/besteffort/pod1234/sandbox-1").unwrap();
        assert_eq!(
            path.as_path(),
            Path::new("kubepods/besteffort/pod1234/sandbox-1")
        );
        assert_eq!(
            CgroupPath::parse("default/./ctr").unwrap().as_path(),
            Path::new("default/ctr")
        );
        for (text, fragment) in [
            ("system.slice:cri-containerd:abc", "systemd"),
            ("/kubepods/../etc", "\"..\""),
            ("/", "root cgroup"),
            ("", "root cgroup"),
            ("/a\0b", "NUL"),
        ] {
            let err = CgroupPath::parse(text).unwrap_err().to_string();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
    }
}

/// What the tests of the spawn path and of crash cleanup share: a cgroups path of their own.
#[cfg(test)]
pub(super) mod testing {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The cgroup hierarchies' mount points, read by the test from /proc/self/mounts.
    pub(crate) fn mounts() -> Vec<PathBuf> {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                matches!(fields[2], "cgroup" | "cgroup2").then(|| PathBuf::from(fields[1]))
            })
            .collect()
    }

    /// `/ksm-test-<pid>-<n>/pod/sandbox`, like kubelet's `/kubepods/<qos>/pod<uid>/<sandbox>`;
    /// on drop, its three levels are removed from every hierarchy (the cgroup code removes only
    /// the last).
    pub(crate) struct TestCgroupPath {
        pub(crate) text: String,
        top: String,
    }

    impl TestCgroupPath {
        pub(crate) fn new() -> TestCgroupPath {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let top = format!(
                "ksm-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            TestCgroupPath {
                text: format!("/{top}/pod/sandbox"),
                top,
            }
        }

        /// The sandbox cgroup's directory under the hierarchy mounted at `mount`.
        pub(crate) fn dir(&self, mount: &std::path::Path) -> PathBuf {
            mount.join(self.text.trim_start_matches('/'))
        }
    }

    impl Drop for TestCgroupPath {
        fn drop(&mut self) {
            for mount in mounts() {
                let top = mount.join(&self.top);
                for dir in [top.join("pod/sandbox"), top.join("pod"), top] {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
    }
}
