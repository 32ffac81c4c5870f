//! Sandbox storages (CreateSandbox): the shim shares host directories over virtio-9p and the agent
//! mounts each at its `mount_point`; DestroySandbox unmounts them again.

use std::path::PathBuf;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::protocols::agent::Storage;

/// Used when the storage's options name no `msize`: 512 KiB is what virtio-9p can carry in one
/// request on Linux, and far faster than the kernel's 8 KiB default.
pub(crate) const DEFAULT_MSIZE: u32 = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("storage driver {0:?} is not supported (only \"9p\")")]
    Driver(String),
    #[error("storage {0:?}: {1}")]
    Invalid(String, String),
    #[error("mounting 9p tag {tag:?} at {target}: {source}")]
    Mount {
        tag: String,
        target: String,
        source: std::io::Error,
    },
}

/// A validated 9p mount: flags and data for mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NinePMount {
    pub(crate) tag: String,
    pub(crate) target: PathBuf,
    pub(crate) flags: MsFlags,
    pub(crate) data: String,
}

/// Builds the mount for one Storage; the virtio transport options are always ours, other data
/// options (e.g. `cache=mmap`, `msize=`) pass through.
pub(crate) fn ninep_mount(storage: &Storage) -> Result<NinePMount, StorageError> {
    if storage.driver != "9p" {
        return Err(StorageError::Driver(storage.driver.clone()));
    }
    let invalid = |why: &str| StorageError::Invalid(storage.mount_point.clone(), why.to_string());
    if storage.source.is_empty() {
        return Err(invalid("source (the 9p mount tag) is empty"));
    }
    let target = PathBuf::from(&storage.mount_point);
    if !target.is_absolute() {
        return Err(invalid("mount_point must be an absolute path"));
    }
    let mut flags = MsFlags::empty();
    let mut data = vec!["trans=virtio".to_string(), "version=9p2000.L".to_string()];
    let mut msize = None;
    for option in storage.options.iter().chain(&storage.driver_options) {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            o if o.starts_with("trans=") || o.starts_with("version=") => {}
            o if o.starts_with("msize=") => msize = Some(o.to_string()),
            o if o.contains('\0') || o.contains(',') => {
                return Err(invalid("an option contains a NUL byte or a comma"))
            }
            o => data.push(o.to_string()),
        }
    }
    data.push(msize.unwrap_or_else(|| format!("msize={DEFAULT_MSIZE}")));
    Ok(NinePMount {
        tag: storage.source.clone(),
        target,
        flags,
        data: data.join(","),
    })
}

/// Creates the mount point and mounts the share.
pub(crate) fn mount_9p(m: &NinePMount) -> Result<(), StorageError> {
    let fail = |source| StorageError::Mount {
        tag: m.tag.clone(),
        target: m.target.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&m.target).map_err(fail)?;
    mount(
        Some(m.tag.as_str()),
        &m.target,
        Some("9p"),
        m.flags,
        Some(m.data.as_str()),
    )
    .map_err(|e| fail(e.into()))
}

/// Lazily unmounts (a container may still hold files open); failures are only logged.
pub(crate) fn unmount(target: &PathBuf) {
    if let Err(err) = umount2(target, MntFlags::MNT_DETACH) {
        tracing::warn!(target = %target.display(), %err, "unmounting sandbox storage");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(driver: &str, options: &[&str]) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = "kataShared".into();
        s.mount_point = "/run/kata-containers/shared/containers".into();
        s.options = options.iter().map(|o| o.to_string()).collect();
        s
    }

    #[test]
    fn builds_virtio_9p_options() {
        let m = ninep_mount(&storage("9p", &[])).expect("valid");
        assert_eq!(m.data, "trans=virtio,version=9p2000.L,msize=524288");
        assert_eq!(m.tag, "kataShared");
        assert!(m.flags.is_empty());

        let m = ninep_mount(&storage(
            "9p",
            &["ro", "cache=mmap", "msize=8192", "trans=tcp"],
        ))
        .expect("valid");
        assert_eq!(
            m.data,
            "trans=virtio,version=9p2000.L,cache=mmap,msize=8192"
        );
        assert!(m.flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn rejects_other_drivers_and_bad_storages() {
        let err = ninep_mount(&storage("virtio-fs", &[])).expect_err("unsupported");
        assert!(err.to_string().contains("\"virtio-fs\""), "{err}");
        let mut s = storage("9p", &[]);
        s.mount_point = "relative".into();
        assert!(ninep_mount(&s).is_err());
        let mut s = storage("9p", &[]);
        s.source.clear();
        assert!(ninep_mount(&s).is_err());
    }
}
