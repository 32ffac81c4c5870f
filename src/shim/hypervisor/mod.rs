//! The sandbox VM: what the shim asks of a hypervisor, and the QEMU implementation.
//!
//! A VM is described by a [`VmConfig`], started with [`Vm::start`] (which returns only once the
//! guest's agent answers a health check) and stopped with [`Vm::stop`]. Every file of a VM lives in
//! its `state_dir`, so that `shim delete` after a shim crash can clean up with [`kill_leftovers`].

mod accel;
mod child_process;
mod cmdline;
mod config_checks;
mod console_gate;
mod leftovers;
mod logs;
mod qmp;
mod relay_watch;
mod sandbox_cgroup;
mod state_files;
mod vm;
mod vsock_cid;

use std::io;
use std::os::fd::OwnedFd;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::agent_client::RpcDurations;

pub use leftovers::kill_leftovers;
pub(crate) use sandbox_cgroup::CgroupError;
pub(crate) use sandbox_cgroup::CgroupPath;
pub use vm::Vm;

/// Kernel parameters every VM gets; [`VmConfig::kernel_params`] is appended.
pub(crate) const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1";
/// What [`VmConfig::kernel_params`] usually holds: `quiet` saves seconds of serial output under TCG.
pub(crate) const DEFAULT_KERNEL_PARAMS: &str = "quiet";
/// The 9p mount tag of [`VmConfig::share_dir`] (Kata's).
pub(crate) const SHARE_MOUNT_TAG: &str = "kataShared";
/// The longest unix socket path the kernel takes (`sun_path` is 108 bytes with the final NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when a probe boot shows that it really boots a kernel, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    /// QEMU's emulator: slow, but works everywhere.
    Tcg,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown accelerator {0:?}; expected auto, kvm or tcg")]
pub struct AccelParseError(pub String);

impl FromStr for Accel {
    type Err = AccelParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(AccelParseError(other.to_string())),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// A NIC of the VM: a tap's descriptor (opened in the pod's network namespace, see
/// `shim::network`) and the MAC the guest's virtio-net device gets.
#[derive(Debug)]
pub(crate) struct Nic {
    pub(crate) tap: OwnedFd,
    pub(crate) mac: String,
}

/// One sandbox VM.
#[derive(Debug)]
pub struct VmConfig {
    pub(crate) qemu_path: PathBuf,
    /// The guest kernel: an uncompressed `vmlinux` (boots faster under TCG) or a bzImage.
    pub kernel: PathBuf,
    /// The initramfs whose `/init` is the static kata-agent.
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// `vhost-device-vsock`, used when the host has no `/dev/vhost-vsock`.
    pub vsock_daemon: PathBuf,
    /// Where the health checks of the boot report their latency (the shim's agent RPC histogram).
    pub(crate) agent_durations: Option<RpcDurations>,
    /// The host directory exported to the guest over virtio-9p with mount tag [`SHARE_MOUNT_TAG`].
    pub(crate) share_dir: PathBuf,
    /// Where every file of this VM lives (e.g. `<run dir>/<sandbox id>/vm`); created by
    /// [`Vm::start`], removed by [`Vm::stop`]. It must not exist yet.
    pub state_dir: PathBuf,
    /// How long the guest's agent may take to answer its first health check.
    pub boot_timeout: Duration,
    /// Appended to [`BASE_KERNEL_PARAMS`].
    pub(crate) kernel_params: String,
    /// The pod's NICs; none gives a VM without a network device.
    pub(crate) nics: Vec<Nic>,
    /// The sandbox's cgroup (the sandbox container's `linux.cgroupsPath`), where QEMU and the
    /// vsock daemon run: created by [`Vm::start`] under every mounted hierarchy, removed by
    /// [`Vm::stop`] or, after a shim crash, by [`kill_leftovers`]. `None`: the shim's cgroups.
    pub(crate) cgroup: Option<CgroupPath>,
}

impl VmConfig {
    /// A configuration with the usual defaults (1 vCPU, 512 MiB, auto acceleration, a 60 s boot
    /// timeout, `qemu-system-x86_64` and `vhost-device-vsock` from PATH).
    pub fn new(
        kernel: PathBuf,
        initrd: PathBuf,
        share_dir: PathBuf,
        state_dir: PathBuf,
    ) -> VmConfig {
        VmConfig {
            qemu_path: PathBuf::from("qemu-system-x86_64"),
            kernel,
            initrd,
            memory_mib: 512,
            vcpus: 1,
            accel: Accel::Auto,
            vsock_daemon: PathBuf::from("vhost-device-vsock"),
            agent_durations: None,
            share_dir,
            state_dir,
            boot_timeout: Duration::from_secs(60),
            kernel_params: DEFAULT_KERNEL_PARAMS.to_string(),
            nics: Vec::new(),
            cgroup: None,
        }
    }
}

/// How long the steps of [`Vm::start`] took (for benchmarks; never for pass/fail).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// Starting the vsock daemon until its socket existed (zero with `/dev/vhost-vsock`).
    pub vsock_daemon: Duration,
    /// Deciding the accelerator (the KVM probe, when [`Accel::Auto`] had not decided before).
    pub accel_probe: Duration,
    /// QEMU spawned until the agent's first successful health check.
    pub qemu_to_agent: Duration,
    /// The whole of [`Vm::start`].
    pub(crate) total: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("{what} {path} does not exist or is not a file")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("VM state directory {0} already exists (a running VM, or leftovers of a crashed shim: clean up with kill_leftovers)")]
    StateDirExists(PathBuf),
    #[error("unix socket path {path} is {len} bytes long, over the limit of {MAX_SOCKET_PATH}: use a shorter state directory")]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{action}: {source}")]
    Io { action: String, source: io::Error },
    #[error("the sandbox's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("KVM was asked for, but {0}")]
    KvmUnusable(String),
    #[error(
        "{what} exited before the agent answered ({status})\n--- {log_name} (tail) ---\n{log_tail}"
    )]
    Exited {
        what: &'static str,
        status: String,
        log_name: &'static str,
        log_tail: String,
    },
    #[error("the VM cannot reach its guest: {why}\n--- console.log (tail) ---\n{log_tail}")]
    RelayLost { why: String, log_tail: String },
    #[error("{what} did not come up within {timeout:?}: {reason}\n--- {log_name} (tail) ---\n{log_tail}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
        reason: String,
        log_name: &'static str,
        log_tail: String,
    },
}

impl VmError {
    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> VmError {
        VmError::Io {
            action: action.into(),
            source,
        }
    }
}

/// A configuration whose kernel and initrd exist (dummy files in `dir`), for unit tests.
#[cfg(test)]
fn test_config(dir: &Path) -> VmConfig {
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.img");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    VmConfig::new(kernel, initrd, dir.to_path_buf(), dir.join("vm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parses_and_prints() {
        for text in ["auto", "kvm", "tcg"] {
            assert_eq!(text.parse::<Accel>().unwrap().to_string(), text);
        }
        assert!("hvf"
            .parse::<Accel>()
            .unwrap_err()
            .to_string()
            .contains("\"hvf\""));
    }
}
