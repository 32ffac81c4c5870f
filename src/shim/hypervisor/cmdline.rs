//! The QEMU command line of a sandbox VM.

use std::path::Path;

use super::child_process::FIRST_INHERITED_FD;
use super::state_files::{CONSOLE_LOG, QEMU_PID, QMP_SOCKET, VHOST_USER_SOCKET};
use super::{Accel, VmConfig, BASE_KERNEL_PARAMS, SHARE_MOUNT_TAG};

/// How the guest's vsock device is served.
#[derive(Debug, Clone, Copy)]
pub(super) enum VsockDevice {
    /// `vhost-user-vsock-pci` served by the vsock daemon.
    VhostUser,
    /// `vhost-vsock-pci` with this guest context id.
    Vhost { cid: u32 },
}

/// The QEMU command line (without the program).
pub(super) fn qemu_args(
    cfg: &VmConfig,
    accel: Accel,
    vsock: VsockDevice,
    dir: &Path,
) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mem = cfg.memory_mib;
    let mut append = BASE_KERNEL_PARAMS.to_string();
    if !cfg.kernel_params.trim().is_empty() {
        append.push(' ');
        append.push_str(cfg.kernel_params.trim());
    }
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("sandbox-{}", vm_name(dir)),
        "-accel".into(),
        match accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg | Accel::Auto => "tcg".into(),
        },
    ];
    if accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    args.extend([
        "-machine".into(),
        "q35,memory-backend=mem".into(),
        "-m".into(),
        format!("{mem}M"),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", path(CONSOLE_LOG)),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-initrd".into(),
        cfg.initrd.display().to_string(),
        "-append".into(),
        append,
        // Shared memory so that a vhost-user daemon can map the guest's RAM.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-fsdev".into(),
        format!(
            "local,id=fs0,path={},security_model=none",
            cfg.share_dir.display()
        ),
        "-device".into(),
        format!("virtio-9p-pci,fsdev=fs0,mount_tag={SHARE_MOUNT_TAG}"),
        "-pidfile".into(),
        path(QEMU_PID),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(QMP_SOCKET)),
    ]);
    // Each NIC's tap descriptor is handed to QEMU as fd 3, 4, ... (see `nic_fd`).
    for (n, nic) in cfg.nics.iter().enumerate() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net{n},fd={},vhost=off", nic_fd(n)),
            "-device".into(),
            format!("virtio-net-pci,netdev=net{n},mac={}", nic.mac),
        ]);
    }
    match vsock {
        VsockDevice::VhostUser => args.extend([
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", path(VHOST_USER_SOCKET)),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ]),
        VsockDevice::Vhost { cid } => args.extend([
            "-device".into(),
            format!("vhost-vsock-pci,id=vsock0,guest-cid={cid}"),
        ]),
    }
    args
}

/// The descriptor number QEMU finds NIC `n`'s tap at (QEMU is spawned with the taps, in order).
fn nic_fd(n: usize) -> i32 {
    FIRST_INHERITED_FD + n as i32
}

/// The VM's name for `-name sandbox-<name>`: the sandbox id when the state directory is
/// `<run dir>/<sandbox id>/vm`, else the state directory's own name (QEMU option syntax: no commas).
fn vm_name(state_dir: &Path) -> String {
    let own = state_dir.file_name();
    let name = match (own, state_dir.parent().and_then(Path::file_name)) {
        (Some(own), Some(parent)) if own == "vm" => parent,
        (Some(own), _) => own,
        (None, _) => std::ffi::OsStr::new("vm"),
    };
    name.to_string_lossy().replace(',', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::hypervisor::test_config as config;
    use crate::shim::hypervisor::Nic;

    #[test]
    fn command_line_has_the_devices() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let args = qemu_args(&cfg, Accel::Tcg, VsockDevice::VhostUser, &cfg.state_dir).join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(args.starts_with("-name sandbox-"), "{args}");
        assert_eq!(vm_name(Path::new("/run/vc/sbs/abc123/vm")), "abc123");
        assert_eq!(vm_name(Path::new("/tmp/x/state")), "state");
        assert!(args.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(args.contains("vhost-user-vsock-pci,chardev=vsock0"));
        assert!(args.contains("mount_tag=kataShared"));
        assert!(args.contains("console=ttyS0 panic=-1 quiet"));
        assert!(
            !args.contains("-netdev"),
            "no NIC without a pod network: {args}"
        );
        let args = qemu_args(
            &cfg,
            Accel::Kvm,
            VsockDevice::Vhost { cid: 7 },
            &cfg.state_dir,
        );
        assert!(args
            .join(" ")
            .contains("vhost-vsock-pci,id=vsock0,guest-cid=7"));
        assert!(args.join(" ").contains("-accel kvm -cpu host"));
    }

    #[test]
    fn each_nic_is_a_tap_descriptor_with_the_pods_mac() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        for mac in ["0a:58:0a:e7:00:05", "0a:58:0a:e7:00:06"] {
            let tap = std::fs::File::open("/dev/null").unwrap();
            cfg.nics.push(Nic {
                tap: tap.into(),
                mac: mac.to_string(),
            });
        }
        let args = qemu_args(&cfg, Accel::Tcg, VsockDevice::VhostUser, &cfg.state_dir).join(" ");
        assert!(args.contains("-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-pci,netdev=net0,mac=0a:58:0a:e7:00:05"), "{args}");
        assert!(args.contains("-netdev tap,id=net1,fd=4,vhost=off -device virtio-net-pci,netdev=net1,mac=0a:58:0a:e7:00:06"), "{args}");
    }
}
