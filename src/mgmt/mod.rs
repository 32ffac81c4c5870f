//! The shim management server (HTTP over unix sockets), its client, and socket paths.

pub mod client;
pub mod paths;
pub(crate) mod peer;
pub(crate) mod pod;
pub(crate) mod server;

pub use pod::{pod_identity_from_annotations, PodIdentity};
