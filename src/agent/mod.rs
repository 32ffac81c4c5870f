//! Both sides of the agent protocol: addresses and transports, the shim's client, the agent's service.

pub mod client;
pub mod container;
pub mod guest_init;
pub mod reaper;
pub mod service;
pub mod transport;
pub mod url;
