//! Series identity: which samples of a family are the same series (same name and label set, in
//! any label order), found in O(1) per sample with a keyed hash and no allocation.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::syntax::{parse_sample, write_open_label_set};
use super::{LabelRef, Limits, SampleRef};

/// Two samples are the same series when name and label set match (label order does not matter).
/// Values are compared as written: the only escapes are `\\`, `\"` and `\n`, so equal values are
/// written alike.
fn same_series(a: &SampleRef<'_, '_>, b: &SampleRef<'_, '_>) -> bool {
    a.name == b.name
        && a.labels.len() == b.labels.len()
        && a.labels
            .iter()
            .all(|l| b.label(l.name).is_some_and(|m| m.escaped == l.escaped))
}

/// Series hash over the name and the label set as an encoder writes it with its labels in name
/// order (so label order and blanks do not matter). Keyed (`RandomState`) so guest text cannot
/// force collisions.
fn series_hash(hasher: &RandomState, s: &SampleRef<'_, '_>) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(s.name.as_bytes());
    let sorted = s.labels.windows(2).all(|w| w[0].name <= w[1].name);
    match s.compact_label_text() {
        // The common case: the text is already that form.
        Some(text) if sorted => h.write(text.as_bytes()),
        _ => {
            let mut labels: Vec<&LabelRef<'_>> = s.labels.iter().collect();
            labels.sort_unstable_by(|a, b| a.name.cmp(b.name));
            let mut text = String::new();
            if write_open_label_set(labels, &mut text) {
                text.push('}');
            }
            h.write(text.as_bytes());
        }
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

/// A sample kept by where it is in the text: its name and the text after the name.
type Written<'t> = (&'t str, &'t str);

/// Finds repeated series among the samples of one family in O(1) per sample. It keeps where each
/// series was written and reads it again only when two hashes meet.
#[derive(Default)]
pub(super) struct SeriesIndex<'t> {
    hasher: RandomState,
    /// Series hash -> the first sample with it.
    first: HashMap<u64, Written<'t>, BuildHasherDefault<PassThrough>>,
    /// Other series whose hash met one in `first` (practically never).
    collided: Vec<(u64, Written<'t>)>,
}

impl<'t> SeriesIndex<'t> {
    pub(super) fn clear(&mut self) {
        self.first.clear();
        self.collided.clear();
    }

    /// Whether `s`, written as `written`, is a series not seen since the last `clear`.
    pub(super) fn is_new(&mut self, s: &SampleRef<'_, '_>, written: Written<'t>) -> bool {
        let hash = series_hash(&self.hasher, s);
        let first = match self.first.entry(hash) {
            Entry::Vacant(e) => {
                e.insert(written);
                return true;
            }
            Entry::Occupied(e) => *e.get(),
        };
        let candidates = std::iter::once(first).chain(
            self.collided
                .iter()
                .filter(|(h, _)| *h == hash)
                .map(|(_, w)| *w),
        );
        let mut labels = Vec::new();
        for (name, rest) in candidates {
            // Text accepted once reads the same again.
            if parse_sample(name, rest, &Limits::unbounded(), &mut labels)
                .is_ok_and(|e| same_series(&e, s))
            {
                return false;
            }
        }
        self.collided.push((hash, written));
        true
    }
}

/// `name{labels}` as it appears in the text, for messages.
pub(super) fn series_text(s: &SampleRef<'_, '_>) -> String {
    let mut out = String::with_capacity(s.name.len() + 16);
    out.push_str(s.name);
    if write_open_label_set(s.labels, &mut out) {
        out.push('}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::syntax::split_name;

    /// Reads `line` and asks the index whether it is a new series.
    fn is_new<'t>(index: &mut SeriesIndex<'t>, line: &'t str) -> bool {
        let (name, rest) = split_name(line);
        let mut labels = Vec::new();
        let sample =
            parse_sample(name, rest, &Limits::default(), &mut labels).expect("a valid line");
        index.is_new(&sample, (name, rest))
    }

    #[test]
    fn label_order_does_not_make_a_new_series() {
        let mut index = SeriesIndex::default();
        assert!(is_new(&mut index, r#"x{a="1",b="2"} 1"#));
        assert!(!is_new(&mut index, r#"x{b="2",a="1"} 2"#));
        assert!(is_new(&mut index, r#"x{a="1",b="3"} 3"#));
        assert!(!is_new(&mut index, r#"x{ a = "1", b="3" , } 4"#));
        assert!(!is_new(&mut index, r#"x{b="3",a="1"} 5"#));
        assert!(is_new(&mut index, r#"x{a="1\n",b="3"} 3"#));
        assert!(!is_new(&mut index, r#"x{b="3",a="1\n"} 3"#));
    }

    #[test]
    fn a_hash_collision_is_not_taken_for_a_repeat() {
        let mut index = SeriesIndex::default();
        assert!(is_new(&mut index, r#"x{a="1"} 1"#));
        // Pretend `x{a="2"}` hashes like `x{a="1"}`: the index must compare the series.
        let labels = [LabelRef {
            name: "a",
            escaped: "2",
        }];
        let other = SampleRef {
            name: "x",
            labels: &labels,
            label_text: r#"{a="2"}"#,
            value: 2.0,
            value_text: "2",
            timestamp_ms: None,
        };
        let collided = series_hash(&index.hasher, &other);
        index.first.insert(collided, ("x", r#"{a="1"} 1"#));
        assert!(is_new(&mut index, r#"x{a="2"} 2"#));
        assert!(!is_new(&mut index, r#"x{a="2"} 3"#));
        assert!(!is_new(&mut index, r#"x{a="1"} 4"#));
    }
}
