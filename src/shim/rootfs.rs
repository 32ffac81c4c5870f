//! Sharing a container's root filesystem with the VM.
//!
//! containerd hands the shim the snapshot's mounts; like runc's shim we mount them on
//! `<bundle>/rootfs`, then bind that into the sandbox's shared directory, which QEMU exports as 9p
//! tag `kataShared`. Unmounting is lazy (MNT_DETACH) so a busy 9p server cannot make cleanup fail.

use std::io;
use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub(crate) enum RootfsError {
    #[error("mounting the container rootfs ({fstype} {source_path}) on {target}: {source}")]
    Mount {
        fstype: String,
        source_path: String,
        target: PathBuf,
        /// Boxed: containerd-shim's error is large, and task results carry this one.
        source: Box<containerd_shim::Error>,
    },
    #[error("sharing {from} with the VM at {to}: {source}")]
    Bind {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// The host side of a container's root in the shared directory.
pub(crate) fn shared_rootfs(shared_dir: &Path, container_id: &str) -> PathBuf {
    shared_dir.join(container_id).join("rootfs")
}

/// Mounts containerd's `mounts` on `<bundle>/rootfs` (if there are any: with none, the bundle's
/// rootfs is already a directory) and binds it to the container's place in `shared_dir`.
pub(crate) async fn share(
    mounts: &[Mount],
    bundle: &Path,
    shared_dir: &Path,
    container_id: &str,
) -> Result<PathBuf, RootfsError> {
    let bundle_rootfs = bundle.join("rootfs");
    for m in mounts {
        containerd_shim::util::mount_rootfs(m, &bundle_rootfs)
            .await
            .map_err(|err| RootfsError::Mount {
                fstype: m.type_.clone(),
                source_path: m.source.clone(),
                target: bundle_rootfs.clone(),
                source: Box::new(err),
            })?;
    }
    let target = shared_rootfs(shared_dir, container_id);
    let bind = || -> io::Result<()> {
        std::fs::create_dir_all(&target)?;
        mount(
            Some(&bundle_rootfs),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(io::Error::from)
    };
    if let Err(source) = bind() {
        if !mounts.is_empty() {
            unmount(&bundle_rootfs);
        }
        return Err(RootfsError::Bind {
            from: bundle_rootfs,
            to: target,
            source,
        });
    }
    Ok(target)
}

/// Undoes [`share`]: unmounts the shared bind and the bundle's rootfs, and removes the (then
/// empty) directories. Never removes anything recursively: a mount still in place would take
/// the container's files with it.
pub(crate) fn unshare(bundle: Option<&Path>, shared_dir: &Path, container_id: &str) {
    let target = shared_rootfs(shared_dir, container_id);
    unmount(&target);
    let _ = std::fs::remove_dir(&target);
    let _ = std::fs::remove_dir(shared_dir.join(container_id));
    if let Some(bundle) = bundle {
        unmount(&bundle.join("rootfs"));
    }
}

/// Unmounts every container left in `shared_dir` and removes it (crash recovery, shutdown).
pub(crate) fn unshare_all(shared_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(shared_dir) {
        for entry in entries.flatten() {
            if let Some(id) = entry.file_name().to_str() {
                unshare(None, shared_dir, id);
            }
        }
    }
    let _ = std::fs::remove_dir(shared_dir);
}

/// Detaches whatever is mounted on `path`, as often as something is (stacked mounts).
fn unmount(path: &Path) {
    for _ in 0..8 {
        if umount2(path, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}
