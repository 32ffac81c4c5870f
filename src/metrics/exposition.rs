//! Prometheus text exposition (format 0.0.4): parse, validate, relabel and encode (no I/O).
//!
//! The text usually comes from the guest, so parsing is strict and defensive: a bad line costs only
//! the family it belongs to (recorded in [`Exposition::dropped`]), whole-input limits refuse the
//! text outright, and nothing here panics on any input.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Labels only the host may set: kata-monitor appends them to every sandbox series, so neither a
/// guest nor a shim may fill them.
pub const HOST_LABELS: [&str; 4] = ["sandbox_id", "cri_uid", "cri_name", "cri_namespace"];

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
    pub fn label(&self, name: &str) -> Option<&str> {
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
            Ok(sample) => {
                if self.series.is_new(&builder.samples, &sample) {
                    builder.samples.push(sample);
                } else {
                    let series = series_text(&sample);
                    builder.fail(format!("line {n}: duplicate series {series}"));
                }
            }
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

/// Parses a value the way Go's `strconv.ParseFloat` does (`NaN`, `+Inf`, `1e3`, `0x1.8p3`...),
/// which is what Prometheus uses: out-of-range values are errors there, so they are here too.
pub fn parse_float(s: &str) -> Option<f64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.starts_with(['n', 'N']) {
        // Go has no signed NaN.
        return (digits.len() == s.len() && digits.eq_ignore_ascii_case("nan")).then_some(f64::NAN);
    }
    if digits.starts_with(['i', 'I']) {
        let inf = digits.eq_ignore_ascii_case("inf") || digits.eq_ignore_ascii_case("infinity");
        return inf.then_some(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => parse_hex_float(hex)?,
        // Rust's decimal syntax matches Go's, except that Go also takes `_` after a base prefix.
        None if digits.starts_with(['+', '-']) => return None,
        None => digits.parse::<f64>().ok()?,
    };
    if magnitude.is_infinite() {
        return None; // Go: ErrRange
    }
    Some(if negative { -magnitude } else { magnitude })
}

/// The part of a Go hex float after `0x`: hex mantissa with optional point, mandatory `p` exponent.
fn parse_hex_float(s: &str) -> Option<f64> {
    let (mantissa, exponent) = s.split_once(['p', 'P'])?;
    let exponent = parse_exponent(exponent)?;
    let mut bits: u64 = 0;
    let mut scale: i64 = 0;
    let mut sticky = false;
    let mut seen_point = false;
    let mut seen_digit = false;
    for c in mantissa.chars() {
        if c == '.' && !seen_point {
            seen_point = true;
            continue;
        }
        let d = c.to_digit(16)?;
        seen_digit = true;
        if bits >> 60 == 0 {
            bits = bits * 16 + u64::from(d);
            if seen_point {
                scale -= 4;
            }
        } else {
            // Beyond 64 bits only "is anything left" matters for rounding.
            sticky |= d != 0;
            if !seen_point {
                scale += 4;
            }
        }
    }
    if !seen_digit {
        return None;
    }
    if sticky {
        bits |= 1;
    }
    Some(scale_by_power_of_two(bits as f64, exponent + scale))
}

/// A decimal exponent with optional sign; huge ones saturate (the result is 0 or out of range).
fn parse_exponent(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<i64>()
            .unwrap_or(if s.starts_with('-') {
                -100_000
            } else {
                100_000
            })
            .clamp(-100_000, 100_000),
    )
}

