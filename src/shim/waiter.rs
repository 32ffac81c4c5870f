//! The per-process waiter: waits for a container's init or exec'd process in the guest, lets its
//! output drain to containerd's FIFOs, then records the exit (which ends Wait) and reports
//! TaskExit (`id` is the exec id for an exec'd process, the container id for the init).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::topics;
use tokio::task::JoinHandle;

use super::container::{Container, Exit, Process};
use super::events::{timestamp, Events};
use super::vm_fate::UNKNOWN_EXIT;
use crate::protocols::agent;

/// How long a finished process's output may take to drain before its exit is reported.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a waiter whose connection to the agent broke waits before it asks again.
const RETRY_WAIT: Duration = Duration::from_secs(1);

/// The process's exit status as the guest reports it. A wait cut short by the connection (a
/// stalled guest, a relay that dropped it) is asked again for as long as the VM runs; once the VM
/// is lost, its processes end with it.
async fn exit_status(container: &Container, process: &Process) -> u32 {
    let wait = agent::WaitProcessRequest::of(&container.id, &process.exec_id);
    loop {
        let reply = tokio::select! {
            reply = container.agent.wait_process(wait.clone()) => reply,
            loss = container.vm.lost() => return loss.exit_status(),
        };
        match reply {
            Ok(reply) => return u32::try_from(reply.status).unwrap_or(UNKNOWN_EXIT),
            // The agent answered: it has no exit to give.
            Err(e) if e.code().is_some() => {
                tracing::warn!(
                    container = container.id,
                    exec = process.exec_id,
                    "WaitProcess: {e}"
                );
                return UNKNOWN_EXIT;
            }
            Err(e) => tracing::debug!(
                container = container.id,
                exec = process.exec_id,
                "WaitProcess: {e}; asking again while the VM runs"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_WAIT) => {}
            loss = container.vm.lost() => return loss.exit_status(),
        }
    }
}

pub(crate) async fn wait_for_exit(
    container: Arc<Container>,
    process: Arc<Process>,
    events: Arc<Events>,
    out: JoinHandle<()>,
    err: JoinHandle<()>,
) {
    let status = exit_status(&container, &process).await;
    // `ctr run` prints output until EOF: report the exit only after the output got out.
    for copy in [out, err] {
        let abort = copy.abort_handle();
        if tokio::time::timeout(DRAIN_TIMEOUT, copy).await.is_err() {
            abort.abort();
        }
    }
    process.stop_stdin_copy();
    let exit = Exit {
        status,
        at: SystemTime::now(),
    };
    if !process.set_exit(exit) {
        return;
    }
    let id = if process.is_init() {
        container.id.clone()
    } else {
        process.exec_id.clone()
    };
    events
        .publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container.id.clone(),
                id,
                pid: container.pid,
                exit_status: status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
}
