//! The filesystems a bare initramfs lacks: /proc, /sys and /dev first (the console needs /dev), then
//! devpts, shm, /run, /tmp and the cgroup v2 hierarchy.

use nix::mount::{mount, MsFlags};

use super::SetupReport;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const BASE_MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
];

const OTHER_MOUNTS: &[Mount] = &[
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// /proc, /sys and /dev.
pub(crate) fn mount_base(report: &mut SetupReport) {
    for m in BASE_MOUNTS {
        mount_one(m, report);
    }
}

/// Everything else, once the console is attached.
pub(crate) fn mount_rest(report: &mut SetupReport) {
    for m in OTHER_MOUNTS {
        mount_one(m, report);
    }
}

fn mount_one(m: &Mount, report: &mut SetupReport) {
    if let Err(err) = std::fs::create_dir_all(m.target) {
        report.warn(format!("cannot create mount point {}: {err}", m.target));
        return;
    }
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
        Ok(()) => tracing::debug!(target = m.target, fstype = m.fstype, "mounted"),
        // Already mounted (e.g. a kernel that mounts devtmpfs itself).
        Err(nix::errno::Errno::EBUSY) => {}
        Err(err) => report.warn(format!(
            "cannot mount {} ({}) on {}: {err}",
            m.source, m.fstype, m.target
        )),
    }
}
