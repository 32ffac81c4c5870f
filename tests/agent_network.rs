//! The agent configuring the pod's NIC and routes (UpdateInterface, UpdateRoutes), as the shim asks
//! it to in a VM: here a real `kata-agent` runs inside a network namespace the test creates, with
//! a veth standing in for the guest's virtio-net NIC, and every result is checked against
//! `ip -j` run in that namespace.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use kata_shim_metrics::agent_client::{AgentClient, AgentError, AgentTimeouts};
use kata_shim_metrics::protocols::{agent, types};
use serde_json::Value;
use support::netns::NetNs;
use support::Proc;

/// The stand-in NIC's MAC as the guest sees it (the pod interface's, in a real sandbox).
const MAC: &str = "02:6b:73:6d:00:01";
/// Its name before the agent renames it.
const NIC: &str = "ksmnic";

struct Guest {
    client: AgentClient,
    agent: Option<Proc>,
    ns: NetNs,
    _dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // The agent first: a namespace is gone only when no process is left in it.
        if let Some(agent) = self.agent.take() {
            agent.terminate(Duration::from_secs(10));
        }
    }
}

/// A namespace with a veth pair whose guest end (`ksmnic`, [`MAC`]) has an old address and
/// MTU, and an agent serving inside it.
fn guest() -> Guest {
    let ns = NetNs::new("ksm-net");
    ns.ip(&[
        "link", "add", NIC, "address", MAC, "mtu", "1500", "type", "veth", "peer", "name",
        "ksmpeer",
    ]);
    // The far end up, so the NIC has a carrier once the agent brings it up.
    ns.ip(&["link", "set", "ksmpeer", "up"]);
    ns.ip(&["addr", "add", "192.168.77.9/24", "dev", NIC]);
    let dir = support::temp_dir();
    let (agent, url) = support::start_agent_in_netns(dir.path(), &ns.path());
    let client = AgentClient::new(
        url.parse().expect("agent url"),
        AgentTimeouts {
            request: Duration::from_secs(20),
            ..AgentTimeouts::default()
        },
    );
    Guest {
        client,
        agent: Some(agent),
        ns,
        _dir: dir,
    }
}

fn address(addr: &str, mask: &str) -> types::IPAddress {
    let mut ip = types::IPAddress::new();
    ip.family = if addr.contains(':') {
        types::IPFamily::v6
    } else {
        types::IPFamily::v4
    }
    .into();
    ip.address = addr.into();
    ip.mask = mask.into();
    ip
}

fn interface(
    mac: &str,
    name: &str,
    mtu: u64,
    addresses: &[(&str, &str)],
) -> agent::UpdateInterfaceRequest {
    let mut iface = types::Interface::new();
    iface.hwAddr = mac.into();
    iface.name = name.into();
    iface.mtu = mtu;
    iface.IPAddresses = addresses.iter().map(|(a, m)| address(a, m)).collect();
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = Some(iface).into();
    req
}

fn route(dest: &str, gateway: &str, device: &str) -> types::Route {
    let mut route = types::Route::new();
    route.dest = dest.into();
    route.gateway = gateway.into();
    route.device = device.into();
    if dest.contains(':') || gateway.contains(':') {
        route.family = types::IPFamily::v6.into();
    }
    route
}

fn routes(list: Vec<types::Route>) -> agent::UpdateRoutesRequest {
    let mut routes = agent::Routes::new();
    routes.Routes = list;
    let mut req = agent::UpdateRoutesRequest::new();
    req.routes = Some(routes).into();
    req
}

/// The pod's interface: eth0, MTU 1400, one address of each family.
async fn configure_eth0(g: &Guest) -> types::Interface {
    g.client
        .update_interface(interface(
            &MAC.to_uppercase(),
            "eth0",
            1400,
            &[("10.88.0.5", "24"), ("2001:db8:88::5", "64")],
        ))
        .await
        .expect("UpdateInterface")
}

fn json_str<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

/// (family, address, prefix) of the link's global addresses, as `ip -j addr` shows them.
fn global_addresses(link: &Value) -> BTreeSet<(String, String, u64)> {
    link["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| json_str(a, "scope") == "global")
        .map(|a| {
            (
                json_str(a, "family").to_string(),
                json_str(a, "local").to_string(),
                a["prefixlen"].as_u64().expect("prefixlen"),
            )
        })
        .collect()
}

/// (destination, gateway) of the routes through `dev`, both families, as `ip -j route` shows
/// them (main table); a host route gets its /32 or /128 written out.
fn ip_routes(ns: &NetNs, dev: &str) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for family in ["-4", "-6"] {
        let list = ns.ip_json(&[family, "route", "show", "dev", dev]);
        for r in list.as_array().expect("route list") {
            let mut dst = json_str(r, "dst").to_string();
            if dst != "default" && !dst.contains('/') {
                dst.push_str(if family == "-4" { "/32" } else { "/128" });
            }
            found.insert((dst, json_str(r, "gateway").to_string()));
        }
    }
    found
}

