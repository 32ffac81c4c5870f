//! The pieces of Prometheus text format 0.0.4 that every side writes, the guest agent included:
//! sample values, escapes, family headers, and a registry's text.

use std::fmt::Write as _;

/// Escapes `\` and newline, and `"` too inside label values.
pub(crate) fn escape_into(s: &str, quote: bool, out: &mut String) {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !s.contains(special) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            _ => out.push(c),
        }
    }
}

/// `# HELP` (when there is help text) and `# TYPE` lines; `kind` is the TYPE word.
pub(crate) fn write_header(name: &str, help: &str, kind: &str, out: &mut String) {
    write_header_quoting(name, help, false, kind, out);
}

/// [`write_header`], escaping `"` in the help text too when `quote_help` (OpenMetrics does).
pub(crate) fn write_header_quoting(
    name: &str,
    help: &str,
    quote_help: bool,
    kind: &str,
    out: &mut String,
) {
    if !help.is_empty() {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        escape_into(help, quote_help, out);
        out.push('\n');
    }
    out.push_str("# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// A registry's families as text format 0.0.4, by prometheus' own encoder.
pub(crate) fn registry_text(
    families: &[prometheus::proto::MetricFamily],
) -> Result<String, prometheus::Error> {
    use prometheus::Encoder;
    let mut text = Vec::with_capacity(16 * 1024);
    prometheus::TextEncoder::new().encode(families, &mut text)?;
    String::from_utf8(text)
        .map_err(|e| prometheus::Error::Msg(format!("metrics text is not UTF-8: {e}")))
}

/// Shortest text that parses back to the same value (as Prometheus writes it: `+Inf`, `NaN`...).
pub(crate) fn write_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v == 0.0 && v.is_sign_negative() {
        out.push_str("-0");
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // Integral: print without ".0", exact since |v| < 2^53.
        let _ = write!(out, "{}", v as i64);
    } else {
        // Debug is the shortest round-tripping form and switches to exponents for extremes.
        let _ = write!(out, "{v:?}");
    }
}
