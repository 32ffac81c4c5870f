//! Metrics: collectors that read /proc, the shim's global registry, and Prometheus text handling.

pub mod exposition;
pub mod guest;
pub mod process;
