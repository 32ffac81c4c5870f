//! Sample lines kept as encoded text: the parser's [`SampleSink`] that writes each sample line at
//! once, without an allocation per sample, and remembers where in the line more labels can go.
//!
//! kata-monitor keeps every sandbox's families this way until its answer is written: a node can
//! hold hundreds of sandboxes with ~1000 series each, and keeping them as parsed samples, or as
//! text with the four host labels already written into every line, would take several times the
//! size of the shims' own bodies. The shim keeps the agent's families this way between parsing
//! and writing its body.

use std::collections::HashSet;

use super::syntax::{labels_of, write_open_label_set};
use super::{
    parse_with, write_value, Exposition, ExpositionError, Family, Limits, SampleRef, SampleSink,
    HOST_LABELS,
};
use crate::metrics::text::write_header;

/// A family whose lines are kept as text (for kata-monitor: one family of one sandbox, ready to
/// be written but for the host labels).
pub(crate) type FamilyBlock = Family<BlockLines>;

/// The sample lines of one family.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BlockLines {
    /// Host labels a shim or guest set are left out (kata-monitor writes its own).
    strip_host_labels: bool,
    /// Whether a host label was left out: two series may have become one.
    stripped: bool,
    /// The first host label a sample carried (kept or left out).
    host_label: Option<&'static str>,
    /// The sample names (`x`, or `x_bucket`, `x_sum`, `x_count`), stored once: they are half of a
    /// typical body, and a family owns at most four.
    names: Vec<String>,
    /// Per line: its sample name in `names`.
    name_of: Vec<u8>,
    /// Encoded sample lines without their names. Line `i` is `lines[prev..insert_i]` + host labels
    /// + the rest up to its newline: `{a="b"` ^ `} 1\n`, or ^ ` 1\n` for a line without labels.
    lines: String,
    /// Per line: where the host labels go; the top bit says the line already has labels.
    inserts: Vec<u32>,
}

const HAS_LABELS: u32 = 1 << 31;

/// Buffers a thread grows families in, kept between families.
#[derive(Default)]
struct Scratch {
    lines: String,
    inserts: Vec<u32>,
    name_of: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::default();
}

/// A scratch buffer grown past this (a huge family) is freed rather than kept by the thread.
const SCRATCH_KEEP_BYTES: usize = 1 << 20;

impl Scratch {
    /// This thread's scratch buffers (empty ones if another block holds them).
    fn take() -> Scratch {
        SCRATCH.take()
    }

    /// Puts these buffers in `block` and returns the ones it had.
    fn lend_to(self, block: &mut BlockLines) -> Scratch {
        Scratch {
            lines: std::mem::replace(&mut block.lines, self.lines),
            inserts: std::mem::replace(&mut block.inserts, self.inserts),
            name_of: std::mem::replace(&mut block.name_of, self.name_of),
        }
    }

    /// Keeps these buffers, emptied, for the thread's next family (unless grown huge).
    fn give_back(mut self) {
        if self.lines.capacity() <= SCRATCH_KEEP_BYTES {
            self.lines.clear();
            self.inserts.clear();
            self.name_of.clear();
            SCRATCH.set(self);
        }
    }
}

/// Writes the families in text format 0.0.4, as [`super::encode`] writes owned ones (sample
/// timestamps are not kept in blocks).
pub(crate) fn encode_blocks(families: &[FamilyBlock], out: &mut String) {
    for family in families {
        write_header(&family.name, &family.help, family.kind.as_str(), out);
        family.samples.write_lines("", out);
    }
}

/// Parses exposition text straight into blocks (the strict parser, no per-sample allocation).
pub(crate) fn parse_blocks(
    text: &str,
    limits: &Limits,
    strip_host_labels: bool,
) -> Result<Exposition<BlockLines>, ExpositionError> {
    parse_with(text, limits, &|| BlockLines::new(strip_host_labels))
}

