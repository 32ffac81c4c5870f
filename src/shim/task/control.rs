//! Acting on a started process: Kill (a signal through the agent), CloseIO (end its stdin) and
//! ResizePty (its terminal's size).

use containerd_shim::api::{CloseIORequest, Empty, KillRequest, ResizePtyRequest, Status};

use super::error::{ProcessName, TaskError};
use super::TaskService;
use crate::protocols::agent;
use crate::shim::waiter;

impl TaskService {
    pub(super) async fn kill_process(&self, req: KillRequest) -> Result<Empty, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let name = || ProcessName::of(&container, &process);
        match process.status() {
            Status::STOPPED => return Err(TaskError::AlreadyFinished { process: name() }),
            // The guest has no such process before Start.
            Status::CREATED if !process.is_init() => {
                return Err(TaskError::NotStarted { process: name() })
            }
            _ => {}
        }
        let signal = agent::SignalProcessRequest::of(&req.id, &process.exec_id, req.signal);
        container
            .agent
            .signal_process(signal)
            .await
            .map_err(|source| TaskError::Signal {
                process: name(),
                source: Box::new(source),
            })?;
        Ok(Empty::new())
    }

    pub(super) async fn close_process_io(&self, req: CloseIORequest) -> Result<Empty, TaskError> {
        let (_, process) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            // Let the copy finish what the FIFO still holds; it closes stdin in the guest at EOF.
            if let Some(copy) = process.take_stdin_copy() {
                tokio::spawn(async move {
                    let abort = copy.abort_handle();
                    if tokio::time::timeout(waiter::DRAIN_TIMEOUT, copy)
                        .await
                        .is_err()
                    {
                        abort.abort();
                    }
                });
            }
        }
        Ok(Empty::new())
    }

    pub(super) async fn resize_process_pty(
        &self,
        req: ResizePtyRequest,
    ) -> Result<Empty, TaskError> {
        let (container, process) = self.process(&req.id, &req.exec_id)?;
        let resize =
            agent::TtyWinResizeRequest::of(&req.id, &process.exec_id, req.height, req.width);
        container
            .agent
            .tty_win_resize(resize)
            .await
            .map_err(|source| TaskError::ResizePty {
                process: ProcessName::of(&container, &process),
                source: Box::new(source),
            })?;
        Ok(Empty::new())
    }
}
