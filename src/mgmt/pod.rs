//! A sandbox's pod identity (Kubernetes uid, name, namespace), taken from the sandbox's OCI
//! annotations by the shim and served on `GET /pod-labels`, so kata-monitor can label series without
//! asking CRI.
//!
//! Wire format (text/plain, one `key=value` per line, only keys that are known):
//! ```text
//! cri_uid=5b0f3b8e-...
//! cri_name=nginx-abc
//! cri_namespace=default
//! ```
//! Values never hold control characters (they are refused on both sides), so no escaping is needed.

use std::collections::HashMap;

/// The OCI annotations containerd's CRI plugin sets on a sandbox.
pub(crate) const ANNOTATION_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub(crate) const ANNOTATION_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub(crate) const ANNOTATION_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Longest value accepted: Kubernetes names are at most 253 characters.
const MAX_VALUE_LEN: usize = 253;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub(crate) uid: String,
    pub(crate) name: String,
    pub(crate) namespace: String,
}

/// True when `value` can be served and used as a label value as it is.
fn acceptable(value: &str) -> bool {
    value.len() <= MAX_VALUE_LEN && !value.chars().any(char::is_control)
}

/// The pod identity in a sandbox's annotations; `None` when none of the three is there (not a
/// Kubernetes pod). A value that is too long or holds control characters is left out (logged).
pub fn pod_identity_from_annotations(annotations: &HashMap<String, String>) -> Option<PodIdentity> {
    let take = |key: &str| -> String {
        match annotations.get(key) {
            Some(value) if acceptable(value) => value.clone(),
            Some(_) => {
                tracing::warn!(annotation = key, "annotation value refused for pod labels");
                String::new()
            }
            None => String::new(),
        }
    };
    let pod = PodIdentity {
        uid: take(ANNOTATION_UID),
        name: take(ANNOTATION_NAME),
        namespace: take(ANNOTATION_NAMESPACE),
    };
    (!pod.is_empty()).then_some(pod)
}

impl PodIdentity {
    /// A pod identity from its three parts (e.g. CRI's pod metadata); an unusable value is left
    /// out, as in annotations.
    pub(crate) fn from_parts(uid: &str, name: &str, namespace: &str) -> PodIdentity {
        let keep = |value: &str| {
            if acceptable(value) {
                value.to_string()
            } else {
                String::new()
            }
        };
        PodIdentity {
            uid: keep(uid),
            name: keep(name),
            namespace: keep(namespace),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.uid.is_empty() && self.name.is_empty() && self.namespace.is_empty()
    }

    /// The `/pod-labels` body.
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        for (key, value) in self.pairs() {
            if !value.is_empty() && acceptable(value) {
                out.push_str(key);
                out.push('=');
                out.push_str(value);
                out.push('\n');
            }
        }
        out
    }

    /// Reads a `/pod-labels` body. Unknown keys and unusable values are skipped: the body comes from
    /// another process and must never fail a scrape.
    pub(crate) fn from_text(text: &str) -> PodIdentity {
        let mut pod = PodIdentity::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !acceptable(value) {
                continue;
            }
            let slot = match key.trim() {
                "cri_uid" => &mut pod.uid,
                "cri_name" => &mut pod.name,
                "cri_namespace" => &mut pod.namespace,
                _ => continue,
            };
            *slot = value.to_string();
        }
        pod
    }

    /// (label name, value) in the order kata-monitor appends them.
    pub(crate) fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("cri_uid", &self.uid),
            ("cri_name", &self.name),
            ("cri_namespace", &self.namespace),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identity_comes_from_the_cri_annotations() {
        let pod = pod_identity_from_annotations(&annotations(&[
            (ANNOTATION_NAME, "web-0"),
            (ANNOTATION_NAMESPACE, "shop"),
            (ANNOTATION_UID, "1234-abcd"),
            ("io.kubernetes.cri.container-type", "sandbox"),
        ]))
        .unwrap();
        assert_eq!(pod.name, "web-0");
        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.uid, "1234-abcd");
        assert_eq!(
            pod.to_text(),
            "cri_uid=1234-abcd\ncri_name=web-0\ncri_namespace=shop\n"
        );
        assert_eq!(PodIdentity::from_text(&pod.to_text()), pod);
    }

    #[test]
    fn no_annotations_no_identity_and_bad_values_are_left_out() {
        assert_eq!(pod_identity_from_annotations(&HashMap::new()), None);
        let pod = pod_identity_from_annotations(&annotations(&[
            (ANNOTATION_NAME, "evil\nsandbox_id=x"),
            (ANNOTATION_NAMESPACE, "ns"),
        ]))
        .unwrap();
        assert_eq!(pod.name, "");
        assert_eq!(pod.to_text(), "cri_namespace=ns\n");
    }

    #[test]
    fn reading_skips_what_it_does_not_know() {
        let pod = PodIdentity::from_text("junk\nsandbox_id=x\ncri_name=a=b\ncri_uid=\u{7}\n");
        assert_eq!(pod.name, "a=b");
        assert_eq!(pod.uid, "");
    }
}
