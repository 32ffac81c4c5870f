//! The names of the files a VM keeps in its state directory.
//!
//! `console.log` (serial console), `qemu.log` (QEMU's own output), `qemu.pid`, `qmp.sock`, and with
//! the vsock daemon `vsock-daemon.log`, `vsock-daemon.pid`, `vhu.sock`, `vm.vsock`, and with a
//! sandbox cgroup `cgroup-path` (its cgroups path, for removal after a shim crash).

pub(super) const CONSOLE_LOG: &str = "console.log";
pub(super) const QEMU_LOG: &str = "qemu.log";
pub(super) const QEMU_PID: &str = "qemu.pid";
pub(super) const QMP_SOCKET: &str = "qmp.sock";
pub(super) const DAEMON_LOG: &str = "vsock-daemon.log";
pub(super) const DAEMON_PID: &str = "vsock-daemon.pid";
pub(super) const VHOST_USER_SOCKET: &str = "vhu.sock";
pub(super) const HYBRID_VSOCK_SOCKET: &str = "vm.vsock";
pub(super) const CGROUP_PATH: &str = "cgroup-path";