/// `v * 2^e` in steps that keep each factor representable.
fn scale_by_power_of_two(mut v: f64, mut e: i64) -> f64 {
    while e > 1000 {
        v *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        v *= 2f64.powi(-1000);
        e += 1000;
    }
    v * 2f64.powi(e as i32)
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
// Series identity
// ---------------------------------------------------------------------------------------------

/// Two samples are the same series when name and label set match (label order does not matter).
fn same_series(a: &Sample, b: &Sample) -> bool {
    a.name == b.name
        && a.labels.len() == b.labels.len()
        && a.labels.iter().all(|(k, v)| b.label(k) == Some(v.as_str()))
}

/// Series hash over the name and the labels in name order (so label order does not matter).
/// Keyed (`RandomState`) so guest text cannot force collisions.
fn series_hash(hasher: &RandomState, s: &Sample) -> u64 {
    let mut h = hasher.build_hasher();
    // 0xff never occurs in UTF-8, so it separates fields unambiguously.
    h.write(s.name.as_bytes());
    h.write_u8(0xff);
    let mut pair = |(k, v): &(String, String)| {
        h.write(k.as_bytes());
        h.write_u8(0xff);
        h.write(v.as_bytes());
        h.write_u8(0xff);
    };
    if s.labels.windows(2).all(|w| w[0].0 <= w[1].0) {
        s.labels.iter().for_each(&mut pair);
    } else {
        // Rare (labels are usually written sorted): sort references, not the labels.
        let mut sorted: Vec<&(String, String)> = s.labels.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        sorted.into_iter().for_each(pair);
    }
    h.finish()
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
    hasher: RandomState,
    /// Series hash -> index of the first sample with it.
    first: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
}

impl SeriesIndex {
    fn clear(&mut self) {
        self.first.clear();
    }

    /// Whether `s` is a new series (the caller then pushes it onto `existing`).
    fn is_new(&mut self, existing: &[Sample], s: &Sample) -> bool {
        match self.first.entry(series_hash(&self.hasher, s)) {
            Entry::Vacant(e) => {
                e.insert(existing.len());
                true
            }
            Entry::Occupied(e) => {
                if existing.get(*e.get()).is_some_and(|o| same_series(o, s)) {
                    return false;
                }
                // A real hash collision (practically never): fall back to a scan.
                !existing.iter().any(|o| same_series(o, s))
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

/// A label value as it goes between the quotes.
pub fn escape_label_value(value: &str, out: &mut String) {
    escape_into(value, true, out);
}

/// Shortest text that parses back to the same value (as Prometheus writes it: `+Inf`, `NaN`...).
pub fn write_value(v: f64, out: &mut String) {
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
// Relabelling
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

    pub fn has_label(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.label(name).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded shim body (64,760 bytes, 65 families, 881 samples).
    const PAYLOAD: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/shim-payload.txt"
    ));

    fn parse_ok(text: &str) -> Exposition {
        match parse(text, &Limits::default()) {
            Ok(e) => e,
            Err(err) => panic!("refused: {err}"),
        }
    }

    fn names(e: &Exposition) -> Vec<&str> {
        e.families.iter().map(|f| f.name.as_str()).collect()
    }

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
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

    fn family(name: &str, kind: MetricType, samples: Vec<Sample>) -> Family {
        Family {
            name: name.to_string(),
            help: format!("help for {name}"),
            kind,
            samples,
        }
    }

    /// Equality that treats NaN as equal to NaN (PartialEq on f64 does not).
    fn same_families(a: &[Family], b: &[Family]) -> bool {
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

    fn encoded(families: &[Family]) -> String {
        let mut out = String::new();
        encode(families, &mut out);
        out
    }

    fn all_kinds() -> Vec<Family> {
        let mut counter = family(
            "requests_total",
            MetricType::Counter,
            vec![sample("requests_total", &[("code", "200")], 1027.0)],
        );
        counter.samples[0].timestamp_ms = Some(1_395_066_363_000);
        let gauge = family(
            "temp:celsius",
            MetricType::Gauge,
            vec![
                sample("temp:celsius", &[("where", "a \"b\" \\c\nd")], -3.25),
                sample("temp:celsius", &[("where", "é ünicode {},=")], f64::NAN),
                sample("temp:celsius", &[("where", "inf")], f64::INFINITY),
                sample("temp:celsius", &[("where", "-inf")], f64::NEG_INFINITY),
                sample("temp:celsius", &[("where", "tiny")], 1.5e-300),
                sample("temp:celsius", &[("where", "huge")], 1.7976931348623157e308),
                sample(
                    "temp:celsius",
                    &[("where", "big_int")],
                    123456789012345680.0,
                ),
                sample("temp:celsius", &[("where", "third")], 1.0 / 3.0),
                sample("temp:celsius", &[("where", "negzero")], -0.0),
            ],
        );
        let mut histogram = family(
            "rpc_ms",
            MetricType::Histogram,
            vec![
                sample("rpc_ms_bucket", &[("le", "1")], 0.0),
                sample("rpc_ms_bucket", &[("le", "+Inf")], 2.0),
                sample("rpc_ms_sum", &[], 3.5),
                sample("rpc_ms_count", &[], 2.0),
            ],
        );
        histogram.help = "multi\nline \\ help with \"quotes\"".to_string();
        let summary = family(
            "gc_seconds",
            MetricType::Summary,
            vec![
                sample("gc_seconds", &[("quantile", "0.5")], 0.001),
                sample("gc_seconds_sum", &[], 0.25),
                sample("gc_seconds_count", &[], 7.0),
            ],
        );
        let mut untyped = family("bare", MetricType::Untyped, vec![sample("bare", &[], 42.0)]);
        untyped.help = String::new();
        let empty = family("no_samples", MetricType::Gauge, vec![]);
        vec![counter, gauge, histogram, summary, untyped, empty]
    }

    #[test]
    fn round_trip_all_kinds() {
        let families = all_kinds();
        let text = encoded(&families);
        let back = parse_ok(&text);
        assert!(back.dropped.is_empty(), "{:?}\n{text}", back.dropped);
        assert!(same_families(&families, &back.families), "{text}");
        // Encoding is stable: a second round gives the same text.
        assert_eq!(encoded(&back.families), text);
    }

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

    #[test]
    fn shim_payload_parses_clean_and_round_trips() {
        let text = PAYLOAD;
        let parsed = parse_ok(text);
        assert!(parsed.dropped.is_empty(), "{:#?}", parsed.dropped);
        assert_eq!(parsed.families.len(), 65);
        let samples: usize = parsed.families.iter().map(|f| f.samples.len()).sum();
        let lines = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty());
        assert_eq!(samples, lines.count());
        let hist = parsed
            .families
            .iter()
            .find(|f| f.name == "kata_shim_rpc_durations_histogram_milliseconds");
        assert!(hist.is_some_and(|h| h.kind == MetricType::Histogram && h.samples.len() == 17 * 13));
        let back = parse_ok(&encoded(&parsed.families));
        assert!(back.dropped.is_empty());
        assert!(same_families(&parsed.families, &back.families));
    }

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
    fn go_float_edge_cases() {
        assert_eq!(
            parse_float("0x1.fffffffffffff8p0"),
            Some(2.0),
            "tie rounds to even"
        );
        assert_eq!(parse_float("0x1.fffffffffffff80001p0"), Some(2.0));
        assert_eq!(
            parse_float("0x1.fffffffffffff7p0"),
            Some(2.0 - f64::EPSILON)
        );
        assert_eq!(parse_float("0x1p-1074"), Some(5e-324));
        assert_eq!(parse_float("0x.8p1"), Some(1.0));
        assert_eq!(
            parse_float("0x1p99999999999999999999"),
            None,
            "out of range"
        );
        assert_eq!(parse_float("0x1p-99999999999999999999"), Some(0.0));
        assert_eq!(parse_float("NaN").map(f64::is_nan), Some(true));
        for bad in [
            "",
            "+",
            "-",
            "0x",
            "0x1p",
            "0x1.2.3p0",
            "1e",
            "1 ",
            " 1",
            "+nan",
            "0x1_0p0",
        ] {
            assert_eq!(parse_float(bad), None, "{bad:?}");
        }
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

    /// Tiny deterministic generator, so the fuzz test needs no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let real = PAYLOAD;
        let tight = Limits {
            max_labels_per_sample: 3,
            max_label_value_bytes: 8,
            max_name_bytes: 12,
            max_samples: 50,
            ..Limits::default()
        };
        let alphabet = b"ab_:{}=\",\\n#\n \t0.1eE+-InfNaHELPTYPEhistogramsummary_bucket_sum_countle\xc3\xa9\xff";
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let bytes: Vec<u8> = if round % 3 == 0 {
                // Truncated real text.
                let cut = rng.below(real.len() + 1);
                real.as_bytes()[..cut].to_vec()
            } else if round % 3 == 1 {
                // Real text with a few bytes replaced.
                let mut b = real.as_bytes()[..rng.below(4096).min(real.len())].to_vec();
                for _ in 0..4 {
                    if !b.is_empty() {
                        let i = rng.below(b.len());
                        b[i] = alphabet[rng.below(alphabet.len())];
                    }
                }
                b
            } else {
                (0..rng.below(300))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect()
            };
            let text = String::from_utf8_lossy(&bytes);
            for limits in [&Limits::default(), &tight] {
                if let Ok(e) = parse(&text, limits) {
                    // Whatever was kept must encode and parse back without loss.
                    let again = parse_ok(&encoded(&e.families));
                    assert!(
                        again.dropped.is_empty(),
                        "round {round}: {:?}",
                        again.dropped
                    );
                    assert!(same_families(&e.families, &again.families), "round {round}");
                }
            }
        }
    }

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
        assert!(!f.has_label("sandbox_id"));
        assert!(
            f.has_label("quantile"),
            "one sample with the label is enough"
        );
        assert_eq!(f.samples[1].label("quantile"), None);
    }
}
