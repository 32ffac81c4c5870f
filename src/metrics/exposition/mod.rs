//! Prometheus text exposition (format 0.0.4): the model, and parse, validate, relabel and encode
//! (no I/O).
//!
//! The text usually comes from the guest, so parsing is strict and defensive: a bad line costs only
//! the family it belongs to (recorded in `Exposition::dropped`), whole-input limits refuse the
//! text outright, and nothing here panics on any input. `parse` groups lines into families
//! (`syntax` reads one line, `float` its value, `series` finds repeated series) and hands each
//! valid sample, borrowed from the text, to the family's [`SampleSink`]: owned [`Sample`]s, or
//! the encoded lines of `block` (what the shim and kata-monitor keep, with no allocation per
//! sample); `encode` writes families back.

pub(crate) mod block;
mod encode;
mod float;
mod parse;
#[cfg(test)]
mod round_trip;
mod series;
mod syntax;
#[cfg(test)]
pub(crate) mod test_support;

pub(crate) use encode::{encode, escape_label_value, write_value};
pub(crate) use parse::{parse, parse_with};

/// Labels only the host may set: kata-monitor appends them to every sandbox series, so neither a
/// guest nor a shim may fill them.
pub(crate) const HOST_LABELS: [&str; 4] = ["sandbox_id", "cri_uid", "cri_name", "cri_namespace"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl MetricType {
    /// The word used on `# TYPE` lines.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::Summary => "summary",
            MetricType::Untyped => "untyped",
        }
    }

    fn from_word(word: &str) -> Option<Self> {
        Some(match word {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "summary" => MetricType::Summary,
            "untyped" => MetricType::Untyped,
            _ => return None,
        })
    }

    /// Whether a sample called `sample` belongs to a family of this type called `family`.
    pub(crate) fn owns(self, family: &str, sample: &str) -> bool {
        if sample == family {
            return true;
        }
        let Some(suffix) = sample.strip_prefix(family) else {
            return false;
        };
        match self {
            MetricType::Histogram => matches!(suffix, "_bucket" | "_sum" | "_count"),
            MetricType::Summary => matches!(suffix, "_sum" | "_count"),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
    pub(crate) timestamp_ms: Option<i64>,
}

impl Sample {
    pub(crate) fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl From<&SampleRef<'_, '_>> for Sample {
    fn from(s: &SampleRef<'_, '_>) -> Self {
        Sample {
            name: s.name.to_string(),
            labels: s
                .labels
                .iter()
                .map(|l| (l.name.to_string(), l.value().into_owned()))
                .collect(),
            value: s.value,
            timestamp_ms: s.timestamp_ms,
        }
    }
}

/// A label as the text holds it: the value is still escaped (`\\`, `\"`, `\n`), which is also
/// how an encoder writes it, so it can be copied to output as it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LabelRef<'t> {
    pub(crate) name: &'t str,
    pub(crate) escaped: &'t str,
}

/// A sample as the parser reads it, borrowing the text: nothing is allocated per sample until a
/// [`SampleSink`] decides what to keep.
#[derive(Debug)]
pub(crate) struct SampleRef<'t, 'l> {
    pub(crate) name: &'t str,
    pub(crate) labels: &'l [LabelRef<'t>],
    /// The label set as written, braces included (empty without one).
    pub(crate) label_text: &'t str,
    pub(crate) value: f64,
    /// The value as written.
    pub(crate) value_text: &'t str,
    pub(crate) timestamp_ms: Option<i64>,
}

impl<'t> SampleRef<'t, '_> {
    pub(crate) fn label(&self, name: &str) -> Option<&LabelRef<'t>> {
        self.labels.iter().find(|l| l.name == name)
    }

    /// The label set as written when it is written as an encoder writes it (`{a="b",c="d"}`, no
    /// blanks), so it can be copied or hashed whole; `None` without labels or with blanks.
    pub(crate) fn compact_label_text(&self) -> Option<&'t str> {
        let encoded: usize = self
            .labels
            .iter()
            .map(|l| l.name.len() + l.escaped.len() + 4)
            .sum();
        (!self.labels.is_empty() && self.label_text.len() == encoded + 1).then_some(self.label_text)
    }

    /// The value as written when it is an integer written as [`write_value`] writes it.
    pub(crate) fn plain_integer_text(&self) -> Option<&'t str> {
        let digits = self.value_text.strip_prefix('-').unwrap_or(self.value_text);
        let plain = (1..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (!digits.starts_with('0') || self.value_text == "0");
        plain.then_some(self.value_text)
    }
}

/// Where the parser puts the samples of one family: owned [`Sample`]s (`Vec<Sample>`), or a
/// compact form of the caller's own (kata-monitor keeps encoded lines).
pub(crate) trait SampleSink {
    /// Keeps one valid sample; an error drops the whole family with that reason.
    fn push(&mut self, sample: &SampleRef<'_, '_>) -> Result<(), String>;
    fn is_empty(&self) -> bool;
    /// The sample names held (each at least once).
    fn names(&self) -> impl Iterator<Item = &str>;
    /// Replaces the name prefix `from` with `to` on every sample that has it.
    fn rename_prefix(&mut self, from: &str, to: &str);
    /// The family is complete and kept.
    fn done(&mut self) {}
    /// The first of [`HOST_LABELS`] that a sample carries, if any does.
    fn host_label(&self) -> Option<&'static str>;
}

