//! UpdateRoutes: the routes through the interfaces the request names become the request's routes.

use std::collections::{BTreeSet, HashMap};

use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};

use super::error::NetworkError;
use super::netlink::{is_v6, route_ip, route_oif, Netlink};
use super::parse::RouteSpec;
use crate::protocols::types;

/// Replaces the main table's routes through the devices `specs` name, and returns the routes now
/// through them. Every device must exist before anything changes. The kernel's own routes (the
/// prefix routes of the interfaces' addresses, IPv6 link-local and multicast ones) stay: they
/// follow from the addresses UpdateInterface set. Routes without a gateway go in first, so that
/// every gateway is reachable when its route is added (as Kata does). A requested route that the
/// kernel already has through the same device (typically a prefix route) is taken as added.
pub(crate) async fn update_routes(
    nl: &Netlink,
    specs: &[RouteSpec],
) -> Result<Vec<types::Route>, NetworkError> {
    let names: HashMap<String, u32> = nl
        .links()
        .await?
        .into_iter()
        .map(|link| (link.name, link.index))
        .collect();
    let mut targets = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let index = names
            .get(&spec.device)
            .copied()
            .ok_or_else(|| NetworkError::NoSuchDevice {
                name: spec.device.clone(),
                route: i,
            })?;
        targets.push((spec, index));
    }
    let devices: BTreeSet<u32> = targets.iter().map(|(_, index)| *index).collect();
    let device_name = |index: u32| {
        names
            .iter()
            .find_map(|(name, i)| (*i == index).then(|| name.clone()))
            .unwrap_or_else(|| format!("interface {index}"))
    };

    for route in nl.routes().await? {
        let through_device = route_oif(&route).is_some_and(|oif| devices.contains(&oif));
        if !through_device || route.header.protocol == RouteProtocol::Kernel {
            continue;
        }
        let shown = describe(&route, &device_name);
        match nl
            .delete_route(format!("removing the route {shown}"), route)
            .await
        {
            // Gone already (with an address, or by someone else).
            Err(err) if err.errno() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }

    let (links, gateways): (Vec<_>, Vec<_>) = targets
        .into_iter()
        .partition(|(spec, _)| spec.gateway.is_none());
    for (spec, index) in links.into_iter().chain(gateways) {
        match nl.add_route(spec, index).await {
            Err(err) if err.errno() == Some(libc::EEXIST) => {
                if !has_route_to(&nl.routes().await?, spec, index) {
                    return Err(err);
                }
            }
            other => other?,
        }
    }

    Ok(nl
        .routes()
        .await?
        .iter()
        .filter(|route| route_oif(route).is_some_and(|oif| devices.contains(&oif)))
        .map(|route| to_proto(route, &device_name))
        .collect())
}

/// Whether the kernel has a route to `spec.dest` through `index`.
fn has_route_to(routes: &[RouteMessage], spec: &RouteSpec, index: u32) -> bool {
    routes.iter().any(|route| {
        route_oif(route) == Some(index)
            && route.header.destination_prefix_length == spec.dest.len
            && destination(route).unwrap_or(if spec.dest.addr.is_ipv6() {
                std::net::IpAddr::from([0u16; 8])
            } else {
                std::net::IpAddr::from([0u8; 4])
            }) == spec.dest.addr
    })
}

fn destination(route: &RouteMessage) -> Option<std::net::IpAddr> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Destination(addr) => route_ip(addr),
        _ => None,
    })
}

fn gateway(route: &RouteMessage) -> Option<std::net::IpAddr> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Gateway(addr) => route_ip(addr),
        _ => None,
    })
}

fn pref_source(route: &RouteMessage) -> Option<std::net::IpAddr> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::PrefSource(addr) => route_ip(addr),
        _ => None,
    })
}

/// `default`, or the destination as `address/len`.
fn dest_text(route: &RouteMessage) -> String {
    let len = route.header.destination_prefix_length;
    match destination(route) {
        Some(addr) if len > 0 => format!("{addr}/{len}"),
        _ => "default".to_string(),
    }
}

