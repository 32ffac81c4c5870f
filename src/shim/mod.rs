//! The containerd shim v2 (`io.containerd.kata.v2`): one VM per sandbox, containers run by the
//! guest agent, and the sandbox's metrics server.

pub mod config;
