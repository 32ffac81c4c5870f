//! `kata-agent init-container`: the container's init before it becomes the user's program.
//!
//! Runs single-threaded, already in the new namespaces (PID 1 of its pid namespace), with the fds
//! laid out by [`super::spawn`]. It builds the container's filesystem view, switches to the
//! user, reports READY, waits for StartContainer and execs. Any failure goes back as text on the
//! status pipe, so the agent can answer CreateContainer/StartContainer with a clear error.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::{chdir, chroot, pivot_root, setgid, setgroups, sethostname, setsid, setuid};
use nix::unistd::{Gid, Uid};
use protobuf::Message;

use super::spawn::{EXEC_MODE, FD_CONFIG, FD_MNT_NS, FD_START, FD_STATUS, MSG_ERROR, MSG_READY};
use super::spec::{self, InitConfig, MountKind, MountPlan, DEFAULT_PATH};
use crate::protocols::oci;

/// Device nodes every container gets, bound from the agent's /dev when the rootfs lacks them.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

type Result<T> = std::result::Result<T, String>;

/// Never returns: execs the program, or reports the failure and exits.
pub fn main() -> ! {
    // SAFETY: fd 5 is the status pipe the agent passed; nothing else owns it.
    let mut status = unsafe { File::from_raw_fd(FD_STATUS) };
    for fd in [FD_CONFIG, FD_START, FD_STATUS] {
        // The user's program must inherit none of them.
        let _ = nix::fcntl::fcntl(
            // SAFETY: the fds exist for the whole life of this process.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let err = match run(&mut status) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let mut msg = vec![MSG_ERROR];
    msg.extend_from_slice(err.as_bytes());
    let _ = status.write_all(&msg);
    std::process::exit(127);
}

fn run(status: &mut File) -> Result<std::convert::Infallible> {
    let config = read_config()?;
    if config.terminal {
        // A session of its own with the pty (fd 0) as controlling terminal, as shells expect.
        setsid().map_err(|e| format!("setsid: {e}"))?;
        // SAFETY: TIOCSCTTY takes an int argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "making the pty the controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if std::env::args_os().nth(2).as_deref() == Some(EXEC_MODE.as_ref()) {
        // In the container's other namespaces already; joining its mount namespace puts /proc
        // (the container's) in view, where PID 1 is its init and /proc/1/root its root.
        // SAFETY: fd 6 is the namespace fd the agent passed; nothing else owns it.
        let mnt = unsafe { OwnedFd::from_raw_fd(FD_MNT_NS) };
        setns(&mnt, CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("joining the container's mount namespace: {e}"))?;
        drop(mnt);
        enter_root(Path::new("/proc/1/root"))?;
    } else {
        setup_rootfs(&config)?;
        if let Some(name) = &config.hostname {
            sethostname(name).map_err(|e| format!("setting the hostname to {name:?}: {e}"))?;
        }
    }
    apply_limits(&config)?;
    // Created as root, entered as the user (who then needs permission for it, as with runc).
    std::fs::create_dir_all(&config.cwd).map_err(|e| {
        format!(
            "creating the working directory {}: {e}",
            config.cwd.display()
        )
    })?;
    switch_user(&config)?;
    chdir(&config.cwd).map_err(|e| {
        format!(
            "changing to the working directory {}: {e}",
            config.cwd.display()
        )
    })?;
    let program = find_program(&config)?;
    reset_signals();

    status
        .write_all(&[MSG_READY])
        .map_err(|e| format!("reporting ready: {e}"))?;
    wait_for_start()?;
    let err = match nix::unistd::execve(&program, &config.args, &config.env) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    Err(format!(
        "executing {}: {}",
        program.to_string_lossy(),
        std::io::Error::from(err)
    ))
}

fn read_config() -> Result<InitConfig> {
    // SAFETY: fd 3 is the memfd the agent passed; nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(FD_CONFIG) };
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| format!("reading the container spec: {e}"))?;
    let spec =
        oci::Spec::parse_from_bytes(&bytes).map_err(|e| format!("decoding the spec: {e}"))?;
    spec::translate(&spec).map_err(|e| e.to_string())
}

fn wait_for_start() -> Result<()> {
    // SAFETY: fd 4 is the start pipe the agent passed; nothing else owns it.
    let mut start = unsafe { File::from_raw_fd(FD_START as RawFd) };
    let mut byte = [0u8; 1];
    match start.read(&mut byte) {
        Ok(1) => Ok(()),
        // The agent removed the container before starting it.
        _ => std::process::exit(0),
    }
}

/// Makes `config.rootfs` the root: mounts, devices, then pivot_root.
fn setup_rootfs(config: &InitConfig) -> Result<()> {
    let none: Option<&str> = None;
    // Nothing mounted here may propagate back to the agent's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("making mounts private: {e}"))?;
    let rootfs = config
        .rootfs
        .canonicalize()
        .map_err(|e| format!("container root {}: {e}", config.rootfs.display()))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(&rootfs),
        &rootfs,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("bind-mounting the root {}: {e}", rootfs.display()))?;
    for plan in &config.mounts {
        apply_mount(&rootfs, plan)?;
    }
    if !config
        .mounts
        .iter()
        .any(|m| m.destination == Path::new("/proc"))
    {
        let target = inside(&rootfs, Path::new("/proc"), true)?;
        mount(Some("proc"), &target, Some("proc"), MsFlags::empty(), none)
            .map_err(|e| format!("mounting /proc: {e}"))?;
    }
    populate_dev(&rootfs)?;
    pivot_into(&rootfs)?;
    if config.readonly_root {
        mount(
            none,
            "/",
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            none,
        )
        .map_err(|e| format!("making the root read-only: {e}"))?;
    }
    Ok(())
}

