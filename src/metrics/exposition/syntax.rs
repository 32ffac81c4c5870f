//! The syntax of one line: metric and label names, label sets and their escapes, a sample's value
//! and timestamp, HELP text escapes. Each reader says why a line is bad; the parser decides what
//! that costs.

use std::borrow::Cow;

use super::float::parse_float;
use super::{LabelRef, Limits, SampleRef};

/// Reads what follows the metric name: `{labels}` into `labels` (cleared first), then the value
/// and the optional timestamp.
pub(super) fn parse_sample<'t, 'l>(
    name: &'t str,
    rest: &'t str,
    limits: &Limits,
    labels: &'l mut Vec<LabelRef<'t>>,
) -> Result<SampleRef<'t, 'l>, String> {
    labels.clear();
    if name.len() > limits.max_name_bytes {
        return Err("metric name longer than limit".to_string());
    }
    let after_labels = match rest.strip_prefix('{') {
        Some(inside) => parse_labels(inside, limits, labels)?,
        None => rest,
    };
    let label_text = &rest[..rest.len() - after_labels.len()];
    let (value_text, rest) = split_token(skip_blanks(after_labels));
    let value = parse_float(value_text)
        .ok_or_else(|| format!("invalid value {:?}", clip(value_text, 32)))?;
    let (ts, rest) = split_token(skip_blanks(rest));
    let timestamp_ms = if ts.is_empty() {
        None
    } else {
        Some(
            ts.parse::<i64>()
                .map_err(|_| format!("invalid timestamp {:?}", clip(ts, 32)))?,
        )
    };
    if !skip_blanks(rest).is_empty() {
        return Err("unexpected text after the timestamp".to_string());
    }
    Ok(SampleRef {
        name,
        labels,
        label_text,
        value,
        value_text,
        timestamp_ms,
    })
}

/// `s` without its leading spaces and tabs.
pub(super) fn skip_blanks(s: &str) -> &str {
    let start = s
        .bytes()
        .position(|b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    &s[start..]
}

/// The labels of an encoded label set, `{a="b",...}` or nothing (for text this module's readers
/// already accepted, such as kata-monitor's stored lines).
pub(crate) fn labels_of<'t>(text: &'t str, limits: &Limits) -> Result<Vec<LabelRef<'t>>, String> {
    let mut labels = Vec::new();
    if let Some(inside) = text.strip_prefix('{') {
        parse_labels(inside, limits, &mut labels)?;
    }
    Ok(labels)
}

/// Writes `labels` as an encoder does, `{a="b",c="d"` (values as written), without the closing
/// brace; false (nothing written) when there are none.
pub(crate) fn write_open_label_set<'a, 't: 'a>(
    labels: impl IntoIterator<Item = &'a LabelRef<'t>>,
    out: &mut String,
) -> bool {
    let mut opened = false;
    for label in labels {
        out.push(if opened { ',' } else { '{' });
        opened = true;
        out.push_str(label.name);
        out.push_str("=\"");
        out.push_str(label.escaped);
        out.push('"');
    }
    opened
}

/// Parses `name="value",...}` (the `{` already consumed) and returns the text after `}`.
fn parse_labels<'t>(
    mut s: &'t str,
    limits: &Limits,
    labels: &mut Vec<LabelRef<'t>>,
) -> Result<&'t str, String> {
    loop {
        s = skip_blanks(s);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        if s.is_empty() {
            return Err("unterminated label set".to_string());
        }
        let end = s
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))
            .unwrap_or(s.len());
        let (name, after) = s.split_at(end);
        check_label_name(name, limits, labels)?;
        let after = skip_blanks(after)
            .strip_prefix('=')
            .ok_or_else(|| format!("label {name} lacks '='"))?;
        let after = skip_blanks(after)
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted"))?;
        let (escaped, length, after) = parse_label_value(after)?;
        if length > limits.max_label_value_bytes {
            return Err(format!("label {name} value longer than limit"));
        }
        if labels.len() >= limits.max_labels_per_sample {
            return Err(format!("more than {} labels", limits.max_labels_per_sample));
        }
        labels.push(LabelRef { name, escaped });
        s = skip_blanks(after);
        if let Some(next) = s.strip_prefix(',') {
            s = next;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".to_string());
        }
    }
}

fn check_label_name(name: &str, limits: &Limits, labels: &[LabelRef<'_>]) -> Result<(), String> {
    if !is_label_name(name) {
        return Err("invalid or missing label name".to_string());
    }
    if name.starts_with("__") {
        return Err(format!(
            "label name {} is reserved (starts with __)",
            clip(name, 64)
        ));
    }
    if name.len() > limits.max_name_bytes {
        return Err("label name longer than limit".to_string());
    }
    if labels.iter().any(|l| l.name == name) {
        return Err(format!("label {name} appears twice"));
    }
    Ok(())
}

/// Reads a quoted label value (after the opening quote) up to the closing quote: the value as
/// written, its length once unescaped, and the text after the quote. Only `\\`, `\"` and `\n`
/// are escapes.
fn parse_label_value(s: &str) -> Result<(&str, usize, &str), String> {
    let bytes = s.as_bytes();
    let mut escapes = 0;
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'"' || b == b'\\') {
        let at = i + offset;
        if bytes[at] == b'"' {
            return Ok((&s[..at], at - escapes, &s[at + 1..]));
        }
        match bytes.get(at + 1) {
            Some(b'\\' | b'"' | b'n') => {}
            Some(_) => {
                let other = s[at + 1..].chars().next().unwrap_or_default();
                return Err(format!(
                    "invalid escape \\{} in label value",
                    other.escape_debug()
                ));
            }
            None => break,
        }
        escapes += 1;
        i = at + 2;
    }
    Err("unterminated label value".to_string())
}

