//! The agent protocol, generated from `protos/` by build.rs.
//!
//! Each generated file becomes a sibling module: the ttrpc files refer to their messages as
//! `super::agent`, `super::health`, `super::oci`, `super::types`. [`requests`] adds short constructors for the
//! requests that address a container or process; [`memory_events`] says where StatsContainer's reply
//! carries memory.events.

/// `google.protobuf.Empty`, as the generated ttrpc code names it.
pub mod empty {
    pub use protobuf::well_known_types::empty::Empty;
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod oci {
    include!(concat!(env!("OUT_DIR"), "/protocols/oci.rs"));
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/protocols/agent.rs"));
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/protocols/agent_ttrpc.rs"));
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod types {
    include!(concat!(env!("OUT_DIR"), "/protocols/types.rs"));
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/protocols/health.rs"));
}
#[allow(clippy::all, unused_mut, unused_qualifications, nonstandard_style)]
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/protocols/health_ttrpc.rs"));
}
pub(crate) mod memory_events;
pub mod requests;
