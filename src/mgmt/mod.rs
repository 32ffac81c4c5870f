//! The shim management server (HTTP over unix sockets), its client, and socket paths; the connection
//! budget ([`admission`]) that kata-monitor's HTTP server uses as well.

pub(crate) mod admission;
pub mod client;
pub mod paths;
pub(crate) mod peer;
pub(crate) mod pod;
pub(crate) mod server;

pub use pod::{pod_identity_from_annotations, PodIdentity};
