//! Translating (and validating) an OCI spec into what the container's init does.
//!
//! Pure code: both the agent (at CreateContainer, to reject bad specs early with a clear error) and
//! the re-executed init process (to act on it) run the same translation.

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

use crate::protocols::oci;

/// The `PATH` used to find the program when the spec's environment has none.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitConfig {
    /// The container's root in the agent's filesystem.
    pub(crate) rootfs: PathBuf,
    pub(crate) readonly_root: bool,
    pub(crate) hostname: Option<String>,
    pub(crate) mounts: Vec<MountPlan>,
    pub(crate) args: Vec<CString>,
    pub(crate) env: Vec<CString>,
    /// Absolute, inside the container.
    pub(crate) cwd: PathBuf,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) additional_gids: Vec<u32>,
    pub(crate) terminal: bool,
    /// (resource, soft, hard) for setrlimit.
    pub(crate) rlimits: Vec<(RlimitResource, u64, u64)>,
    pub(crate) no_new_privileges: bool,
    pub(crate) oom_score_adj: i64,
}

/// An `RLIMIT_*` constant, as libc types it on this target.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) type RlimitResource = libc::c_int;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    /// Absolute path inside the container, without `..`.
    pub(crate) destination: PathBuf,
    pub(crate) kind: MountKind,
    pub(crate) flags: MsFlags,
    /// Filesystem-specific options (`mode=755,size=65536k`), passed as mount data.
    pub(crate) data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MountKind {
    /// A new instance of a filesystem (proc, sysfs, tmpfs, ...).
    Fresh { fstype: String, source: String },
    /// A bind mount of a path in the agent's filesystem.
    Bind { source: PathBuf, recursive: bool },
}

/// A spec the agent cannot run; the message names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid container spec: {0}")]
pub(crate) struct SpecError(pub String);

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError(msg.into())
}

fn cstring(what: &str, s: &str) -> Result<CString, SpecError> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte: {s:?}")))
}

pub(crate) fn translate(spec: &oci::Spec) -> Result<InitConfig, SpecError> {
    let root = spec
        .Root
        .as_ref()
        .ok_or_else(|| invalid("Root is missing"))?;
    let rootfs = PathBuf::from(&root.Path);
    if !rootfs.is_absolute() {
        return Err(invalid(format!(
            "Root.Path must be an absolute path in the agent's filesystem, got {:?}",
            root.Path
        )));
    }
    let process = spec
        .Process
        .as_ref()
        .ok_or_else(|| invalid("Process is missing"))?;
    let (args, env, cwd) = process_parts(process)?;
    let user = process.User.as_ref();
    let mounts = spec
        .Mounts
        .iter()
        .map(mount_plan)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InitConfig {
        rootfs,
        readonly_root: root.Readonly,
        hostname: (!spec.Hostname.is_empty()).then(|| spec.Hostname.clone()),
        mounts,
        args,
        env,
        cwd,
        uid: user.map_or(0, |u| u.UID),
        gid: user.map_or(0, |u| u.GID),
        additional_gids: user.map(|u| u.AdditionalGids.clone()).unwrap_or_default(),
        terminal: process.Terminal,
        rlimits: process
            .Rlimits
            .iter()
            .map(rlimit)
            .collect::<Result<_, _>>()?,
        no_new_privileges: process.NoNewPrivileges,
        oom_score_adj: process.OOMScoreAdj,
    })
}

fn rlimit(limit: &oci::POSIXRlimit) -> Result<(RlimitResource, u64, u64), SpecError> {
    let resource = match limit.Type.as_str() {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        other => return Err(invalid(format!("unknown rlimit type {other:?}"))),
    };
    if limit.Soft > limit.Hard {
        return Err(invalid(format!(
            "rlimit {}: soft limit {} exceeds hard limit {}",
            limit.Type, limit.Soft, limit.Hard
        )));
    }
    Ok((resource, limit.Soft, limit.Hard))
}

