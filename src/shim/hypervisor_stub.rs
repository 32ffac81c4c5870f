//! Placeholder for the `vm` branch's hypervisor API until it is merged (same names and shapes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::url::AgentUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub qemu_path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    pub vsock_daemon: PathBuf,
    pub share_dir: PathBuf,
    pub state_dir: PathBuf,
    pub boot_timeout: Duration,
    pub kernel_params: String,
}

#[derive(Debug, thiserror::Error)]
#[error("the hypervisor is not built in yet")]
pub struct VmError;

#[derive(Debug, Clone, Default)]
pub struct VmTimings {}

pub struct Vm;

impl Vm {
    pub async fn start(_cfg: &VmConfig) -> Result<Vm, VmError> {
        Err(VmError)
    }
    pub fn agent_url(&self) -> AgentUrl {
        AgentUrl::Unix {
            path: PathBuf::new(),
        }
    }
    pub fn pid(&self) -> u32 {
        0
    }
    pub fn timings(&self) -> VmTimings {
        VmTimings {}
    }
    pub async fn stop(self) {}
}

pub fn kill_leftovers(_state_dir: &Path) {}
