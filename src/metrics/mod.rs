//! Collectors that read /proc ([`process`] for any pid and prefix, [`guest`] for the guest OS) and
//! Prometheus text handling ([`exposition`]). Nothing here knows the shim, the agent or the
//! monitor: they build on this.

pub mod exposition;
pub mod family;
pub mod guest;
pub mod process;
