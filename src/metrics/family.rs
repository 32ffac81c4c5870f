//! Gauge families built by hand, for collectors that read /proc at scrape time.

use std::collections::HashMap;

use prometheus::core::Desc;
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::text::{escape_into, write_header, write_value};

/// One gauge family a collector may produce: its descriptor (checked once, at registration) and the
/// label names its samples carry, in order.
pub(crate) struct GaugeSpec {
    pub(crate) desc: Desc,
    pub(crate) labels: &'static [&'static str],
}

impl GaugeSpec {
    pub(crate) fn new(
        name: &str,
        help: &str,
        labels: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            HashMap::new(),
        )?;
        Ok(GaugeSpec { desc, labels })
    }

    /// An empty family of this kind, to be filled with [`GaugeFamily::add`].
    pub(crate) fn family(&self) -> GaugeFamily<'_> {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::GAUGE);
        GaugeFamily {
            spec: self,
            out: Out::Proto(family),
        }
    }

    /// A family written straight to `out` as text format 0.0.4 (HELP and TYPE come with the first
    /// sample; a family without samples writes nothing, as the registry leaves it out).
    pub(crate) fn text_family<'a>(&'a self, out: &'a mut String) -> GaugeFamily<'a> {
        GaugeFamily {
            spec: self,
            out: Out::Text {
                out,
                started: false,
            },
        }
    }

    /// The family with one unlabelled sample.
    pub(crate) fn single(&self, value: f64) -> MetricFamily {
        let mut family = self.family();
        family.add(&[], value);
        family.finish()
    }
}

enum Out<'a> {
    Proto(MetricFamily),
    /// Text, without building the protobuf (the agent's GetMetrics: emulated in a TCG guest).
    Text {
        out: &'a mut String,
        started: bool,
    },
}

pub(crate) struct GaugeFamily<'a> {
    spec: &'a GaugeSpec,
    out: Out<'a>,
}

impl GaugeFamily<'_> {
    /// Adds a sample; `values` follow the spec's label names, in order.
    pub(crate) fn add(&mut self, values: &[&str], value: f64) {
        let spec = self.spec;
        match &mut self.out {
            Out::Proto(family) => {
                let labels = spec
                    .labels
                    .iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(name.to_string());
                        pair.set_value(value.to_string());
                        pair
                    })
                    .collect();
                let mut gauge = Gauge::default();
                gauge.set_value(value);
                let mut metric = Metric::from_gauge(gauge);
                metric.set_label(labels);
                family.mut_metric().push(metric);
            }
            Out::Text { out, started } => {
                let name = &spec.desc.fq_name;
                if !*started {
                    *started = true;
                    write_header(name, &spec.desc.help, "gauge", out);
                }
                out.push_str(name);
                for (i, (label, value)) in spec.labels.iter().zip(values).enumerate() {
                    out.push(if i == 0 { '{' } else { ',' });
                    out.push_str(label);
                    out.push_str("=\"");
                    escape_into(value, true, out);
                    out.push('"');
                }
                if !spec.labels.is_empty() && !values.is_empty() {
                    out.push('}');
                }
                out.push(' ');
                write_value(value, out);
                out.push('\n');
            }
        }
    }

    /// The protobuf family (empty for a family written as text).
    pub(crate) fn finish(self) -> MetricFamily {
        match self.out {
            Out::Proto(family) => family,
            Out::Text { .. } => MetricFamily::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    /// Text written straight is what prometheus' encoder writes for the same family.
    #[test]
    fn text_mode_writes_what_the_encoder_writes() {
        let spec = GaugeSpec::new("g", "Help with \\ and\nlines.", &["dev", "item"]).unwrap();
        let samples: [(&[&str], f64); 3] = [
            (&["sda", "reads"], 2097152.0),
            (&["we\"ird\\", "x"], 0.5),
            (&["sdb", "reads"], 0.0),
        ];
        let mut proto = spec.family();
        let mut text = String::new();
        let mut direct = spec.text_family(&mut text);
        for (labels, value) in samples {
            proto.add(labels, value);
            direct.add(labels, value);
        }
        let mut encoded = Vec::new();
        TextEncoder::new()
            .encode(&[proto.finish()], &mut encoded)
            .unwrap();
        assert_eq!(text, String::from_utf8(encoded).unwrap());

        let mut empty = String::new();
        let _ = spec.text_family(&mut empty);
        assert_eq!(empty, "", "a family without samples writes nothing");
    }
}
