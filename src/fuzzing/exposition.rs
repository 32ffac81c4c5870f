//! The exposition parser as its two users run it: the shim on the agent's text, kata-monitor on a
//! shim's body (then relabelled, merged and rendered).

use std::sync::LazyLock;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::exposition::block::{encode_blocks, parse_blocks};
use crate::metrics::exposition::{
    self, encode, Exposition, ExpositionError, Family, Limits, HOST_LABELS,
};
use crate::monitor::aggregate::{host_labels, merge};
use crate::monitor::render::{self, ChunkSink, FamilyFilter, Format};
use crate::monitor::scrape::{parse_body, shim_body_limits};
use crate::shim::config::Config;
use crate::shim::metrics::scrape::agent_families_from;

/// Tight limits, so short inputs reach every limit branch too.
fn tight_limits() -> Limits {
    Limits {
        max_bytes: 4096,
        max_samples: 50,
        max_labels_per_sample: 3,
        max_label_value_bytes: 8,
        max_name_bytes: 12,
    }
}

/// The agent's metrics text (a protobuf string, so UTF-8) through the shim: parse under the
/// shim's limits, keep what `agent_families_from` accepts, encode it into the shim's body.
pub fn agent_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    agent_text_with(&text, &SHIM_LIMITS);
    // Short inputs also meet every limit (longer ones would only repeat the same refusals).
    if text.len() <= 1024 {
        agent_text_with(&text, &tight_limits());
    }
}

/// The shim's limits for the agent's text, as its default configuration sets them.
static SHIM_LIMITS: LazyLock<Limits> = LazyLock::new(|| Config::default().agent_text_limits());
/// kata-monitor's limits for a shim's body.
static MONITOR_LIMITS: LazyLock<Limits> = LazyLock::new(shim_body_limits);

fn agent_text_with(text: &str, limits: &Limits) {
    let parsed = parse_checked(text, limits);
    let Some(parsed) = parsed else { return };
    let total = parsed.families.len();
    let dropped_before = parsed.dropped.len();
    let (kept, dropped) = agent_families_from(
        parsed.families,
        parsed.dropped,
        MONITOR_LIMITS.max_name_bytes,
    );
    assert_eq!(kept.len() + dropped.len(), total + dropped_before);
    let mut names = std::collections::HashSet::new();
    for family in &kept {
        assert!(
            family.name.starts_with("kata_agent_") || family.name.starts_with("kata_guest_"),
            "kept a family outside the agent's namespaces: {}",
            family.name
        );
        assert!(
            names.insert(family.name.as_str()),
            "{} kept twice",
            family.name
        );
        for sample in &family.samples {
            assert!(
                sample.name.starts_with(family.name.as_str()),
                "sample {} in family {}",
                sample.name,
                family.name
            );
            for label in HOST_LABELS {
                assert!(
                    sample.label(label).is_none(),
                    "guest set host label {label}"
                );
            }
        }
    }
    // What the shim writes, kata-monitor reads under its own limits: nothing may be lost there.
    let mut body = String::new();
    encode(&kept, &mut body);
    same_body_from_blocks(text, limits, &kept);
    let back = parse_ok(&body, &MONITOR_LIMITS);
    assert!(
        back.dropped.is_empty(),
        "the monitor drops what the shim sent: {:?}\n{body}",
        back.dropped
    );
    assert_same(&kept, &back.families, &body);
}

/// The shim keeps the agent's families as lines ([`parse_blocks`]): its body must be what encoding
/// the owned families gives, sample timestamps aside (lines do not keep them).
fn same_body_from_blocks(text: &str, limits: &Limits, kept: &[Family]) {
    let Ok(parsed) = parse_blocks(text, limits, false) else {
        panic!("the lines parser refused what the owned one took");
    };
    let (blocks, _) = agent_families_from(
        parsed.families,
        parsed.dropped,
        MONITOR_LIMITS.max_name_bytes,
    );
    let mut from_blocks = String::new();
    encode_blocks(&blocks, &mut from_blocks);
    let mut untimed = kept.to_vec();
    for sample in untimed.iter_mut().flat_map(|f| f.samples.iter_mut()) {
        sample.timestamp_ms = None;
    }
    let mut expected = String::new();
    encode(&untimed, &mut expected);
    assert_eq!(from_blocks, expected, "lines and owned samples disagree");
}

