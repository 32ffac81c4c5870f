//! A container process's stdio as the agent sees it: pipes, or a pty when the spec asks for a
//! terminal. Reads block until data is there and return empty data at EOF (the shim's EOF).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

/// The most one ReadStdout/ReadStderr returns; also used when the request asks for 0 bytes.
pub(crate) const MAX_READ: usize = 1024 * 1024;
const DEFAULT_READ: usize = 32 * 1024;

/// The ends the container process gets as fds 0, 1 and 2.
pub(crate) struct ChildStdio {
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// The agent's ends. A stream is `None` once closed (stdin) or at EOF (stdout, stderr).
pub(crate) struct Stdio {
    pub(crate) stdin: Mutex<Option<Stream>>,
    pub(crate) stdout: Mutex<Option<Stream>>,
    pub(crate) stderr: Mutex<Option<Stream>>,
    /// The pty master, for TIOCSWINSZ.
    pub(crate) tty: Option<OwnedFd>,
}

impl Stdio {
    /// Three pipes.
    pub(crate) fn pipes() -> io::Result<(Stdio, ChildStdio)> {
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let stdio = Stdio {
            stdin: Mutex::new(Some(Stream::new(stdin_w)?)),
            stdout: Mutex::new(Some(Stream::new(stdout_r)?)),
            stderr: Mutex::new(Some(Stream::new(stderr_r)?)),
            tty: None,
        };
        Ok((
            stdio,
            ChildStdio {
                stdin: stdin_r,
                stdout: stdout_w,
                stderr: stderr_w,
            },
        ))
    }

    /// A pty: the slave is all three of the child's fds; output (stdout and stderr) comes out of
    /// the master as stdout, and the agent's stderr stream is at EOF from the start.
    pub(crate) fn terminal(rows: u16, cols: u16) -> io::Result<(Stdio, ChildStdio)> {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None)?;
        for fd in [&pty.master, &pty.slave] {
            set_cloexec(fd)?;
        }
        // Separate fds for reading and writing, so CloseStdin can drop the writer alone.
        let reader = pty.master.try_clone()?;
        let writer = pty.master.try_clone()?;
        let stdio = Stdio {
            stdin: Mutex::new(Some(Stream::new(writer)?)),
            stdout: Mutex::new(Some(Stream::new(reader)?)),
            stderr: Mutex::new(None),
            tty: Some(pty.master),
        };
        let child = ChildStdio {
            stdin: pty.slave.try_clone()?,
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave,
        };
        Ok((stdio, child))
    }

    pub(crate) fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let tty = self.tty.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "the process has no terminal")
        })?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Up to `len` bytes from `slot`; waits for data; empty at EOF (then and ever after).
pub(crate) async fn read(slot: &Mutex<Option<Stream>>, len: u32) -> io::Result<Vec<u8>> {
    let mut guard = slot.lock().await;
    let Some(stream) = guard.as_ref() else {
        return Ok(Vec::new());
    };
    let len = match len as usize {
        0 => DEFAULT_READ,
        n => n.min(MAX_READ),
    };
    let data = stream.read(len).await?;
    if data.is_empty() {
        *guard = None;
    }
    Ok(data)
}

/// Writes all of `data` (waiting while the pipe is full); the number of bytes written.
pub(crate) async fn write(slot: &Mutex<Option<Stream>>, data: &[u8]) -> io::Result<usize> {
    let guard = slot.lock().await;
    let stream = guard
        .as_ref()
        .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin was closed"))?;
    let mut written = 0;
    while written < data.len() {
        written += stream.write(&data[written..]).await?;
    }
    Ok(written)
}

/// One non-blocking fd driven by tokio's reactor (pipes and pty masters alike).
pub(crate) struct Stream {
    fd: AsyncFd<OwnedFd>,
}

impl Stream {
    fn new(fd: OwnedFd) -> io::Result<Stream> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the OwnedFd stays open, unreplaced, for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Stream { fd })
    }

    async fn read(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| {
                // SAFETY: reads at most buf.len() bytes into buf.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                // A pty master reads EIO once the last slave fd is closed: that is its EOF.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| {
                // SAFETY: writes at most data.len() bytes from data.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    // CLOEXEC: no other child of the agent may hold an end, or EOF would never come.
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

fn set_cloexec(fd: &impl AsFd) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(())
}
