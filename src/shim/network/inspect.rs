//! What CNI gave the pod: its interfaces (name, MAC, MTU, addresses) and routes, read over netlink
//! inside the pod's network namespace, and the same as the agent's `types.Interface` and
//! `types.Route`, which the guest applies to its own NICs.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::NetworkError;
use crate::protocols::types;

/// The suffix of the taps we create, so they are never taken for the pod's own interfaces.
pub(crate) const TAP_SUFFIX: &str = "_kata";

/// One interface of the pod that the VM gets a NIC for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodInterface {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) mac: [u8; 6],
    pub(crate) mtu: u32,
    /// Address and prefix length.
    pub(crate) addresses: Vec<(IpAddr, u8)>,
}

/// One route of the pod through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodRoute {
    /// Destination and prefix length; `None` for the default route.
    pub(crate) destination: Option<(IpAddr, u8)>,
    pub(crate) gateway: Option<IpAddr>,
    pub(crate) source: Option<IpAddr>,
    pub(crate) scope: u8,
    pub(crate) device: String,
    pub(crate) ipv6: bool,
}

/// The pod's Ethernet interfaces (not `lo`, not our taps) with their addresses, and their routes.
pub(crate) async fn pod_network(
    handle: &rtnetlink::Handle,
) -> Result<(Vec<PodInterface>, Vec<PodRoute>), NetworkError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetworkError::netlink("listing the pod's links", source))?;
    let mut interfaces: Vec<PodInterface> = links.iter().filter_map(pod_interface).collect();
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetworkError::netlink("listing the pod's addresses", source))?;
    for message in addresses {
        let Some(interface) = interfaces
            .iter_mut()
            .find(|i| i.index == message.header.index)
        else {
            continue;
        };
        let address = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        // The guest makes its own link-local IPv6 address from the MAC.
        if let Some(ip) = address.filter(|ip| !is_link_local(ip)) {
            interface.addresses.push((ip, message.header.prefix_len));
        }
    }
    let mut routes = Vec::new();
    for family in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let messages: Vec<RouteMessage> = handle
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetworkError::netlink("listing the pod's routes", source))?;
        routes.extend(messages.iter().filter_map(|m| pod_route(m, &interfaces)));
    }
    Ok((interfaces, routes))
}

fn pod_interface(link: &LinkMessage) -> Option<PodInterface> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let name = name?;
    // lo has an all-zero MAC; tunnels and the like have none of 6 bytes.
    let mac = mac.filter(|m| m.iter().any(|b| *b != 0))?;
    if name.ends_with(TAP_SUFFIX) {
        return None;
    }
    Some(PodInterface {
        index: link.header.index,
        name,
        mac,
        mtu,
        addresses: Vec::new(),
    })
}

fn pod_route(message: &RouteMessage, interfaces: &[PodInterface]) -> Option<PodRoute> {
    let header = &message.header;
    if header.table != RouteHeader::RT_TABLE_MAIN || header.kind != RouteType::Unicast {
        return None;
    }
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut device = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            RouteAttribute::PrefSource(a) => source = ip(a),
            RouteAttribute::Oif(index) => {
                device = interfaces.iter().find(|i| i.index == *index);
            }
            _ => {}
        }
    }
    let device = device?;
    let destination = match destination {
        Some(ip) if is_link_local(&ip) => return None,
        Some(ip) if header.destination_prefix_length > 0 => {
            Some((ip, header.destination_prefix_length))
        }
        _ => None,
    };
    Some(PodRoute {
        destination,
        gateway,
        source,
        scope: header.scope.into(),
        device: device.name.clone(),
        ipv6: header.address_family == AddressFamily::Inet6,
    })
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// `aa:bb:cc:dd:ee:ff`, as QEMU's `mac=` and the agent's `hwAddr` take it.
pub(crate) fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn family(ip: &IpAddr) -> types::IPFamily {
    match ip {
        IpAddr::V4(_) => types::IPFamily::v4,
        IpAddr::V6(_) => types::IPFamily::v6,
    }
}

impl PodInterface {
    /// The interface as the agent's UpdateInterface takes it: the guest NIC with this MAC gets
    /// this name, these addresses and this MTU.
    pub(crate) fn to_agent(&self) -> types::Interface {
        types::Interface {
            device: self.name.clone(),
            name: self.name.clone(),
            IPAddresses: self
                .addresses
                .iter()
                .map(|(ip, prefix)| types::IPAddress {
                    family: family(ip).into(),
                    address: ip.to_string(),
                    mask: prefix.to_string(),
                    ..Default::default()
                })
                .collect(),
            mtu: u64::from(self.mtu),
            hwAddr: mac_text(&self.mac),
            ..Default::default()
        }
    }
}

impl PodRoute {
    pub(crate) fn to_agent(&self) -> types::Route {
        types::Route {
            dest: self
                .destination
                .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                .unwrap_or_default(),
            gateway: self.gateway.map(|ip| ip.to_string()).unwrap_or_default(),
            device: self.device.clone(),
            source: self.source.map(|ip| ip.to_string()).unwrap_or_default(),
            scope: u32::from(self.scope),
            family: if self.ipv6 {
                types::IPFamily::v6
            } else {
                types::IPFamily::v4
            }
            .into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_and_routes_in_the_agents_terms() {
        let eth0 = PodInterface {
            index: 2,
            name: "eth0".into(),
            mac: [0x0a, 0x58, 0x0a, 0xe7, 0x00, 0x05],
            mtu: 1450,
            addresses: vec![("10.231.0.5".parse().unwrap(), 24)],
        };
        let agent = eth0.to_agent();
        assert_eq!(agent.hwAddr, "0a:58:0a:e7:00:05");
        assert_eq!((agent.name.as_str(), agent.mtu), ("eth0", 1450));
        assert_eq!(agent.IPAddresses[0].address, "10.231.0.5");
        assert_eq!(agent.IPAddresses[0].mask, "24");
        let default = PodRoute {
            destination: None,
            gateway: Some("10.231.0.1".parse().unwrap()),
            source: None,
            scope: 0,
            device: "eth0".into(),
            ipv6: false,
        };
        let agent = default.to_agent();
        assert_eq!(
            (agent.dest.as_str(), agent.gateway.as_str()),
            ("", "10.231.0.1")
        );
        let link = PodRoute {
            destination: Some(("10.231.0.0".parse().unwrap(), 24)),
            gateway: None,
            source: Some("10.231.0.5".parse().unwrap()),
            scope: 253,
            ..default
        };
        let agent = link.to_agent();
        assert_eq!(agent.dest, "10.231.0.0/24");
        assert_eq!((agent.source.as_str(), agent.scope), ("10.231.0.5", 253));
    }

    #[test]
    fn link_local_ipv6_is_the_guests_own() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local(&"10.0.0.1".parse().unwrap()));
    }
}