/// One stored line, in pieces: `name` + `head` + host labels + `tail`.
struct Line<'b> {
    name: &'b str,
    /// `{a="b"` (without the closing brace), or empty.
    head: &'b str,
    has_labels: bool,
    /// `} 1\n` or ` 1\n`.
    tail: &'b str,
}

impl BlockLines {
    /// `strip_host_labels`: leave out the labels only the host may set (a shim's families).
    pub(crate) fn new(strip_host_labels: bool) -> Self {
        BlockLines {
            strip_host_labels,
            stripped: false,
            host_label: None,
            names: Vec::new(),
            name_of: Vec::new(),
            lines: String::new(),
            inserts: Vec::new(),
        }
    }

    /// How many sample lines the block holds.
    pub(crate) fn len(&self) -> usize {
        self.inserts.len()
    }

    fn lines(&self) -> impl Iterator<Item = Line<'_>> {
        let mut start = 0usize;
        self.inserts
            .iter()
            .zip(&self.name_of)
            .map_while(move |(&insert, &name)| {
                let offset = (insert & !HAS_LABELS) as usize;
                let head = self.lines.get(start..offset)?;
                let rest = self.lines.get(offset..)?;
                // This line ends with its newline; the next starts after it.
                let tail_len = rest.find('\n').map_or(rest.len(), |i| i + 1);
                start = offset + tail_len;
                Some(Line {
                    name: self.names.get(name as usize)?,
                    head,
                    has_labels: insert & HAS_LABELS != 0,
                    tail: &rest[..tail_len],
                })
            })
    }

    /// Writes the lines with `host` (`sandbox_id="..",...`, possibly empty) added to each.
    pub(crate) fn write_lines(&self, host: &str, out: &mut String) {
        for line in self.lines() {
            out.push_str(line.name);
            out.push_str(line.head);
            if !host.is_empty() {
                if line.has_labels {
                    out.push(',');
                    out.push_str(host);
                } else {
                    out.push('{');
                    out.push_str(host);
                    out.push('}');
                }
            }
            out.push_str(line.tail);
        }
    }

    /// Whether leaving out the host labels made two series one (`x{sandbox_id="a"}` and
    /// `x{sandbox_id="b"}`): the family must be dropped then, as its lines would repeat a series.
    pub(crate) fn merged_series(&self) -> bool {
        if !self.stripped {
            return false;
        }
        // Rare (a shim that sets host labels): read the stored label sets back and compare.
        let limits = Limits::unbounded();
        let mut seen = HashSet::with_capacity(self.len());
        let mut label_set = String::new();
        self.lines().any(|line| {
            label_set.clear();
            label_set.push_str(line.head);
            label_set.push('}');
            let Ok(mut labels) = labels_of(&label_set, &limits) else {
                return true;
            };
            labels.sort_unstable_by(|a, b| a.name.cmp(b.name));
            let key: Vec<(String, String)> = labels
                .iter()
                .map(|l| (l.name.to_string(), l.escaped.to_string()))
                .collect();
            !seen.insert((line.name, key))
        })
    }
}

