//! One process collector for any pid and metric prefix (shim, hypervisor, agent).
// TEMP STUB (replaced by the collectors branch)
pub enum Target {
    SelfProcess,
    Pid(i32),
}
pub enum IoItemNames {
    Runtime,
    Agent,
}
pub struct ProcessCollectorOptions {
    pub netdev: bool,
    pub totals: bool,
    pub io_item_names: IoItemNames,
}
impl ProcessCollectorOptions {
    pub fn shim() -> Self {
        Self {
            netdev: true,
            totals: false,
            io_item_names: IoItemNames::Runtime,
        }
    }
    pub fn hypervisor() -> Self {
        Self::shim()
    }
    pub fn agent() -> Self {
        Self {
            netdev: false,
            totals: true,
            io_item_names: IoItemNames::Agent,
        }
    }
}
pub struct ProcessCollector {
    descs: Vec<prometheus::core::Desc>,
}
impl ProcessCollector {
    pub fn new(
        _target: Target,
        _prefix: &str,
        _options: ProcessCollectorOptions,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self { descs: vec![] })
    }
}
impl prometheus::core::Collector for ProcessCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        vec![]
    }
}
