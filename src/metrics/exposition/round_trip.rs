//! Parse and encode together: whatever the parser keeps, the encoder writes back so that it parses
//! to the same families, on a real shim body and on garbage.

use super::test_support::{encoded, family, parse_ok, sample};
use super::{parse, same_families, Family, Limits, MetricType};

/// A recorded shim body (64,760 bytes, 65 families, 881 samples).
const PAYLOAD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/shim-payload.txt"
));

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
    let alphabet =
        b"ab_:{}=\",\\n#\n \t0.1eE+-InfNaHELPTYPEhistogramsummary_bucket_sum_countle\xc3\xa9\xff";
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
