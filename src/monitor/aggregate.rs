//! Turns parsed shim families into compact per-sandbox blocks and merges them by family name.
//!
//! A node can hold hundreds of sandboxes with ~1000 series each. Keeping them as parsed samples, or
//! as text with the four host labels already written into every line, would take several times
//! the size of the shims' own bodies. So each sandbox keeps its sample lines as encoded text
//! *without* host labels, plus the offset in every line where they go; the host labels are written
//! while the response is produced (see `render`).

use std::collections::{BTreeMap, HashSet};

use crate::metrics::exposition::{
    escape_label_value, write_value, Family, Limits, MetricType, Sample, HOST_LABELS,
};

/// Shim families renamed on the way through (the shim serves its own `process_*` unprefixed).
const SHIM_RENAMES: [(&str, &str); 1] = [("process_", "kata_shim_process_")];
/// Names only the monitor itself may use.
const RESERVED_PREFIX: &str = "kata_monitor_";

/// One family of one sandbox: its sample lines, ready but for the host labels.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FamilyBlock {
    pub(crate) name: String,
    pub(crate) help: String,
    pub(crate) kind: MetricType,
    /// The sample names of this family (`x`, or `x_bucket`, `x_sum`, `x_count`...), stored once:
    /// they are half of a typical body.
    names: Vec<String>,
    /// Per line: its sample name in `names`.
    name_of: Vec<u8>,
    /// Encoded sample lines without their names. Line `i` is `lines[prev..insert_i]` + host labels
    /// + the rest up to its newline: `{a="b"` ^ `} 1\n`, or ^ ` 1\n` for a line without labels.
    lines: String,
    /// Per line: where the host labels go; the top bit says the line already has labels.
    inserts: Vec<u32>,
}

const HAS_LABELS: u32 = 1 << 31;

impl FamilyBlock {
    fn new(name: String, help: String, kind: MetricType) -> Self {
        FamilyBlock {
            name,
            help,
            kind,
            names: Vec::new(),
            name_of: Vec::new(),
            lines: String::new(),
            inserts: Vec::new(),
        }
    }

    /// Adds one sample; false when the block cannot hold it (more than 256 sample names, or 2 GiB).
    fn push_sample(&mut self, sample: &Sample, strip_host_labels: bool) -> bool {
        // Samples of one name come together: try the previous line's name first.
        let last = self.name_of.last().map_or(0, |&i| i as usize);
        let same_as_last = self.names.get(last).is_some_and(|n| *n == sample.name);
        let found = if same_as_last {
            Some(last)
        } else {
            self.names.iter().position(|n| *n == sample.name)
        };
        let index = match found {
            Some(index) => index,
            None => {
                self.names.push(sample.name.clone());
                self.names.len() - 1
            }
        };
        let Ok(index) = u8::try_from(index) else {
            return false;
        };
        // A host label from a shim or guest is replaced, never repeated.
        let kept = sample
            .labels
            .iter()
            .filter(|(name, _)| !(strip_host_labels && HOST_LABELS.contains(&name.as_str())));
        let mut mark = 0;
        for (name, value) in kept {
            self.lines.push(if mark == 0 { '{' } else { ',' });
            mark = HAS_LABELS;
            self.lines.push_str(name);
            self.lines.push_str("=\"");
            escape_label_value(value, &mut self.lines);
            self.lines.push('"');
        }
        let Ok(offset) = u32::try_from(self.lines.len()) else {
            return false;
        };
        if offset & HAS_LABELS != 0 {
            return false;
        }
        self.inserts.push(offset | mark);
        self.name_of.push(index);
        if mark != 0 {
            self.lines.push('}');
        }
        self.lines.push(' ');
        write_value(sample.value, &mut self.lines);
        self.lines.push('\n');
        true
    }

    /// How many sample lines the block holds.
    pub(crate) fn len(&self) -> usize {
        self.inserts.len()
    }

