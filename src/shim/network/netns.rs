//! Running netlink work inside a pod's network namespace.
//!
//! A network namespace is joined per thread (`setns`), and netlink sockets and `/dev/net/tun`
//! belong to the namespace of the thread that opens them. So each piece of work gets a thread of
//! its own that joins the namespace, with a small tokio runtime for the netlink connection; the
//! shim's own threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use super::NetworkError;

/// Runs `work` with a netlink handle inside the network namespace at `netns`, on a thread of its
/// own, and returns its result.
pub(crate) async fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let netns = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("pod-netns".to_string())
        .spawn(move || {
            let _ = tx.send(run_in(&netns, work));
        });
    if let Err(source) = spawned {
        return Err(NetworkError::Thread { source });
    }
    rx.await.map_err(|_| NetworkError::ThreadGone)?
}

fn run_in<T, F, Fut>(netns: &PathBuf, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let namespace = File::open(netns).map_err(|source| NetworkError::OpenNetns {
        path: netns.clone(),
        source,
    })?;
    setns(&namespace, CloneFlags::CLONE_NEWNET).map_err(|source| NetworkError::Setns {
        path: netns.clone(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetworkError::Thread { source })?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Socket { source })?;
        let driver = tokio::spawn(connection);
        let result = work(handle).await;
        driver.abort();
        result
    })
}
