//! Pod identity: from a sandbox's CRI annotations (shim), through the `/pod-labels` body, to the
//! host labels kata-monitor writes on every series.

use std::collections::HashMap;

use crate::metrics::exposition::{self, Limits};
use crate::mgmt::pod::{ANNOTATION_NAME, ANNOTATION_NAMESPACE, ANNOTATION_UID};
use crate::mgmt::{pod_identity_from_annotations, PodIdentity};
use crate::monitor::aggregate::host_labels;

/// Longest value that may become a label (Kubernetes names are at most 253 characters).
const MAX_VALUE_LEN: usize = 253;

/// `data` twice: decoded into annotations (records of key tag, length, value), and read as it is
/// as a `/pod-labels` body.
pub fn pod_labels(data: &[u8]) {
    let annotations = annotations_from(data);
    let pod = pod_identity_from_annotations(&annotations);
    let keys = [ANNOTATION_UID, ANNOTATION_NAME, ANNOTATION_NAMESPACE];
    let usable = |key: &str| {
        annotations
            .get(key)
            .filter(|v| !v.is_empty() && acceptable(v))
    };
    match &pod {
        None => assert!(keys.iter().all(|k| usable(k).is_none())),
        Some(pod) => {
            let fields = [&pod.uid, &pod.name, &pod.namespace];
            for (key, field) in keys.iter().zip(fields) {
                match usable(key) {
                    Some(value) => assert_eq!(value, field, "{key}"),
                    None => assert!(field.is_empty(), "{key}: {field:?}"),
                }
            }
            check_identity(pod);
        }
    }
    // The monitor reads at most 4096 bytes, lossily.
    let body = String::from_utf8_lossy(&data[..data.len().min(4096)]);
    check_identity(&PodIdentity::from_text(&body));
}

/// Records `[tag][len][len bytes]`; the tag picks the key (the three CRI ones, or another).
fn annotations_from(mut data: &[u8]) -> HashMap<String, String> {
    let mut annotations = HashMap::new();
    while let [tag, len, rest @ ..] = data {
        let len = usize::from(*len).min(rest.len());
        let (value, next) = rest.split_at(len);
        let key = match tag % 4 {
            0 => ANNOTATION_UID,
            1 => ANNOTATION_NAME,
            2 => ANNOTATION_NAMESPACE,
            _ => "io.kubernetes.cri.container-type",
        };
        annotations.insert(key.to_string(), String::from_utf8_lossy(value).into_owned());
        data = next;
    }
    annotations
}

fn acceptable(value: &str) -> bool {
    value.len() <= MAX_VALUE_LEN && !value.chars().any(char::is_control)
}

/// Every value may be a label; the `/pod-labels` body reads back to the same identity; the host
/// labels parse back to exactly `sandbox_id` and the non-empty `cri_*` values.
fn check_identity(pod: &PodIdentity) {
    for (name, value) in pod.pairs() {
        assert!(acceptable(value), "{name}={value:?}");
    }
    let text = pod.to_text();
    assert_eq!(PodIdentity::from_text(&text), *pod, "{text:?}");

    let mut line = String::from("x{");
    line.push_str(&host_labels("sandbox-1", &pod.pairs()));
    line.push_str("} 1\n");
    let parsed = match exposition::parse(&line, &Limits::default()) {
        Ok(parsed) => parsed,
        Err(err) => panic!("{err}: {line:?}"),
    };
    assert!(parsed.dropped.is_empty(), "{:?}: {line:?}", parsed.dropped);
    let [family] = &parsed.families[..] else {
        panic!("{line:?}");
    };
    let [sample] = &family.samples[..] else {
        panic!("{line:?}");
    };
    let mut expected = vec![("sandbox_id".to_string(), "sandbox-1".to_string())];
    for (name, value) in pod.pairs() {
        if !value.is_empty() {
            expected.push((name.to_string(), value.to_string()));
        }
    }
    assert_eq!(sample.labels, expected, "{line:?}");
}
