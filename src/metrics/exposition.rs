//! Prometheus text exposition (format 0.0.4): parse, validate, relabel, merge and encode (no I/O).
//!
//! The text usually comes from the guest, so parsing is strict and defensive: a bad line costs only
//! the family it belongs to (recorded in [`Exposition::dropped`]), whole-input limits refuse the
//! text outright, and nothing here panics on any input.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl MetricType {
    /// The word used on `# TYPE` lines.
    pub fn as_str(self) -> &'static str {
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
    fn owns(self, family: &str, sample: &str) -> bool {
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
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub kind: MetricType,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_samples: usize,
    pub max_labels_per_sample: usize,
    pub max_label_value_bytes: usize,
    pub max_name_bytes: usize,
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

/// A family left out of the result, and why.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub family: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
    pub dropped: Vec<Dropped>,
}

/// Refusals of the whole input; everything finer-grained is a [`Dropped`] family.
#[derive(Debug, thiserror::Error)]
pub enum ExpositionError {
    #[error("exposition text too large: {size} bytes > {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("exposition text has more than {limit} samples")]
    TooManySamples { limit: usize },
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses exposition text, keeping every valid family and dropping each invalid one whole.
pub fn parse(text: &str, limits: &Limits) -> Result<Exposition, ExpositionError> {
    if text.len() > limits.max_bytes {
        return Err(ExpositionError::TooLarge {
            size: text.len(),
            limit: limits.max_bytes,
        });
    }
    let mut parser = Parser::new(limits);
    for (i, line) in text.split('\n').enumerate() {
        parser.line(i + 1, line)?;
    }
    Ok(parser.finish())
}

/// A family being read; becomes a [`Slot`] when the next family starts.
struct Builder {
    name: String,
    help: Option<String>,
    kind: Option<MetricType>,
    samples: Vec<Sample>,
    /// First problem found; the family is dropped with this reason.
    error: Option<String>,
    /// Set when this is a later, non-contiguous part of a family already in `slots`.
    earlier: Option<usize>,
}

impl Builder {
    fn kind(&self) -> MetricType {
        self.kind.unwrap_or(MetricType::Untyped)
    }

    /// Records the first problem and frees the samples: the family is lost anyway.
    fn fail(&mut self, reason: String) {
        if self.error.is_none() {
            self.error = Some(reason);
            self.samples = Vec::new();
        }
    }
}

enum Slot {
    Kept(Family),
    Dropped(Dropped),
}

struct Parser<'l> {
    limits: &'l Limits,
    /// Finished families (and unattributable bad lines) in input order.
    slots: Vec<Slot>,
    /// Finished family name -> (slot, type), to catch families that come back later.
    finished: HashMap<String, (usize, MetricType)>,
    current: Option<Builder>,
    hasher: RandomState,
    series: SeriesIndex,
    samples_seen: usize,
}

impl<'l> Parser<'l> {
    fn new(limits: &'l Limits) -> Self {
        Parser {
            limits,
            slots: Vec::new(),
            finished: HashMap::new(),
            current: None,
            hasher: RandomState::new(),
            series: SeriesIndex::default(),
            samples_seen: 0,
        }
    }

    fn line(&mut self, n: usize, line: &str) -> Result<(), ExpositionError> {
        let line = line.trim_start_matches([' ', '\t']);
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
        let comment = comment.trim_start_matches([' ', '\t']);
        let (keyword, rest) = split_token(comment);
        if keyword != "HELP" && keyword != "TYPE" {
            return;
        }
        let (name, rest) = split_token(rest.trim_start_matches([' ', '\t']));
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
        if name.len() > self.limits.max_name_bytes {
            builder.fail(format!("line {n}: metric name longer than limit"));
            return;
        }
        let rest = rest.trim_start_matches([' ', '\t']);
        if keyword == "HELP" {
            set_help(builder, n, rest);
        } else {
            set_type(builder, n, rest);
        }
    }

