//! The VM's child processes (QEMU, the vsock daemon): spawning them detached with their output in
//! a log, signalling them, and stopping them with a grace period.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procfs::process::Process;
use tokio::process::{Child, Command};

use super::sandbox_cgroup::{self, SandboxCgroup};
use super::VmError;

/// How long a process gets to exit after a polite request, before SIGKILL.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(3);

/// The descriptor number the first of [`spawn_detached`]'s `inherited` descriptors gets in the
/// child (right after stdin, stdout and stderr); the next ones follow.
pub(super) const FIRST_INHERITED_FD: RawFd = 3;

/// Spawns `cmd` in a process group of its own (no terminal signals from the shim's group), with
/// stdin from /dev/null, its output in `log`, and `inherited[i]` as its descriptor
/// `FIRST_INHERITED_FD + i` (every other descriptor of the shim is close-on-exec); with a
/// `cgroup`, the child is in it before it execs the program.
pub(super) fn spawn_detached(
    mut cmd: Command,
    log: std::fs::File,
    what: &str,
    program: &Path,
    inherited: &[&OwnedFd],
    cgroup: Option<&SandboxCgroup>,
) -> Result<Child, VmError> {
    let err_log = log
        .try_clone()
        .map_err(|e| VmError::io(format!("duplicating the log of {what}"), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        .process_group(0)
        .kill_on_drop(true);
    // Joined first: the descriptor moves below may reuse the numbers of the cgroup files.
    let mut place = String::new();
    if let Some(cgroup) = cgroup {
        let procs = cgroup.open_procs()?;
        place = format!(" in cgroup {}", cgroup.path().as_path().display());
        // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
        // calls are sound: `join` makes write(2) calls on descriptors opened above (O_CLOEXEC,
        // so the program does not inherit them) and allocates nothing, not even for its error.
        unsafe {
            cmd.pre_exec(move || sandbox_cgroup::join(&procs));
        }
    }
    // Copies numbered above the targets, so that moving one into place cannot close another.
    let copies = inherited
        .iter()
        .map(|fd| dup_above(fd, FIRST_INHERITED_FD + 64))
        .collect::<io::Result<Vec<OwnedFd>>>()
        .map_err(|e| VmError::io(format!("passing descriptors to {what}"), e))?;
    if !copies.is_empty() {
        let sources: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the child between fork and exec and calls only dup2, which
        // is async-signal-safe; the new descriptors are not close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                for (target, source) in (FIRST_INHERITED_FD..).zip(&sources) {
                    if libc::dup2(*source, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    // The copies close when this returns: the child has its own by then.
    cmd.spawn()
        .map_err(|e| VmError::io(format!("starting {what} ({}){place}", program.display()), e))
}

/// A close-on-exec duplicate of `fd` numbered `min` or above.
fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that nothing else owns.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::hypervisor::sandbox_cgroup::testing::{mounts, TestCgroupPath};
    use crate::shim::hypervisor::CgroupPath;

    fn sandbox_cgroup(path: &TestCgroupPath) -> SandboxCgroup {
        SandboxCgroup::create(CgroupPath::parse(&path.text).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_child_is_in_the_sandbox_cgroup_of_every_hierarchy_when_it_execs() {
        let path = TestCgroupPath::new();
        let cgroup = sandbox_cgroup(&path);
        assert_eq!(cgroup.dirs().len(), mounts().len(), "{:?}", cgroup.dirs());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("cat.log");

        // The program's first look at its cgroups already finds the sandbox's.
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        let file = std::fs::File::create(&log).unwrap();
        let mut cat =
            spawn_detached(cmd, file, "cat", Path::new("cat"), &[], Some(&cgroup)).unwrap();
        assert!(cat.wait().await.unwrap().success());
        let seen = std::fs::read_to_string(&log).unwrap();
        // One line per hierarchy ("<id>:<controllers>:<path>"), v1 ones and v2's "0::".
        assert_eq!(seen.lines().count(), mounts().len(), "{seen}");
        for line in seen.lines() {
            assert!(line.ends_with(&format!(":{}", path.text)), "{seen}");
        }

        // A long-running child is listed in every hierarchy's cgroup.procs.
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let file = std::fs::File::create(dir.path().join("sleep.log")).unwrap();
        let mut sleep =
            spawn_detached(cmd, file, "sleep", Path::new("sleep"), &[], Some(&cgroup)).unwrap();
        let pid = sleep.id().unwrap().to_string();
        for mount in mounts() {
            let procs = std::fs::read_to_string(path.dir(&mount).join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|p| p == pid),
                "{pid} not in {}: {procs:?}",
                mount.display()
            );
        }
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            own.lines().all(|l| l.ends_with(&format!(":{}", path.text))),
            "{own}"
        );

        // Once it is gone, the sandbox cgroup goes; kubelet's parents stay.
        sleep.start_kill().unwrap();
        sleep.wait().await.unwrap();
        cgroup.remove().unwrap();
        for mount in mounts() {
            let leaf = path.dir(&mount);
            assert!(!leaf.exists(), "{} left", leaf.display());
            assert!(leaf.parent().unwrap().is_dir());
        }
        cgroup.remove().unwrap();
    }

    #[tokio::test]
    async fn a_cgroup_that_is_gone_fails_the_spawn_naming_it() {
        let path = TestCgroupPath::new();
        let cgroup = sandbox_cgroup(&path);
        cgroup.remove().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("log")).unwrap();
        let err = spawn_detached(
            Command::new("true"),
            file,
            "true",
            Path::new("true"),
            &[],
            Some(&cgroup),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("{}/cgroup.procs", path.text)),
            "{err}"
        );
    }
}
