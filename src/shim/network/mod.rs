//! Pod networking into the VM (Kata's default tc filter model).
//!
//! CNI put the pod's interfaces (usually one veth, `eth0`) into the network namespace named by the
//! sandbox's OCI spec. For each of them the shim opens a tap in that namespace and redirects
//! traffic both ways between the two with tc ([`tap`]); QEMU gets the tap's descriptor as a
//! virtio-net NIC with the pod interface's MAC; once the guest is up, the agent gives the guest NIC
//! the pod interface's name, addresses and MTU, and the pod's routes ([`inspect`] reads them).
//! The taps live as long as QEMU's descriptors: nothing is left to remove when the VM goes.

mod inspect;
mod netns;
mod tap;

use std::path::{Path, PathBuf};

use self::inspect::{PodInterface, PodRoute, TAP_SUFFIX};
use super::hypervisor::Nic;
use crate::agent_client::{AgentClient, AgentError};
use crate::protocols::agent;

/// More NICs than this are not wired (a pod has one or two; QEMU and the guest take time per NIC).
const MAX_INTERFACES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NetworkError {
    #[error("starting a thread for the pod's network namespace: {source}")]
    Thread { source: std::io::Error },
    #[error("the pod network thread ended without an answer")]
    ThreadGone,
    #[error("opening the pod's network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("joining the pod's network namespace {path}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("opening a netlink socket in the pod's network namespace: {source}")]
    Socket { source: std::io::Error },
    #[error("{what} in the pod's network namespace: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("creating tap {name} in the pod's network namespace: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("no link {name} in the pod's network namespace")]
    NoSuchLink { name: String },
    #[error("link index {index} is out of range for tc")]
    BadIndex { index: u32 },
    #[error("{what} in the guest: {source}")]
    Agent {
        what: String,
        source: Box<AgentError>,
    },
}

impl NetworkError {
    fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> NetworkError {
        NetworkError::Netlink {
            what: what.into(),
            source,
        }
    }
}

/// The pod's interfaces and routes, as the guest must have them.
#[derive(Debug, Default)]
pub(crate) struct PodNetwork {
    interfaces: Vec<PodInterface>,
    routes: Vec<PodRoute>,
}

/// Reads the pod's interfaces in the network namespace at `netns` and wires a tap to each; returns
/// what the guest must be told and the NICs QEMU must get.
pub(crate) async fn prepare(netns: &Path) -> Result<(PodNetwork, Vec<Nic>), NetworkError> {
    netns::in_netns(netns, |handle| async move {
        let (mut interfaces, routes) = inspect::pod_network(&handle).await?;
        if interfaces.len() > MAX_INTERFACES {
            tracing::warn!(
                count = interfaces.len(),
                "the pod has more interfaces than the VM gets NICs for; wiring the first {MAX_INTERFACES}"
            );
            interfaces.truncate(MAX_INTERFACES);
        }
        let mut nics = Vec::with_capacity(interfaces.len());
        for (n, interface) in interfaces.iter().enumerate() {
            let name = format!("tap{n}{TAP_SUFFIX}");
            let tap = tap::open_tap(&name)?;
            let tap_index = tap::link_index(&handle, &name).await?;
            tap::wire(&handle, interface.index, tap_index, interface.mtu).await?;
            nics.push(Nic {
                tap,
                mac: inspect::mac_text(&interface.mac),
            });
        }
        let routes = routes
            .into_iter()
            .filter(|r| interfaces.iter().any(|i| i.name == r.device))
            .collect();
        Ok((PodNetwork { interfaces, routes }, nics))
    })
    .await
}

impl PodNetwork {
    /// Gives the guest NICs the pod interfaces' names, addresses and MTU, then the pod's routes.
    pub(crate) async fn configure_guest(&self, agent: &AgentClient) -> Result<(), NetworkError> {
        for interface in &self.interfaces {
            let request = agent::UpdateInterfaceRequest {
                interface: Some(interface.to_agent()).into(),
                ..Default::default()
            };
            agent
                .update_interface(request)
                .await
                .map_err(|source| NetworkError::Agent {
                    what: format!("configuring {}", interface.name),
                    source: Box::new(source),
                })?;
        }
        if self.routes.is_empty() {
            return Ok(());
        }
        let request = agent::UpdateRoutesRequest {
            routes: Some(agent::Routes {
                Routes: self.routes.iter().map(PodRoute::to_agent).collect(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        agent
            .update_routes(request)
            .await
            .map_err(|source| NetworkError::Agent {
                what: "setting the pod's routes".to_string(),
                source: Box::new(source),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
