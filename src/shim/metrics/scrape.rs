//! One scrape of the shim: its own registry plus the agent's text, checked before it is merged.
//!
//! The agent's text is guest data: it is size-capped and parsed strictly, its `process_*`/`go_*`
//! families are renamed to `kata_agent_*`, and a family is dropped (and counted) when it is invalid,
//! lies outside the agent's namespaces, repeats a host family, or sets a host-side label.

use std::collections::HashSet;
use std::sync::Arc;

use super::overhead::GuestUsage;
use super::registry::{
    self, AGENT_FAMILIES_DROPPED, AGENT_METRICS_ERRORS, AGENT_METRICS_UP, POD_OVERHEAD, REGISTRY,
};
use crate::agent_client::AgentClient;
use crate::metrics::exposition::block::{encode_blocks, parse_blocks, FamilyBlock};
use crate::metrics::exposition::{self, Dropped, ExpositionError, Family, Limits, SampleSink};
use crate::metrics::text::registry_text;
use crate::mgmt::server::MetricsSource;
use crate::protocols::agent::GetMetricsRequest;

/// Family name prefixes the guest may fill (after renaming).
const AGENT_NAMESPACES: [&str; 2] = ["kata_agent_", "kata_guest_"];

/// The agent's standard families and what the shim calls them.
const AGENT_RENAMES: [(&str, &str); 2] = [
    ("process_", "kata_agent_process_"),
    ("go_", "kata_agent_go_"),
];

pub(crate) struct ShimScraper {
    agent: Arc<AgentClient>,
    limits: Limits,
}

impl ShimScraper {
    pub(crate) fn new(agent: Arc<AgentClient>, limits: Limits) -> Self {
        ShimScraper { agent, limits }
    }

    /// The whole `/metrics` body. Never fails: without the agent it still has the host families and
    /// says so with `kata_shim_agent_metrics_up 0`.
    pub(crate) async fn render(&self) -> String {
        let request = GetMetricsRequest::new();
        let agent_text = match self.agent.get_metrics(request).await {
            Ok(reply) => Some(reply.metrics),
            Err(err) => {
                tracing::warn!(error = %err, "agent metrics are missing from this scrape");
                AGENT_METRICS_ERRORS
                    .with_label_values(&[err.reason()])
                    .inc();
                None
            }
        };
        compose(agent_text.as_deref(), &self.limits)
    }
}

/// The body from the agent's text (`None`: the agent did not answer) and the host registry.
pub(crate) fn compose(agent_text: Option<&str>, limits: &Limits) -> String {
    // Parse before gathering, so the up gauge and drop counter describe this very scrape.
    let mut agent_families = Vec::new();
    if let Some(text) = agent_text {
        // Kept as lines of text: no allocation per sample between the agent's text and ours.
        match parse_blocks(text, limits, false) {
            Ok(parsed) => {
                let (kept, dropped) =
                    agent_families_from(parsed.families, parsed.dropped, limits.max_name_bytes);
                note_dropped(&dropped);
                // A live agent always reports something: nothing usable means its text was garbage.
                if kept.is_empty() {
                    AGENT_METRICS_ERRORS
                        .with_label_values(&["invalid_text"])
                        .inc();
                    AGENT_METRICS_UP.set(0);
                } else {
                    AGENT_METRICS_UP.set(1);
                }
                agent_families = kept;
            }
            Err(err) => {
                tracing::warn!(error = %err, "agent metrics text refused");
                AGENT_METRICS_ERRORS
                    .with_label_values(&[refusal_reason(&err)])
                    .inc();
                AGENT_METRICS_UP.set(0);
            }
        }
    } else {
        AGENT_METRICS_UP.set(0);
    }

    POD_OVERHEAD.update(guest_usage(&agent_families), &registry::host_pids());
    let host = REGISTRY.gather();
    let host_names: HashSet<&str> = host.iter().map(|mf| mf.name()).collect();
    let (agent_families, collisions): (Vec<FamilyBlock>, Vec<FamilyBlock>) = agent_families
        .into_iter()
        .partition(|family| !host_names.contains(family.name.as_str()));
    if !collisions.is_empty() {
        let dropped: Vec<Dropped> = collisions
            .into_iter()
            .map(|family| Dropped {
                reason: format!("family {} repeats a host family", family.name),
                family: family.name,
            })
            .collect();
        note_dropped(&dropped);
    }

    let mut out = registry_text(&host).unwrap_or_else(|err| {
        tracing::error!(error = %err, "encoding the shim's own metrics");
        String::new()
    });
    encode_blocks(&agent_families, &mut out);
    out
}

