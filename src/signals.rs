//! Waiting for the signals that ask a daemon to stop.

use tokio::signal::unix::{signal, SignalKind};

/// Returns when SIGTERM or SIGINT arrives.
pub async fn wait_for_termination() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
