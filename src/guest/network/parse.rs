//! UpdateInterface's and UpdateRoutes' requests checked and turned into typed values before any
//! netlink call, so that a bad field fails the whole request (INVALID_ARGUMENT, naming the field
//! and its value) and changes nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::error::NetworkError;
use crate::protocols::types;

/// Linux's `RTNH_F_ONLINK`: the gateway is on the link even if no prefix route says so.
pub(crate) const ROUTE_FLAG_ONLINK: u32 = 4;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MacAddr(pub(crate) [u8; 6]);

impl MacAddr {
    /// Six two-digit hex groups separated by `:`, either case.
    pub(crate) fn parse(field: &str, text: &str) -> Result<Self, NetworkError> {
        let bad = |reason: &str| NetworkError::invalid(field, text, reason);
        let mut bytes = [0u8; 6];
        let mut groups = text.split(':');
        for byte in bytes.iter_mut() {
            let group = groups
                .next()
                .ok_or_else(|| bad("a MAC address has six groups"))?;
            if group.len() != 2 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(
                    "a MAC address is six pairs of hex digits, like 02:42:ac:11:00:02",
                ));
            }
            *byte = u8::from_str_radix(group, 16)
                .map_err(|_| bad("a MAC address is six pairs of hex digits"))?;
        }
        if groups.next().is_some() {
            return Err(bad("a MAC address has six groups"));
        }
        if bytes == [0; 6] {
            return Err(bad("the all-zero address is the loopback's, not a NIC's"));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An address with its prefix length (`10.0.0.5/24`); also a route's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpPrefix {
    pub(crate) addr: IpAddr,
    pub(crate) len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn family_name(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, NetworkError> {
    text.parse()
        .map_err(|_| NetworkError::invalid(field, text, "not an IPv4 or IPv6 address"))
}

/// A prefix length as a decimal string, within the address family's range.
fn parse_prefix_len(field: &str, text: &str, addr: &IpAddr) -> Result<u8, NetworkError> {
    let max = max_prefix(addr);
    text.parse::<u8>()
        .ok()
        .filter(|len| *len <= max)
        .ok_or_else(|| {
            NetworkError::invalid(
                field,
                text,
                format!(
                    "the prefix length of an {} address is a number from 0 to {max}",
                    family_name(addr)
                ),
            )
        })
}

/// A name the kernel accepts for a network interface (its `dev_valid_name`).
fn check_link_name(field: &str, name: &str) -> Result<(), NetworkError> {
    let bad = |reason: &str| Err(NetworkError::invalid(field, name, reason));
    if name.is_empty() || name.len() >= 16 {
        return bad("an interface name has 1 to 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not an interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("an interface name has no '/', ':' or white space");
    }
    Ok(())
}

/// What UpdateInterface does to the interface whose MAC is `mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterfaceSpec {
    pub(crate) mac: MacAddr,
    /// The new name; `None` keeps the current one.
    pub(crate) name: Option<String>,
    /// `None` keeps the current MTU.
    pub(crate) mtu: Option<u32>,
    pub(crate) addresses: Vec<IpPrefix>,
}

/// Checks UpdateInterface's `interface`. `device`, `devicePath`, `type` and `raw_flags` are not
/// used: the guest finds the NIC by its MAC.
pub(crate) fn interface_spec(iface: &types::Interface) -> Result<InterfaceSpec, NetworkError> {
    if iface.hwAddr.is_empty() {
        return Err(NetworkError::invalid(
            "interface.hwAddr",
            "",
            "the MAC address names the interface to configure",
        ));
    }
    let mac = MacAddr::parse("interface.hwAddr", &iface.hwAddr)?;
    let name = if iface.name.is_empty() {
        None
    } else {
        check_link_name("interface.name", &iface.name)?;
        Some(iface.name.clone())
    };
    let mtu = match iface.mtu {
        0 => None,
        mtu => Some(u32::try_from(mtu).map_err(|_| {
            NetworkError::invalid("interface.mtu", mtu.to_string(), "larger than 2^32 - 1")
        })?),
    };
    let addresses = iface
        .IPAddresses
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let field = format!("interface.IPAddresses[{i}]");
            let addr = parse_ip(&format!("{field}.address"), &ip.address)?;
            if addr.is_unspecified() || addr.is_multicast() {
                return Err(NetworkError::invalid(
                    format!("{field}.address"),
                    &ip.address,
                    "an interface address is a unicast address",
                ));
            }
            let len = parse_prefix_len(&format!("{field}.mask"), &ip.mask, &addr)?;
            Ok(IpPrefix { addr, len })
        })
        .collect::<Result<_, _>>()?;
    Ok(InterfaceSpec {
        mac,
        name,
        mtu,
        addresses,
    })
}

