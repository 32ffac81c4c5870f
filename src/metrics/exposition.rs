//! Prometheus text exposition: parse, validate, relabel, merge and encode (no I/O).
// TEMP STUB (replaced by the exposition branch)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
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
#[derive(Debug, thiserror::Error)]
pub enum ExpositionError {
    #[error("too large: {size} > {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("too many samples")]
    TooManySamples { limit: usize },
}
pub fn parse(_text: &str, _limits: &Limits) -> Result<Exposition, ExpositionError> {
    Ok(Exposition::default())
}
pub fn encode(_families: &[Family], _out: &mut String) {}
impl Family {
    pub fn rename_prefix(&mut self, _from: &str, _to: &str) -> bool {
        false
    }
    pub fn set_label(&mut self, _name: &str, _value: &str) {}
    pub fn has_label(&self, _name: &str) -> bool {
        false
    }
}
