//! The containerd shim v2 (`io.containerd.kata.v2`): one VM per sandbox, containers run by the
//! guest agent, and the sandbox's metrics server.

pub mod config;
pub mod container;
pub mod events;
pub mod hypervisor;
pub mod metrics;
pub mod oci;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod stats;
pub mod stdio;
pub mod task;
pub mod waiter;