impl LabelRef<'_> {
    /// The value with its escapes resolved (borrowed when it has none).
    pub(crate) fn value(&self) -> Cow<'_, str> {
        if !self.escaped.contains('\\') {
            return Cow::Borrowed(self.escaped);
        }
        let mut value = String::with_capacity(self.escaped.len());
        let mut chars = self.escaped.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => value.push('\n'),
                // `\\` and `\"`: the parser accepted no other escape.
                Some(other) => value.push(other),
                None => {}
            }
        }
        Cow::Owned(value)
    }
}

/// HELP text allows only `\\` and `\n` escapes.
pub(super) fn unescape_help(text: &str) -> Result<String, String> {
    if !text.contains('\\') {
        return Ok(text.to_string());
    }
    let mut help = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            help.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => help.push('\\'),
            Some('n') => help.push('\n'),
            Some(other) => {
                return Err(format!("invalid escape \\{} in HELP", other.escape_debug()))
            }
            None => return Err("HELP ends with a lone backslash".to_string()),
        }
    }
    Ok(help)
}

/// Splits at the first space or tab.
pub(super) fn split_token(s: &str) -> (&str, &str) {
    let end = s
        .bytes()
        .position(|b| b == b' ' || b == b'\t')
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Splits a sample line after its metric name.
pub(super) fn split_name(s: &str) -> (&str, &str) {
    let end = s
        .bytes()
        .position(|b| b == b'{' || b == b' ' || b == b'\t')
        .unwrap_or(s.len());
    s.split_at(end)
}

/// The bytes that may continue a metric name: `[a-zA-Z0-9_:]`.
const NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || byte == b'_' || byte == b':';
        b += 1;
    }
    table
};

/// Splits a sample line after its metric name, checking the name in the same pass: the name and
/// the rest, or (`Err`) the token that stands where a valid name should.
pub(super) fn split_metric_name(s: &str) -> Result<(&str, &str), &str> {
    let bytes = s.as_bytes();
    let end = bytes
        .iter()
        .position(|&b| !NAME_BYTE[usize::from(b)])
        .unwrap_or(bytes.len());
    let (name, rest) = s.split_at(end);
    let ends_well = matches!(rest.bytes().next(), None | Some(b'{' | b' ' | b'\t'));
    if ends_well && is_metric_name(name) {
        Ok((name, rest))
    } else {
        Err(split_name(s).0)
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub(super) fn is_metric_name(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && s.bytes().all(|b| NAME_BYTE[usize::from(b)])
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
fn is_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// At most `max` bytes of `s`, cut at a character boundary (for messages about hostile text).
pub(super) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use crate::metrics::exposition::test_support::parse_ok;

    #[test]
    fn values_and_timestamps() {
        let text = "\
a{x=\"1\"} NaN
a{x=\"2\"} +Inf
a{x=\"3\"} -Inf
a{x=\"4\"} 1.5e3
a{x=\"5\"} -2E-2
a{x=\"6\"} .5
a{x=\"7\"} 7.
a{x=\"8\"} Inf
a{x=\"9\"} +3 1700000000000
a{x=\"10\"}\t10\t-1 \t
a{x=\"11\"}11
a{x=\"12\"} 0x1.8p1
a{x=\"13\"} -0X10P-4
a{x=\"14\"} -infinity
a{x=\"15\"} 1e-400
";
        let e = parse_ok(text);
        assert!(e.dropped.is_empty(), "{:?}", e.dropped);
        let v: Vec<f64> = e.families[0].samples.iter().map(|s| s.value).collect();
        assert!(v[0].is_nan());
        assert_eq!(
            &v[1..],
            [
                f64::INFINITY,
                f64::NEG_INFINITY,
                1500.0,
                -0.02,
                0.5,
                7.0,
                f64::INFINITY,
                3.0,
                10.0,
                11.0,
                3.0,
                -1.0,
                f64::NEG_INFINITY,
                0.0
            ]
        );
        assert_eq!(
            e.families[0].samples[8].timestamp_ms,
            Some(1_700_000_000_000)
        );
        assert_eq!(e.families[0].samples[9].timestamp_ms, Some(-1));
    }

    #[test]
    fn escapes_in_label_values_and_help() {
        let text = "# HELP e a\\\\b\\nc\ne{v=\"q\\\"\\\\\\n end\",w = \"x\" ,} 1\n";
        let e = parse_ok(text);
        assert!(e.dropped.is_empty(), "{:?}", e.dropped);
        assert_eq!(e.families[0].help, "a\\b\nc");
        let labels = &e.families[0].samples[0].labels;
        assert_eq!(labels[0], ("v".to_string(), "q\"\\\n end".to_string()));
        assert_eq!(labels[1], ("w".to_string(), "x".to_string()));
    }
}