fn apply_mount(rootfs: &Path, plan: &MountPlan) -> Result<()> {
    let dest = plan.destination.display();
    let none: Option<&str> = None;
    match &plan.kind {
        MountKind::Fresh { fstype, source } => {
            let target = inside(rootfs, &plan.destination, true)?;
            mount(
                Some(source.as_str()),
                &target,
                Some(fstype.as_str()),
                plan.flags,
                plan.data.as_deref(),
            )
            .map_err(|e| format!("mounting {fstype} at {dest}: {e}"))
        }
        MountKind::Bind { source, recursive } => {
            let is_dir = source
                .metadata()
                .map_err(|e| format!("bind source {} for {dest}: {e}", source.display()))?
                .is_dir();
            let target = inside(rootfs, &plan.destination, is_dir)?;
            let mut flags = MsFlags::MS_BIND;
            if *recursive {
                flags |= MsFlags::MS_REC;
            }
            mount(Some(source.as_path()), &target, none, flags, none)
                .map_err(|e| format!("bind-mounting {} at {dest}: {e}", source.display()))?;
            // A bind ignores flags such as ro; they take a remount.
            if !plan.flags.is_empty() {
                mount(
                    none,
                    &target,
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | plan.flags,
                    none,
                )
                .map_err(|e| format!("remounting {dest} with its options: {e}"))?;
            }
            Ok(())
        }
    }
}

/// Creates `dest` (a directory, or an empty file for a file bind) under the root and checks that
/// symlinks in the image did not lead it outside.
fn inside(rootfs: &Path, dest: &Path, dir: bool) -> Result<PathBuf> {
    let path = rootfs.join(dest.strip_prefix("/").unwrap_or(dest));
    let created = if dir {
        std::fs::create_dir_all(&path)
    } else {
        path.parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map(drop)
            })
    };
    created.map_err(|e| format!("creating mount point {}: {e}", dest.display()))?;
    let real = path
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", dest.display()))?;
    if !real.starts_with(rootfs) {
        return Err(format!(
            "mount point {} resolves outside the container root",
            dest.display()
        ));
    }
    Ok(real)
}

/// Gives /dev the basic devices, the agent's ptys (where a container terminal lives) and the
/// usual symlinks, unless a mount in the spec already provided them.
fn populate_dev(rootfs: &Path) -> Result<()> {
    let none: Option<&str> = None;
    for name in DEVICES {
        let dest = PathBuf::from("/dev").join(name);
        let present = rootfs
            .join("dev")
            .join(name)
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_char_device());
        let source = Path::new("/dev").join(name);
        if present || !source.exists() {
            continue;
        }
        let target = inside(rootfs, &dest, false)?;
        mount(Some(&source), &target, none, MsFlags::MS_BIND, none)
            .map_err(|e| format!("binding {} into the container: {e}", source.display()))?;
    }
    if !rootfs.join("dev/pts/ptmx").exists() && Path::new("/dev/pts/ptmx").exists() {
        let target = inside(rootfs, Path::new("/dev/pts"), true)?;
        mount(Some("/dev/pts"), &target, none, MsFlags::MS_BIND, none)
            .map_err(|e| format!("binding /dev/pts into the container: {e}"))?;
    }
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = rootfs.join("dev").join(link);
        if path.symlink_metadata().is_err() {
            // Best effort: a read-only /dev simply keeps what it has.
            let _ = std::os::unix::fs::symlink(to, &path);
        }
    }
    Ok(())
}