    fn sample(&mut self, n: usize, line: &str) {
        let (name, rest) = split_name(line);
        if !is_metric_name(name) {
            self.stray(n, name, "invalid metric name".to_string());
            return;
        }
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
        match parse_sample(name, rest, self.limits).and_then(|s| check_sample(builder, s)) {
            Ok(sample) => match self.series.check(&self.hasher, &builder.samples, &sample) {
                Ok(()) => builder.samples.push(sample),
                Err(_) => {
                    let series = series_text(&sample);
                    builder.fail(format!("line {n}: duplicate series {series}"));
                }
            },
            Err(why) => builder.fail(format!("line {n}: {why}")),
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
            samples: Vec::new(),
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
            None => Slot::Kept(Family {
                name: b.name,
                help: b.help.unwrap_or_default(),
                kind,
                samples: b.samples,
            }),
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

    fn finish(mut self) -> Exposition {
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

fn set_help(b: &mut Builder, n: usize, text: &str) {
    if b.help.is_some() {
        b.fail(format!("line {n}: second HELP line for {}", b.name));
        return;
    }
    match unescape_help(text) {
        Ok(help) => b.help = Some(help),
        Err(why) => b.fail(format!("line {n}: {why}")),
    }
}

fn set_type(b: &mut Builder, n: usize, rest: &str) {
    let word = rest.trim_end_matches([' ', '\t']);
    if b.kind.is_some() {
        b.fail(format!("line {n}: second TYPE line for {}", b.name));
    } else if !b.samples.is_empty() {
        b.fail(format!("line {n}: TYPE line after samples of {}", b.name));
    } else {
        match MetricType::from_word(word) {
            Some(kind) => b.kind = Some(kind),
            None => b.fail(format!("line {n}: unknown TYPE {:?}", clip(word, 32))),
        }
    }
}

/// Type-specific rules: histogram buckets need `le`, summary quantiles need `quantile`.
fn check_sample(b: &Builder, sample: Sample) -> Result<Sample, String> {
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
        match sample.label(label) {
            None => return Err(format!("{} has no {label} label", sample.name)),
            Some(v) if parse_float(v).is_none() => {
                return Err(format!("{label} label {:?} is not a number", clip(v, 32)))
            }
            Some(_) => {}
        }
    }
    Ok(sample)
}

/// Parses what follows the metric name: `{labels}`, value, optional timestamp.
fn parse_sample(name: &str, rest: &str, limits: &Limits) -> Result<Sample, String> {
    if name.len() > limits.max_name_bytes {
        return Err("metric name longer than limit".to_string());
    }
    let mut labels = Vec::new();
    let rest = match rest.strip_prefix('{') {
        Some(inside) => parse_labels(inside, limits, &mut labels)?,
        None => rest,
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    let (value, rest) = split_token(rest);
    let value = parse_float(value).ok_or_else(|| format!("invalid value {:?}", clip(value, 32)))?;
    let (ts, rest) = split_token(rest.trim_start_matches([' ', '\t']));
    let timestamp_ms = if ts.is_empty() {
        None
    } else {
        Some(
            ts.parse::<i64>()
                .map_err(|_| format!("invalid timestamp {:?}", clip(ts, 32)))?,
        )
    };
    if !rest.trim_matches([' ', '\t']).is_empty() {
        return Err("unexpected text after the timestamp".to_string());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp_ms,
    })
}

/// Parses `name="value",...}` (the `{` already consumed) and returns the text after `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    limits: &Limits,
    labels: &mut Vec<(String, String)>,
) -> Result<&'a str, String> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        if s.is_empty() {
            return Err("unterminated label set".to_string());
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let (name, after) = s.split_at(end);
        check_label_name(name, limits, labels)?;
        let after = after.trim_start_matches([' ', '\t']);
        let after = after
            .strip_prefix('=')
            .ok_or_else(|| format!("label {name} lacks '='"))?
            .trim_start_matches([' ', '\t']);
        let after = after
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted"))?;
        let (value, after) = parse_label_value(after)?;
        if value.len() > limits.max_label_value_bytes {
            return Err(format!("label {name} value longer than limit"));
        }
        if labels.len() >= limits.max_labels_per_sample {
            return Err(format!("more than {} labels", limits.max_labels_per_sample));
        }
        labels.push((name.to_string(), value));
        s = after.trim_start_matches([' ', '\t']);
        if let Some(next) = s.strip_prefix(',') {
            s = next;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".to_string());
        }
    }
}

