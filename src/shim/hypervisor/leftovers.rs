//! Cleaning up after a shim crash: the pid files a VM leaves in its state directory, killing the
//! processes they name when those are still ours, and removing the sandbox cgroup it recorded.

use std::io;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procfs::process::Process;

use super::child_process::STOP_GRACE;
use super::sandbox_cgroup::{CgroupPath, SandboxCgroup};
use super::state_files::{CGROUP_PATH, DAEMON_PID, QEMU_PID};
use super::VmError;

/// After a shim crash: kills the QEMU and vsock daemon named by the pid files in `state_dir` if
/// they still are ours (their command line mentions `state_dir`), then removes the sandbox cgroup
/// recorded there, if any, and `state_dir`. Both are tried; the first failure is returned.
pub fn kill_leftovers(state_dir: &Path) -> Result<(), VmError> {
    if !state_dir.exists() {
        return Ok(());
    }
    for name in [QEMU_PID, DAEMON_PID] {
        let Some(pid) = read_pid_file(&state_dir.join(name)) else {
            continue;
        };
        if !cmdline_mentions(pid, state_dir) {
            continue;
        }
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGKILL);
        // Wait for it to go (it is not our child: poll).
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid.as_raw()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let cgroup = remove_recorded_cgroup(state_dir);
    let removed = match std::fs::remove_dir_all(state_dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(VmError::io(
            format!("removing VM state directory {}", state_dir.display()),
            err,
        )),
        _ => Ok(()),
    };
    cgroup.and(removed)
}

/// Notes in `state_dir` which cgroup the VM's processes run in.
pub(super) fn write_cgroup_record(state_dir: &Path, path: &CgroupPath) -> Result<(), VmError> {
    let record = state_dir.join(CGROUP_PATH);
    std::fs::write(&record, path.as_path().as_os_str().as_encoded_bytes())
        .map_err(|e| VmError::io(format!("writing {}", record.display()), e))
}

/// Removes the cgroup that `state_dir` records (the record is our own file, but it is parsed as
/// strictly as the spec's path was).
fn remove_recorded_cgroup(state_dir: &Path) -> Result<(), VmError> {
    let Ok(text) = std::fs::read_to_string(state_dir.join(CGROUP_PATH)) else {
        return Ok(());
    };
    SandboxCgroup::existing(CgroupPath::parse(&text)?)?.remove()?;
    Ok(())
}

fn read_pid_file(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    (pid > 1).then_some(pid)
}

pub(super) fn write_pid_file(path: &Path, pid: i32) -> Result<(), VmError> {
    std::fs::write(path, format!("{pid}\n"))
        .map_err(|e| VmError::io(format!("writing {}", path.display()), e))
}

/// Whether the command line of `pid` mentions `state_dir`; false when the process is gone or its
/// command line unreadable. procfs reads it as UTF-8, so a path that is not UTF-8 never matches
/// (the state directory is built from the run directory and a containerd id, both UTF-8).
fn cmdline_mentions(pid: i32, state_dir: &Path) -> bool {
    let Some(needle) = state_dir.to_str().filter(|path| !path.is_empty()) else {
        return false;
    };
    let Ok(argv) = Process::new(pid).and_then(|process| process.cmdline()) else {
        return false;
    };
    argv.iter().any(|arg| arg.contains(needle))
}

fn is_zombie(pid: i32) -> bool {
    Process::new(pid)
        .and_then(|process| process.stat())
        .is_ok_and(|stat| stat.state == 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_someone_else_are_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vm");
        std::fs::create_dir(&state).unwrap();
        // Our own pid: its command line does not mention the state directory.
        std::fs::write(state.join(QEMU_PID), format!("{}\n", std::process::id())).unwrap();
        std::fs::write(state.join(DAEMON_PID), "garbage").unwrap();
        kill_leftovers(&state).unwrap();
        assert!(!state.exists());
        kill_leftovers(&state).unwrap();
    }

    #[test]
    fn leftovers_of_ours_are_killed_without_waiting_out_the_grace_period() {
        use std::os::unix::process::ExitStatusExt;

        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vm");
        std::fs::create_dir(&state).unwrap();
        let console = state.join("console.log");
        std::fs::write(&console, "boot log").unwrap();
        // Stands in for the QEMU of a crashed shim: its command line mentions the state directory.
        let mut qemu = std::process::Command::new("tail")
            .arg("-f")
            .arg(&console)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(state.join(QEMU_PID), format!("{}\n", qemu.id())).unwrap();
        // spawn returns once the child is in exec, but the kernel fills in its command line a
        // moment later: wait until it shows, as a leftover of a crashed shim long since has.
        let cmdline = format!("/proc/{}/cmdline", qemu.id());
        let needle = state.as_os_str().as_encoded_bytes().to_vec();
        let shown = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
        {
            assert!(std::time::Instant::now() < shown, "no command line");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let started = std::time::Instant::now();
        kill_leftovers(&state).unwrap();
        let took = started.elapsed();
        let status = qemu.try_wait().unwrap();
        if status.is_none() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        let status = status.expect("the leftover QEMU is still running");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        // Killed but not yet reaped by us, it was a zombie at once: no polling until the deadline.
        assert!(took < STOP_GRACE, "kill_leftovers took {took:?}");
        assert!(!state.exists());
    }

    #[tokio::test]
    async fn the_sandbox_cgroup_of_a_crashed_shim_is_removed_with_its_processes() {
        use super::super::child_process::spawn_detached;
        use super::super::sandbox_cgroup::testing::{mounts, TestCgroupPath};
        use super::super::sandbox_cgroup::SandboxCgroup;

        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vm");
        std::fs::create_dir(&state).unwrap();
        let path = TestCgroupPath::new();
        let cgroup_path = CgroupPath::parse(&path.text).unwrap();
        write_cgroup_record(&state, &cgroup_path).unwrap();
        let cgroup = SandboxCgroup::create(cgroup_path).unwrap();
        // A stand-in QEMU, started as the shim starts it, that the crashed shim left behind.
        let console = state.join("console.log");
        std::fs::write(&console, "boot log").unwrap();
        let mut cmd = tokio::process::Command::new("tail");
        cmd.arg("-f").arg(&console);
        let log = std::fs::File::create(dir.path().join("qemu.log")).unwrap();
        let mut qemu =
            spawn_detached(cmd, log, "QEMU", Path::new("tail"), &[], Some(&cgroup)).unwrap();
        let pid = qemu.id().unwrap();
        std::fs::write(state.join(QEMU_PID), format!("{pid}\n")).unwrap();
        let needle = state.as_os_str().as_encoded_bytes().to_vec();
        let shown = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
        {
            assert!(std::time::Instant::now() < shown, "no command line");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(cgroup);

        // Killed but not reaped (a zombie of ours) does not keep the cgroup.
        kill_leftovers(&state).unwrap();
        for mount in mounts() {
            assert!(!path.dir(&mount).exists(), "{}", path.dir(&mount).display());
        }
        assert!(!state.exists());
        qemu.wait().await.unwrap();
    }
}
