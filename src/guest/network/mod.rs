//! The guest's pod network: Kata's UpdateInterface and UpdateRoutes over netlink.
//!
//! The shim gives the VM a virtio-net NIC whose MAC is the pod interface's, then sends that
//! interface (addresses, MTU, name) and the pod's routes. Nothing in the guest configures a NIC
//! by itself (boot only brings `lo` up).
//!
//! - [`parse`]: the requests checked and typed (INVALID_ARGUMENT naming the field and value);
//! - [`interface`]: UpdateInterface (the link with the MAC: down, addresses, MTU, name, up);
//! - [`routes`]: UpdateRoutes (the routes through the named devices replaced);
//! - [`netlink`]: the rtnetlink requests both make;
//! - [`error`]: what can fail, and its ttrpc status (NOT_FOUND for an unknown MAC or device).

mod error;
mod interface;
mod netlink;
mod parse;
mod routes;

use tokio::sync::Mutex;

use crate::protocols::{agent, types};
use error::NetworkError;
use netlink::Netlink;

/// The agent's network configuration. One change at a time: two requests interleaving their
/// steps on one link would leave a mix of both.
#[derive(Default)]
pub(crate) struct Network {
    busy: Mutex<()>,
}

impl Network {
    pub(crate) async fn update_interface(
        &self,
        req: &agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        let iface = req.interface.as_ref().ok_or_else(|| {
            NetworkError::invalid("interface", "", "UpdateInterface needs an interface")
        })?;
        let spec = parse::interface_spec(iface)?;
        let _busy = self.busy.lock().await;
        let nl = Netlink::connect()?;
        let done = interface::update_interface(&nl, &spec).await?;
        tracing::info!(
            mac = %spec.mac,
            name = %done.name,
            addresses = done.IPAddresses.len(),
            mtu = done.mtu,
            "interface configured"
        );
        Ok(done)
    }

    pub(crate) async fn update_routes(
        &self,
        req: &agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        let requested = req
            .routes
            .as_ref()
            .map(|r| r.Routes.as_slice())
            .unwrap_or(&[]);
        let specs = parse::route_specs(requested)?;
        let _busy = self.busy.lock().await;
        let nl = Netlink::connect()?;
        let now = routes::update_routes(&nl, &specs).await?;
        tracing::info!(requested = specs.len(), now = now.len(), "routes replaced");
        let mut reply = agent::Routes::new();
        reply.Routes = now;
        Ok(reply)
    }
}
