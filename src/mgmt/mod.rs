//! The shim management server (HTTP over unix sockets), its client, and socket paths.

pub mod client;
pub mod launch;
pub mod paths;
pub mod peer;
pub mod server;
