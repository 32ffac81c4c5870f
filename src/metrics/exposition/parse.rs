//! The strict parser: groups sample lines into families, applies HELP/TYPE lines, the per-type
//! rules and the limits, and drops a bad family whole (as a [`Dropped`] with its reason).

use std::collections::HashMap;

use super::float::parse_float;
use super::series::{series_text, SeriesIndex};
use super::syntax::{
    clip, is_metric_name, parse_sample, skip_blanks, split_metric_name, split_token, unescape_help,
};
use super::{
    Dropped, Exposition, ExpositionError, Family, LabelRef, Limits, MetricType, SampleRef,
    SampleSink,
};

/// Parses exposition text, keeping every valid family and dropping each invalid one whole.
pub(crate) fn parse(text: &str, limits: &Limits) -> Result<Exposition, ExpositionError> {
    parse_with(text, limits, &Vec::new)
}

/// [`parse`], with each family's samples kept in a sink made by `new_sink`.
pub(crate) fn parse_with<S: SampleSink>(
    text: &str,
    limits: &Limits,
    new_sink: &dyn Fn() -> S,
) -> Result<Exposition<S>, ExpositionError> {
    if text.len() > limits.max_bytes {
        return Err(ExpositionError::TooLarge {
            size: text.len(),
            limit: limits.max_bytes,
        });
    }
    let mut parser = Parser::new(limits, new_sink);
    for (i, line) in text.split('\n').enumerate() {
        parser.line(i + 1, line)?;
    }
    Ok(parser.finish())
}

/// A family being read; becomes a [`Slot`] when the next family starts.
struct Builder<S> {
    name: String,
    help: Option<String>,
    kind: Option<MetricType>,
    samples: S,
    /// First problem found; the family is dropped with this reason.
    error: Option<String>,
    /// Set when this is a later, non-contiguous part of a family already in `slots`.
    earlier: Option<usize>,
}

impl<S> Builder<S> {
    fn kind(&self) -> MetricType {
        self.kind.unwrap_or(MetricType::Untyped)
    }
}

/// Records the first problem and frees the samples: the family is lost anyway.
fn fail<S: SampleSink>(b: &mut Builder<S>, new_sink: &dyn Fn() -> S, reason: String) {
    if b.error.is_none() {
        b.error = Some(reason);
        b.samples = new_sink();
    }
}

enum Slot<S> {
    Kept(Family<S>),
    Dropped(Dropped),
}

struct Parser<'t, 'l, S> {
    limits: &'l Limits,
    new_sink: &'l dyn Fn() -> S,
    /// Finished families (and unattributable bad lines) in input order.
    slots: Vec<Slot<S>>,
    /// Finished family name -> (slot, type), to catch families that come back later.
    finished: HashMap<String, (usize, MetricType)>,
    current: Option<Builder<S>>,
    series: SeriesIndex<'t>,
    /// The labels of the line being read (reused: no allocation per sample).
    labels: Vec<LabelRef<'t>>,
    samples_seen: usize,
}

impl<'t, 'l, S: SampleSink> Parser<'t, 'l, S> {
    fn new(limits: &'l Limits, new_sink: &'l dyn Fn() -> S) -> Self {
        Parser {
            limits,
            new_sink,
            slots: Vec::new(),
            finished: HashMap::new(),
            current: None,
            series: SeriesIndex::default(),
            labels: Vec::new(),
            samples_seen: 0,
        }
    }