fn reply_routes(reply: &agent::Routes) -> BTreeSet<(String, String)> {
    reply
        .Routes
        .iter()
        .map(|r| (r.dest.clone(), r.gateway.clone()))
        .collect()
}

fn pair(dest: &str, gateway: &str) -> (String, String) {
    (dest.to_string(), gateway.to_string())
}

fn expect_code(err: AgentError, code: ttrpc::Code, mentions: &[&str]) {
    assert_eq!(err.code(), Some(code), "{err}");
    let message = err.message().unwrap_or_default();
    for text in mentions {
        assert!(
            message.contains(text),
            "{message:?} does not mention {text:?}"
        );
    }
}

#[tokio::test]
async fn the_nic_with_the_pods_mac_gets_its_addresses_mtu_and_name() {
    let g = guest();
    let reply = configure_eth0(&g).await;

    let links = g.ns.ip_json(&["addr", "show", "dev", "eth0"]);
    let link = &links[0];
    assert_eq!(json_str(link, "ifname"), "eth0");
    assert_eq!(json_str(link, "address"), MAC);
    assert_eq!(link["mtu"].as_u64(), Some(1400));
    let flags: Vec<&str> = link["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"UP"), "eth0 is not up: {flags:?}");
    let expected: BTreeSet<(String, String, u64)> = [
        ("inet".to_string(), "10.88.0.5".to_string(), 24),
        ("inet6".to_string(), "2001:db8:88::5".to_string(), 64),
    ]
    .into();
    // The old address is gone: only the pod's are there.
    assert_eq!(global_addresses(link), expected);
    assert!(
        g.ns.try_ip(&["link", "show", NIC]).is_err(),
        "{NIC} still exists"
    );

    // The reply is the interface as ip sees it.
    assert_eq!(reply.name, "eth0");
    assert_eq!(reply.hwAddr, MAC);
    assert_eq!(reply.mtu, 1400);
    assert_ne!(reply.raw_flags & libc::IFF_UP as u32, 0);
    let replied: BTreeSet<(String, String, u64)> = reply
        .IPAddresses
        .iter()
        .map(|ip| {
            let family = match ip.family.enum_value() {
                Ok(types::IPFamily::v6) => "inet6",
                _ => "inet",
            };
            (
                family.to_string(),
                ip.address.clone(),
                ip.mask.parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(replied, expected);

    // Asked again with other values, the same NIC (now eth0) changes again.
    let again = g
        .client
        .update_interface(interface(MAC, "", 0, &[("10.77.0.5", "16")]))
        .await
        .expect("second UpdateInterface");
    let link = &g.ns.ip_json(&["addr", "show", "dev", "eth0"])[0];
    assert_eq!(link["mtu"].as_u64(), Some(1400), "MTU 0 keeps the MTU");
    assert_eq!(
        global_addresses(link),
        [("inet".to_string(), "10.77.0.5".to_string(), 16)].into()
    );
    assert_eq!(again.name, "eth0");
}

#[tokio::test]
async fn the_pods_routes_replace_the_old_ones() {
    let g = guest();
    configure_eth0(&g).await;
    // A route someone else left: the shim's list replaces it.
    g.ns.ip(&[
        "route",
        "add",
        "172.30.0.0/16",
        "via",
        "10.88.0.254",
        "dev",
        "eth0",
    ]);

    // The gateway route comes first in the list, but 10.99.0.1 is reachable only through the
    // link route after it: the agent must add that one first.
    let mut link_route = route("10.99.0.0/24", "", "eth0");
    link_route.scope = 253;
    let mut prefix_route = route("10.88.0.0/24", "", "eth0");
    prefix_route.scope = 253;
    prefix_route.source = "10.88.0.5".into();
    let reply = g
        .client
        .update_routes(routes(vec![
            route("192.168.200.0/24", "10.99.0.1", "eth0"),
            route("", "10.88.0.1", "eth0"),
            link_route,
            prefix_route,
            route("default", "2001:db8:88::1", "eth0"),
        ]))
        .await
        .expect("UpdateRoutes");

    let now = ip_routes(&g.ns, "eth0");
    for expected in [
        pair("default", "10.88.0.1"),
        pair("default", "2001:db8:88::1"),
        pair("10.99.0.0/24", ""),
        pair("192.168.200.0/24", "10.99.0.1"),
        pair("10.88.0.0/24", ""),
        pair("2001:db8:88::/64", ""),
    ] {
        assert!(now.contains(&expected), "{expected:?} missing from {now:?}");
    }
    assert!(
        !now.iter().any(|(dst, _)| dst == "172.30.0.0/16"),
        "the old route stayed: {now:?}"
    );
    assert_eq!(reply_routes(&reply), now);

    // A second list replaces the first.
    let reply = g
        .client
        .update_routes(routes(vec![route("default", "10.88.0.254", "eth0")]))
        .await
        .expect("second UpdateRoutes");
    let now = ip_routes(&g.ns, "eth0");
    assert!(now.contains(&pair("default", "10.88.0.254")), "{now:?}");
    for gone in [
        pair("default", "10.88.0.1"),
        pair("default", "2001:db8:88::1"),
        pair("10.99.0.0/24", ""),
        pair("192.168.200.0/24", "10.99.0.1"),
    ] {
        assert!(!now.contains(&gone), "{gone:?} stayed: {now:?}");
    }
    // The kernel's prefix route of eth0's address stays: it comes with the address.
    assert!(now.contains(&pair("10.88.0.0/24", "")), "{now:?}");
    assert_eq!(reply_routes(&reply), now);
}

#[tokio::test]
async fn an_unknown_mac_is_not_found_and_changes_nothing() {
    let g = guest();
    let err = g
        .client
        .update_interface(interface(
            "02:6b:73:6d:00:99",
            "eth0",
            0,
            &[("10.88.0.5", "24")],
        ))
        .await
        .expect_err("no NIC has that MAC");
    expect_code(err, ttrpc::Code::NOT_FOUND, &["02:6b:73:6d:00:99"]);
    let link = &g.ns.ip_json(&["addr", "show", "dev", NIC])[0];
    assert_eq!(
        global_addresses(link),
        [("inet".to_string(), "192.168.77.9".to_string(), 24)].into()
    );
}

#[tokio::test]
async fn bad_input_is_an_invalid_argument_that_names_the_field_and_changes_nothing() {
    let g = guest();
    let cases = [
        (
            interface(MAC, "eth0", 0, &[("10.88.0.500", "24")]),
            ["interface.IPAddresses[0].address", "10.88.0.500"],
        ),
        (
            interface(MAC, "eth0", 0, &[("10.88.0.5", "24"), ("10.88.0.6", "33")]),
            ["interface.IPAddresses[1].mask", "33"],
        ),
        (
            interface("02:6b:73:6d:00", "eth0", 0, &[]),
            ["interface.hwAddr", "02:6b:73:6d:00"],
        ),
    ];
    for (req, mentions) in cases {
        let err = g.client.update_interface(req).await.expect_err("bad input");
        expect_code(err, ttrpc::Code::INVALID_ARGUMENT, &mentions);
    }
    let link = &g.ns.ip_json(&["addr", "show", "dev", NIC])[0];
    assert_eq!(
        global_addresses(link),
        [("inet".to_string(), "192.168.77.9".to_string(), 24)].into()
    );

    g.ns.ip(&["link", "set", NIC, "up"]);
    g.ns.ip(&[
        "route",
        "add",
        "172.30.0.0/16",
        "via",
        "192.168.77.1",
        "dev",
        NIC,
    ]);
    let err = g
        .client
        .update_routes(routes(vec![
            route("", "192.168.77.1", NIC),
            route("192.168.77.9/24", "", NIC),
        ]))
        .await
        .expect_err("host bits in a destination");
    expect_code(
        err,
        ttrpc::Code::INVALID_ARGUMENT,
        &["routes[1].dest", "192.168.77.9/24"],
    );
    assert!(
        ip_routes(&g.ns, NIC).contains(&pair("172.30.0.0/16", "192.168.77.1")),
        "a refused request removed routes"
    );
}

#[tokio::test]
async fn unknown_devices_and_unreachable_gateways_are_refused() {
    let g = guest();
    let err = g
        .client
        .update_routes(routes(vec![route("", "10.88.0.1", "nosuch0")]))
        .await
        .expect_err("no such device");
    expect_code(err, ttrpc::Code::NOT_FOUND, &["nosuch0"]);

    configure_eth0(&g).await;
    let err = g
        .client
        .update_routes(routes(vec![route("", "172.16.5.1", "eth0")]))
        .await
        .expect_err("no route reaches the gateway");
    expect_code(
        err,
        ttrpc::Code::FAILED_PRECONDITION,
        &["default via 172.16.5.1 dev eth0"],
    );

    // The kernel's word on an MTU the device cannot take (a veth's maximum is 65535).
    let err = g
        .client
        .update_interface(interface(MAC, "eth0", 70000, &[]))
        .await
        .expect_err("MTU out of range");
    expect_code(err, ttrpc::Code::INVALID_ARGUMENT, &["MTU", "70000"]);
}
