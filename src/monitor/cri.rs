//! Pod labels from the CRI runtime (`--runtime-endpoint`), for sandboxes whose shim does not serve
//! `/pod-labels` (an upstream Kata shim on the same node): `PodSandboxStatus` names the pod.
//!
//! One connection, opened when first needed and opened again after a failure; every call has the
//! caller's deadline, so a stuck CRI runtime costs a scrape no more than one shim's timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::PodSandboxStatusRequest;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::mgmt::PodIdentity;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(
        "runtime endpoint {endpoint:?}: only unix sockets are supported (unix:///path or /path)"
    )]
    Endpoint { endpoint: String },
    #[error("connecting to the CRI runtime at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("CRI PodSandboxStatus of {sandbox_id}: {source}")]
    Status {
        sandbox_id: String,
        source: Box<tonic::Status>,
    },
    #[error("CRI PodSandboxStatus of {sandbox_id}: no answer within {timeout:?}")]
    Timeout {
        sandbox_id: String,
        timeout: Duration,
    },
}

/// The CRI runtime kata-monitor asks for pod labels.
pub(crate) struct CriPods {
    socket: PathBuf,
    client: Mutex<Option<RuntimeServiceClient<Channel>>>,
}

impl CriPods {
    /// `endpoint` as kubelet and upstream kata-monitor spell it: `unix:///run/containerd/containerd.sock`
    /// or a plain path.
    pub(crate) fn new(endpoint: &str) -> Result<CriPods, CriError> {
        let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
        if !path.starts_with('/') {
            return Err(CriError::Endpoint {
                endpoint: endpoint.to_string(),
            });
        }
        Ok(CriPods {
            socket: PathBuf::from(path),
            client: Mutex::new(None),
        })
    }

    /// The pod of sandbox `sandbox_id` as CRI knows it; `None` when CRI has no such sandbox (not a
    /// Kubernetes pod).
    pub(crate) async fn pod_of(
        &self,
        sandbox_id: &str,
        timeout: Duration,
    ) -> Result<Option<PodIdentity>, CriError> {
        match tokio::time::timeout(timeout, self.ask(sandbox_id)).await {
            Ok(answer) => answer,
            Err(_) => {
                // A half-open connection may be why: start afresh next time.
                self.client.lock().await.take();
                Err(CriError::Timeout {
                    sandbox_id: sandbox_id.to_string(),
                    timeout,
                })
            }
        }
    }

    async fn ask(&self, sandbox_id: &str) -> Result<Option<PodIdentity>, CriError> {
        let mut slot = self.client.lock().await;
        let mut client = match slot.as_ref() {
            Some(client) => client.clone(),
            None => {
                let client = RuntimeServiceClient::new(connect(&self.socket).await?);
                *slot = Some(client.clone());
                client
            }
        };
        drop(slot);
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            verbose: false,
        };
        let status = match client.pod_sandbox_status(request).await {
            Ok(reply) => reply.into_inner().status,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => {
                if status.code() == tonic::Code::Unavailable {
                    self.client.lock().await.take();
                }
                return Err(CriError::Status {
                    sandbox_id: sandbox_id.to_string(),
                    source: Box::new(status),
                });
            }
        };
        let pod = status
            .and_then(|status| status.metadata)
            .map(|meta| PodIdentity::from_parts(&meta.uid, &meta.name, &meta.namespace))
            .filter(|pod| !pod.is_empty());
        Ok(pod)
    }
}

async fn connect(socket: &Path) -> Result<Channel, CriError> {
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector always dials the socket.
    Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| CriError::Connect {
            path: socket.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_sockets() {
        assert!(CriPods::new("unix:///run/containerd/containerd.sock").is_ok());
        assert!(CriPods::new("/run/containerd/containerd.sock").is_ok());
        let err = CriPods::new("tcp://10.0.0.1:1234").err().expect("refused");
        assert!(err.to_string().contains("tcp://10.0.0.1:1234"), "{err}");
    }

    #[tokio::test]
    async fn a_runtime_that_is_not_there_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let cri = CriPods::new(&dir.path().join("nothing.sock").display().to_string()).unwrap();
        let err = cri
            .pod_of("abc", Duration::from_secs(2))
            .await
            .expect_err("no runtime");
        assert!(err.to_string().contains("nothing.sock"), "{err}");
    }
}
