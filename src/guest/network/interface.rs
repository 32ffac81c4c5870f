//! UpdateInterface: the guest NIC whose MAC the shim names gets the pod interface's addresses, MTU
//! and name, and comes up.

use super::error::NetworkError;
use super::netlink::{address_of, Link, Netlink};
use super::parse::{InterfaceSpec, IpPrefix};
use crate::protocols::types;

/// Configures the link with `spec.mac` and returns it as it now is. Order matters: the link goes
/// down first (the kernel renames only links that are down, and drops their IPv6 addresses),
/// its old addresses go, then MTU (before addresses: IPv6 needs an MTU of at least 1280), name,
/// the new addresses, and up. A failure part-way leaves the link as far as it got.
pub(crate) async fn update_interface(
    nl: &Netlink,
    spec: &InterfaceSpec,
) -> Result<types::Interface, NetworkError> {
    let link = nl
        .links()
        .await?
        .into_iter()
        .find(|link| link.mac == spec.mac.0)
        .ok_or_else(|| NetworkError::NoSuchMac {
            mac: spec.mac.to_string(),
        })?;
    let index = link.index;
    let mut name = link.name.clone();
    nl.set_link(format!("taking {name} down"), index, |l| l.down())
        .await?;
    for msg in nl.addresses(index).await? {
        let shown = address_of(&msg).map_or_else(|| "an address".into(), |a| a.to_string());
        match nl
            .delete_address(format!("removing {shown} from {name}"), msg)
            .await
        {
            // Gone with the primary address it was a secondary of.
            Err(err) if err.errno() == Some(libc::EADDRNOTAVAIL) => {}
            other => other?,
        }
    }
    if let Some(mtu) = spec.mtu.filter(|mtu| *mtu != link.mtu) {
        nl.set_link(format!("setting the MTU of {name} to {mtu}"), index, |l| {
            l.mtu(mtu)
        })
        .await?;
    }
    if let Some(new_name) = spec.name.as_ref().filter(|n| **n != name) {
        let what = format!("renaming {name} to {new_name}");
        nl.set_link(what, index, |l| l.name(new_name.clone()))
            .await?;
        name.clone_from(new_name);
    }
    for prefix in &spec.addresses {
        nl.add_address(format!("adding {prefix} to {name}"), index, *prefix)
            .await?;
    }
    nl.set_link(format!("bringing {name} up"), index, |l| l.up())
        .await?;
    let now = nl.link(index).await?;
    let addresses = nl.addresses(index).await?;
    Ok(reply(&now, addresses.iter().filter_map(address_of)))
}

/// The interface as the reply describes it: name, MAC, MTU, flags (`IFF_*`) and addresses, but
/// not the IPv6 link-local ones the kernel adds by itself once the link is up (when they appear
/// depends on timing, so they would make the reply vary).
fn reply(link: &Link, addresses: impl Iterator<Item = IpPrefix>) -> types::Interface {
    let mut iface = types::Interface::new();
    iface.name = link.name.clone();
    iface.hwAddr = link
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    iface.mtu = link.mtu.into();
    iface.raw_flags = link.flags.bits();
    iface.IPAddresses = addresses
        .filter(|prefix| !is_ipv6_link_local(prefix))
        .map(|prefix| {
            let mut ip = types::IPAddress::new();
            ip.family = if prefix.addr.is_ipv6() {
                types::IPFamily::v6
            } else {
                types::IPFamily::v4
            }
            .into();
            ip.address = prefix.addr.to_string();
            ip.mask = prefix.len.to_string();
            ip
        })
        .collect();
    iface
}

fn is_ipv6_link_local(prefix: &IpPrefix) -> bool {
    match prefix.addr {
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
        std::net::IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkFlags;

    #[test]
    fn the_reply_leaves_out_kernel_link_local_addresses() {
        let link = Link {
            index: 3,
            name: "eth0".into(),
            mac: vec![0x02, 0, 0, 0, 0xab, 0x01],
            mtu: 1400,
            flags: LinkFlags::Up | LinkFlags::Broadcast,
        };
        let addresses = ["10.1.0.5/24", "fe80::ab:ff:fe00:1/64", "2001:db8::5/64"].map(|text| {
            let (addr, len) = text.split_once('/').unwrap();
            IpPrefix {
                addr: addr.parse().unwrap(),
                len: len.parse().unwrap(),
            }
        });
        let iface = reply(&link, addresses.into_iter());
        assert_eq!(iface.name, "eth0");
        assert_eq!(iface.hwAddr, "02:00:00:00:ab:01");
        assert_eq!(iface.mtu, 1400);
        assert_eq!(iface.raw_flags & libc::IFF_UP as u32, libc::IFF_UP as u32);
        let shown: Vec<(String, String, types::IPFamily)> = iface
            .IPAddresses
            .iter()
            .map(|ip| {
                (
                    ip.address.clone(),
                    ip.mask.clone(),
                    ip.family.enum_value().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("10.1.0.5".into(), "24".into(), types::IPFamily::v4),
                ("2001:db8::5".into(), "64".into(), types::IPFamily::v6),
            ]
        );
    }
}
