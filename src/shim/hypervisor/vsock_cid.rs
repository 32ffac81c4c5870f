//! Guest context ids for `/dev/vhost-vsock`: finding one no other VM uses.

use std::io;
use std::os::fd::AsRawFd;

pub(super) const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// `VHOST_VSOCK_SET_GUEST_CID`: `_IOW(VHOST_VIRTIO, 0x60, __u64)`.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_af60;

/// A guest context id no other VM uses: the first that `/dev/vhost-vsock` accepts (as Kata does).
pub(super) fn find_free_cid() -> io::Result<u32> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK_DEVICE)?;
    let start = 3 + (std::process::id() % 1000);
    for offset in 0..4096u32 {
        let cid = u64::from(start + offset);
        // SAFETY: the ioctl reads one u64 from the pointer.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), VHOST_VSOCK_SET_GUEST_CID, &cid) };
        if rc == 0 {
            // Closing the descriptor releases the id for QEMU.
            return Ok(start + offset);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(err);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free vsock context id",
    ))
}
