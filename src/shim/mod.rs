//! The containerd shim v2 (`io.containerd.kata.v2`): one VM per sandbox, containers run by the
//! guest agent, and the sandbox's metrics server.

pub mod cadvisor;
pub(crate) mod config;
pub(crate) mod container;
pub(crate) mod events;
pub mod hypervisor;
pub mod metrics;
pub(crate) mod network;
pub(crate) mod oci;
pub(crate) mod rootfs;
pub(crate) mod sandbox;
pub mod service;
pub(crate) mod stats;
pub(crate) mod stdio;
pub(crate) mod task;
pub(crate) mod vm_fate;
pub(crate) mod waiter;
