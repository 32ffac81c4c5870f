//! Gauge families built by hand, for collectors that read /proc at scrape time.

use std::collections::HashMap;

use prometheus::core::Desc;
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

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
        GaugeFamily { spec: self, family }
    }

    /// The family with one unlabelled sample.
    pub(crate) fn single(&self, value: f64) -> MetricFamily {
        let mut family = self.family();
        family.add(&[], value);
        family.finish()
    }
}

pub(crate) struct GaugeFamily<'a> {
    spec: &'a GaugeSpec,
    family: MetricFamily,
}

impl GaugeFamily<'_> {
    /// Adds a sample; `values` follow the spec's label names, in order.
    pub(crate) fn add(&mut self, values: &[&str], value: f64) {
        let labels = self
            .spec
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
        self.family.mut_metric().push(metric);
    }

    pub(crate) fn finish(self) -> MetricFamily {
        self.family
    }
}
