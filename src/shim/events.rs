//! Task events for containerd (TaskCreate, TaskStart, TaskExit, TaskDelete), sent through the
//! crate's publisher on containerd's ttrpc socket. A lost event is logged, never fatal.

use std::time::SystemTime;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;

pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Events {
        Events {
            publisher,
            namespace,
        }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(err) = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await
        {
            tracing::warn!(topic, "publishing event: {err}");
        }
    }
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    Timestamp::from(at)
}
