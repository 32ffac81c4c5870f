//! The sandbox's containers as kubelet's cAdvisor labels them, kept from their OCI specs (host
//! data: containerd wrote them) so that nothing the guest sends can name or relabel a container.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use oci_spec::runtime::Spec;

use crate::mgmt::PodIdentity;
use crate::shim::oci;

const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// One container: what its series say about it besides the pod.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContainerCard {
    /// CRI's container name; empty for the pod's sandbox (pause) container, as kubelet has it.
    pub(crate) container: String,
    /// The image as CRI names it.
    pub(crate) image: String,
    /// The container's cgroup as cAdvisor names it (`/kubepods/.../<id>`), from `cgroupsPath`.
    pub(crate) cgroup: String,
    /// When the shim created it.
    pub(crate) created: SystemTime,
}

impl ContainerCard {
    pub(crate) fn from_spec(spec: &Spec, created: SystemTime) -> ContainerCard {
        let annotation = |key: &str| {
            spec.annotations()
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
                .unwrap_or_default()
        };
        ContainerCard {
            container: annotation(CONTAINER_NAME),
            image: annotation(IMAGE_NAME),
            cgroup: oci::cgroups_path(spec)
                .map(|path| cadvisor_cgroup_name(&path))
                .unwrap_or_default(),
            created,
        }
    }
}

/// The sandbox's containers by id, and its pod (from the sandbox container's annotations).
#[derive(Debug, Default)]
pub struct ContainerBook {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct BookPage {
    pub(crate) pod: Option<PodIdentity>,
    pub(crate) containers: BTreeMap<String, ContainerCard>,
}

type Inner = BookPage;

impl ContainerBook {
    pub(crate) fn set_pod(&self, pod: Option<PodIdentity>) {
        self.lock().pod = pod;
    }

    pub(crate) fn add(&self, id: &str, card: ContainerCard) {
        self.lock().containers.insert(id.to_string(), card);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    /// A copy, so that no lock is held across the agent call.
    pub(crate) fn page(&self) -> BookPage {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// cAdvisor's name of a cgroup: its path in the hierarchy. A cgroupfs `cgroupsPath` is one already;
/// a systemd one (`kubepods-besteffort-pod1.slice:cri-containerd:<id>`) becomes the slices'
/// nesting and a scope: `/kubepods.slice/kubepods-besteffort.slice/.../cri-containerd-<id>.scope`.
fn cadvisor_cgroup_name(path: &str) -> String {
    let mut parts = path.splitn(3, ':');
    let (Some(slice), Some(prefix), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return format!("/{}", path.trim_start_matches('/'));
    };
    let mut out = String::new();
    if let Some(stem) = slice.strip_suffix(".slice").filter(|s| !s.is_empty()) {
        let mut nested = String::new();
        for word in stem.split('-') {
            if !nested.is_empty() {
                nested.push('-');
            }
            nested.push_str(word);
            out.push('/');
            out.push_str(&nested);
            out.push_str(".slice");
        }
    }
    out.push('/');
    out.push_str(prefix);
    out.push('-');
    out.push_str(name);
    out.push_str(".scope");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_as_cadvisor_has_them() {
        assert_eq!(
            cadvisor_cgroup_name("/kubepods/besteffort/pod1/abc"),
            "/kubepods/besteffort/pod1/abc"
        );
        assert_eq!(cadvisor_cgroup_name("kubepods/x"), "/kubepods/x");
        assert_eq!(
            cadvisor_cgroup_name("kubepods-besteffort-pod1.slice:cri-containerd:abc"),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
        );
    }

    #[test]
    fn cards_come_from_the_cri_annotations() {
        let spec: Spec = match serde_json::from_str(
            r#"{"ociVersion":"1.0.2","annotations":{
                "io.kubernetes.cri.container-name":"web",
                "io.kubernetes.cri.image-name":"docker.io/library/busybox:latest"},
               "linux":{"cgroupsPath":"/kubepods/besteffort/pod1/c1"}}"#,
        ) {
            Ok(spec) => spec,
            Err(err) => panic!("spec: {err}"),
        };
        let card = ContainerCard::from_spec(&spec, SystemTime::UNIX_EPOCH);
        assert_eq!(card.container, "web");
        assert_eq!(card.image, "docker.io/library/busybox:latest");
        assert_eq!(card.cgroup, "/kubepods/besteffort/pod1/c1");
        let book = ContainerBook::default();
        book.add("c1", card.clone());
        book.add("c2", card);
        book.remove("c2");
        assert_eq!(book.page().containers.keys().collect::<Vec<_>>(), ["c1"]);
    }
}
