//! The shim's own metrics: the global registry and its collectors ([`registry`]), one scrape of the
//! sandbox (the registry plus the agent's checked text, [`scrape`]), the pod overhead gauges
//! ([`overhead`]), and bringing all of it up behind the management server ([`launch`]).

pub mod launch;
pub(crate) mod overhead;
pub mod registry;
pub(crate) mod scrape;