/// `ip route`'s way of showing a route, for error messages.
fn describe(route: &RouteMessage, device_name: &impl Fn(u32) -> String) -> String {
    let mut text = dest_text(route);
    if let Some(gateway) = gateway(route) {
        text.push_str(&format!(" via {gateway}"));
    }
    if let Some(oif) = route_oif(route) {
        text.push_str(&format!(" dev {}", device_name(oif)));
    }
    text
}

/// A kernel route as Kata's `types.Route`: `dest` is `default` or `address/len`, `source` the
/// preferred source address, `flags` the kernel's `rtm_flags`.
fn to_proto(route: &RouteMessage, device_name: &impl Fn(u32) -> String) -> types::Route {
    let mut out = types::Route::new();
    out.dest = dest_text(route);
    out.gateway = gateway(route).map(|a| a.to_string()).unwrap_or_default();
    out.device = route_oif(route).map(device_name).unwrap_or_default();
    out.source = pref_source(route)
        .map(|a| a.to_string())
        .unwrap_or_default();
    out.scope = u8::from(route.header.scope).into();
    out.family = if is_v6(route.header.address_family) {
        types::IPFamily::v6
    } else {
        types::IPFamily::v4
    }
    .into();
    out.flags = route.header.flags.bits();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteAddress, RouteScope};
    use rtnetlink::packet_route::AddressFamily;

    fn kernel_route(dest: &str, len: u8, gateway: Option<&str>, oif: u32) -> RouteMessage {
        let mut msg = RouteMessage::default();
        let dest: std::net::IpAddr = dest.parse().unwrap();
        msg.header.address_family = if dest.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.destination_prefix_length = len;
        msg.header.scope = RouteScope::Link;
        if len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dest)));
        }
        if let Some(gw) = gateway {
            let gw: std::net::IpAddr = gw.parse().unwrap();
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        msg
    }

    fn spec(dest: &str, len: u8, device: &str) -> RouteSpec {
        RouteSpec {
            dest: super::super::parse::IpPrefix {
                addr: dest.parse().unwrap(),
                len,
            },
            gateway: None,
            device: device.into(),
            source: None,
            scope: 253,
            onlink: false,
        }
    }

    fn names(index: u32) -> String {
        format!("eth{index}")
    }

    #[test]
    fn routes_read_like_kata_routes() {
        let default = to_proto(&kernel_route("0.0.0.0", 0, Some("10.1.0.1"), 2), &names);
        assert_eq!(default.dest, "default");
        assert_eq!(default.gateway, "10.1.0.1");
        assert_eq!(default.device, "eth2");
        assert_eq!(default.family.enum_value(), Ok(types::IPFamily::v4));
        let link = to_proto(&kernel_route("2001:db8::", 64, None, 2), &names);
        assert_eq!(link.dest, "2001:db8::/64");
        assert_eq!(link.scope, 253);
        assert_eq!(link.family.enum_value(), Ok(types::IPFamily::v6));
        assert_eq!(
            describe(&kernel_route("0.0.0.0", 0, Some("10.1.0.1"), 2), &names),
            "default via 10.1.0.1 dev eth2"
        );
    }

    #[test]
    fn an_existing_route_counts_only_on_the_same_device() {
        let routes = [
            kernel_route("10.1.0.0", 24, None, 2),
            kernel_route("0.0.0.0", 0, Some("10.9.0.1"), 3),
        ];
        assert!(has_route_to(&routes, &spec("10.1.0.0", 24, "eth0"), 2));
        assert!(!has_route_to(&routes, &spec("10.1.0.0", 24, "eth0"), 3));
        assert!(!has_route_to(&routes, &spec("10.1.0.0", 16, "eth0"), 2));
        assert!(has_route_to(&routes, &spec("0.0.0.0", 0, "eth1"), 3));
        assert!(!has_route_to(&routes, &spec("0.0.0.0", 0, "eth0"), 2));
    }
}
