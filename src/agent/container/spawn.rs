//! Starting a container's init: clone into new namespaces and re-execute the agent binary as
//! `kata-agent init-container`, which sets the container up in a fresh single-threaded process.
//!
//! Between clone and exec the child of this multi-threaded process only calls async-signal-safe
//! functions (fcntl, dup2, execve, write, _exit) on data prepared before the clone.
//!
//! The child's fds: 0-2 stdio, 3 the encoded spec (a memfd), 4 the start pipe (one byte = exec,
//! EOF = give up), 5 the status pipe (close-on-exec in the child: see [`read_status`]).

use std::ffi::CString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::Pid;

use super::stdio::ChildStdio;
use crate::agent::reaper::{ExitWatch, Reaper};

pub const FD_CONFIG: i32 = 3;
pub const FD_START: i32 = 4;
pub const FD_STATUS: i32 = 5;

/// The hidden subcommand the agent's main dispatches to [`super::init::main`].
pub const INIT_SUBCOMMAND: &str = "init-container";

/// Status pipe messages from the init: "ready, waiting for start", or an error and its text.
pub const MSG_READY: u8 = b'R';
pub const MSG_ERROR: u8 = b'E';

const STACK_SIZE: usize = 256 * 1024;

pub struct Spawned {
    pub pid: Pid,
    pub exit: ExitWatch,
    /// Writing one byte lets the init exec the program; dropping it makes the init give up.
    pub start: OwnedFd,
    pub status: OwnedFd,
}

/// Clones the init of a new container into fresh pid, mount, UTS and IPC namespaces.
pub fn spawn_init(reaper: &Reaper, config: &[u8], stdio: ChildStdio) -> io::Result<Spawned> {
    let memfd = memfd_create(c"container-spec", MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(config)?;
    file.rewind()?;
    let (start_r, start_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;

    let exe = c"/proc/self/exe";
    let arg0 = c"kata-agent";
    let arg1 = CString::new(INIT_SUBCOMMAND).map_err(io::Error::other)?;
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let sources = [
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
        file.as_raw_fd(),
        start_r.as_raw_fd(),
        status_w.as_raw_fd(),
    ];
    let status_raw = status_w.as_raw_fd();
    let mut stack = vec![0u8; STACK_SIZE];
    let flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;

    let child = Box::new(move || -> isize {
        // SAFETY: only async-signal-safe calls on fds and pointers prepared before the clone.
        unsafe {
            // First move every source above the targets, so no dup2 clobbers a later source.
            let mut high = [-1; 6];
            for (slot, fd) in high.iter_mut().zip(sources) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 6);
                if *slot < 0 {
                    fail(status_raw);
                }
            }
            for (target, fd) in high.iter().enumerate() {
                // dup2 leaves the target without close-on-exec.
                if libc::dup2(*fd, target as i32) < 0 {
                    fail(status_raw);
                }
            }
            libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(FD_STATUS)
        }
    });
    let (pid, exit) = reaper.spawn(|| {
        // SAFETY: the callback above is async-signal-safe; the stack outlives the clone call
        // (the child runs on its own copy of this address space).
        unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
    })?;
    // The child holds its own copies now; closing ours lets EOFs arrive when it is gone.
    drop((stdio, file, start_r, status_w));
    Ok(Spawned {
        pid,
        exit,
        start: start_w,
        status: status_r,
    })
}

/// Reports the failed re-exec on the status pipe and exits, in the cloned child.
unsafe fn fail(status_fd: i32) -> ! {
    const MSG: &[u8] = b"Ecannot re-execute the agent as the container's init";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(status_fd, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(127)
    }
}

/// What the init reported on the status pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Ready,
    /// The pipe closed without a message: after start, this means the exec succeeded.
    Closed,
    Error(String),
}

/// Reads one status message (blocking): a READY byte, or an error text up to EOF.
/// After start the init's copy of the pipe is close-on-exec, so a successful exec reads EOF.
pub fn read_status(status: &mut std::fs::File) -> io::Result<Status> {
    let mut first = [0u8; 1];
    loop {
        match status.read(&mut first) {
            Ok(0) => return Ok(Status::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    match first[0] {
        MSG_READY => Ok(Status::Ready),
        _ => {
            let mut text = Vec::new();
            status.take(64 * 1024).read_to_end(&mut text)?;
            Ok(Status::Error(String::from_utf8_lossy(&text).into_owned()))
        }
    }
}