    /// Blocks live until the answer is written, hundreds of sandboxes at once: no growth slack.
    fn shrink(&mut self) {
        self.lines.shrink_to_fit();
        self.inserts.shrink_to_fit();
        self.name_of.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// Writes the lines with `host` (`sandbox_id="..",...`, possibly empty) added to each.
    pub(crate) fn write_lines(&self, host: &str, out: &mut String) {
        let mut start = 0usize;
        for (&insert, &name) in self.inserts.iter().zip(&self.name_of) {
            let offset = (insert & !HAS_LABELS) as usize;
            let (Some(head), Some(rest), Some(name)) = (
                self.lines.get(start..offset),
                self.lines.get(offset..),
                self.names.get(name as usize),
            ) else {
                return;
            };
            // This line ends with its newline; the next starts after it.
            let tail_len = rest.find('\n').map_or(rest.len(), |i| i + 1);
            out.push_str(name);
            out.push_str(head);
            if !host.is_empty() {
                if insert & HAS_LABELS != 0 {
                    out.push(',');
                    out.push_str(host);
                } else {
                    out.push('{');
                    out.push_str(host);
                    out.push('}');
                }
            }
            out.push_str(&rest[..tail_len]);
            start = offset + tail_len;
        }
    }
}

/// What one sandbox contributed to a scrape.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ShimBody {
    /// Sorted by name, one block per name.
    pub(crate) families: Vec<FamilyBlock>,
}

/// Builds a sandbox's blocks from its parsed families: `process_*` renamed, host labels removed,
/// reserved or repeated families dropped. Returns the body and how many families were dropped.
pub(crate) fn shim_body(families: Vec<Family>) -> (ShimBody, usize) {
    let mut dropped = 0;
    let mut blocks: Vec<FamilyBlock> = Vec::with_capacity(families.len());
    for mut family in families {
        for (from, to) in SHIM_RENAMES {
            family.rename_prefix(from, to);
        }
        if family.name.starts_with(RESERVED_PREFIX) || renamed_too_long(&family) {
            dropped += 1;
            continue;
        }
        if merges_series_when_stripped(&family) {
            dropped += 1;
            continue;
        }
        blocks.push(block_with(&family, true));
    }
    blocks.sort_by(|a, b| a.name.cmp(&b.name));
    let before = blocks.len();
    blocks.dedup_by(|later, first| later.name == first.name);
    dropped += before - blocks.len();
    (ShimBody { families: blocks }, dropped)
}

/// The prefix of every cAdvisor family: the only ones a shim's `/metrics/cadvisor` may serve.
pub(crate) const CADVISOR_PREFIX: &str = "container_";

/// Builds a sandbox's `/metrics/cadvisor` blocks: labels as the shim wrote them (kubelet's, no
/// host labels added, none of [`HOST_LABELS`] kept), repeated families dropped.
pub(crate) fn cadvisor_body(families: Vec<Family>) -> (ShimBody, usize) {
    let total = families.len();
    let mut blocks: Vec<FamilyBlock> = families
        .iter()
        .filter(|f| !merges_series_when_stripped(f))
        .map(|f| block_with(f, true))
        .collect();
    blocks.sort_by(|a, b| a.name.cmp(&b.name));
    blocks.dedup_by(|later, first| later.name == first.name);
    let dropped = total - blocks.len();
    (ShimBody { families: blocks }, dropped)
}

/// Whether removing the host labels makes two series of `family` one (`x{sandbox_id="a"}` and
/// `x{sandbox_id="b"}`): the family is dropped then, as its lines would repeat a series.
fn merges_series_when_stripped(family: &Family) -> bool {
    let is_host = |name: &str| HOST_LABELS.contains(&name);
    let has_host = |s: &Sample| s.labels.iter().any(|(name, _)| is_host(name));
    // The common case costs one scan: nothing to strip, nothing can merge.
    if !family.samples.iter().any(has_host) {
        return false;
    }
    let mut seen = HashSet::with_capacity(family.samples.len());
    family.samples.iter().any(|sample| {
        let mut labels: Vec<(&str, &str)> = sample
            .labels
            .iter()
            .filter(|(name, _)| !is_host(name))
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        labels.sort_unstable();
        !seen.insert((sample.name.as_str(), labels))
    })
}

/// A name the rename made longer than a strict reader's (our parser's) limit: it would drop it.
fn renamed_too_long(family: &Family) -> bool {
    let max = Limits::default().max_name_bytes;
    family.name.len() > max || family.samples.iter().any(|s| s.name.len() > max)
}