type ProcessParts = (Vec<CString>, Vec<CString>, PathBuf);

/// Args, Env and Cwd of a process (shared with ExecProcess).
pub(crate) fn process_parts(process: &oci::Process) -> Result<ProcessParts, SpecError> {
    if process.Args.is_empty() || process.Args[0].is_empty() {
        return Err(invalid("Process.Args is empty: there is no program to run"));
    }
    let args = process
        .Args
        .iter()
        .map(|a| cstring("Process.Args", a))
        .collect::<Result<_, _>>()?;
    let env = process
        .Env
        .iter()
        .map(|e| {
            if !e.contains('=') || e.starts_with('=') {
                return Err(invalid(format!(
                    "Process.Env entry {e:?} is not NAME=value"
                )));
            }
            cstring("Process.Env", e)
        })
        .collect::<Result<_, _>>()?;
    let cwd = if process.Cwd.is_empty() {
        PathBuf::from("/")
    } else {
        clean_absolute("Process.Cwd", &process.Cwd)?
    };
    Ok((args, env, cwd))
}

/// An absolute path without `..` (it is joined onto the rootfs and must stay inside).
fn clean_absolute(what: &str, path: &str) -> Result<PathBuf, SpecError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!(
            "{what} must be an absolute path without '..', got {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    Ok(p.to_path_buf())
}

/// One OCI mount.
fn mount_plan(mount: &oci::Mount) -> Result<MountPlan, SpecError> {
    let destination = clean_absolute("Mount destination", &mount.destination)?;
    let (flags, data, bind) = parse_options(&mount.options)?;
    let kind = if mount.type_ == "bind" || bind.is_some() {
        let source = PathBuf::from(&mount.source);
        if !source.is_absolute() {
            return Err(invalid(format!(
                "bind mount source for {} must be absolute, got {:?}",
                destination.display(),
                mount.source
            )));
        }
        MountKind::Bind {
            source,
            recursive: bind.unwrap_or(false),
        }
    } else {
        match mount.type_.as_str() {
            // A devpts of our own would not hold the pty the agent allocates for the container's
            // terminal; the agent's /dev/pts is bound there instead.
            "devpts" => MountKind::Bind {
                source: PathBuf::from("/dev/pts"),
                recursive: false,
            },
            // The guest has cgroup v2 only, whatever the host has: a program reads its limits
            // and usage there (the container's own cgroup is kata/<id>).
            "cgroup" | "cgroup2" => MountKind::Fresh {
                fstype: "cgroup2".to_string(),
                source: "cgroup2".to_string(),
            },
            "proc" | "sysfs" | "tmpfs" | "devtmpfs" | "mqueue" => MountKind::Fresh {
                fstype: mount.type_.clone(),
                source: if mount.source.is_empty() {
                    mount.type_.clone()
                } else {
                    mount.source.clone()
                },
            },
            other => {
                return Err(invalid(format!(
                    "mount type {other:?} at {} is not supported (proc, sysfs, tmpfs, devtmpfs, \
                     mqueue, cgroup, devpts, bind)",
                    destination.display()
                )))
            }
        }
    };
    let data = match kind {
        // Data such as devpts' `newinstance,ptmxmode=0666` would make a bind fail.
        MountKind::Bind { .. } => None,
        MountKind::Fresh { .. } => data,
    };
    Ok(MountPlan {
        destination,
        kind,
        flags,
        data,
    })
}

type ParsedOptions = (MsFlags, Option<String>, Option<bool>);