impl SampleSink for BlockLines {
    fn push(&mut self, sample: &SampleRef<'_, '_>) -> Result<(), String> {
        if self.inserts.is_empty() {
            // Grow in this thread's scratch buffers; `done` keeps an exact copy.
            Scratch::take().lend_to(self);
        }
        // Samples of one name come together: try the previous line's name first.
        let last = self.name_of.last().map_or(0, |&i| usize::from(i));
        let index = if self.names.get(last).is_some_and(|n| n == sample.name) {
            last
        } else if let Some(index) = self.names.iter().position(|n| n == sample.name) {
            index
        } else {
            self.names.push(sample.name.to_string());
            self.names.len() - 1
        };
        let index = u8::try_from(index).map_err(|_| "more than 256 sample names".to_string())?;
        let is_host = |name: &str| HOST_LABELS.iter().find(|host| **host == name);
        let host = sample.labels.iter().find_map(|l| is_host(l.name));
        if let Some(&host) = host {
            self.host_label.get_or_insert(host);
        }
        // A host label from a shim or guest is replaced, never repeated.
        let strip = self.strip_host_labels && host.is_some();
        self.stripped |= strip;
        let opened = match sample.compact_label_text() {
            // The common case: copy the label set as written, without its closing brace.
            Some(text) if !strip => {
                self.lines.push_str(&text[..text.len() - 1]);
                true
            }
            // As written: the text's escapes are the ones an encoder writes.
            _ => write_open_label_set(
                sample
                    .labels
                    .iter()
                    .filter(|l| !(strip && is_host(l.name).is_some())),
                &mut self.lines,
            ),
        };
        let mark = if opened { HAS_LABELS } else { 0 };
        let offset = u32::try_from(self.lines.len())
            .ok()
            .filter(|offset| offset & HAS_LABELS == 0)
            .ok_or_else(|| "family larger than 2 GiB".to_string())?;
        self.inserts.push(offset | mark);
        self.name_of.push(index);
        if mark != 0 {
            self.lines.push('}');
        }
        self.lines.push(' ');
        match sample.plain_integer_text() {
            Some(text) => self.lines.push_str(text),
            None => write_value(sample.value, &mut self.lines),
        }
        self.lines.push('\n');
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.inserts.is_empty()
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Blocks live until the answer is written, hundreds of sandboxes at once: each keeps an
    /// exact-size copy of its lines, and the grown buffers go back to this thread's scratch for
    /// the next family (growing and shrinking every block left the heap full of holes).
    fn done(&mut self) {
        let grown = Scratch {
            lines: String::from(self.lines.as_str()),
            inserts: self.inserts.to_vec(),
            name_of: self.name_of.to_vec(),
        }
        .lend_to(self);
        grown.give_back();
        self.names.shrink_to_fit();
    }

    fn host_label(&self) -> Option<&'static str> {
        self.host_label
    }

    fn rename_prefix(&mut self, from: &str, to: &str) {
        for name in &mut self.names {
            if let Some(rest) = name.strip_prefix(from) {
                *name = format!("{to}{rest}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(text: &str, strip_host_labels: bool) -> String {
        let parsed = parse_blocks(text, &Limits::default(), strip_host_labels).expect("parsed");
        assert!(parsed.dropped.is_empty(), "{:?}", parsed.dropped);
        let mut out = String::new();
        for family in &parsed.families {
            family.samples.write_lines(r#"h="1""#, &mut out);
        }
        out
    }

    #[test]
    fn lines_as_written_or_as_an_encoder_writes_them() {
        let text = r#"x{a="1",b="q\""} 7
x{ a = "2" , b="" , } 007
x{a="3",sandbox_id="forged"} -0
x{} 1e3
y 0x10p0
"#;
        assert_eq!(
            written(text, true),
            r#"x{a="1",b="q\"",h="1"} 7
x{a="2",b="",h="1"} 7
x{a="3",h="1"} -0
x{h="1"} 1000
y{h="1"} 16
"#
        );
        assert!(written(text, false).contains(r#"x{a="3",sandbox_id="forged",h="1"} -0"#));
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::metrics::exposition::encode;

    fn parsed(families: &[Family], strip_host_labels: bool) -> Vec<FamilyBlock> {
        let mut text = String::new();
        encode(families, &mut text);
        match parse_blocks(&text, &Limits::default(), strip_host_labels) {
            Ok(parsed) if parsed.dropped.is_empty() => parsed.families,
            Ok(parsed) => panic!("dropped {:?} from {text}", parsed.dropped),
            Err(err) => panic!("{err}: {text}"),
        }
    }

    /// A shim's families as the monitor keeps them (host labels left out).
    pub(crate) fn blocks_of(families: Vec<Family>) -> Vec<FamilyBlock> {
        parsed(&families, true)
    }

    /// One of the monitor's own families, labels as they are.
    pub(crate) fn block_of(family: &Family) -> FamilyBlock {
        parsed(std::slice::from_ref(family), false).remove(0)
    }
}
