//! Writes merged families in the format the client asked for, in chunks, gzipped when asked.
//!
//! Output is produced piece by piece into a bounded channel that feeds the HTTP body, so the full
//! response (which carries the host labels on every line, and so is far larger than the shims'
//! bodies) never sits in memory at once.

use std::io::Write;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::aggregate::Merged;
use crate::metrics::exposition::MetricType;
use crate::metrics::text::write_header_quoting;

pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bytes gathered before a chunk goes out: each chunk costs a wake-up of the HTTP task (100 MB of
/// text at 64 KiB was 1,600 of them), and up to four wait in the channel.
const CHUNK: usize = 128 * 1024;
/// A chunk's buffer: a chunk goes out once a sandbox's family lines take it past `CHUNK`.
const CHUNK_BUFFER: usize = CHUNK + 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the Accept header lists it (without `q=0`), else text 0.0.4.
    pub(crate) fn from_accept(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                // A quality that is not a number above 0 (`q=0`, `q=x`, `q=NaN`) refuses.
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .is_some_and(|q| !q.trim().parse::<f32>().is_ok_and(|q| q > 0.0))
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// `?filter_family=a,b`: keep families whose name starts with one of the prefixes.
#[derive(Debug, Clone, Default)]
pub(crate) struct FamilyFilter {
    prefixes: Vec<String>,
}

impl FamilyFilter {
    pub(crate) fn new(list: &str) -> Self {
        FamilyFilter {
            prefixes: list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    pub(crate) fn keeps(&self, name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// The receiving side went away (the client hung up).
#[derive(Debug)]
pub(crate) struct Gone;

/// Collects output and hands it on in chunks.
pub(crate) struct ChunkSink {
    buf: String,
    gzip: Option<flate2::write::GzEncoder<Vec<u8>>>,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkSink {
    pub(crate) fn new(tx: mpsc::Sender<Bytes>, gzip: bool) -> Self {
        ChunkSink {
            buf: String::with_capacity(CHUNK_BUFFER),
            gzip: gzip.then(|| {
                flate2::write::GzEncoder::new(
                    Vec::with_capacity(CHUNK),
                    flate2::Compression::fast(),
                )
            }),
            tx,
        }
    }

    pub(crate) fn buf(&mut self) -> &mut String {
        &mut self.buf
    }

    /// Sends a chunk once enough is gathered (blocking: call from a blocking thread).
    pub(crate) fn maybe_flush(&mut self) -> Result<(), Gone> {
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Gone> {
        let text = std::mem::replace(&mut self.buf, String::with_capacity(CHUNK_BUFFER));
        let chunk = match self.gzip.as_mut() {
            Some(encoder) => {
                // Writing to a Vec cannot fail.
                let _ = encoder.write_all(text.as_bytes());
                if encoder.get_ref().len() < CHUNK {
                    return Ok(());
                }
                Bytes::from(std::mem::take(encoder.get_mut()))
            }
            None => Bytes::from(text),
        };
        self.send(chunk)
    }

    fn send(&self, chunk: Bytes) -> Result<(), Gone> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.tx.blocking_send(chunk).map_err(|_| Gone)
    }

    /// Sends what is left (and the gzip trailer).
    pub(crate) fn finish(mut self) -> Result<(), Gone> {
        let text = std::mem::take(&mut self.buf);
        match self.gzip.take() {
            Some(mut encoder) => {
                let _ = encoder.write_all(text.as_bytes());
                let rest = encoder.finish().unwrap_or_default();
                self.send(Bytes::from(rest))
            }
            None => self.send(Bytes::from(text)),
        }
    }
}

/// Writes every family of `merged` that `filter` keeps.
pub(crate) fn write(
    merged: &Merged<'_>,
    format: Format,
    filter: &FamilyFilter,
    sink: &mut ChunkSink,
) -> Result<(), Gone> {
    for (name, family) in &merged.families {
        if !filter.keeps(name) {
            continue;
        }
        write_header(name, family.help, family.kind, format, sink.buf());
        for (host, block) in &family.parts {
            block.samples.write_lines(host, sink.buf());
            sink.maybe_flush()?;
        }
    }
    if format == Format::OpenMetrics {
        sink.buf().push_str("# EOF\n");
    }
    Ok(())
}

fn write_header(name: &str, help: &str, kind: MetricType, format: Format, out: &mut String) {
    let (name, kind) = match format {
        Format::Text => (
            name,
            match kind {
                MetricType::Counter => "counter",
                MetricType::Gauge => "gauge",
                MetricType::Histogram => "histogram",
                MetricType::Summary => "summary",
                MetricType::Untyped => "untyped",
            },
        ),
        // OpenMetrics names a counter without its `_total`; a counter whose samples lack the
        // suffix (Kata's `*_count` counters) can only be `unknown` there.
        Format::OpenMetrics => match kind {
            MetricType::Counter => match name.strip_suffix("_total") {
                Some(base) => (base, "counter"),
                None => (name, "unknown"),
            },
            MetricType::Gauge => (name, "gauge"),
            MetricType::Histogram => (name, "histogram"),
            MetricType::Summary => (name, "summary"),
            MetricType::Untyped => (name, "unknown"),
        },
    };
    write_header_quoting(name, help, format == Format::OpenMetrics, kind, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::block::test_support::block_of;
    use crate::metrics::exposition::{Family, Sample};
    use crate::monitor::aggregate::merge;

    fn render(format: Format, gzip: bool) -> Vec<u8> {
        let family = Family {
            name: "c_total".into(),
            help: "say \"hi\"\\".into(),
            kind: MetricType::Counter,
            samples: vec![Sample {
                name: "c_total".into(),
                labels: vec![],
                value: 1.0,
                timestamp_ms: None,
            }],
        };
        let sources = vec![("sandbox_id=\"a\"".to_string(), vec![block_of(&family)])];
        let merged = merge(&sources);
        let (tx, mut rx) = mpsc::channel(1024);
        let mut sink = ChunkSink::new(tx, gzip);
        write(&merged, format, &FamilyFilter::default(), &mut sink).unwrap();
        sink.finish().unwrap();
        let mut out = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[test]
    fn both_formats() {
        assert_eq!(
            String::from_utf8(render(Format::Text, false)).unwrap(),
            "# HELP c_total say \"hi\"\\\\\n# TYPE c_total counter\nc_total{sandbox_id=\"a\"} 1\n"
        );
        assert_eq!(
            String::from_utf8(render(Format::OpenMetrics, false)).unwrap(),
            "# HELP c say \\\"hi\\\"\\\\\n# TYPE c counter\nc_total{sandbox_id=\"a\"} 1\n# EOF\n"
        );
        let zipped = render(Format::Text, true);
        let mut plain = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut plain)
            .unwrap();
        assert!(plain.ends_with("c_total{sandbox_id=\"a\"} 1\n"));
    }

    #[test]
    fn negotiation_and_filters() {
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Text
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=NaN")),
            Format::Text
        );
        let filter = FamilyFilter::new("kata_guest_, kata_shim_fds");
        assert!(filter.keeps("kata_guest_meminfo"));
        assert!(filter.keeps("kata_shim_fds"));
        assert!(!filter.keeps("kata_shim_threads"));
        assert!(FamilyFilter::new("").keeps("anything"));
    }
}
