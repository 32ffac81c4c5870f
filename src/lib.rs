//! kata-shim-metrics: monitoring for VM-isolated ("secure") containers.
//!
//! The library behind the four binaries (see DESIGN in the README):
//! - [`protocols`]: the agent ttrpc API generated from `protos/`;
//! - [`metrics`]: collectors (process, guest OS), the shim's global registry, exposition text handling;
//! - [`agent`]: agent addresses and transports, the shim's agent client, and the agent's own service;
//! - [`mgmt`]: the shim management HTTP server, its client, and where sandbox sockets live;
//! - [`runtime_cli`]: `kata-runtime` subcommands.

pub mod agent;
pub mod logging;
pub mod metrics;
pub mod mgmt;
pub mod protocols;
pub mod runtime_cli;
#[cfg(feature = "host")]
pub mod shim;
pub mod signals;
