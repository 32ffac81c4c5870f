//! What became of a sandbox's VM: running, or lost (it died, its vsock relay broke, or a SIGKILL
//! stopped it while the agent could not be reached). Shared by the sandbox's watchdog, which loses
//! the VM, and every waiter of its containers, which end their processes with the VM instead of
//! reporting an exit that the guest never had.

use tokio::sync::watch;

/// Why the VM was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmLoss {
    pub(crate) reason: String,
    /// Stopped on a SIGKILL: the processes count as killed (137), not as lost (255).
    pub(crate) killed: bool,
}

/// Exit status of a process that was killed by SIGKILL (128 + 9), as a shell reports it.
const KILLED_EXIT: u32 = 137;
/// Exit status of a process whose VM went away without the guest telling us one.
pub(crate) const UNKNOWN_EXIT: u32 = 255;

impl VmLoss {
    /// The exit status the VM's processes get.
    pub(crate) fn exit_status(&self) -> u32 {
        if self.killed {
            KILLED_EXIT
        } else {
            UNKNOWN_EXIT
        }
    }
}

pub(crate) struct VmFate {
    loss: watch::Sender<Option<VmLoss>>,
}

impl Default for VmFate {
    fn default() -> Self {
        VmFate {
            loss: watch::Sender::new(None),
        }
    }
}

impl VmFate {
    /// Records the loss; the first one stands. Returns whether this call recorded it.
    pub(crate) fn lose(&self, loss: VmLoss) -> bool {
        self.loss.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(loss);
            true
        })
    }

    pub(crate) fn loss(&self) -> Option<VmLoss> {
        self.loss.borrow().clone()
    }

    /// Waits until the VM is lost.
    pub(crate) async fn lost(&self) -> VmLoss {
        let mut seen = self.loss.subscribe();
        let loss = match seen.wait_for(Option::is_some).await {
            Ok(loss) => loss.clone(),
            // The sender lives in `self`, so it outlives this wait.
            Err(_) => None,
        };
        match loss {
            Some(loss) => loss,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_loss_stands_and_wakes_the_waiters() {
        let fate = std::sync::Arc::new(VmFate::default());
        assert_eq!(fate.loss(), None);
        let waiter = tokio::spawn({
            let fate = fate.clone();
            async move { fate.lost().await }
        });
        let killed = VmLoss {
            reason: "SIGKILL".into(),
            killed: true,
        };
        assert!(fate.lose(killed.clone()));
        assert!(!fate.lose(VmLoss {
            reason: "later".into(),
            killed: false
        }));
        assert_eq!(waiter.await.unwrap(), killed);
        assert_eq!(fate.loss().map(|l| l.exit_status()), Some(137));
        // A waiter that comes late returns at once.
        assert_eq!(fate.lost().await.reason, "SIGKILL");
    }
}
