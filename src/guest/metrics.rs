//! What the guest agent serves on GetMetrics: guest OS families, the agent's own process families
//! and its scrape counter, read at call time.

use prometheus::{IntCounter, Registry};

use crate::metrics::guest::GuestCollector;
use crate::metrics::process::{ProcessCollector, ProcessCollectorOptions, Target};
use crate::metrics::text::registry_text;

pub(crate) struct AgentMetrics {
    /// The guest OS families, written straight as text: most of the answer, and every
    /// instruction of it is emulated in a TCG guest.
    guest: GuestCollector,
    /// The agent's own families.
    registry: Registry,
    scrapes: IntCounter,
}

impl AgentMetrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(ProcessCollector::new(
            Target::SelfProcess,
            "kata_agent",
            ProcessCollectorOptions::agent(),
        )?))?;
        // Standard `process_*` families; the shim renames them to `kata_agent_process_*`.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let scrapes = IntCounter::new("kata_agent_scrape_count", "Metrics scrape count")?;
        registry.register(Box::new(scrapes.clone()))?;
        Ok(AgentMetrics {
            guest: GuestCollector::new()?,
            registry,
            scrapes,
        })
    }

    /// Counts this scrape and returns every family in text format 0.0.4.
    pub(crate) fn render(&self) -> Result<String, prometheus::Error> {
        self.scrapes.inc();
        let mut out = registry_text(&self.registry.gather())?;
        out.reserve(32 * 1024);
        self.guest.write_text(&mut out);
        Ok(out)
    }
}