/// Splits mount options into flags, filesystem data, and whether (and how) it is a bind mount.
fn parse_options(options: &[String]) -> Result<ParsedOptions, SpecError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = None;
    for option in options {
        match option.as_str() {
            "bind" => bind = Some(false),
            "rbind" => bind = Some(true),
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            // Propagation: the container's mount namespace is private as a whole.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" | "async" | "atime" | "diratime" | "defaults" => {}
            other if other.contains('\0') => {
                return Err(invalid("a mount option contains a NUL byte"))
            }
            other => data.push(other.to_string()),
        }
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    Ok((flags, data, bind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> oci::Spec {
        let mut spec = oci::Spec::new();
        let mut root = oci::Root::new();
        root.Path = "/run/rootfs".into();
        spec.Root = Some(root).into();
        let mut process = oci::Process::new();
        process.Args = args.iter().map(|s| s.to_string()).collect();
        spec.Process = Some(process).into();
        spec
    }

    fn mount(dest: &str, ty: &str, source: &str, options: &[&str]) -> oci::Mount {
        let mut m = oci::Mount::new();
        m.destination = dest.into();
        m.type_ = ty.into();
        m.source = source.into();
        m.options = options.iter().map(|s| s.to_string()).collect();
        m
    }

    #[test]
    fn translates_a_typical_spec() {
        let mut s = spec(&["sh", "-c", "true"]);
        s.Hostname = "box".into();
        s.Mounts = vec![
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount(
                "/dev",
                "tmpfs",
                "tmpfs",
                &["nosuid", "strictatime", "mode=755", "size=65536k"],
            ),
            mount(
                "/dev/pts",
                "devpts",
                "devpts",
                &["newinstance", "ptmxmode=0666"],
            ),
            mount("/sys/fs/cgroup", "cgroup", "cgroup", &["ro"]),
            mount("/etc/hosts", "bind", "/run/hosts", &["rbind", "ro"]),
        ];
        let c = translate(&s).expect("valid");
        assert_eq!(c.cwd, PathBuf::from("/"));
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert_eq!(c.mounts.len(), 5);
        assert_eq!(c.mounts[1].data.as_deref(), Some("mode=755,size=65536k"));
        assert!(c.mounts[1]
            .flags
            .contains(MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME));
        assert_eq!(
            c.mounts[2].kind,
            MountKind::Bind {
                source: "/dev/pts".into(),
                recursive: false
            }
        );
        assert_eq!(c.mounts[2].data, None);
        assert_eq!(
            c.mounts[3].kind,
            MountKind::Fresh {
                fstype: "cgroup2".into(),
                source: "cgroup2".into()
            },
            "the guest's cgroup v2, whatever the host has"
        );
        assert!(c.mounts[3].flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(
            c.mounts[4].kind,
            MountKind::Bind {
                source: "/run/hosts".into(),
                recursive: true
            }
        );
        assert!(c.mounts[4].flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn rejects_bad_specs_with_the_field_named() {
        let err = |s: oci::Spec| translate(&s).expect_err("invalid").0;
        assert!(err(spec(&[])).contains("Process.Args"));
        let mut s = spec(&["x"]);
        s.Root.mut_or_insert_default().Path = "rootfs".into();
        assert!(err(s).contains("Root.Path"));
        let mut s = spec(&["x"]);
        s.Mounts = vec![mount("/x", "nfs", "srv:/", &[])];
        assert!(err(s).contains("\"nfs\""));
        let mut s = spec(&["x"]);
        s.Mounts = vec![mount("/../etc", "tmpfs", "", &[])];
        assert!(err(s).contains("'..'"));
        let mut s = spec(&["x"]);
        s.Process.mut_or_insert_default().Env = vec!["NOVALUE".into()];
        assert!(err(s).contains("NAME=value"));
        let mut s = spec(&["x"]);
        s.Process.mut_or_insert_default().Cwd = "tmp".into();
        assert!(err(s).contains("Process.Cwd"));
        let mut s = spec(&["x"]);
        let mut limit = oci::POSIXRlimit::new();
        limit.Type = "RLIMIT_BOGUS".into();
        s.Process.mut_or_insert_default().Rlimits = vec![limit];
        assert!(err(s).contains("RLIMIT_BOGUS"));
    }
}
