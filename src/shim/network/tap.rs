//! The tap that backs a VM NIC, and the tc redirect that wires it to a pod interface (Kata's
//! default "tcfilter" model): everything arriving on the pod interface goes out of the tap to the
//! guest, and everything the guest sends into the tap goes out of the pod interface. The guest NIC
//! has the pod interface's MAC and addresses, so to CNI's bridge the VM is the pod.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::LinkUnspec;

use super::NetworkError;

/// `ETH_P_ALL`, as tc wants the protocol: in network byte order.
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();

/// Opens a new tap called `name` in the calling thread's network namespace. The device lives as
/// long as an open descriptor does: QEMU gets one, so the tap goes when QEMU goes.
pub(crate) fn open_tap(name: &str) -> Result<OwnedFd, NetworkError> {
    let tap_err = |source| NetworkError::Tap {
        name: name.to_string(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(tap_err)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(tap_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the name must have 1 to 15 bytes",
        )));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads an ifreq from the pointer, which lives for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(tap_err(io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(file))
}

/// The index of the link called `name`.
pub(crate) async fn link_index(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<u32, NetworkError> {
    let links: Vec<_> = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetworkError::netlink(format!("finding link {name}"), source))?;
    links
        .first()
        .map(|link| link.header.index)
        .ok_or_else(|| NetworkError::NoSuchLink {
            name: name.to_string(),
        })
}

/// Brings the tap up with the pod interface's MTU and redirects traffic both ways between the two.
pub(crate) async fn wire(
    handle: &rtnetlink::Handle,
    pod_index: u32,
    tap_index: u32,
    mtu: u32,
) -> Result<(), NetworkError> {
    let mut tap = LinkUnspec::new_with_index(tap_index).up();
    if mtu > 0 {
        tap = tap.mtu(mtu);
    }
    handle
        .link()
        .set(tap.build())
        .execute()
        .await
        .map_err(|source| NetworkError::netlink("bringing the tap up", source))?;
    for (from, to) in [(pod_index, tap_index), (tap_index, pod_index)] {
        redirect_ingress(handle, from, to).await?;
    }
    Ok(())
}

/// `tc qdisc add dev FROM ingress; tc filter add dev FROM parent ffff: protocol all u32 match u8 0
/// 0 action mirred egress redirect dev TO`.
async fn redirect_ingress(
    handle: &rtnetlink::Handle,
    from: u32,
    to: u32,
) -> Result<(), NetworkError> {
    let from_index = i32::try_from(from).map_err(|_| NetworkError::BadIndex { index: from })?;
    handle
        .qdisc()
        .add(from_index)
        .ingress()
        .execute()
        .await
        .map_err(|source| {
            NetworkError::netlink(format!("adding an ingress qdisc to link {from}"), source)
        })?;
    handle
        .traffic_filter(from_index)
        .add()
        .ingress()
        .protocol(ALL_PROTOCOLS)
        .redirect(to)
        .map_err(|source| NetworkError::netlink("building the redirect filter", source))?
        .execute()
        .await
        .map_err(|source| {
            NetworkError::netlink(
                format!("redirecting link {from}'s traffic to link {to}"),
                source,
            )
        })
}
