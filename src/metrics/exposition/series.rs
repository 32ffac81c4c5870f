//! Series identity: which samples of a family are the same series (same name and label set, in
//! any label order), found in O(1) per sample with a keyed hash.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::encode::write_labels;
use super::Sample;

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
pub(super) struct SeriesIndex {
    hasher: RandomState,
    /// Series hash -> index of the first sample with it.
    first: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
}

impl SeriesIndex {
    pub(super) fn clear(&mut self) {
        self.first.clear();
    }

    /// Whether `s` is a new series (the caller then pushes it onto `existing`).
    pub(super) fn is_new(&mut self, existing: &[Sample], s: &Sample) -> bool {
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

/// `name{labels}` as it appears in the text, for messages.
pub(super) fn series_text(s: &Sample) -> String {
    let mut out = String::with_capacity(s.name.len() + 16);
    out.push_str(&s.name);
    write_labels(&s.labels, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::test_support::sample;

    #[test]
    fn label_order_does_not_make_a_new_series() {
        let mut index = SeriesIndex::default();
        let first = sample("x", &[("a", "1"), ("b", "2")], 1.0);
        assert!(index.is_new(&[], &first));
        let reordered = sample("x", &[("b", "2"), ("a", "1")], 2.0);
        assert!(!index.is_new(std::slice::from_ref(&first), &reordered));
        let other = sample("x", &[("a", "1"), ("b", "3")], 3.0);
        assert!(index.is_new(std::slice::from_ref(&first), &other));
    }

    #[test]
    fn a_hash_collision_is_not_taken_for_a_repeat() {
        let mut index = SeriesIndex::default();
        let first = sample("x", &[("a", "1")], 1.0);
        assert!(index.is_new(&[], &first));
        let existing = [first];
        // Pretend `other` hashes like the first sample: the index must compare the series.
        let other = sample("x", &[("a", "2")], 2.0);
        let collided = series_hash(&index.hasher, &other);
        index.first.insert(collided, 0);
        assert!(index.is_new(&existing, &other));
        assert!(!index.is_new(&existing, &existing[0]));
    }
}
