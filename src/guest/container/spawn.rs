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
use crate::guest::reaper::{ExitWatch, Reaper};

pub(crate) const FD_CONFIG: i32 = 3;
pub(crate) const FD_START: i32 = 4;
pub(crate) const FD_STATUS: i32 = 5;

/// The hidden subcommand the agent's main dispatches to [`super::init::main`].
pub const INIT_SUBCOMMAND: &str = "init-container";

/// Status pipe messages from the init: "ready, waiting for start", or an error and its text.
pub(crate) const MSG_READY: u8 = b'R';
pub(crate) const MSG_ERROR: u8 = b'E';

const STACK_SIZE: usize = 256 * 1024;

pub(crate) struct Spawned {
    pub(crate) pid: Pid,
    pub(crate) exit: ExitWatch,
    /// Writing one byte lets the init exec the program; dropping it makes the init give up.
    pub(crate) start: OwnedFd,
    pub(crate) status: OwnedFd,
}

/// Clones the init of a new container into fresh pid, mount, UTS and IPC namespaces.
pub(crate) fn spawn_init(reaper: &Reaper, config: &[u8], stdio: ChildStdio) -> io::Result<Spawned> {
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
            install_fds(sources, status_raw);
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

/// Namespaces the exec helper joins. The mount namespace is joined by the exec'd init itself
/// (fd [`FD_MNT_NS`]): a dynamically linked agent could not even be loaded inside the container.
const EXEC_NAMESPACES: [&str; 3] = ["ipc", "uts", "pid"];

/// The container's mount namespace, passed to an exec'd init.
pub(crate) const FD_MNT_NS: i32 = 6;

/// The argument after [`INIT_SUBCOMMAND`] that selects the exec mode of the init.
pub(crate) const EXEC_MODE: &str = "exec";

/// Starts a process in the namespaces of the running container init `target`.
///
/// A helper child joins the namespaces (setns of a pid namespace only applies to new children)
/// and clones the real process with CLONE_PARENT, so that it is the agent's child like any other;
/// the helper reports the new pid on a pipe and exits. The reaper's lock is held until the pid is
/// registered, so even an immediate exit is not lost.
pub(crate) fn spawn_exec(
    reaper: &Reaper,
    target: Pid,
    config: &[u8],
    stdio: ChildStdio,
) -> io::Result<Spawned> {
    let mut namespaces = Vec::new();
    for ns in EXEC_NAMESPACES {
        let path = format!("/proc/{}/ns/{ns}", target.as_raw());
        let file = std::fs::File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {path}: {e}")))?;
        namespaces.push(OwnedFd::from(file));
    }
    let mnt_path = format!("/proc/{}/ns/mnt", target.as_raw());
    let mnt_ns = std::fs::File::open(&mnt_path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {mnt_path}: {e}")))?;
    // Executed by fd: once in the container's mount namespace, the agent's path is not there.
    let exe = OwnedFd::from(std::fs::File::open("/proc/self/exe")?);
    let memfd = memfd_create(c"exec-spec", MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(config)?;
    file.rewind()?;
    let (start_r, start_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (pid_r, pid_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;

    let arg0 = c"kata-agent";
    let arg1 = CString::new(INIT_SUBCOMMAND).map_err(io::Error::other)?;
    let arg2 = CString::new(EXEC_MODE).map_err(io::Error::other)?;
    let argv = [
        arg0.as_ptr(),
        arg1.as_ptr(),
        arg2.as_ptr(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null::<libc::c_char>()];
    let empty = c"";
    let sources = [
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
        file.as_raw_fd(),
        start_r.as_raw_fd(),
        status_w.as_raw_fd(),
        mnt_ns.as_raw_fd(),
    ];
    let ns_fds = [
        namespaces[0].as_raw_fd(),
        namespaces[1].as_raw_fd(),
        namespaces[2].as_raw_fd(),
    ];
    let exe_fd = exe.as_raw_fd();
    let status_raw = status_w.as_raw_fd();
    let pid_raw = pid_w.as_raw_fd();
    let mut stack = vec![0u8; STACK_SIZE];

    let helper = Box::new(move || -> isize {
        // SAFETY: only async-signal-safe calls on fds and pointers prepared before the clone.
        unsafe {
            install_fds(sources, status_raw);
            for fd in ns_fds {
                if libc::setns(fd, 0) < 0 {
                    fail_with(FD_STATUS, b"Ecannot join the container's namespaces");
                }
            }
            // Like fork (no new stack), but the child's parent is the agent.
            let pid = libc::syscall(
                libc::SYS_clone,
                libc::CLONE_PARENT | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            );
            if pid == 0 {
                libc::syscall(
                    libc::SYS_execveat,
                    exe_fd,
                    empty.as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
                fail_with(FD_STATUS, b"Ecannot re-execute the agent for the container");
            }
            if pid < 0 {
                fail_with(
                    FD_STATUS,
                    b"Ecannot clone into the container's pid namespace",
                );
            }
            let pid = pid as i32;
            libc::write(pid_raw, (&pid as *const i32).cast(), 4);
            libc::_exit(0)
        }
    });
    let (pid, exit) = reaper.spawn(|| -> io::Result<Pid> {
        // SAFETY: as in spawn_init; the helper's own exit is reaped as an orphan.
        unsafe { nix::sched::clone(helper, &mut stack, CloneFlags::empty(), Some(libc::SIGCHLD)) }?;
        drop(pid_w);
        let mut raw = [0u8; 4];
        std::fs::File::from(pid_r)
            .read_exact(&mut raw)
            .map_err(|e| io::Error::new(e.kind(), "the exec helper reported no pid"))?;
        Ok(Pid::from_raw(i32::from_ne_bytes(raw)))
    })?;
    drop((stdio, file, start_r, status_w, namespaces, mnt_ns, exe));
    Ok(Spawned {
        pid,
        exit,
        start: start_w,
        status: status_r,
    })
}

/// Makes `sources[i]` the child's fd `i` (without close-on-exec), in the cloned child.
unsafe fn install_fds<const N: usize>(sources: [i32; N], status_fd: i32) {
    // SAFETY: fcntl and dup2 are async-signal-safe; the array lives on the child's stack.
    unsafe {
        // First move every source above the targets, so no dup2 clobbers a later source.
        let mut high = [-1; N];
        for (slot, fd) in high.iter_mut().zip(sources) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, N as i32);
            if *slot < 0 {
                fail(status_fd);
            }
        }
        for (target, fd) in high.iter().enumerate() {
            // dup2 leaves the target without close-on-exec.
            if libc::dup2(*fd, target as i32) < 0 {
                fail(status_fd);
            }
        }
    }
}

/// Reports a failed step on the status pipe and exits, in the cloned child.
unsafe fn fail_with(status_fd: i32, msg: &[u8]) -> ! {
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(status_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

unsafe fn fail(status_fd: i32) -> ! {
    // SAFETY: see fail_with.
    unsafe {
        fail_with(
            status_fd,
            b"Ecannot re-execute the agent as the container's init",
        )
    }
}

/// What the init reported on the status pipe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Ready,
    /// The pipe closed without a message: after start, this means the exec succeeded.
    Closed,
    Error(String),
}

/// Reads one status message (blocking): a READY byte, or an error text up to EOF.
/// After start the init's copy of the pipe is close-on-exec, so a successful exec reads EOF.
pub(crate) fn read_status(status: &mut std::fs::File) -> io::Result<Status> {
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
