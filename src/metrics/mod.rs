//! Metrics: collectors that read /proc, the shim's global registry, and Prometheus text handling.

pub mod agent;
pub mod exposition;
pub mod family;
pub mod guest;
pub mod overhead;
pub mod process;
pub mod registry;
pub mod scrape;
