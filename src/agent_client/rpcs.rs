//! Every agent call the host makes, one line each: the service and method, the request and reply
//! types, and the deadline. The action recorded for a call is Kata's `grpc.<Request type>`.

use std::time::Duration;

use super::{AgentClient, AgentError, AgentTimeouts};
use crate::protocols::empty::Empty;
use crate::protocols::{agent, health, types};

/// The deadline of most calls.
fn request<R>(timeouts: &AgentTimeouts, _: &R) -> Option<Duration> {
    Some(timeouts.request)
}

/// GetMetrics: a scrape must never wait long.
fn metrics<R>(timeouts: &AgentTimeouts, _: &R) -> Option<Duration> {
    Some(timeouts.metrics)
}

/// Calls that block until something happens in the guest (an exit, output): only connecting is
/// bounded.
fn unbounded<R>(_: &AgentTimeouts, _: &R) -> Option<Duration> {
    None
}

/// RemoveContainer: the agent waits up to `req.timeout` seconds (0: no bound) for the container's
/// exit, on top of the usual deadline.
fn request_and_exit_wait(
    timeouts: &AgentTimeouts,
    req: &agent::RemoveContainerRequest,
) -> Option<Duration> {
    Some(timeouts.request + Duration::from_secs(req.timeout.into()))
}

macro_rules! agent_rpcs {
    ($(
        $(#[$doc:meta])*
        $service:ident.$method:ident($module:ident::$request:ident) -> $reply:ty, $deadline:ident;
    )*) => {
        impl AgentClient {$(
            $(#[$doc])*
            pub async fn $method(&self, req: $module::$request) -> Result<$reply, AgentError> {
                let deadline = $deadline(&self.timeouts, &req);
                self.call(concat!("grpc.", stringify!($request)), deadline, |conn, ctx| async move {
                    conn.$service.$method(ctx, &req).await
                })
                .await
            }
        )*}
    };
}

agent_rpcs! {
    /// The agent's Prometheus text (guest OS and agent families).
    agent.get_metrics(agent::GetMetricsRequest) -> agent::Metrics, metrics;
    /// Prepares the guest for the sandbox (hostname, the shared directory's mount).
    agent.create_sandbox(agent::CreateSandboxRequest) -> Empty, request;
    agent.destroy_sandbox(agent::DestroySandboxRequest) -> Empty, request;
    /// Prepares the container (everything but exec'ing its program); `OCI.Root.Path` must be the
    /// rootfs path inside the guest.
    agent.create_container(agent::CreateContainerRequest) -> Empty, request;
    agent.start_container(agent::StartContainerRequest) -> Empty, request;
    /// Kills the container if it runs and forgets it.
    agent.remove_container(agent::RemoveContainerRequest) -> Empty, request_and_exit_wait;
    /// The container's new limits (CRI UpdateContainerResources), applied to its guest cgroup.
    agent.update_container(agent::UpdateContainerRequest) -> Empty, request;
    /// The container's resource usage measured in the guest (cgroup and network figures).
    agent.stats_container(agent::StatsContainerRequest) -> agent::StatsContainerResponse, request;
    /// Many containers' figures in one round trip (a scrape of `/metrics/cadvisor`).
    agent.stats_containers(agent::StatsContainersRequest) -> agent::StatsContainersResponse, metrics;
    /// Creates and starts one more process in a running container.
    agent.exec_process(agent::ExecProcessRequest) -> Empty, request;
    /// Signals a process; signalling one that already exited succeeds.
    agent.signal_process(agent::SignalProcessRequest) -> Empty, request;
    /// Blocks until the process exits: its exit code, or 128 + N when signal N killed it.
    agent.wait_process(agent::WaitProcessRequest) -> agent::WaitProcessResponse, unbounded;
    /// Up to `len` bytes of the process's stdout, waiting for data; empty means EOF.
    agent.read_stdout(agent::ReadStreamRequest) -> agent::ReadStreamResponse, unbounded;
    /// Like `read_stdout`; a terminal process's stderr is at EOF at once.
    agent.read_stderr(agent::ReadStreamRequest) -> agent::ReadStreamResponse, unbounded;
    /// Writes all of `data` to the process's stdin.
    agent.write_stdin(agent::WriteStreamRequest) -> agent::WriteStreamResponse, request;
    agent.close_stdin(agent::CloseStdinRequest) -> Empty, request;
    agent.tty_win_resize(agent::TtyWinResizeRequest) -> Empty, request;
    /// Configures the guest interface whose MAC is `interface.hwAddr` (addresses, MTU, up).
    agent.update_interface(agent::UpdateInterfaceRequest) -> types::Interface, request;
    /// Replaces the guest's routes with these.
    agent.update_routes(agent::UpdateRoutesRequest) -> agent::Routes, request;
    /// `grpc.Health/Check`; see [`AgentClient::serving`] for the answer's meaning.
    health.check(health::CheckRequest) -> health::HealthCheckResponse, request;
}
