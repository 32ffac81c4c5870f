//! The kernel modules the guest needs (virtio, vsock, 9p, ...), loaded from the initramfs in the
//! order its load-order file gives.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::SetupReport;

/// Where the kernel modules live in the initramfs: `<dir>/<release>/kernel/<path>.ko`.
const MODULES_DIR: &str = "/lib/modules";
/// The list of modules to load, one `<path>` (relative to `kernel/`, no `.ko`) a line, written by
/// `scripts/build-guest-image.sh` from `scripts/guest-modules.txt`.
const LOAD_ORDER_FILE: &str = "load-order";

/// The module paths to load, in order, from `<modules dir>/<release>/load-order`.
fn module_list(modules_dir: &Path, release: &str) -> io::Result<Vec<PathBuf>> {
    let base = modules_dir.join(release);
    let text = std::fs::read_to_string(base.join(LOAD_ORDER_FILE))?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty() && !line.contains(".."))
        .map(|line| base.join("kernel").join(format!("{line}.ko")))
        .collect())
}

/// A module's name as /sys/module spells it: the file name without `.ko`, `-` as `_`.
fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.split(".ko").next().unwrap_or("").replace('-', "_")
}

fn kernel_release() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}

pub(crate) fn load_modules(report: &mut SetupReport) {
    let release = match kernel_release() {
        Ok(release) => release,
        Err(err) => {
            report.warn(format!("cannot tell the kernel release: {err}"));
            return;
        }
    };
    let modules = match module_list(Path::new(MODULES_DIR), &release) {
        Ok(modules) => modules,
        Err(err) => {
            report.warn(format!(
                "no module list {MODULES_DIR}/{release}/{LOAD_ORDER_FILE} ({err}); loading no modules"
            ));
            return;
        }
    };
    for path in modules {
        let name = module_name(&path);
        if Path::new("/sys/module").join(&name).exists() {
            report.warn(format!("module {name} is already loaded; skipped"));
            continue;
        }
        match load_module(&path) {
            Ok(()) => {
                tracing::debug!(module = %name, "module loaded");
                report.modules_loaded.push(name);
            }
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                report.warn(format!("module {name} is already loaded; skipped"));
            }
            Err(err) => report.warn(format!(
                "cannot load module {name} from {}: {err}",
                path.display()
            )),
        }
    }
}

/// `finit_module(fd, "", 0)`.
fn load_module(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let params = c"";
    // SAFETY: finit_module reads the open descriptor and a NUL-terminated parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_load_order_file() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("6.1.0-test");
        std::fs::create_dir_all(&release).unwrap();
        std::fs::write(
            release.join(LOAD_ORDER_FILE),
            "# comment\ndrivers/virtio/virtio_ring\n\n net/9p/9pnet_virtio \n../../etc/evil\n",
        )
        .unwrap();
        let list = module_list(dir.path(), "6.1.0-test").unwrap();
        assert_eq!(
            list,
            vec![
                release.join("kernel/drivers/virtio/virtio_ring.ko"),
                release.join("kernel/net/9p/9pnet_virtio.ko"),
            ]
        );
        assert!(module_list(dir.path(), "missing").is_err());
    }

    #[test]
    fn module_names_match_sys_module() {
        assert_eq!(module_name(Path::new("/x/9pnet_virtio.ko")), "9pnet_virtio");
        assert_eq!(module_name(Path::new("/x/vmw-vsock.ko.xz")), "vmw_vsock");
    }
}
