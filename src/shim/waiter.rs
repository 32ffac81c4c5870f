//! The per-container waiter: waits for the init process in the guest, lets its output drain to
//! containerd's FIFOs, then records the exit (which ends Wait) and reports TaskExit.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::topics;
use tokio::task::JoinHandle;

use super::container::{Container, Exit};
use super::events::{timestamp, Events};

/// How long a finished process's output may take to drain before its exit is reported.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status reported when the guest could not tell us one (VM gone, agent lost).
const UNKNOWN_EXIT: u32 = 255;

pub async fn wait_for_exit(
    container: Arc<Container>,
    events: Arc<Events>,
    out: JoinHandle<()>,
    err: JoinHandle<()>,
) {
    let status = match container.agent.wait_process(&container.id, "").await {
        Ok(status) => u32::try_from(status).unwrap_or(UNKNOWN_EXIT),
        Err(e) => {
            tracing::warn!(container = container.id, "WaitProcess: {e}");
            UNKNOWN_EXIT
        }
    };
    // `ctr run` prints output until EOF: report the exit only after the output got out.
    for copy in [out, err] {
        let abort = copy.abort_handle();
        if tokio::time::timeout(DRAIN_TIMEOUT, copy).await.is_err() {
            abort.abort();
        }
    }
    container.stop_stdin_copy();
    let exit = Exit {
        status,
        at: SystemTime::now(),
    };
    if !container.set_exit(exit) {
        return;
    }
    events
        .publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container.id.clone(),
                id: container.id.clone(),
                pid: container.pid,
                exit_status: status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
}