fn check_label_name(
    name: &str,
    limits: &Limits,
    labels: &[(String, String)],
) -> Result<(), String> {
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
    if labels.iter().any(|(k, _)| k == name) {
        return Err(format!("label {name} appears twice"));
    }
    Ok(())
}

/// Reads a quoted label value (after the opening quote) up to the closing quote.
fn parse_label_value(s: &str) -> Result<(String, &str), String> {
    let end = s
        .find(['"', '\\'])
        .ok_or_else(|| "unterminated label value".to_string())?;
    // Fast path: no escapes at all.
    if s[end..].starts_with('"') {
        return Ok((s[..end].to_string(), &s[end + 1..]));
    }
    let mut value = String::with_capacity(s.len().min(64));
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, other)) => {
                    return Err(format!(
                        "invalid escape \\{} in label value",
                        other.escape_debug()
                    ))
                }
                None => break,
            },
            _ => value.push(c),
        }
    }
    Err("unterminated label value".to_string())
}

/// HELP text allows only `\\` and `\n` escapes.
fn unescape_help(text: &str) -> Result<String, String> {
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

/// Parses a value the way Go's `strconv.ParseFloat` does for decimal text (`NaN`, `+Inf`, `1e3`...).
pub fn parse_float(s: &str) -> Option<f64> {
    // Rust's parser is close to Go's; keep out the few spellings Go refuses.
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.eq_ignore_ascii_case("nan") && digits.len() != s.len() {
        return None; // Go has no signed NaN
    }
    if s.contains('_') {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Splits at the first space or tab.
fn split_token(s: &str) -> (&str, &str) {
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    s.split_at(end)
}

/// Splits a sample line after its metric name.
fn split_name(s: &str) -> (&str, &str) {
    let end = s.find(['{', ' ', '\t']).unwrap_or(s.len());
    s.split_at(end)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
pub fn is_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// At most `max` bytes of `s`, cut at a character boundary (for messages about hostile text).
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Series identity (shared by parse and merge)
// ---------------------------------------------------------------------------------------------

/// Two samples are the same series when name and label set match (label order does not matter).
fn same_series(a: &Sample, b: &Sample) -> bool {
    a.name == b.name
        && a.labels.len() == b.labels.len()
        && a.labels.iter().all(|(k, v)| b.label(k) == Some(v.as_str()))
}

/// Order-independent series hash; keyed (`RandomState`) so guest text cannot force collisions.
fn series_hash(hasher: &RandomState, s: &Sample) -> u64 {
    let mut h = hasher.hash_one(s.name.as_str());
    for (k, v) in &s.labels {
        h = h.wrapping_add(hasher.hash_one((k.as_str(), v.as_str())));
    }
    h
}

/// The key is already a hash: don't hash it again.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Finds repeated series among the samples of one family in O(1) per sample.
#[derive(Default)]
struct SeriesIndex {
    first: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
}

impl SeriesIndex {
    fn clear(&mut self) {
        self.first.clear();
    }

    /// `Ok` if `s` is new (the caller then pushes it onto `existing`), else the earlier index.
    fn check(
        &mut self,
        hasher: &RandomState,
        existing: &[Sample],
        s: &Sample,
    ) -> Result<(), usize> {
        match self.first.entry(series_hash(hasher, s)) {
            Entry::Vacant(e) => {
                e.insert(existing.len());
                Ok(())
            }
            Entry::Occupied(e) => {
                if existing.get(*e.get()).is_some_and(|o| same_series(o, s)) {
                    return Err(*e.get());
                }
                // A real hash collision (practically never): fall back to a scan.
                match existing.iter().position(|o| same_series(o, s)) {
                    Some(i) => Err(i),
                    None => Ok(()),
                }
            }
        }
    }
}

fn series_text(s: &Sample) -> String {
    let mut out = String::with_capacity(s.name.len() + 16);
    out.push_str(&s.name);
    write_labels(&s.labels, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Appends families in text format 0.0.4 (HELP only when there is help text).
pub fn encode(families: &[Family], out: &mut String) {
    for family in families {
        encode_family(family, out);
    }
}

fn encode_family(family: &Family, out: &mut String) {
    if !family.help.is_empty() {
        out.push_str("# HELP ");
        out.push_str(&family.name);
        out.push(' ');
        escape_into(&family.help, false, out);
        out.push('\n');
    }
    out.push_str("# TYPE ");
    out.push_str(&family.name);
    out.push(' ');
    out.push_str(family.kind.as_str());
    out.push('\n');
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

fn write_labels(labels: &[(String, String)], out: &mut String) {
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

/// Escapes `\` and newline, and `"` too inside label values.
fn escape_into(s: &str, quote: bool, out: &mut String) {
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

/// Shortest text that parses back to the same value (as Prometheus writes it: `+Inf`, `NaN`...).
fn write_value(v: f64, out: &mut String) {
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

// ---------------------------------------------------------------------------------------------
// Relabelling and merging
// ---------------------------------------------------------------------------------------------

impl Family {
    /// Replaces the name prefix `from` with `to` on the family and its samples.
    pub fn rename_prefix(&mut self, from: &str, to: &str) -> bool {
        let Some(rest) = self.name.strip_prefix(from) else {
            return false;
        };
        self.name = format!("{to}{rest}");
        for sample in &mut self.samples {
            if let Some(rest) = sample.name.strip_prefix(from) {
                sample.name = format!("{to}{rest}");
            }
        }
        true
    }

    /// Sets `name="value"` on every sample, replacing an existing value.
    pub fn set_label(&mut self, name: &str, value: &str) {
        for sample in &mut self.samples {
            match sample.labels.iter_mut().find(|(k, _)| k == name) {
                Some((_, v)) => {
                    v.clear();
                    v.push_str(value);
                }
                None => sample.labels.push((name.to_string(), value.to_string())),
            }
        }
    }

    pub fn has_label(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.label(name).is_some())
    }
}

/// One output family of [`merge`] and the series it already holds.
struct Merged {
    family: Family,
    series: SeriesIndex,
}

/// Merges same-named families from several sources into one family each, sorted by name.
///
/// The first TYPE seen wins (conflicting families are dropped), the first non-empty HELP wins,
/// and a series repeated in a later source is dropped (one [`Dropped`] per family and source).
pub fn merge(groups: Vec<Vec<Family>>) -> (Vec<Family>, Vec<Dropped>) {
    let hasher = RandomState::new();
    let mut merged: Vec<Merged> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut dropped = Vec::new();
    for (source, group) in groups.into_iter().enumerate() {
        for family in group {
            let i = match by_name.get(&family.name) {
                Some(&i) => i,
                None => {
                    by_name.insert(family.name.clone(), merged.len());
                    merged.push(Merged {
                        family: Family {
                            name: family.name.clone(),
                            help: String::new(),
                            kind: family.kind,
                            samples: Vec::with_capacity(family.samples.len()),
                        },
                        series: SeriesIndex::default(),
                    });
                    merged.len() - 1
                }
            };
            absorb(&mut merged[i], family, source, &hasher, &mut dropped);
        }
    }
    let mut families: Vec<Family> = merged.into_iter().map(|m| m.family).collect();
    families.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    (families, dropped)
}

/// Adds one source's family to the merged one.
fn absorb(
    into: &mut Merged,
    family: Family,
    source: usize,
    hasher: &RandomState,
    dropped: &mut Vec<Dropped>,
) {
    let target = &mut into.family;
    if family.kind != target.kind {
        dropped.push(Dropped {
            reason: format!(
                "source {source}: {} has TYPE {}, but {} was seen first",
                family.name,
                family.kind.as_str(),
                target.kind.as_str()
            ),
            family: family.name,
        });
        return;
    }
    if target.help.is_empty() {
        target.help = family.help;
    }
    let mut repeated = 0usize;
    let mut example = None;
    for sample in family.samples {
        match into.series.check(hasher, &target.samples, &sample) {
            Ok(()) => target.samples.push(sample),
            Err(_) => {
                repeated += 1;
                example.get_or_insert_with(|| series_text(&sample));
            }
        }
    }
    if let Some(example) = example {
        dropped.push(Dropped {
            family: family.name,
            reason: format!(
                "source {source}: {repeated} series repeat earlier ones (e.g. {example})"
            ),
        });
    }
}