/// One of the monitor's own families as a block, labels as they are.
pub(crate) fn block_of(family: &Family) -> FamilyBlock {
    block_with(family, false)
}

fn block_with(family: &Family, strip_host_labels: bool) -> FamilyBlock {
    let mut block = FamilyBlock::new(family.name.clone(), family.help.clone(), family.kind);
    for sample in &family.samples {
        if !block.push_sample(sample, strip_host_labels) {
            // Over 2 GiB in one family: the rest is left out rather than mis-encoded.
            break;
        }
    }
    block.shrink();
    block
}

/// The families of all sandboxes, merged by name: for each name (sorted), its HELP/TYPE from the
/// first sandbox that has it and every sandbox's lines in sandbox order. A sandbox whose family
/// has another type than the first one is left out of that family (counted in `conflicts`).
pub(crate) struct Merged<'a> {
    pub(crate) families: BTreeMap<&'a str, MergedFamily<'a>>,
    pub(crate) conflicts: usize,
}

pub(crate) struct MergedFamily<'a> {
    pub(crate) help: &'a str,
    pub(crate) kind: MetricType,
    /// (host labels, block) in sandbox order.
    pub(crate) parts: Vec<(&'a str, &'a FamilyBlock)>,
}

/// `sources`: (host label text, blocks) per sandbox, in output order.
pub(crate) fn merge<'a>(sources: &'a [(String, Vec<FamilyBlock>)]) -> Merged<'a> {
    let mut merged = Merged {
        families: BTreeMap::new(),
        conflicts: 0,
    };
    for (host, blocks) in sources {
        for block in blocks {
            let entry = merged
                .families
                .entry(block.name.as_str())
                .or_insert_with(|| MergedFamily {
                    help: &block.help,
                    kind: block.kind,
                    parts: Vec::new(),
                });
            if entry.kind == block.kind {
                entry.parts.push((host.as_str(), block));
            } else {
                merged.conflicts += 1;
            }
        }
    }
    drop_shadowed(&mut merged);
    merged
}

/// Leaves out a family named like the samples of a histogram or summary (`x_bucket` beside
/// histogram `x`, from one body, two sandboxes, or a rename): written after `x`, its lines would
/// read as `x`'s, and a strict reader drops `x` for coming back after another family.
fn drop_shadowed(merged: &mut Merged<'_>) {
    let shadowed: Vec<&str> = merged
        .families
        .keys()
        .copied()
        .filter(|name| {
            ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    merged
                        .families
                        .get(base)
                        .is_some_and(|family| family.kind.owns(base, name))
                })
            })
        })
        .collect();
    for name in shadowed {
        if let Some(family) = merged.families.remove(name) {
            merged.conflicts += family.parts.len();
        }
    }
}

/// `sandbox_id="..",cri_uid="..",cri_name="..",cri_namespace=".."` (empty values left out: in
/// Prometheus an empty label is no label).
pub(crate) fn host_labels(sandbox_id: &str, pod: &[(&str, &str); 3]) -> String {
    let mut out = String::with_capacity(160);
    out.push_str("sandbox_id=\"");
    escape_label_value(sandbox_id, &mut out);
    out.push('"');
    for (name, value) in pod {
        if !value.is_empty() {
            out.push(',');
            out.push_str(name);
            out.push_str("=\"");
            escape_label_value(value, &mut out);
            out.push('"');
        }
    }
    out
}

