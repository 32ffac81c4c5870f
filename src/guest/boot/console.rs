//! Stdio on /dev/console, so that init's logs reach the serial console.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::SetupReport;

/// Points stdin, stdout and stderr at /dev/console: an initramfs without a /dev/console node gives
/// init no stdio at all, and the logs must reach the serial console.
pub(crate) fn attach_console(report: &mut SetupReport) {
    let console = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(file) => OwnedFd::from(file),
        Err(err) => {
            report.warn(format!("cannot open /dev/console: {err}"));
            return;
        }
    };
    for fd in 0..=2 {
        // SAFETY: dup2 on a valid open descriptor onto the standard descriptors.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            let err = io::Error::last_os_error();
            report.warn(format!("cannot attach fd {fd} to /dev/console: {err}"));
        }
    }
}
