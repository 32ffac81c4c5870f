//! Builders and shorthands shared by the exposition tests (and the monitor's, which build
//! families too).

use super::{encode, parse, Exposition, Family, Limits, MetricType, Sample};

pub(super) fn parse_ok(text: &str) -> Exposition {
    match parse(text, &Limits::default()) {
        Ok(e) => e,
        Err(err) => panic!("refused: {err}"),
    }
}

pub(super) fn names(e: &Exposition) -> Vec<&str> {
    e.families.iter().map(|f| f.name.as_str()).collect()
}

pub(crate) fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value,
        timestamp_ms: None,
    }
}

pub(crate) fn family(name: &str, kind: MetricType, samples: Vec<Sample>) -> Family {
    Family {
        name: name.to_string(),
        help: format!("help for {name}"),
        kind,
        samples,
    }
}

pub(super) fn encoded(families: &[Family]) -> String {
    let mut out = String::new();
    encode(families, &mut out);
    out
}