    fn line(&mut self, n: usize, line: &'t str) -> Result<(), ExpositionError> {
        let line = skip_blanks(line);
        if line.is_empty() {
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix('#') {
            self.comment(n, comment);
            return Ok(());
        }
        self.samples_seen += 1;
        if self.samples_seen > self.limits.max_samples {
            return Err(ExpositionError::TooManySamples {
                limit: self.limits.max_samples,
            });
        }
        self.sample(n, line);
        Ok(())
    }

    /// `# HELP`/`# TYPE` lines; any other comment is ignored.
    fn comment(&mut self, n: usize, comment: &str) {
        let comment = skip_blanks(comment);
        let (keyword, rest) = split_token(comment);
        if keyword != "HELP" && keyword != "TYPE" {
            return;
        }
        let (name, rest) = split_token(skip_blanks(rest));
        if !is_metric_name(name) {
            self.stray(n, name, format!("invalid metric name in # {keyword} line"));
            return;
        }
        let is_current = matches!(&self.current, Some(b) if b.name == name);
        if !is_current {
            self.start(n, name.to_string(), name);
        }
        let Some(builder) = self.current.as_mut() else {
            return;
        };
        let new_sink = self.new_sink;
        if name.len() > self.limits.max_name_bytes {
            fail(
                builder,
                new_sink,
                format!("line {n}: metric name longer than limit"),
            );
            return;
        }
        let rest = skip_blanks(rest);
        let problem = if keyword == "HELP" {
            set_help(builder, n, rest)
        } else {
            set_type(builder, n, rest)
        };
        if let Err(reason) = problem {
            fail(builder, new_sink, reason);
        }
    }

    fn sample(&mut self, n: usize, line: &'t str) {
        let (name, rest) = match split_metric_name(line) {
            Ok(split) => split,
            Err(token) => {
                self.stray(n, token, "invalid metric name".to_string());
                return;
            }
        };
        let owned = matches!(&self.current, Some(b) if b.kind().owns(&b.name, name));
        if !owned {
            // A sample outside any declared family forms its own untyped family.
            self.start(n, name.to_string(), name);
        }
        // `start` always leaves a current family; the `else` only avoids an unwrap.
        let Some(builder) = self.current.as_mut() else {
            return;
        };
        if builder.error.is_some() {
            return;
        }
        let problem = parse_sample(name, rest, self.limits, &mut self.labels).and_then(|sample| {
            check_sample(builder, &sample)?;
            if !self.series.is_new(&sample, (name, rest)) {
                return Err(format!("duplicate series {}", series_text(&sample)));
            }
            builder.samples.push(&sample)
        });
        if let Err(why) = problem {
            fail(builder, self.new_sink, format!("line {n}: {why}"));
        }
    }

    /// Finishes the current family and starts `family`, first seen at line `n` via `seen_as`.
    fn start(&mut self, n: usize, family: String, seen_as: &str) {
        self.finish_current();
        let earlier = self.earlier_family(seen_as);
        if let Some(slot) = earlier {
            self.reappeared(slot, n, seen_as);
        }
        self.series.clear();
        self.current = Some(Builder {
            name: family,
            help: None,
            kind: None,
            samples: (self.new_sink)(),
            error: None,
            earlier,
        });
    }

    /// The finished family that a name belongs to, if any (`x_count` belongs to histogram `x`).
    fn earlier_family(&self, name: &str) -> Option<usize> {
        if let Some((slot, _)) = self.finished.get(name) {
            return Some(*slot);
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))?;
        match self.finished.get(base) {
            Some((slot, kind)) if kind.owns(base, name) => Some(*slot),
            _ => None,
        }
    }

    /// Drops a family that shows up again after other families (once, keeping its first reason).
    fn reappeared(&mut self, slot: usize, n: usize, name: &str) {
        if let Some(Slot::Kept(family)) = self.slots.get(slot) {
            let drop = Dropped {
                family: family.name.clone(),
                reason: format!(
                    "line {n}: {name} appears again after other families (not contiguous)"
                ),
            };
            self.slots[slot] = Slot::Dropped(drop);
        }
    }

    fn finish_current(&mut self) {
        let Some(b) = self.current.take() else {
            return;
        };
        if b.earlier.is_some() {
            // Its first part was already dropped in `reappeared`.
            return;
        }
        let kind = b.kind();
        self.finished
            .insert(b.name.clone(), (self.slots.len(), kind));
        let slot = match b.error {
            Some(reason) => Slot::Dropped(Dropped {
                family: b.name,
                reason,
            }),
            None => {
                let mut samples = b.samples;
                samples.done();
                Slot::Kept(Family {
                    name: b.name,
                    help: b.help.unwrap_or_default(),
                    kind,
                    samples,
                })
            }
        };
        self.slots.push(slot);
    }

    /// A bad line that names no usable family: dropped on its own, the current family goes on.
    fn stray(&mut self, n: usize, token: &str, why: String) {
        self.slots.push(Slot::Dropped(Dropped {
            family: clip(token, self.limits.max_name_bytes).to_string(),
            reason: format!("line {n}: {why}"),
        }));
    }

    fn finish(mut self) -> Exposition<S> {
        self.finish_current();
        let mut out = Exposition::default();
        for slot in self.slots {
            match slot {
                Slot::Kept(family) => out.families.push(family),
                Slot::Dropped(drop) => out.dropped.push(drop),
            }
        }
        out
    }
}

fn set_help<S>(b: &mut Builder<S>, n: usize, text: &str) -> Result<(), String> {
    if b.help.is_some() {
        return Err(format!("line {n}: second HELP line for {}", b.name));
    }
    let help = unescape_help(text).map_err(|why| format!("line {n}: {why}"))?;
    b.help = Some(help);
    Ok(())
}

fn set_type<S: SampleSink>(b: &mut Builder<S>, n: usize, rest: &str) -> Result<(), String> {
    let word = rest.trim_end_matches([' ', '\t']);
    if b.kind.is_some() {
        Err(format!("line {n}: second TYPE line for {}", b.name))
    } else if !b.samples.is_empty() {
        Err(format!("line {n}: TYPE line after samples of {}", b.name))
    } else {
        let kind = MetricType::from_word(word)
            .ok_or_else(|| format!("line {n}: unknown TYPE {:?}", clip(word, 32)))?;
        b.kind = Some(kind);
        Ok(())
    }
}