/// The monitor's own registry as families (no host labels), through the same path as the shims'.
pub(crate) fn families_of_registry(gathered: &[prometheus::proto::MetricFamily]) -> Vec<Family> {
    use prometheus::proto::MetricType as P;
    gathered
        .iter()
        .map(|mf| {
            let name = mf.name().to_string();
            let mut samples = Vec::new();
            let kind = match mf.get_field_type() {
                P::COUNTER => MetricType::Counter,
                P::GAUGE => MetricType::Gauge,
                P::HISTOGRAM => MetricType::Histogram,
                P::SUMMARY => MetricType::Summary,
                P::UNTYPED => MetricType::Untyped,
            };
            for metric in mf.get_metric() {
                let labels: Vec<(String, String)> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                let sample = |suffix: &str, extra: Option<(&str, String)>, value: f64| {
                    let mut labels = labels.clone();
                    if let Some((k, v)) = extra {
                        labels.push((k.to_string(), v));
                    }
                    Sample {
                        name: format!("{name}{suffix}"),
                        labels,
                        value,
                        timestamp_ms: None,
                    }
                };
                match kind {
                    MetricType::Counter => samples.push(sample("", None, metric.counter.value())),
                    MetricType::Gauge => samples.push(sample("", None, metric.gauge.value())),
                    MetricType::Untyped => samples.push(sample("", None, metric.untyped.value())),
                    MetricType::Histogram => {
                        let h = metric.get_histogram();
                        let mut saw_inf = false;
                        for b in h.get_bucket() {
                            let mut le = String::new();
                            write_value(b.upper_bound(), &mut le);
                            saw_inf |= b.upper_bound().is_infinite();
                            samples.push(sample(
                                "_bucket",
                                Some(("le", le)),
                                b.cumulative_count() as f64,
                            ));
                        }
                        if !saw_inf {
                            samples.push(sample(
                                "_bucket",
                                Some(("le", "+Inf".into())),
                                h.get_sample_count() as f64,
                            ));
                        }
                        samples.push(sample("_sum", None, h.get_sample_sum()));
                        samples.push(sample("_count", None, h.get_sample_count() as f64));
                    }
                    MetricType::Summary => {
                        let s = metric.get_summary();
                        for q in s.get_quantile() {
                            let mut quantile = String::new();
                            write_value(q.quantile(), &mut quantile);
                            samples.push(sample("", Some(("quantile", quantile)), q.value()));
                        }
                        samples.push(sample("_sum", None, s.sample_sum()));
                        samples.push(sample("_count", None, s.sample_count() as f64));
                    }
                }
            }
            Family {
                name,
                help: mf.help().to_string(),
                kind,
                samples,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::test_support::{family, sample};

    #[test]
    fn host_labels_are_appended_and_replace_any_the_shim_set() {
        let (body, _) = shim_body(vec![family(
            "kata_guest_load",
            MetricType::Gauge,
            vec![
                sample(
                    "kata_guest_load",
                    &[("item", "a\"b"), ("sandbox_id", "forged")],
                    1.5,
                ),
                sample("kata_guest_load", &[], 2.0),
            ],
        )]);
        let block = &body.families[0];
        let host = host_labels(
            "sb1",
            &[("cri_uid", "u"), ("cri_name", ""), ("cri_namespace", "ns")],
        );
        let mut out = String::new();
        block.write_lines(&host, &mut out);
        assert_eq!(
            out,
            "kata_guest_load{item=\"a\\\"b\",sandbox_id=\"sb1\",cri_uid=\"u\",cri_namespace=\"ns\"} 1.5\n\
             kata_guest_load{sandbox_id=\"sb1\",cri_uid=\"u\",cri_namespace=\"ns\"} 2\n"
        );
        let mut bare = String::new();
        block.write_lines("", &mut bare);
        assert_eq!(
            bare,
            "kata_guest_load{item=\"a\\\"b\"} 1.5\nkata_guest_load 2\n"
        );
    }

    #[test]
    fn shim_process_families_are_renamed_and_reserved_ones_dropped() {
        let (body, dropped) = shim_body(vec![
            family(
                "process_cpu_seconds_total",
                MetricType::Counter,
                vec![sample("process_cpu_seconds_total", &[], 3.0)],
            ),
            family("kata_monitor_scrape_count", MetricType::Counter, vec![]),
            family("kata_shim_fds", MetricType::Gauge, vec![]),
            family("kata_shim_fds", MetricType::Gauge, vec![]),
        ]);
        let names: Vec<&str> = body.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["kata_shim_fds", "kata_shim_process_cpu_seconds_total"]
        );
        assert_eq!(dropped, 2);
        let mut out = String::new();
        body.families[1].write_lines("", &mut out);
        assert_eq!(out, "kata_shim_process_cpu_seconds_total 3\n");
    }

    #[test]
    fn merge_keeps_one_type_per_name_in_order() {
        let a = block_of(&family("x", MetricType::Gauge, vec![sample("x", &[], 1.0)]));
        let b = block_of(&family(
            "x",
            MetricType::Counter,
            vec![sample("x", &[], 2.0)],
        ));
        let c = block_of(&family("w", MetricType::Gauge, vec![sample("w", &[], 3.0)]));
        let sources = vec![
            ("sandbox_id=\"a\"".to_string(), vec![a]),
            ("sandbox_id=\"b\"".to_string(), vec![b, c]),
        ];
        let merged = merge(&sources);
        assert_eq!(merged.conflicts, 1);
        let names: Vec<&str> = merged.families.keys().copied().collect();
        assert_eq!(names, vec!["w", "x"]);
        assert_eq!(merged.families["x"].parts.len(), 1);
    }

    /// Found by the shim_body fuzz target: series told apart only by a host label would be one
    /// series twice once the monitor writes its own.
    #[test]
    fn a_family_whose_series_differ_only_in_host_labels_is_dropped() {
        let forged = |id| {
            sample(
                "kata_guest_load",
                &[("item", "1m"), ("sandbox_id", id)],
                0.5,
            )
        };
        let (body, dropped) = shim_body(vec![
            family(
                "kata_guest_load",
                MetricType::Gauge,
                vec![forged("a"), forged("b")],
            ),
            family(
                "kata_guest_ok",
                MetricType::Gauge,
                vec![sample("kata_guest_ok", &[("cri_uid", "x")], 1.0)],
            ),
        ]);
        let names: Vec<&str> = body.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["kata_guest_ok"]);
        assert_eq!(dropped, 1);
        let (body, dropped) = cadvisor_body(vec![family(
            "container_x",
            MetricType::Gauge,
            vec![
                sample("container_x", &[("cri_name", "a")], 1.0),
                sample("container_x", &[("cri_name", "b")], 1.0),
            ],
        )]);
        assert!(body.families.is_empty());
        assert_eq!(dropped, 1);
    }

    /// Found by the shim_body fuzz target: `process_*` at the name limit, renamed past it.
    #[test]
    fn a_family_the_rename_makes_too_long_is_dropped() {
        let long = format!(
            "process_{}",
            "x".repeat(Limits::default().max_name_bytes - 8)
        );
        let families = vec![
            family(&long, MetricType::Gauge, vec![sample(&long, &[], 1.0)]),
            family(
                "process_open_fds",
                MetricType::Gauge,
                vec![sample("process_open_fds", &[], 7.0)],
            ),
        ];
        let (body, dropped) = shim_body(families);
        let names: Vec<&str> = body.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["kata_shim_process_open_fds"]);
        assert_eq!(dropped, 1);
    }

    /// Found by the shim_body fuzz target: `x_bucket` of its own beside histogram `x`.
    #[test]
    fn a_family_named_like_histogram_samples_is_left_out() {
        let h = block_of(&family(
            "x",
            MetricType::Histogram,
            vec![sample("x_bucket", &[("le", "+Inf")], 1.0)],
        ));
        let shadow = block_of(&family(
            "x_bucket",
            MetricType::Untyped,
            vec![sample("x_bucket", &[], 2.0)],
        ));
        let count = block_of(&family("y_count", MetricType::Gauge, vec![]));
        let sources = vec![
            ("sandbox_id=\"a\"".to_string(), vec![h, count]),
            ("sandbox_id=\"b\"".to_string(), vec![shadow]),
        ];
        let merged = merge(&sources);
        let names: Vec<&str> = merged.families.keys().copied().collect();
        assert_eq!(names, vec!["x", "y_count"]);
        assert_eq!(merged.conflicts, 1);
    }

    #[test]
    fn values_read_back() {
        for (value, text) in [
            (1.0, "1"),
            (-2.5, "-2.5"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (1e20, "1e20"),
            (6.834512e6, "6834512"),
            (3.1217e-05, "3.1217e-5"),
        ] {
            let mut out = String::new();
            write_value(value, &mut out);
            assert_eq!(out, text);
            if !value.is_nan() {
                let back: f64 = out.replace("+Inf", "inf").parse().unwrap();
                assert_eq!(back, value);
            }
        }
    }
}
