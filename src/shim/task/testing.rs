//! What the task service's tests share: a service whose events are recorded instead of sent to
//! containerd, containers put in place without a VM (their agent socket does not exist, so a call
//! that reaches the agent fails to connect), and an agent that refuses ExecProcess.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use ttrpc::Code;

use super::{lock, TaskService};
use crate::agent_client::AgentClient;
use crate::protocols::{agent, agent_ttrpc, empty};
use crate::shim::config::{Config, ConfigError};
use crate::shim::container::{Container, Exit, Process};
use crate::shim::events::Publisher;
use crate::shim::sandbox::SandboxSlot;
use crate::shim::stdio::StdioPaths;

/// The sandbox id containerd started the test's shim for.
pub(super) const SHIM_ID: &str = "sb1";
/// Where the test containers' agent would be: nothing listens there.
pub(super) const NO_AGENT: &str = "unix:///nonexistent/agent.sock";
/// How a call that reaches the agent at [`NO_AGENT`] fails.
pub(super) const NO_AGENT_ERROR: &str =
    "connecting to the agent at unix:///nonexistent/agent.sock: No such file or directory (os error 2)";
/// The pid the test containers report (the VMM's, in a real sandbox).
pub(super) const VMM_PID: u32 = 4242;

/// One published event and its topic.
type Event = (String, Box<dyn MessageDyn>);

/// The events the service published, in order.
#[derive(Clone, Default)]
pub(super) struct Recorded(Arc<Mutex<Vec<Event>>>);

impl Recorded {
    pub(super) fn topics(&self) -> Vec<String> {
        lock(&self.0)
            .iter()
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// The one event published on `topic`, as `M`.
    pub(super) fn only<M: protobuf::MessageFull + Clone>(&self, topic: &str) -> M {
        let events = lock(&self.0);
        let mut on_topic = events.iter().filter(|(t, _)| t == topic);
        let (_, event) = on_topic.next().expect("an event on the topic");
        assert!(on_topic.next().is_none(), "one event on {topic}");
        event.downcast_ref::<M>().expect("the event's type").clone()
    }
}

#[async_trait]
impl Publisher for Recorded {
    async fn send_event(
        &self,
        topic: &str,
        _namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> containerd_shim::Result<()> {
        lock(&self.0).push((topic.to_string(), event));
        Ok(())
    }
}

/// A shim for sandbox [`SHIM_ID`] with a default configuration and no sandbox booted yet.
pub(super) fn service() -> (TaskService, Recorded) {
    service_with(Ok(Config::default()))
}

pub(super) fn service_with(config: Result<Config, Arc<ConfigError>>) -> (TaskService, Recorded) {
    let events = Recorded::default();
    let service = TaskService::new(
        "default".to_string(),
        SHIM_ID.to_string(),
        config,
        events.clone(),
        Arc::new(ExitSignal::default()),
        SandboxSlot::default(),
    );
    (service, events)
}

/// A created container `id` (its init not started) whose agent is at `agent_url`.
pub(super) fn add_container(service: &TaskService, id: &str, agent_url: &str) -> Arc<Container> {
    let agent = Arc::new(AgentClient::new(
        agent_url.parse().expect("agent url"),
        Default::default(),
    ));
    let container = Arc::new(Container::new(
        id.to_string(),
        Path::new("/nonexistent/bundle").join(id),
        StdioPaths::default(),
        VMM_PID,
        agent,
        Arc::default(),
        "/nonexistent/shared".into(),
    ));
    lock(&service.containers).insert(id.to_string(), container.clone());
    container
}

/// A container `id` whose init runs.
pub(super) fn add_running_container(service: &TaskService, id: &str) -> Arc<Container> {
    let container = add_container(service, id, NO_AGENT);
    container.init.mark_started();
    container
}

/// An exec'd process `exec_id` added to `container`, not started.
pub(super) fn add_exec(container: &Container, exec_id: &str) -> Arc<Process> {
    let process = Arc::new(Process::new(
        exec_id.to_string(),
        StdioPaths::default(),
        Some(Default::default()),
    ));
    assert!(container.add_exec(process.clone()), "a new exec id");
    process
}

pub(super) fn exited(process: &Process, status: u32) {
    assert!(process.set_exit(Exit {
        status,
        at: SystemTime::now(),
    }));
}

pub(super) fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

/// The status containerd would read from a refused call.
pub(super) fn refusal<T: std::fmt::Debug>(result: TtrpcResult<T>) -> (Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => (
            status.code.enum_value().expect("a known code"),
            status.message,
        ),
        other => panic!("expected a status, got {other:?}"),
    }
}

/// An agent that answers every ExecProcess with `code` and `message`.
struct RefusingAgent {
    code: Code,
    message: String,
}

#[async_trait]
impl agent_ttrpc::AgentService for RefusingAgent {
    async fn exec_process(
        &self,
        _ctx: &ttrpc::asynchronous::TtrpcContext,
        _req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<empty::Empty> {
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            self.code,
            self.message.clone(),
        )))
    }
}

/// Serves a [`RefusingAgent`] at `socket` until the server is dropped; returns its url.
pub(super) async fn refusing_agent(
    socket: &Path,
    code: Code,
    message: &str,
) -> (ttrpc::asynchronous::Server, String) {
    let url = format!("unix://{}", socket.display());
    let agent = RefusingAgent {
        code,
        message: message.to_string(),
    };
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&url)
        .expect("bind the agent socket")
        .register_service(agent_ttrpc::create_agent_service(Arc::new(agent)));
    server.start().await.expect("start the agent");
    (server, url)
}
