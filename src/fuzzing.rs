//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and of their corpus replay
//! (`tests/fuzz_corpus.rs`, stable). Each takes arbitrary bytes, drives the code path production
//! uses on that kind of outside input, and panics when an invariant breaks; see `FUZZING.md`.
//!
//! Not an API: hidden from the docs, and its functions may change with the code they drive.

mod agent;
mod exposition;
mod monitor;
mod pod;

pub use agent::{agent_url, hvsock_reply};
pub use exposition::{agent_text, shim_body};
pub use monitor::monitor_request;
pub use pod::pod_labels;

/// The names of the targets, for the corpus replay.
pub const TARGETS: [&str; 6] = [
    "agent_text",
    "shim_body",
    "agent_url",
    "hvsock_reply",
    "pod_labels",
    "monitor_request",
];

/// Runs the target called `name` on `data`; false when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    let target: fn(&[u8]) = match name {
        "agent_text" => agent_text,
        "shim_body" => shim_body,
        "agent_url" => agent_url,
        "hvsock_reply" => hvsock_reply,
        "pod_labels" => pod_labels,
        "monitor_request" => monitor_request,
        _ => return false,
    };
    target(data);
    true
}
