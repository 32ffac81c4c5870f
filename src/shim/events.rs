//! Task events for containerd (TaskCreate, TaskStart, TaskExit, TaskDelete), sent through the
//! crate's publisher on containerd's ttrpc socket. A lost event is logged, never fatal.

use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;

/// Where events go: containerd's publisher in the shim; the task service's tests record them.
#[async_trait]
pub(crate) trait Publisher: Send + Sync {
    async fn send_event(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> containerd_shim::Result<()>;
}

#[async_trait]
impl Publisher for RemotePublisher {
    async fn send_event(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> containerd_shim::Result<()> {
        self.publish(ttrpc::context::Context::default(), topic, namespace, event)
            .await
    }
}

pub(crate) struct Events {
    publisher: Box<dyn Publisher>,
    namespace: String,
}

impl Events {
    pub(crate) fn new(publisher: impl Publisher + 'static, namespace: String) -> Events {
        Events {
            publisher: Box::new(publisher),
            namespace,
        }
    }

    pub(crate) async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(err) = self
            .publisher
            .send_event(topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, "publishing event: {err}");
        }
    }
}

pub(crate) fn timestamp(at: SystemTime) -> Timestamp {
    Timestamp::from(at)
}
