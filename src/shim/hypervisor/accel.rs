//! Deciding how QEMU runs guest code: TCG, or KVM when a probe boot shows that KVM really works.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use super::state_files::CONSOLE_LOG;
use super::{Accel, VmConfig, VmError};

/// The KVM probe's limit: a working KVM reaches the kernel's root-mount panic well within it.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_millis(3500);

/// The accelerator `cfg` asks for, with [`Accel::Auto`] decided (never `Auto` on success).
pub(super) async fn resolve_accel(cfg: &VmConfig) -> Result<Accel, VmError> {
    match cfg.accel {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm => {
            if Path::new("/dev/kvm").exists() {
                Ok(Accel::Kvm)
            } else {
                Err(VmError::KvmUnusable("/dev/kvm does not exist".to_string()))
            }
        }
        Accel::Auto => {
            let qemu = cfg.qemu_path.clone();
            let kernel = cfg.kernel.clone();
            let usable = tokio::task::spawn_blocking(move || kvm_usable(&qemu, &kernel))
                .await
                .unwrap_or(false);
            Ok(if usable { Accel::Kvm } else { Accel::Tcg })
        }
    }
}

/// Whether QEMU can really run a guest with KVM here: `/dev/kvm` must exist, and a probe boot of
/// `kernel` without an initrd must reach the kernel's panic about the missing root filesystem
/// within a few seconds (some hosts offer a /dev/kvm that hangs or aborts). Decided once per process.
fn kvm_usable(qemu: &Path, kernel: &Path) -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| {
        let usable = probe_kvm(qemu, kernel);
        tracing::info!(usable, "KVM probe");
        usable
    })
}

fn probe_kvm(qemu: &Path, kernel: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(dir) = probe_dir() else {
        return false;
    };
    let console = dir.join(CONSOLE_LOG);
    let child = std::process::Command::new(qemu)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256M",
        ])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let usable = match child {
        Ok(mut child) => {
            let deadline = std::time::Instant::now() + KVM_PROBE_TIMEOUT;
            let mut panicked = false;
            while std::time::Instant::now() < deadline {
                let text = std::fs::read(&console).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains("Kernel panic") {
                    panicked = true;
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // Exited: a panic with panic=-1 -no-reboot, or QEMU refused KVM.
                    let text = std::fs::read(&console).unwrap_or_default();
                    panicked = String::from_utf8_lossy(&text).contains("Kernel panic");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panicked
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_dir_all(&dir);
    usable
}

fn probe_dir() -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ksm-kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}
