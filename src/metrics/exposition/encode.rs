//! The encoder: families back to text format 0.0.4, and the pieces kata-monitor writes itself
//! (label values, sample values).

use std::fmt::Write as _;

pub(crate) use crate::metrics::text::write_value;
use crate::metrics::text::{escape_into, write_header};

use super::Family;

/// Appends families in text format 0.0.4 (HELP only when there is help text).
pub(crate) fn encode(families: &[Family], out: &mut String) {
    for family in families {
        encode_family(family, out);
    }
}

fn encode_family(family: &Family, out: &mut String) {
    write_header(&family.name, &family.help, family.kind.as_str(), out);
    for sample in &family.samples {
        out.push_str(&sample.name);
        write_labels(&sample.labels, out);
        out.push(' ');
        write_value(sample.value, out);
        if let Some(ts) = sample.timestamp_ms {
            let _ = write!(out, " {ts}");
        }
        out.push('\n');
    }
}

pub(super) fn write_labels(labels: &[(String, String)], out: &mut String) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        escape_into(value, true, out);
        out.push('"');
    }
    out.push('}');
}

/// A label value as it goes between the quotes.
pub(crate) fn escape_label_value(value: &str, out: &mut String) {
    escape_into(value, true, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::test_support::{encoded, family, sample};
    use crate::metrics::exposition::MetricType;

    #[test]
    fn encode_format() {
        let mut f = family(
            "x",
            MetricType::Untyped,
            vec![sample("x", &[("a", "q\"b\\n\n"), ("b", "")], 2.0)],
        );
        f.help = "h\\i\nj \"k\"".to_string();
        f.samples[0].timestamp_ms = Some(-5);
        assert_eq!(
            encoded(&[f]),
            "# HELP x h\\\\i\\nj \"k\"\n# TYPE x untyped\nx{a=\"q\\\"b\\\\n\\n\",b=\"\"} 2 -5\n"
        );
        let mut out = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.5, 1e21, 3.0] {
            write_value(v, &mut out);
            out.push(' ');
        }
        assert_eq!(out, "NaN +Inf -Inf 0.5 1e21 3 ");
    }
}
