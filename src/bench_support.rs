//! Entry points for the benchmarks (`benches/`): the pieces of a scrape that they time in process.
//!
//! Not an API: hidden from the docs, and its functions may change with the code they drive.

use crate::metrics::exposition::Limits;

/// The guest agent's GetMetrics work without the transport: read /proc, encode the text.
pub struct AgentRender(crate::guest::metrics::AgentMetrics);

impl AgentRender {
    pub fn new() -> Result<Self, prometheus::Error> {
        crate::guest::metrics::AgentMetrics::new().map(AgentRender)
    }

    /// One GetMetrics answer's text, as the agent would send it.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        self.0.render()
    }
}

/// The shim's work on one scrape once the agent's text is in: check and rename the agent's
/// families, gather and encode the host registry, write the body.
pub fn shim_compose(agent_text: &str) -> String {
    crate::shim::metrics::scrape::compose(Some(agent_text), &Limits::default())
}