/// One route UpdateRoutes adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteSpec {
    /// `/0` for the default route.
    pub(crate) dest: IpPrefix,
    pub(crate) gateway: Option<IpAddr>,
    pub(crate) device: String,
    /// The preferred source address (`src` in `ip route`).
    pub(crate) source: Option<IpAddr>,
    pub(crate) scope: u8,
    pub(crate) onlink: bool,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dest.len == 0 {
            write!(f, "default")?;
        } else {
            write!(f, "{}", self.dest)?;
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " dev {}", self.device)
    }
}

/// Checks UpdateRoutes' routes. `dest` empty or `default` is the default route, a plain address a
/// host route; `family` only decides when neither `dest` nor `gateway` names an address.
pub(crate) fn route_specs(routes: &[types::Route]) -> Result<Vec<RouteSpec>, NetworkError> {
    routes
        .iter()
        .enumerate()
        .map(|(i, route)| route_spec(i, route))
        .collect()
}

fn route_spec(i: usize, route: &types::Route) -> Result<RouteSpec, NetworkError> {
    let field = |name: &str| format!("routes[{i}].{name}");
    check_link_name(&field("device"), &route.device)?;
    let optional_ip = |name: &str, text: &str| {
        (!text.is_empty())
            .then(|| parse_ip(&field(name), text))
            .transpose()
    };
    let gateway = optional_ip("gateway", &route.gateway)?;
    let source = optional_ip("source", &route.source)?;
    let dest = match route.dest.as_str() {
        "" | "default" => None,
        text => Some(parse_dest(&field("dest"), text)?),
    };
    let declared_v6 = route.family.enum_value() == Ok(types::IPFamily::v6);
    // The first address the route names sets its family; proto3 cannot tell an unset family
    // from v4, so `family` counts only when the route names no address.
    let first = dest.map(|d| d.addr).or(gateway).or(source);
    let v6 = first.map_or(declared_v6, |addr| addr.is_ipv6());
    if declared_v6 && !v6 {
        return Err(NetworkError::invalid(
            field("family"),
            "v6",
            "the route's addresses are IPv4",
        ));
    }
    for (name, addr) in [("gateway", gateway), ("source", source)] {
        if let Some(addr) = addr.filter(|a| a.is_ipv6() != v6) {
            return Err(NetworkError::invalid(
                field(name),
                addr.to_string(),
                "not of the route's address family",
            ));
        }
    }
    let dest = dest.unwrap_or(IpPrefix {
        addr: if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        },
        len: 0,
    });
    let scope = u8::try_from(route.scope).map_err(|_| {
        NetworkError::invalid(
            field("scope"),
            route.scope.to_string(),
            "a scope is 0 to 255",
        )
    })?;
    if route.flags & !ROUTE_FLAG_ONLINK != 0 {
        return Err(NetworkError::invalid(
            field("flags"),
            route.flags.to_string(),
            "only RTNH_F_ONLINK (4) is supported",
        ));
    }
    Ok(RouteSpec {
        dest,
        gateway,
        device: route.device.clone(),
        source,
        scope,
        onlink: route.flags & ROUTE_FLAG_ONLINK != 0,
    })
}

/// `address/len` or a plain address (a host route). Host bits must be clear: the kernel refuses
/// them, and a silently masked destination would not be the route asked for.
fn parse_dest(field: &str, text: &str) -> Result<IpPrefix, NetworkError> {
    let (addr_text, len_text) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let addr = parse_ip(field, addr_text).map_err(|_| {
        NetworkError::invalid(field, text, "not \"default\", an address or address/prefix")
    })?;
    let len = match len_text {
        Some(len) => parse_prefix_len(field, len, &addr)
            .map_err(|_| NetworkError::invalid(field, text, "bad prefix length"))?,
        None => max_prefix(&addr),
    };
    let network = mask(addr, len);
    if network != addr {
        return Err(NetworkError::invalid(
            field,
            text,
            format!("host bits are set (the network is {network}/{len})"),
        ));
    }
    Ok(IpPrefix { addr, len })
}

