//! Turns a sandbox's parsed families into the blocks kept for a scrape, and merges every
//! sandbox's blocks by family name (the lines themselves are kept and written by `block`).

use std::collections::BTreeMap;

use crate::metrics::exposition::block::{BlockLines, FamilyBlock};
use crate::metrics::exposition::{escape_label_value, Family, Limits, MetricType};

/// Shim families renamed on the way through (the shim serves its own `process_*` unprefixed).
const SHIM_RENAMES: [(&str, &str); 1] = [("process_", "kata_shim_process_")];
/// Names only the monitor itself may use.
const RESERVED_PREFIX: &str = "kata_monitor_";

/// What one sandbox contributed to a scrape.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ShimBody {
    /// Sorted by name, one block per name.
    pub(crate) families: Vec<FamilyBlock>,
}

/// Builds a sandbox's blocks from its parsed families: `process_*` renamed, reserved or repeated
/// families dropped, and those whose series became one without host labels. Returns the body and
/// how many families were dropped.
pub(crate) fn shim_body(families: Vec<Family<BlockLines>>) -> (ShimBody, usize) {
    let total = families.len();
    let max_name = Limits::default().max_name_bytes;
    let blocks = families.into_iter().filter_map(|mut family| {
        for (from, to) in SHIM_RENAMES {
            family.rename_prefix(from, to);
        }
        // A name the rename made longer than a strict reader's (our parser's) limit: it would
        // drop it.
        let refused = family.name.starts_with(RESERVED_PREFIX)
            || family.name_longer_than(max_name)
            || family.samples.merged_series();
        (!refused).then_some(family)
    });
    body_of(blocks, total)
}

/// The prefix of every cAdvisor family: the only ones a shim's `/metrics/cadvisor` may serve.
pub(crate) const CADVISOR_PREFIX: &str = "container_";

/// Builds a sandbox's `/metrics/cadvisor` blocks: labels as the shim wrote them (kubelet's, no
/// host labels added, none of the host labels kept), repeated families dropped.
pub(crate) fn cadvisor_body(families: Vec<Family<BlockLines>>) -> (ShimBody, usize) {
    let total = families.len();
    let blocks = families
        .into_iter()
        .filter(|family| !family.samples.merged_series());
    body_of(blocks, total)
}

/// Sorts the blocks by name, keeps the first of each name, and counts what was left out of `total`.
fn body_of(blocks: impl Iterator<Item = FamilyBlock>, total: usize) -> (ShimBody, usize) {
    let mut families: Vec<FamilyBlock> = blocks.collect();
    families.sort_by(|a, b| a.name.cmp(&b.name));
    families.dedup_by(|later, first| later.name == first.name);
    // Collected in place from the parser's vector, which grew by doubling: hundreds of bodies
    // live until the answer is written.
    families.shrink_to_fit();
    let dropped = total - families.len();
    (ShimBody { families }, dropped)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::block::test_support::{block_of, blocks_of};
    use crate::metrics::exposition::test_support::{family, sample};
    use crate::metrics::exposition::write_value;

    #[test]
    fn host_labels_are_appended_and_replace_any_the_shim_set() {
        let (body, _) = shim_body(blocks_of(vec![family(
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
        )]));
        let block = &body.families[0];
        let host = host_labels(
            "sb1",
            &[("cri_uid", "u"), ("cri_name", ""), ("cri_namespace", "ns")],
        );
        let mut out = String::new();
        block.samples.write_lines(&host, &mut out);
        assert_eq!(
            out,
            "kata_guest_load{item=\"a\\\"b\",sandbox_id=\"sb1\",cri_uid=\"u\",cri_namespace=\"ns\"} 1.5\n\
             kata_guest_load{sandbox_id=\"sb1\",cri_uid=\"u\",cri_namespace=\"ns\"} 2\n"
        );
        let mut bare = String::new();
        block.samples.write_lines("", &mut bare);
        assert_eq!(
            bare,
            "kata_guest_load{item=\"a\\\"b\"} 1.5\nkata_guest_load 2\n"
        );
    }

    #[test]
    fn shim_process_families_are_renamed_and_reserved_ones_dropped() {
        let (body, dropped) = shim_body(blocks_of(vec![
            family(
                "process_cpu_seconds_total",
                MetricType::Counter,
                vec![sample("process_cpu_seconds_total", &[], 3.0)],
            ),
            family("kata_monitor_scrape_count", MetricType::Counter, vec![]),
            family("kata_shim_fds", MetricType::Gauge, vec![]),
            // The same name once renamed: the first one (in name order) is kept.
            family(
                "kata_shim_process_cpu_seconds_total",
                MetricType::Gauge,
                vec![],
            ),
        ]));
        let names: Vec<&str> = body.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["kata_shim_fds", "kata_shim_process_cpu_seconds_total"]
        );
        assert_eq!(dropped, 2);
        let mut out = String::new();
        body.families[1].samples.write_lines("", &mut out);
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
        let (body, dropped) = shim_body(blocks_of(vec![
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
        ]));
        let names: Vec<&str> = body.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["kata_guest_ok"]);
        assert_eq!(dropped, 1);
        let (body, dropped) = cadvisor_body(blocks_of(vec![family(
            "container_x",
            MetricType::Gauge,
            vec![
                sample("container_x", &[("cri_name", "a")], 1.0),
                sample("container_x", &[("cri_name", "b")], 1.0),
            ],
        )]));
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
        let (body, dropped) = shim_body(blocks_of(families));
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
