//! The agent as the guest's init (PID 1): the filesystems, kernel modules, network and hostname that a
//! bare initramfs does not have.
//!
//! Nothing here fails the boot: each step that goes wrong is logged and the rest still runs, so the
//! agent comes up (and can be asked what is missing) whenever its vsock transport loaded.
//! Reaping: see `guest::reaper` (it owns waitpid for container processes; nothing here waits).
//!
//! - `mounts`: /proc, /sys, /dev and the rest of the base filesystems;
//! - `console`: stdio on /dev/console;
//! - `modules`: the kernel modules listed in the initramfs' load-order file;
//! - `network`: lo up (the pod NIC is the shim's to configure, through `guest::network`);
//! - `hostname`: the hostname from /etc/hostname.

mod console;
mod hostname;
mod modules;
mod mounts;
mod network;

use std::io;

/// True when this process is the system's init.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// What [`setup_guest`] did not manage; each entry is a complete sentence for a log line.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub(crate) warnings: Vec<String>,
    pub(crate) modules_loaded: Vec<String>,
}

impl SetupReport {
    fn warn(&mut self, text: String) {
        tracing::warn!("{text}");
        self.warnings.push(text);
    }
}

/// Prepares a bare guest for the agent: mounts, modules, console, network, hostname.
pub fn setup_guest() -> SetupReport {
    let mut report = SetupReport::default();
    mounts::mount_base(&mut report);
    console::attach_console(&mut report);
    mounts::mount_rest(&mut report);
    modules::load_modules(&mut report);
    network::setup_network(&mut report);
    hostname::set_hostname(&mut report);
    tracing::info!(
        modules = report.modules_loaded.len(),
        warnings = report.warnings.len(),
        "guest set up"
    );
    report
}

/// Powers the VM off (QEMU started with `-no-reboot` then exits). Returns only if that failed.
pub fn power_off() -> io::Error {
    nix::unistd::sync();
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_init_in_tests() {
        assert!(!is_init());
    }
}
