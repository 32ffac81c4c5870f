//! The guest's loopback, brought up through SIOC* ioctls (this runs before the async runtime, and
//! the initramfs has no ip(8)). The pod's NIC is not configured here: the shim configures it
//! through UpdateInterface and UpdateRoutes (`guest::network`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::SetupReport;

pub(crate) fn setup_network(report: &mut SetupReport) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("lo").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-very-long-interface-name").is_err());
    }
}