/// The guest's CPU and memory for the pod overhead, read back from the two agent families that
/// hold them.
fn guest_usage(agent_families: &[FamilyBlock]) -> Option<GuestUsage> {
    let mut text = String::new();
    for family in agent_families
        .iter()
        .filter(|f| f.name == "kata_guest_cpu_time" || f.name == "kata_guest_meminfo")
    {
        family.samples.write_lines("", &mut text);
    }
    let parsed = exposition::parse(&text, &Limits::default()).ok()?;
    GuestUsage::from_families(&parsed.families)
}

#[async_trait::async_trait]
impl MetricsSource for ShimScraper {
    async fn render(&self) -> String {
        ShimScraper::render(self).await
    }
}

/// Keeps the agent families the host accepts (renamed where needed) and lists the refused ones.
/// `max_name_bytes` bounds names after renaming too: kata-monitor would drop a longer one.
pub(crate) fn agent_families_from<S: SampleSink>(
    families: Vec<Family<S>>,
    mut dropped: Vec<Dropped>,
    max_name_bytes: usize,
) -> (Vec<Family<S>>, Vec<Dropped>) {
    let mut kept = Vec::with_capacity(families.len());
    let mut seen = HashSet::new();
    for mut family in families {
        for (from, to) in AGENT_RENAMES {
            if family.rename_prefix(from, to) {
                break;
            }
        }
        let refusal = if !AGENT_NAMESPACES
            .iter()
            .any(|ns| family.name.starts_with(ns))
        {
            Some(format!(
                "family {} is outside the agent's namespaces (kata_agent_*, kata_guest_*)",
                family.name
            ))
        } else if family.name_longer_than(max_name_bytes) {
            Some(format!(
                "family {} is longer than {max_name_bytes} bytes after renaming",
                family.name
            ))
        } else if let Some(label) = family.samples.host_label() {
            Some(format!(
                "family {} sets the host-side label {label}",
                family.name
            ))
        } else if !seen.insert(family.name.clone()) {
            Some(format!(
                "family {} appears twice after renaming",
                family.name
            ))
        } else {
            None
        };
        match refusal {
            Some(reason) => dropped.push(Dropped {
                family: family.name,
                reason,
            }),
            None => kept.push(family),
        }
    }
    (kept, dropped)
}

fn note_dropped(dropped: &[Dropped]) {
    if dropped.is_empty() {
        return;
    }
    AGENT_FAMILIES_DROPPED.inc_by(dropped.len() as u64);
    for drop in dropped {
        tracing::debug!(family = %drop.family, reason = %drop.reason, "agent metric family dropped");
    }
}

fn refusal_reason(err: &ExpositionError) -> &'static str {
    match err {
        ExpositionError::TooLarge { .. } => "too_large",
        _ => "invalid_text",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::test_support::{family, sample};
    use crate::metrics::exposition::MetricType;

    /// Found by the shim_body fuzz target's twin check (a renamed name past the limit): the shim
    /// kept `process_<245 bytes>` as `kata_agent_process_<245 bytes>`, which kata-monitor dropped.
    #[test]
    fn a_name_too_long_after_renaming_is_refused_here() {
        let long = format!("process_{}", "x".repeat(240));
        let fits = format!("kata_guest_{}", "y".repeat(245));
        let (kept, dropped) = agent_families_from(
            vec![
                family(&long, MetricType::Gauge, vec![sample(&long, &[], 1.0)]),
                family(&fits, MetricType::Gauge, vec![sample(&fits, &[], 1.0)]),
            ],
            Vec::new(),
            256,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].name, fits);
        assert!(dropped[0].reason.contains("after renaming"), "{dropped:?}");
    }
}
