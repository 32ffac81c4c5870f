//! The sandboxes discovery has found: id, management socket, and the pod labels once read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::mgmt::paths::SocketAddress;
use crate::mgmt::PodIdentity;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PodLabels {
    /// Not asked yet (or the shim did not answer): asked again on the next scrape.
    Unknown,
    /// What the shim said; `None` when it has no pod identity.
    Known(Option<PodIdentity>),
}

#[derive(Debug)]
pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) socket: SocketAddress,
    pod: Mutex<PodLabels>,
}

impl Sandbox {
    /// Whether the sandbox's socket file is gone (its shim removed it on the way out). An
    /// abstract socket leaves no trace to check.
    pub(crate) fn socket_is_gone(&self) -> bool {
        match &self.socket {
            SocketAddress::File(path) => !path.exists(),
            SocketAddress::Abstract(_) => false,
        }
    }

    pub(crate) fn new(id: String, socket: SocketAddress) -> Self {
        Sandbox {
            id,
            socket,
            pod: Mutex::new(PodLabels::Unknown),
        }
    }

    pub(crate) fn pod(&self) -> PodLabels {
        self.pod
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn set_pod(&self, labels: PodLabels) {
        *self
            .pod
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = labels;
    }
}

/// Every known sandbox by id (sorted, so every listing and scrape has one order).
#[derive(Debug, Default)]
pub(crate) struct Sandboxes {
    inner: RwLock<BTreeMap<String, Arc<Sandbox>>>,
}

/// What an update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
}

impl Sandboxes {
    /// Makes the set exactly `found`; a sandbox whose socket moved counts as a new one.
    pub(crate) fn replace_all(&self, found: BTreeMap<String, SocketAddress>) -> Changes {
        let mut map = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut changes = Changes::default();
        map.retain(|id, sandbox| {
            let keep = found.get(id) == Some(&sandbox.socket);
            if !keep {
                changes.removed.push(id.clone());
            }
            keep
        });
        for (id, socket) in found {
            if !map.contains_key(&id) {
                changes.added.push(id.clone());
                map.insert(id.clone(), Arc::new(Sandbox::new(id, socket)));
            }
        }
        // A moved socket is both removed and added; it is still there.
        changes.removed.retain(|id| !changes.added.contains(id));
        changes
    }

    pub(crate) fn all(&self) -> Vec<Arc<Sandbox>> {
        self.read().values().cloned().collect()
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.read().get(id).cloned()
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Sandbox>>> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pairs: &[(&str, &str)]) -> BTreeMap<String, SocketAddress> {
        pairs
            .iter()
            .map(|(id, path)| (id.to_string(), SocketAddress::File(path.into())))
            .collect()
    }

    #[test]
    fn updates_report_arrivals_and_departures() {
        let sandboxes = Sandboxes::default();
        let changes = sandboxes.replace_all(found(&[("a", "/r/a/s"), ("b", "/r/b/s")]));
        assert_eq!(changes.added, vec!["a", "b"]);
        sandboxes.get("a").unwrap().set_pod(PodLabels::Known(None));
        let changes = sandboxes.replace_all(found(&[("a", "/r/a/s"), ("c", "/r/c/s")]));
        assert_eq!(changes.added, vec!["c"]);
        assert_eq!(changes.removed, vec!["b"]);
        // The sandbox that stayed kept what was learnt about it.
        assert_eq!(sandboxes.get("a").unwrap().pod(), PodLabels::Known(None));
        assert_eq!(sandboxes.ids(), vec!["a", "c"]);
    }
}