/// `addr` with every bit past the first `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(address: &str, mask: &str) -> types::IPAddress {
        let mut ip = types::IPAddress::new();
        ip.address = address.into();
        ip.mask = mask.into();
        ip
    }

    fn iface(mac: &str, addresses: Vec<types::IPAddress>) -> types::Interface {
        let mut iface = types::Interface::new();
        iface.hwAddr = mac.into();
        iface.IPAddresses = addresses;
        iface
    }

    fn route(dest: &str, gateway: &str, device: &str) -> types::Route {
        let mut route = types::Route::new();
        route.dest = dest.into();
        route.gateway = gateway.into();
        route.device = device.into();
        route
    }

    fn invalid_field(err: NetworkError) -> String {
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT, "{err}");
        match err {
            NetworkError::Invalid { field, .. } => field,
            other => panic!("not an Invalid error: {other}"),
        }
    }

    #[test]
    fn mac_addresses_in_either_case() {
        let mac = MacAddr::parse("f", "02:AB:cd:00:11:Ff").unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
        for bad in [
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "02-ab-cd-00-11-ff",
            "2:ab:cd:00:11:ff",
            "02:ab:cd:00:11:fg",
            "02:ab:cd:00:11:+f",
            "00:00:00:00:00:00",
            "",
        ] {
            assert!(MacAddr::parse("f", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_interface_with_both_families() {
        let mut req = iface(
            "02:00:00:00:00:01",
            vec![ip("10.1.0.5", "24"), ip("2001:db8::5", "64")],
        );
        req.name = "eth0".into();
        req.mtu = 1400;
        let spec = interface_spec(&req).unwrap();
        assert_eq!(spec.name.as_deref(), Some("eth0"));
        assert_eq!(spec.mtu, Some(1400));
        let shown: Vec<String> = spec.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, ["10.1.0.5/24", "2001:db8::5/64"]);
    }

    #[test]
    fn empty_name_and_zero_mtu_keep_what_is_there() {
        let spec = interface_spec(&iface("02:00:00:00:00:01", vec![])).unwrap();
        assert_eq!((spec.name, spec.mtu), (None, None));
    }

    #[test]
    fn bad_interface_fields_are_named() {
        let cases: Vec<(types::Interface, &str)> = vec![
            (iface("", vec![]), "interface.hwAddr"),
            (iface("zz:00:00:00:00:01", vec![]), "interface.hwAddr"),
            (
                iface("02:00:00:00:00:01", vec![ip("10.1.0.500", "24")]),
                "interface.IPAddresses[0].address",
            ),
            (
                iface(
                    "02:00:00:00:00:01",
                    vec![ip("10.1.0.5", "24"), ip("10.1.0.6", "33")],
                ),
                "interface.IPAddresses[1].mask",
            ),
            (
                iface("02:00:00:00:00:01", vec![ip("2001:db8::5", "129")]),
                "interface.IPAddresses[0].mask",
            ),
            (
                iface("02:00:00:00:00:01", vec![ip("10.1.0.5", "")]),
                "interface.IPAddresses[0].mask",
            ),
            (
                iface("02:00:00:00:00:01", vec![ip("10.1.0.5/24", "24")]),
                "interface.IPAddresses[0].address",
            ),
            (
                iface("02:00:00:00:00:01", vec![ip("224.0.0.1", "24")]),
                "interface.IPAddresses[0].address",
            ),
        ];
        for (req, field) in cases {
            assert_eq!(invalid_field(interface_spec(&req).unwrap_err()), field);
        }
        let mut long = iface("02:00:00:00:00:01", vec![]);
        long.name = "a-name-of-16-chr".into();
        assert_eq!(
            invalid_field(interface_spec(&long).unwrap_err()),
            "interface.name"
        );
        let mut big = iface("02:00:00:00:00:01", vec![]);
        big.mtu = 1 << 32;
        assert_eq!(
            invalid_field(interface_spec(&big).unwrap_err()),
            "interface.mtu"
        );
    }

    #[test]
    fn the_message_names_field_and_value() {
        let req = iface("02:00:00:00:00:01", vec![ip("10.1.0.5", "40")]);
        let text = interface_spec(&req).unwrap_err().to_string();
        assert!(text.contains("interface.IPAddresses[0].mask"), "{text}");
        assert!(text.contains("\"40\""), "{text}");
    }

    #[test]
    fn default_routes_take_the_gateways_family() {
        let specs = route_specs(&[
            route("", "10.1.0.1", "eth0"),
            route("default", "2001:db8::1", "eth0"),
        ])
        .unwrap();
        assert_eq!(specs[0].dest.to_string(), "0.0.0.0/0");
        assert_eq!(specs[0].to_string(), "default via 10.1.0.1 dev eth0");
        assert_eq!(specs[1].dest.to_string(), "::/0");
    }

    #[test]
    fn family_decides_a_route_without_addresses() {
        let mut v6 = route("", "", "eth0");
        v6.family = types::IPFamily::v6.into();
        let specs = route_specs(&[route("", "", "eth0"), v6]).unwrap();
        assert!(specs[0].dest.addr.is_ipv4());
        assert!(specs[1].dest.addr.is_ipv6());
    }

    #[test]
    fn destinations_prefixes_and_host_routes() {
        let mut link = route("10.1.0.0/24", "", "eth0");
        link.scope = 253;
        link.source = "10.1.0.5".into();
        let specs = route_specs(&[link, route("192.0.2.7", "10.1.0.1", "eth0")]).unwrap();
        assert_eq!(specs[0].dest.to_string(), "10.1.0.0/24");
        assert_eq!(specs[0].scope, 253);
        assert_eq!(specs[0].source, Some("10.1.0.5".parse().unwrap()));
        assert_eq!(specs[1].dest.to_string(), "192.0.2.7/32");
    }

    #[test]
    fn bad_route_fields_are_named() {
        let mut mixed_source = route("10.1.0.0/24", "", "eth0");
        mixed_source.source = "2001:db8::5".into();
        let mut wrong_family = route("10.1.0.0/24", "", "eth0");
        wrong_family.family = types::IPFamily::v6.into();
        let mut big_scope = route("10.1.0.0/24", "", "eth0");
        big_scope.scope = 256;
        let mut odd_flags = route("10.1.0.0/24", "", "eth0");
        odd_flags.flags = 1;
        let cases = [
            (route("10.1.0.0/24", "", ""), "routes[0].device"),
            (route("10.1.0.0/33", "", "eth0"), "routes[0].dest"),
            (route("10.1.0.5/24", "", "eth0"), "routes[0].dest"),
            (route("nowhere", "", "eth0"), "routes[0].dest"),
            (route("", "10.1.0.256", "eth0"), "routes[0].gateway"),
            (
                route("10.2.0.0/16", "2001:db8::1", "eth0"),
                "routes[0].gateway",
            ),
            (mixed_source, "routes[0].source"),
            (wrong_family, "routes[0].family"),
            (big_scope, "routes[0].scope"),
            (odd_flags, "routes[0].flags"),
        ];
        for (bad, field) in cases {
            assert_eq!(invalid_field(route_specs(&[bad]).unwrap_err()), field);
        }
        let err = route_specs(&[route("", "10.1.0.1", "eth0"), route("x", "", "eth0")]);
        assert_eq!(invalid_field(err.unwrap_err()), "routes[1].dest");
    }

    #[test]
    fn onlink_is_the_one_flag() {
        let mut onlink = route("", "10.9.0.1", "eth0");
        onlink.flags = ROUTE_FLAG_ONLINK;
        assert!(route_specs(&[onlink]).unwrap()[0].onlink);
    }

    #[test]
    fn masks() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(mask(v4, 24).to_string(), "10.1.2.0");
        assert_eq!(mask(v4, 0).to_string(), "0.0.0.0");
        assert_eq!(mask(v4, 32), v4);
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        assert_eq!(mask(v6, 64).to_string(), "2001:db8::");
        assert_eq!(mask(v6, 128), v6);
    }
}
