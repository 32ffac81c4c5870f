//! Guest OS collectors (`kata_guest_*`), read from /proc at scrape time.
// TEMP STUB (replaced by the collectors branch)
pub struct GuestCollector {
    descs: Vec<prometheus::core::Desc>,
}
impl GuestCollector {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self { descs: vec![] })
    }
}
impl prometheus::core::Collector for GuestCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        vec![]
    }
}