impl SampleSink for Vec<Sample> {
    fn push(&mut self, sample: &SampleRef<'_, '_>) -> Result<(), String> {
        Vec::push(self, Sample::from(sample));
        Ok(())
    }

    fn is_empty(&self) -> bool {
        <[Sample]>::is_empty(self)
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|s| s.name.as_str())
    }

    fn rename_prefix(&mut self, from: &str, to: &str) {
        for sample in self {
            if let Some(rest) = sample.name.strip_prefix(from) {
                sample.name = format!("{to}{rest}");
            }
        }
    }

    fn host_label(&self) -> Option<&'static str> {
        HOST_LABELS
            .into_iter()
            .find(|host| self.iter().any(|s| s.label(host).is_some()))
    }
}

/// A family: name, HELP, TYPE and its samples, as owned [`Sample`]s unless the parser was given
/// another [`SampleSink`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Family<S = Vec<Sample>> {
    pub(crate) name: String,
    pub(crate) help: String,
    pub(crate) kind: MetricType,
    pub(crate) samples: S,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: usize,
    pub(crate) max_samples: usize,
    pub(crate) max_labels_per_sample: usize,
    pub(crate) max_label_value_bytes: usize,
    pub(crate) max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_samples: 20000,
            max_labels_per_sample: 32,
            max_label_value_bytes: 1024,
            max_name_bytes: 256,
        }
    }
}

impl Limits {
    /// For reading again text that was accepted once (stored lines, a series seen before): no
    /// size can refuse it now.
    pub(crate) fn unbounded() -> Self {
        Self {
            max_bytes: usize::MAX,
            max_samples: usize::MAX,
            max_labels_per_sample: usize::MAX,
            max_label_value_bytes: usize::MAX,
            max_name_bytes: usize::MAX,
        }
    }
}

/// A family left out of the result, and why.
#[derive(Debug, Clone)]
pub(crate) struct Dropped {
    pub(crate) family: String,
    pub(crate) reason: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Exposition<S = Vec<Sample>> {
    pub(crate) families: Vec<Family<S>>,
    pub(crate) dropped: Vec<Dropped>,
}

impl<S> Default for Exposition<S> {
    fn default() -> Self {
        Exposition {
            families: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

/// Refusals of the whole input; everything finer-grained is a [`Dropped`] family.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExpositionError {
    #[error("exposition text too large: {size} bytes > {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("exposition text has more than {limit} samples")]
    TooManySamples { limit: usize },
}

impl<S: SampleSink> Family<S> {
    /// Replaces the name prefix `from` with `to` on the family and its samples.
    pub(crate) fn rename_prefix(&mut self, from: &str, to: &str) -> bool {
        let Some(rest) = self.name.strip_prefix(from) else {
            return false;
        };
        self.name = format!("{to}{rest}");
        self.samples.rename_prefix(from, to);
        true
    }

    /// Whether the family's name or one of its sample names is longer than `max` bytes.
    pub(crate) fn name_longer_than(&self, max: usize) -> bool {
        self.name.len() > max || self.samples.names().any(|name| name.len() > max)
    }
}

/// Equality that treats NaN as equal to NaN (PartialEq on f64 does not): the round-trip check of
/// the exposition tests and of the fuzz targets.
pub(crate) fn same_families(a: &[Family], b: &[Family]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.help == y.help
                && x.kind == y.kind
                && x.samples.len() == y.samples.len()
                && x.samples.iter().zip(&y.samples).all(|(s, t)| {
                    s.name == t.name
                        && s.labels == t.labels
                        && s.timestamp_ms == t.timestamp_ms
                        && (s.value.to_bits() == t.value.to_bits()
                            || (s.value.is_nan() && t.value.is_nan()))
                })
        })
}

#[cfg(test)]
mod tests {
    use super::test_support::{family, sample};
    use super::*;

    #[test]
    fn relabel_helpers() {
        let mut f = family(
            "go_gc_seconds",
            MetricType::Summary,
            vec![
                sample("go_gc_seconds", &[("quantile", "0.5")], 1.0),
                sample("go_gc_seconds_sum", &[], 1.0),
            ],
        );
        assert!(!f.rename_prefix("process_", "kata_agent_process_"));
        assert!(f.rename_prefix("go_", "kata_agent_go_"));
        assert_eq!(f.name, "kata_agent_go_gc_seconds");
        assert_eq!(f.samples[1].name, "kata_agent_go_gc_seconds_sum");
        assert_eq!(f.samples.host_label(), None);
        f.samples[1].labels.push(("cri_uid".into(), "u".into()));
        assert_eq!(
            f.samples.host_label(),
            Some("cri_uid"),
            "one sample with the label is enough"
        );
        assert_eq!(f.samples[1].label("quantile"), None);
    }
}
