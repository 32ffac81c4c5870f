//! kata-shim-metrics: monitoring for VM-isolated ("secure") containers.
//!
//! The library behind the four binaries, in layers; every import points down this list
//! (`docs/architecture.md` walks one scrape through them):
//! - [`shim`], [`monitor`], [`runtime_cli`]: the host programs (containerd shim v2 with its VM and
//!   its own metrics; the node aggregator; `kata-runtime`);
//! - [`mgmt`]: the shim management HTTP server, its client, socket paths, pod identity;
//! - [`agent_client`]: the host's client of the guest agent (deadlines, reconnect, RPC durations);
//! - [`guest`]: the guest agent (service, container runtime, PID 1 setup, reaper);
//! - [`agent`]: what both ends of the agent protocol share (addresses, transports);
//! - [`metrics`]: collectors and Prometheus text (parse, encode), no I/O but /proc reads;
//! - [`protocols`]: the agent ttrpc API generated from `protos/`.
//!
//! Everything above [`guest`] runs on the host only and needs the `host` feature (on by
//! default); the guest agent's static build leaves it out.

pub mod agent;
#[cfg(feature = "host")]
pub mod agent_client;
#[cfg(feature = "host")]
#[doc(hidden)]
pub mod bench_support;
#[cfg(feature = "host")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod logging;
pub mod metrics;
#[cfg(feature = "host")]
pub mod mgmt;
#[cfg(feature = "host")]
pub mod monitor;
pub mod protocols;
#[cfg(feature = "host")]
pub mod runtime_cli;
#[cfg(feature = "host")]
pub mod shim;
pub mod signals;
