//! The netlink requests the network RPCs make (rtnetlink): links, addresses and main-table routes,
//! read into small typed views and changed one request at a time, each failure saying what it did.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use tokio::task::JoinHandle;

use super::error::NetworkError;
use super::parse::{IpPrefix, RouteSpec};

/// One rtnetlink connection: its socket is served by a task that ends when this is dropped.
pub(crate) struct Netlink {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A network interface as the kernel reports it.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    /// Empty for links without a hardware address.
    pub(crate) mac: Vec<u8>,
    pub(crate) mtu: u32,
    pub(crate) flags: LinkFlags,
}

impl From<LinkMessage> for Link {
    fn from(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            flags: msg.header.flags,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = mac,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                _ => {}
            }
        }
        link
    }
}

/// The address of an interface address message (`IFA_LOCAL`, else `IFA_ADDRESS`).
pub(crate) fn address_of(msg: &AddressMessage) -> Option<IpPrefix> {
    let mut found = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(addr) => found = Some(*addr),
            AddressAttribute::Address(addr) if found.is_none() => found = Some(*addr),
            _ => {}
        }
    }
    found.map(|addr| IpPrefix {
        addr,
        len: msg.header.prefix_len,
    })
}

/// The IP address a route attribute holds, if it is one.
pub(crate) fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The interface a (single-path) route leaves through.
pub(crate) fn route_oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(msg.header.table.into())
}

impl Netlink {
    pub(crate) fn connect() -> Result<Self, NetworkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    fn failed(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
        let what = what.into();
        move |source| NetworkError::Netlink { what, source }
    }

    pub(crate) async fn links(&self) -> Result<Vec<Link>, NetworkError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::failed("listing the interfaces"))?;
        Ok(links.into_iter().map(Link::from).collect())
    }

    pub(crate) async fn link(&self, index: u32) -> Result<Link, NetworkError> {
        let what = format!("reading interface {index}");
        let found: Option<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(Self::failed(what.clone()))?;
        found.map(Link::from).ok_or(NetworkError::Netlink {
            what,
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// Applies `change` to the link `index`; `what` says what it does.
    pub(crate) async fn set_link(
        &self,
        what: String,
        index: u32,
        change: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), NetworkError> {
        let msg = change(LinkUnspec::new_with_index(index)).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(Self::failed(what))
    }

    /// The addresses of the interface, both families.
    pub(crate) async fn addresses(&self, index: u32) -> Result<Vec<AddressMessage>, NetworkError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(Self::failed(format!(
                "listing the addresses of interface {index}"
            )))
    }

    pub(crate) async fn delete_address(
        &self,
        what: String,
        msg: AddressMessage,
    ) -> Result<(), NetworkError> {
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(Self::failed(what))
    }

    pub(crate) async fn add_address(
        &self,
        what: String,
        index: u32,
        prefix: IpPrefix,
    ) -> Result<(), NetworkError> {
        self.handle
            .address()
            .add(index, prefix.addr, prefix.len)
            .execute()
            .await
            .map_err(Self::failed(what))
    }

    /// The main table's routes, both families.
    pub(crate) async fn routes(&self) -> Result<Vec<RouteMessage>, NetworkError> {
        let mut routes = Vec::new();
        // One dump at a time: a second one on the same socket while the first runs fails (EBUSY).
        for (family, query) in [
            (
                "IPv4",
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            ),
            (
                "IPv6",
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            ),
        ] {
            let dumped: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(Self::failed(format!("listing the {family} routes")))?;
            routes.extend(
                dumped
                    .into_iter()
                    .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)),
            );
        }
        Ok(routes)
    }

    /// Deletes a route as a dump reported it, identified by what the kernel matches on.
    pub(crate) async fn delete_route(
        &self,
        what: String,
        mut msg: RouteMessage,
    ) -> Result<(), NetworkError> {
        msg.attributes.retain(|attr| {
            matches!(
                attr,
                RouteAttribute::Destination(_)
                    | RouteAttribute::Gateway(_)
                    | RouteAttribute::Oif(_)
                    | RouteAttribute::Priority(_)
                    | RouteAttribute::Table(_)
            )
        });
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(Self::failed(what))
    }

    /// Adds `route` through the interface `index` to the main table, as `ip route add` would
    /// (protocol boot).
    pub(crate) async fn add_route(
        &self,
        route: &RouteSpec,
        index: u32,
    ) -> Result<(), NetworkError> {
        // parse::route_specs checked the families already; this is the builder's own check.
        let invalid = |reason: &dyn std::fmt::Display| {
            NetworkError::invalid("route", route.to_string(), reason.to_string())
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dest.addr, route.dest.len)
            .map_err(|e| invalid(&e))?;
        if let Some(gateway) = route.gateway {
            builder = builder.gateway(gateway).map_err(|e| invalid(&e))?;
        }
        if let Some(source) = route.source {
            builder = builder.pref_source(source).map_err(|e| invalid(&e))?;
        }
        builder = builder
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .scope(route.scope.into());
        let mut msg = builder.build();
        if route.onlink {
            msg.header.flags |= RouteFlags::Onlink;
        }
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(Self::failed(format!("adding the route {route}")))
    }
}

/// Whether the kernel's `family` value is IPv6.
pub(crate) fn is_v6(family: AddressFamily) -> bool {
    family == AddressFamily::Inet6
}
