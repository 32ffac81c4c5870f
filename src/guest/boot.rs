//! The agent as the guest's init (PID 1): the filesystems, kernel modules, network and hostname that a
//! bare initramfs does not have.
//!
//! Nothing here fails the boot: each step that goes wrong is logged and the rest still runs, so the
//! agent comes up (and can be asked what is missing) whenever its vsock transport loaded.
//! Reaping: see `guest::reaper` (it owns waitpid for container processes; nothing here waits).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Where the kernel modules live in the initramfs: `<dir>/<release>/kernel/<path>.ko`.
pub const MODULES_DIR: &str = "/lib/modules";
/// The list of modules to load, one `<path>` (relative to `kernel/`, no `.ko`) a line, written by
/// `scripts/build-guest-image.sh` from `scripts/guest-modules.txt`.
pub const LOAD_ORDER_FILE: &str = "load-order";
/// The hostname when `/etc/hostname` gives none.
pub const DEFAULT_HOSTNAME: &str = "kata-guest";

/// QEMU user networking's fixed guest address, prefix and gateway.
pub const USER_NET_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const USER_NET_PREFIX: u8 = 24;
pub const USER_NET_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// True when this process is the system's init.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// What [`setup_guest`] did not manage; each entry is a complete sentence for a log line.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub warnings: Vec<String>,
    pub modules_loaded: Vec<String>,
}

impl SetupReport {
    fn warn(&mut self, text: String) {
        tracing::warn!("{text}");
        self.warnings.push(text);
    }
}

/// Prepares a bare guest for the agent: mounts, modules, console, network, hostname.
pub fn setup_guest() -> SetupReport {
    let mut report = SetupReport::default();
    mount_base(&mut report);
    attach_console(&mut report);
    mount_rest(&mut report);
    load_modules(&mut report);
    setup_network(&mut report);
    set_hostname(&mut report);
    tracing::info!(
        modules = report.modules_loaded.len(),
        warnings = report.warnings.len(),
        "guest set up"
    );
    report
}

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

fn mount_base(report: &mut SetupReport) {
    for m in BASE_MOUNTS {
        mount_one(m, report);
    }
}

fn mount_rest(report: &mut SetupReport) {
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

/// Points stdin, stdout and stderr at /dev/console: an initramfs without a /dev/console node gives
/// init no stdio at all, and the logs must reach the serial console.
fn attach_console(report: &mut SetupReport) {
    let console = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(file) => OwnedFd::from(file),
        Err(err) => {
            report.warn(format!("cannot open /dev/console: {err}"));
            return;
        }
    };
    for fd in 0..=2 {
        // SAFETY: dup2 on a valid open descriptor onto the standard descriptors.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            let err = io::Error::last_os_error();
            report.warn(format!("cannot attach fd {fd} to /dev/console: {err}"));
        }
    }
}

/// The module paths to load, in order, from `<modules dir>/<release>/load-order`.
pub fn module_list(modules_dir: &Path, release: &str) -> io::Result<Vec<PathBuf>> {
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
pub fn module_name(path: &Path) -> String {
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

fn load_modules(report: &mut SetupReport) {
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

fn setup_network(report: &mut SetupReport) {
    let sock = match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(sock) => sock,
        Err(err) => {
            report.warn(format!(
                "cannot open a socket to configure the network: {err}"
            ));
            return;
        }
    };
    if let Err(err) = set_up(&sock, "lo") {
        report.warn(format!("cannot bring lo up: {err}"));
    }
    if !Path::new("/sys/class/net/eth0").exists() {
        tracing::info!("no eth0: guest has loopback networking only");
        return;
    }
    if let Err(err) = set_address(&sock, "eth0", USER_NET_ADDRESS, USER_NET_PREFIX) {
        report.warn(format!("cannot set eth0's address: {err}"));
    }
    if let Err(err) = set_up(&sock, "eth0") {
        report.warn(format!("cannot bring eth0 up: {err}"));
        return;
    }
    if let Err(err) = add_default_route(&sock, USER_NET_GATEWAY) {
        report.warn(format!(
            "cannot add the default route via {USER_NET_GATEWAY}: {err}"
        ));
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: the caller passes a request together with a pointer to the structure it expects.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req as *mut _ as *mut libc::c_void,
    )
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; sockaddr is the generic view of it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

fn set_address(sock: &OwnedFd, name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(netmask(prefix));
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        &mut req as *mut _ as *mut libc::c_void,
    )
}

/// Linux's `struct rtentry` (libc has no binding for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: RTF_UP | RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    match ioctl(
        sock,
        libc::SIOCADDRT,
        &mut route as *mut _ as *mut libc::c_void,
    ) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

fn set_hostname(report: &mut SetupReport) {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|name| !name.is_empty() && name.len() <= 64 && CString::new(name.as_str()).is_ok())
        .unwrap_or_else(|| DEFAULT_HOSTNAME.to_string());
    if let Err(err) = nix::unistd::sethostname(&name) {
        report.warn(format!("cannot set the hostname to {name:?}: {err}"));
    }
}

/// Powers the VM off (QEMU started with `-no-reboot` then exits). Returns only if that failed.
pub fn power_off() -> io::Error {
    nix::unistd::sync();
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
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

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-very-long-interface-name").is_err());
    }

    #[test]
    fn not_init_in_tests() {
        assert!(!is_init());
    }
}
