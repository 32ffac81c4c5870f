//! Checks of a [`VmConfig`] that refuse a bad one before anything starts.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{VmConfig, VmError, MAX_SOCKET_PATH};

pub(super) fn check_config(cfg: &VmConfig) -> Result<(), VmError> {
    for (what, path) in [("guest kernel", &cfg.kernel), ("guest initrd", &cfg.initrd)] {
        if !path.is_file() {
            return Err(VmError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    if !cfg.share_dir.is_dir() {
        return Err(VmError::Config(format!(
            "shared directory {} does not exist or is not a directory",
            cfg.share_dir.display()
        )));
    }
    if cfg.memory_mib < 64 {
        return Err(VmError::Config(format!(
            "memory_mib {} is too small (at least 64)",
            cfg.memory_mib
        )));
    }
    if cfg.vcpus == 0 || cfg.vcpus > 255 {
        return Err(VmError::Config(format!(
            "vcpus {} is out of range (1 to 255)",
            cfg.vcpus
        )));
    }
    if !cfg.state_dir.is_absolute() {
        return Err(VmError::Config(format!(
            "state directory {} must be an absolute path",
            cfg.state_dir.display()
        )));
    }
    // Commas separate QEMU option values; a path with one would be misread.
    for (what, path) in [
        ("state directory", &cfg.state_dir),
        ("shared directory", &cfg.share_dir),
    ] {
        if path.as_os_str().as_bytes().contains(&b',') {
            return Err(VmError::Config(format!(
                "{what} {} contains a comma, which QEMU's option syntax cannot take",
                path.display()
            )));
        }
    }
    if cfg.kernel_params.contains('\n') {
        return Err(VmError::Config(
            "kernel parameters contain a newline".to_string(),
        ));
    }
    Ok(())
}

pub(super) fn check_socket_path(path: &Path) -> Result<(), VmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmError::SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::shim::hypervisor::test_config as config;

    #[test]
    fn bad_configs_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.vcpus = 0;
        assert!(check_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("vcpus"));
        let mut cfg = config(dir.path());
        cfg.kernel = dir.path().join("nope");
        assert!(check_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("guest kernel"));
        let long = PathBuf::from(format!("/{}/vm.vsock", "x".repeat(120)));
        assert!(check_socket_path(&long)
            .unwrap_err()
            .to_string()
            .contains("shorter state directory"));
    }
}