/// Parses `text` and checks the limits and the round trip; `None` when the text is refused.
fn parse_checked(text: &str, limits: &Limits) -> Option<Exposition> {
    let parsed = match exposition::parse(text, limits) {
        Ok(parsed) => parsed,
        Err(ExpositionError::TooLarge { size, limit }) => {
            assert!(size > limit && size == text.len() && limit == limits.max_bytes);
            return None;
        }
        Err(ExpositionError::TooManySamples { limit }) => {
            assert_eq!(limit, limits.max_samples);
            assert!(sample_lines(text) > limit, "refused below the sample limit");
            return None;
        }
    };
    assert!(text.len() <= limits.max_bytes);
    let mut samples = 0;
    for family in &parsed.families {
        assert!(
            family.name.len() <= limits.max_name_bytes,
            "{}",
            family.name
        );
        for sample in &family.samples {
            samples += 1;
            assert!(sample.name.len() <= limits.max_name_bytes);
            assert!(sample.labels.len() <= limits.max_labels_per_sample);
            for (name, value) in &sample.labels {
                assert!(name.len() <= limits.max_name_bytes);
                assert!(value.len() <= limits.max_label_value_bytes);
            }
        }
    }
    assert!(samples <= limits.max_samples && samples <= sample_lines(text));
    // Whatever the parser keeps, the encoder writes back to the same families, and again to the
    // same text.
    let mut encoded = String::new();
    encode(&parsed.families, &mut encoded);
    let unbounded = Limits {
        max_bytes: usize::MAX,
        ..limits.clone()
    };
    let back = parse_ok(&encoded, &unbounded);
    assert!(back.dropped.is_empty(), "{:?}\n{encoded}", back.dropped);
    assert_same(&parsed.families, &back.families, &encoded);
    let mut again = String::new();
    encode(&back.families, &mut again);
    assert_eq!(encoded, again, "encoding is not stable");
    Some(parsed)
}

fn parse_ok(text: &str, limits: &Limits) -> Exposition {
    match exposition::parse(text, limits) {
        Ok(parsed) => parsed,
        Err(err) => panic!("refused: {err}\n{text}"),
    }
}

/// The lines the parser counts as samples.
fn sample_lines(text: &str) -> usize {
    text.split('\n')
        .map(|line| line.trim_start_matches([' ', '\t']))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .count()
}

/// Equal families, NaN equal to NaN (see `exposition::same_families`).
fn assert_same(a: &[Family], b: &[Family], text: &str) {
    let same = crate::metrics::exposition::same_families(a, b);
    assert!(
        same,
        "families differ after a round trip:\n{a:?}\n{b:?}\n{text}"
    );
}

/// The sandbox the body is labelled with; its pod's values need escaping.
const SANDBOX: &str = "sb-1";
const POD: [(&str, &str); 3] = [
    ("cri_uid", "u\"1\\"),
    ("cri_name", "web\n0"),
    ("cri_namespace", "ns"),
];

/// A shim's `/metrics` body through kata-monitor: `parse_body` under the monitor's limits, then
/// merged with the sandbox's host labels and rendered in both formats. (One sandbox: the parse of
/// the rendered text is most of the cost, and a second would only repeat it with another id.)
pub fn shim_body(data: &[u8]) {
    let Ok(scraped) = parse_body(data, &MONITOR_LIMITS) else {
        return;
    };
    let families = scraped.body.families;
    for pair in families.windows(2) {
        assert!(pair[0].name < pair[1].name, "blocks not sorted and unique");
    }
    for block in &families {
        assert!(!block.name.starts_with("kata_monitor_"), "{}", block.name);
        assert!(!block.name.starts_with("process_"), "{}", block.name);
    }
    let blocks = families.len();
    let sources = vec![(host_labels(SANDBOX, &POD), families)];
    let merged = merge(&sources);
    // One body has one type per name: only families shadowing another's samples are left out.
    assert_eq!(merged.conflicts, blocks - merged.families.len());
    let lines: usize = merged
        .families
        .values()
        .flat_map(|family| &family.parts)
        .map(|(_, block)| block.samples.len())
        .sum();

    let text = rendered(&merged, Format::Text);
    // The answer goes to Prometheus: bounded by what the monitor read plus what it adds itself
    // (the `kata_shim_` of a renamed `process_*`, the host labels).
    let limits = Limits {
        max_bytes: usize::MAX,
        max_samples: usize::MAX,
        max_name_bytes: MONITOR_LIMITS.max_name_bytes + "kata_shim_".len(),
        max_labels_per_sample: MONITOR_LIMITS.max_labels_per_sample + HOST_LABELS.len(),
        ..MONITOR_LIMITS.clone()
    };
    let back = parse_ok(&text, &limits);
    assert!(back.dropped.is_empty(), "{:?}\n{text}", back.dropped);
    assert_eq!(back.families.len(), merged.families.len(), "{text}");
    let mut samples = 0;
    for family in &back.families {
        for sample in &family.samples {
            samples += 1;
            // Exactly the host's labels: none of the shim's survived, none is missing.
            assert_eq!(sample.label("sandbox_id"), Some(SANDBOX), "{sample:?}");
            for (name, value) in POD {
                assert_eq!(sample.label(name), Some(value), "{sample:?}");
            }
        }
    }
    assert_eq!(samples, lines, "{text}");

    let open = rendered(&merged, Format::OpenMetrics);
    assert!(open.ends_with("# EOF\n"));
}

fn rendered(merged: &crate::monitor::aggregate::Merged<'_>, format: Format) -> String {
    let (tx, mut rx) = mpsc::channel::<Bytes>(1 << 16);
    let mut sink = ChunkSink::new(tx, false);
    let written = render::write(merged, format, &FamilyFilter::default(), &mut sink)
        .and_then(|()| sink.finish());
    assert!(written.is_ok());
    let mut out = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        out.extend_from_slice(&chunk);
    }
    match String::from_utf8(out) {
        Ok(text) => text,
        Err(err) => panic!("rendered output is not UTF-8: {err}"),
    }
}