/// chroot into the container's root, for an exec'd process.
fn enter_root(root: &Path) -> Result<()> {
    chdir(root).map_err(|e| format!("entering {}: {e}", root.display()))?;
    chroot(".").map_err(|e| format!("chroot: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// pivot_root into the rootfs and detach the old root; where the agent's own root cannot be
/// pivoted (an initramfs), move the rootfs over / and chroot instead.
fn pivot_into(rootfs: &Path) -> Result<()> {
    chdir(rootfs).map_err(|e| format!("entering {}: {e}", rootfs.display()))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            // The old root now sits on top of the new one; detach it.
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| format!("detaching the old root: {e}"))?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            let none: Option<&str> = None;
            mount(Some("."), "/", none, MsFlags::MS_MOVE, none)
                .map_err(|e| format!("moving the root: {e}"))?;
            chroot(".").map_err(|e| format!("chroot: {e}"))?;
        }
        Err(e) => return Err(format!("pivot_root to {}: {e}", rootfs.display())),
    }
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Rlimits, OOM score and no_new_privs: set while still root, inherited across exec.
fn apply_limits(config: &InitConfig) -> Result<()> {
    for (resource, soft, hard) in &config.rlimits {
        let limit = libc::rlimit {
            rlim_cur: *soft as libc::rlim_t,
            rlim_max: *hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads one rlimit from the pointer, which outlives the call.
        if unsafe { libc::setrlimit(*resource, &limit) } < 0 {
            return Err(format!(
                "setrlimit {resource}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // 0 (also proto3's "unset") resets what the agent may have set for itself; only an explicit
    // value is worth failing for.
    let oom = std::fs::write("/proc/self/oom_score_adj", config.oom_score_adj.to_string());
    if let (Err(e), true) = (oom, config.oom_score_adj != 0) {
        return Err(format!(
            "setting oom_score_adj to {}: {e}",
            config.oom_score_adj
        ));
    }
    if config.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(format!(
                "setting no_new_privs: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn switch_user(config: &InitConfig) -> Result<()> {
    let groups: Vec<Gid> = config
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| format!("setgroups {:?}: {e}", config.additional_gids))?;
    setgid(Gid::from_raw(config.gid)).map_err(|e| format!("setgid {}: {e}", config.gid))?;
    setuid(Uid::from_raw(config.uid)).map_err(|e| format!("setuid {}: {e}", config.uid))
}

/// The program's path: args[0] itself when it holds a '/', else the first match on PATH.
fn find_program(config: &InitConfig) -> Result<CString> {
    let name = config.args[0].as_bytes();
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains(&b'/') {
        let path = Path::new(std::ffi::OsStr::from_bytes(name));
        if !executable(path) {
            return Err(format!(
                "executable {} not found in the container (or not executable)",
                path.display()
            ));
        }
        return Ok(config.args[0].clone());
    }
    let path_var = config
        .env
        .iter()
        .find_map(|e| e.to_bytes().strip_prefix(b"PATH="))
        .unwrap_or(DEFAULT_PATH.as_bytes());
    for dir in path_var.split(|b| *b == b':').filter(|d| !d.is_empty()) {
        let candidate =
            Path::new(std::ffi::OsStr::from_bytes(dir)).join(std::ffi::OsStr::from_bytes(name));
        if executable(&candidate) {
            return CString::new(candidate.as_os_str().as_bytes()).map_err(|e| e.to_string());
        }
    }
    Err(format!(
        "executable {:?} not found in $PATH ({}) of the container",
        String::from_utf8_lossy(name),
        String::from_utf8_lossy(path_var)
    ))
}

/// The agent ignores SIGPIPE (Rust does) and its mask may differ: the program gets defaults.
fn reset_signals() {
    // SAFETY: restoring the default disposition installs no handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
