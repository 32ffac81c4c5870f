//! The agent protocol, generated from `protos/` by build.rs.
//!
//! Each generated file becomes a sibling module: the ttrpc files refer to their messages as
//! `super::agent`, `super::health`, `super::oci`.

#![allow(
    clippy::all,
    clippy::pedantic,
    unused_mut,
    unused_qualifications,
    missing_docs,
    nonstandard_style
)]

/// `google.protobuf.Empty`, as the generated ttrpc code names it.
pub mod empty {
    pub use protobuf::well_known_types::empty::Empty;
}
pub mod oci {
    include!(concat!(env!("OUT_DIR"), "/protocols/oci.rs"));
}
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/protocols/agent.rs"));
}
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/protocols/agent_ttrpc.rs"));
}
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/protocols/health.rs"));
}
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/protocols/health_ttrpc.rs"));
}