/// Type-specific rules: histogram buckets need `le`, summary quantiles need `quantile`.
fn check_sample<S>(b: &Builder<S>, sample: &SampleRef<'_, '_>) -> Result<(), String> {
    let needed = match b.kind() {
        MetricType::Histogram if sample.name == b.name => {
            return Err(format!(
                "histogram sample {} lacks a _bucket/_sum/_count suffix",
                sample.name
            ))
        }
        MetricType::Histogram if sample.name.ends_with("_bucket") => Some("le"),
        MetricType::Summary if sample.name == b.name => Some("quantile"),
        _ => None,
    };
    if let Some(label) = needed {
        let Some(found) = sample.label(label) else {
            return Err(format!("{} has no {label} label", sample.name));
        };
        let value = found.value();
        if parse_float(&value).is_none() {
            return Err(format!(
                "{label} label {:?} is not a number",
                clip(&value, 32)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::test_support::{names, parse_ok};

    #[test]
    fn histogram_and_summary_grouping() {
        let text = "\
# TYPE h histogram
h_bucket{a=\"1\",le=\"1\"} 1
h_bucket{a=\"1\",le=\"+Inf\"} 1
h_sum{a=\"1\"} 0.5
h_count{a=\"1\"} 1
h_bucket{a=\"2\",le=\"1\"} 0
h_bucket{a=\"2\",le=\"+Inf\"} 0
h_sum{a=\"2\"} 0
h_count{a=\"2\"} 0
# TYPE s summary
s{quantile=\"0.9\"} 3
s_sum 10
s_count 4
s_bucket 1
g_sum 5
g_count 1
";
        let e = parse_ok(text);
        assert!(e.dropped.is_empty(), "{:?}", e.dropped);
        assert_eq!(names(&e), ["h", "s", "s_bucket", "g_sum", "g_count"]);
        assert_eq!(e.families[0].samples.len(), 8);
        assert_eq!(e.families[1].samples.len(), 3);
        assert!(e.families[2..]
            .iter()
            .all(|f| f.kind == MetricType::Untyped));
    }

    #[test]
    fn help_and_type_metadata() {
        let text = "\
# some comment
#   HELP a  first help
# TYPE a counter
a 1

# HELP b only help, untyped
b 2
# HELP c help after samples is fine
# TYPE c gauge
c 3
#HELPER not a help line
# TYPE empty gauge
  d 4
";
        let e = parse_ok(text);
        assert!(e.dropped.is_empty(), "{:?}", e.dropped);
        assert_eq!(names(&e), ["a", "b", "c", "empty", "d"]);
        assert_eq!(e.families[0].help, "first help");
        assert_eq!(e.families[0].kind, MetricType::Counter);
        assert_eq!(e.families[1].kind, MetricType::Untyped);
        assert!(e.families[3].samples.is_empty());
        // HELP after samples of c is the first HELP of c: kept as its help.
        let e = parse_ok("c 1\n# HELP c late\n");
        assert_eq!(e.families[0].help, "late");
    }

    /// Each bad family is dropped alone; its neighbours survive.
    #[test]
    fn each_invalid_case_drops_only_its_family() {
        let cases: &[(&str, &str)] = &[
            ("bad{1a=\"x\"} 1", "label name"),
            ("bad{a-b=\"x\"} 1", "lacks '='"),
            ("bad{a=\"x\\t\"} 1", "escape"),
            ("bad{a=\"x} 1", "unterminated"),
            ("bad{a=\"x\" 1", "expected"),
            ("bad{a=x} 1", "not quoted"),
            ("bad{a\"x\"} 1", "lacks '='"),
            ("bad{a=\"x\",a=\"y\"} 1", "twice"),
            ("bad{__name__=\"x\"} 1", "reserved"),
            ("bad 1x", "invalid value"),
            ("bad", "invalid value"),
            ("bad 0x1.8", "invalid value"),
            ("bad 0xp3", "invalid value"),
            ("bad 1e400", "invalid value"),
            ("bad +-1", "invalid value"),
            ("bad infinit", "invalid value"),
            ("bad 1_000", "invalid value"),
            ("bad -NaN", "invalid value"),
            ("bad 1 2.5", "timestamp"),
            ("bad 1 2 3", "after the timestamp"),
            ("bad 1\r", "invalid value"),
            ("# TYPE bad gauge\n# TYPE bad gauge\nbad 1", "second TYPE"),
            ("# HELP bad a\n# HELP bad b\nbad 1", "second HELP"),
            ("bad 1\n# TYPE bad gauge", "TYPE line after samples"),
            ("# TYPE bad gaugehistogram\nbad 1", "unknown TYPE"),
            ("# TYPE bad\nbad 1", "unknown TYPE"),
            ("# HELP bad a\\qb\nbad 1", "escape"),
            ("# HELP bad trailing\\\nbad 1", "backslash"),
            ("bad{a=\"1\"} 1\nbad{a=\"1\"} 2", "duplicate series"),
            (
                "bad{a=\"1\",b=\"2\"} 1\nbad{b=\"2\",a=\"1\"} 2",
                "duplicate series",
            ),
            ("# TYPE bad histogram\nbad_bucket 1", "no le label"),
            (
                "# TYPE bad histogram\nbad_bucket{le=\"x\"} 1",
                "not a number",
            ),
            ("# TYPE bad histogram\nbad 1", "suffix"),
            ("# TYPE bad summary\nbad 1", "no quantile label"),
        ];
        for (i, (bad, why)) in cases.iter().enumerate() {
            let text =
                format!("# TYPE good_a gauge\ngood_a 1\n{bad}\n# TYPE good_c counter\ngood_c 2\n");
            let e = parse_ok(&text);
            assert_eq!(names(&e), ["good_a", "good_c"], "case {i}: {bad}");
            assert_eq!(e.dropped.len(), 1, "case {i}: {bad}: {:?}", e.dropped);
            assert_eq!(e.dropped[0].family, "bad", "case {i}");
            let reason = &e.dropped[0].reason;
            assert!(reason.starts_with("line "), "case {i}: {reason}");
            assert!(reason.contains(why), "case {i}: {bad}: {reason}");
        }
    }

    #[test]
    fn invalid_names_drop_only_their_line() {
        for bad in [
            "1bad 1",
            "bad-name 1",
            "{a=\"b\"} 1",
            "# TYPE 1x gauge",
            "# HELP",
        ] {
            let text = format!("good 1\n{bad}\ngood{{x=\"2\"}} 2\n");
            let e = parse_ok(&text);
            assert_eq!(names(&e), ["good"], "{bad}");
            assert_eq!(e.families[0].samples.len(), 2, "{bad}");
            assert_eq!(e.dropped.len(), 1, "{bad}");
            assert!(e.dropped[0].reason.contains("invalid metric name"), "{bad}");
        }
    }

    #[test]
    fn non_contiguous_family_is_dropped_once() {
        let e = parse_ok("x 1\ny 2\nx{a=\"b\"} 3\nz 4\nx{a=\"c\"} 5\n");
        assert_eq!(names(&e), ["y", "z"]);
        assert_eq!(e.dropped.len(), 1, "{:?}", e.dropped);
        assert_eq!(e.dropped[0].family, "x");
        assert!(e.dropped[0].reason.contains("line 3"));
        // A histogram's _count coming back after another family belongs to the histogram.
        let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\ny 2\nh_count 1\n";
        let e = parse_ok(text);
        assert_eq!(names(&e), ["y"]);
        assert_eq!(e.dropped[0].family, "h");
        // And metadata for a family seen earlier.
        let e = parse_ok("# TYPE a gauge\na 1\nb 1\n# HELP a again\n");
        assert_eq!(names(&e), ["b"]);
        assert_eq!(e.dropped.len(), 1);
    }

    #[test]
    fn limits() {
        let limits = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            parse("a 1\nb 2\nc 3\n", &limits),
            Err(ExpositionError::TooLarge {
                size: 12,
                limit: 10
            })
        ));
        let limits = Limits {
            max_samples: 2,
            ..Limits::default()
        };
        assert!(parse("a 1\n# c\nb 2\n", &limits).is_ok());
        assert!(matches!(
            parse("a 1\nb 2\nc{ 3\n", &limits),
            Err(ExpositionError::TooManySamples { limit: 2 })
        ));
        let limits = Limits {
            max_labels_per_sample: 2,
            max_label_value_bytes: 4,
            max_name_bytes: 8,
            ..Limits::default()
        };
        let text = "\
ok{a=\"1\",b=\"1234\"} 1
labels{a=\"1\",b=\"2\",c=\"3\"} 1
value{a=\"12345\"} 1
escaped{a=\"\\\\\\\\\\\\\\\\\"} 1
long_name_x 1
# TYPE longer_name gauge
lname{abcdefghi=\"1\"} 1
";
        let e = parse(text, &limits).unwrap_or_default();
        assert_eq!(names(&e), ["ok", "escaped"]);
        let reasons: Vec<&str> = e.dropped.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert!(reasons[0].contains("more than 2 labels"));
        assert!(reasons[1].contains("value longer"));
        assert!(reasons[2].contains("metric name longer"));
        assert!(reasons[3].contains("metric name longer"));
        assert!(reasons[4].contains("label name longer"));
    }
}
