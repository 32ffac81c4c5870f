//! Collectors that read /proc ([`process`] for any pid and prefix, [`guest`] for the guest OS) and
//! Prometheus text handling ([`exposition`]). Nothing here knows the shim, the agent or the
//! monitor: they build on this.

// Parsing and encoding text is the host's job (the shim checks the guest's text, the monitor
// merges the shims'); the guest only writes text.
#[cfg(feature = "host")]
pub mod exposition;
pub(crate) mod family;
pub(crate) mod guest;
pub(crate) mod process;
pub(crate) mod text;
