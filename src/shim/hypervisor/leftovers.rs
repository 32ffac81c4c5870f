//! Cleaning up after a shim crash: the pid files a VM leaves in its state directory, and killing
//! the processes they name when those are still ours.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::child_process::STOP_GRACE;
use super::state_files::{DAEMON_PID, QEMU_PID};
use super::VmError;

/// After a shim crash: kills the QEMU and vsock daemon named by the pid files in `state_dir` if
/// they still are ours (their command line mentions `state_dir`), then removes `state_dir`.
pub fn kill_leftovers(state_dir: &Path) -> io::Result<()> {
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
    match std::fs::remove_dir_all(state_dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
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

fn cmdline_mentions(pid: i32, state_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = state_dir.as_os_str().as_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1.trim_start().to_string();
            after.chars().next()
        })
        .is_some_and(|state| state == 'Z')
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
}
