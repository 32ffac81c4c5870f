//! When a boot may send its first CONNECT through the vsock daemon.
//!
//! vhost-device-vsock's relay thread ends for good when a host connection arrives while QEMU hands
//! the guest's vsock queues to it (see `relay_watch`), which happens while the guest's driver
//! starts: a moment the host cannot see. Our agent writes [`CONSOLE_READY_LINE`] to the console
//! once it listens, well after its driver is up, so a boot connects only after that line. A guest
//! that never writes it (another agent, an image built before the line) is connected to after
//! [`CONSOLE_GRACE`] as before; should the relay stop then, the boot starts the VM again.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::logs::LogWatch;
use crate::agent::CONSOLE_READY_LINE;

/// How often the console is read while the gate is shut.
pub(super) const CONSOLE_POLL: Duration = Duration::from_millis(50);
/// How long a guest may take to write the line (a TCG boot on a loaded host takes about 11 s)
/// before it is connected to anyway; at most half the boot timeout.
const CONSOLE_GRACE: Duration = Duration::from_secs(20);

pub(super) struct ConsoleGate {
    open: bool,
    /// When a guest that has not written the line is connected to anyway.
    until: Instant,
    console: LogWatch,
}

impl ConsoleGate {
    /// A gate for a boot of `timeout`; open from the start when no vsock daemon relays (the
    /// host's vhost-vsock has no such fault).
    pub(super) fn new(hybrid: bool, timeout: Duration) -> ConsoleGate {
        ConsoleGate {
            open: !hybrid,
            until: Instant::now() + CONSOLE_GRACE.min(timeout / 2),
            console: LogWatch::default(),
        }
    }

    /// Whether the boot may connect now: the guest's console (`console`) said that the agent
    /// listens, or the guest had its time to say it.
    pub(super) fn open(&mut self, console: &Path) -> bool {
        if !self.open && self.console.find(console, CONSOLE_READY_LINE).is_some() {
            self.open = true;
        }
        if !self.open && Instant::now() >= self.until {
            tracing::info!(
                "the guest's console has not said that the agent listens: connecting anyway"
            );
            self.open = true;
        }
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_opens_on_the_agents_line_or_after_half_the_timeout() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let console = dir.path().join("console.log");
        std::fs::write(&console, "[    0.000000] Linux version 6.1\n").expect("the console");
        let mut gate = ConsoleGate::new(true, Duration::from_secs(3600));
        assert!(!gate.open(&console), "no line yet");
        std::fs::write(
            &console,
            format!("[    0.000000] Linux version 6.1\n{CONSOLE_READY_LINE}\n"),
        )
        .expect("the console");
        assert!(gate.open(&console), "the agent's line");
        assert!(gate.open(&console), "and it stays open");

        assert!(ConsoleGate::new(false, Duration::from_secs(3600)).open(&console));
        let missing = dir.path().join("missing.log");
        assert!(!ConsoleGate::new(true, Duration::from_secs(3600)).open(&missing));
        assert!(
            ConsoleGate::new(true, Duration::ZERO).open(&missing),
            "timed out"
        );
    }
}
