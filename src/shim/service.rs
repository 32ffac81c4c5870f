//! The shim's entry points for containerd: `start` (spawn or reuse the sandbox's shim), `delete`
//! (clean up after a shim that is gone), and the serving process's task service and exit: on
//! Shutdown, or on SIGTERM/SIGINT (which the crate itself only logs), it stops its sandbox first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_str_to_file;
use containerd_shim::{
    socket_address, spawn, Config as ShimConfig, DeleteResponse, Error, ExitSignal, Flags, Shim,
    StartOpts,
};

use super::config::Config;
use super::oci;
use super::rootfs;
use super::sandbox::{self, SandboxSlot};
use super::task::{shared_dir_of, TaskService};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// containerd reports a task killed with the shim as SIGKILL'd: 128 + 9.
const KILLED_EXIT: u32 = 137;
/// How long `start` waits for the spawned shim's socket to accept connections.
const SERVE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Service {
    id: String,
    namespace: String,
    /// containerd's gRPC address (the shim socket name is derived from it).
    address: String,
    bundle: PathBuf,
    /// The serving process's own ttrpc socket (`unix://...`; empty for start and delete).
    socket: String,
    exit: Arc<ExitSignal>,
    sandbox: SandboxSlot,
    /// SIGTERM and SIGINT, for the serving process only.
    terminations: Option<(Signal, Signal)>,
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        // Only the serving process (no action, a socket) has containerd's log FIFO to write to.
        let serving = args.action.is_empty() && !args.socket.is_empty();
        if serving {
            init_fifo_logging(args.debug);
        }
        // Listening from the start: a signal that arrives before `wait` must not be missed.
        let terminations = if serving { termination_signals() } else { None };
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            bundle,
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
            sandbox: SandboxSlot::default(),
            terminations,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle.
        let sandbox_id = oci::load(&self.bundle)
            .ok()
            .and_then(|spec| oci::sandbox_of(&spec));
        if let Some(sandbox_id) = sandbox_id.filter(|sb| *sb != opts.id) {
            // A container of a running sandbox: its shim serves it (one VM per sandbox).
            let address = socket_address(&opts.address, &opts.namespace, &sandbox_id);
            if accepts(&address) {
                write_str_to_file("address", &address).await?;
                return Ok(address);
            }
            return Err(Error::InvalidArgument(format!(
                "container {} belongs to sandbox {sandbox_id}, which has no running shim at {address}",
                opts.id
            )));
        }
        let id = opts.id.clone();
        let address = spawn(opts, &id, Vec::new()).await?;
        // The spawned server's stderr goes nowhere: make sure it really serves before answering.
        let deadline = std::time::Instant::now() + SERVE_TIMEOUT;
        while !accepts(&address) {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "the shim server for {id} did not start serving at {address} (see containerd's log)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // With this file the crate removes the socket when the server exits.
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let config = Config::load().unwrap_or_else(|err| {
            eprintln!("containerd-shim-kata-v2 delete: {err}; using the default run directory");
            Config::default()
        });
        let run_dir = config.run_dir();
        let spec = oci::load(&self.bundle).ok();
        let sandbox_id = spec
            .as_ref()
            .and_then(oci::sandbox_of)
            .unwrap_or_else(|| self.id.clone());
        if crate::mgmt::paths::validate_id(&self.id).is_ok()
            && crate::mgmt::paths::validate_id(&sandbox_id).is_ok()
        {
            let sandbox_shim = socket_address(&self.address, &self.namespace, &sandbox_id);
            clean_up_after_shim(&run_dir, &self.bundle, &self.id, &sandbox_id, &sandbox_shim);
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED_EXIT,
            exited_at: Some(SystemTime::now().into()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        let exit = self.exit.clone();
        match self.terminations.as_mut() {
            Some((term, int)) => tokio::select! {
                _ = exit.wait() => {}
                _ = term.recv() => self.terminate("SIGTERM").await,
                _ = int.recv() => self.terminate("SIGINT").await,
            },
            None => exit.wait().await,
        }
        // The crate removes the socket only if the bundle's `address` file still exists, but
        // containerd removes the bundle while a VM teardown may still be running: unlink it here
        // (the listener keeps serving until the server stops).
        if !self.socket.is_empty() {
            let _ = std::fs::remove_file(socket_path(&self.socket));
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let config = Config::load().map_err(Arc::new);
        if let Err(err) = &config {
            tracing::error!("{err}");
        }
        TaskService::new(
            self.namespace.clone(),
            self.id.clone(),
            config,
            publisher,
            self.exit.clone(),
            self.sandbox.clone(),
        )
    }
}

impl Service {
    /// Leaves nothing running when asked to quit: the sandbox (VM, vsock daemon, metrics server,
    /// mounts, run directory) goes first; `wait` then removes the socket.
    async fn terminate(&self, signal: &str) {
        tracing::info!(
            sandbox = self.id,
            "{signal}: stopping the sandbox and exiting"
        );
        sandbox::stop_in(&self.sandbox).await;
    }
}

/// `delete`'s clean-up of task `id` (of sandbox `sandbox_id`, whose shim serves at
/// `sandbox_shim`); true if it cleaned up. containerd runs `delete` whenever its connection for a
/// task closes: after a shim died, but also after every ordinary task delete, while the sandbox's
/// shim may still be tearing the VM down after Shutdown. A shim that still serves owns the VM,
/// the mounts and the directories and removes them itself, so only a dead shim's are touched here.
fn clean_up_after_shim(
    run_dir: &Path,
    bundle: &Path,
    id: &str,
    sandbox_id: &str,
    sandbox_shim: &str,
) -> bool {
    if accepts(sandbox_shim) {
        tracing::debug!(
            id,
            sandbox = sandbox_id,
            "delete: the sandbox's shim still serves and cleans up itself"
        );
        return false;
    }
    rootfs::unshare(Some(bundle), &shared_dir_of(run_dir, sandbox_id), id);
    if sandbox_id == id {
        sandbox::clean_up_leftovers(run_dir, id);
        remove_shim_socket(sandbox_shim);
    }
    true
}

fn termination_signals() -> Option<(Signal, Signal)> {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!("cannot listen for SIGTERM/SIGINT: {err}");
            None
        }
    }
}

/// The filesystem path of a `unix://` shim address.
fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

fn accepts(address: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(address)).is_ok()
}

fn remove_shim_socket(address: &str) {
    let path = socket_path(address);
    if !accepts(address) {
        let _ = std::fs::remove_file(path);
    }
}

/// Logs to the `log` FIFO containerd created in the bundle (the serving process's cwd).
fn init_fifo_logging(debug: bool) {
    // Read-write: opening never blocks, whether or not containerd reads yet.
    let Ok(fifo) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("log")
    else {
        return;
    };
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(fifo))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_leaves_a_sandbox_alone_while_its_shim_serves_and_cleans_up_after_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let shared = shared_dir_of(&run_dir, "sb1");
        std::fs::create_dir_all(shared.join("c1")).unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let socket = dir.path().join("shim.sock");
        let address = format!("unix://{}", socket.display());

        let shim = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for id in ["c1", "sb1"] {
            assert!(!clean_up_after_shim(&run_dir, &bundle, id, "sb1", &address));
        }
        assert!(shared.join("c1").is_dir(), "a serving shim's files stay");

        // The shim died: its socket file is left, but nothing accepts on it.
        drop(shim);
        assert!(clean_up_after_shim(
            &run_dir, &bundle, "c1", "sb1", &address
        ));
        assert!(!shared.join("c1").exists(), "the container's place is gone");
        assert!(shared.is_dir(), "a container's delete leaves the sandbox");
        assert!(clean_up_after_shim(
            &run_dir, &bundle, "sb1", "sb1", &address
        ));
        assert!(
            !run_dir.join("sb1").exists(),
            "the sandbox's directory is gone"
        );
        assert!(!socket.exists(), "the dead shim's socket is gone");
    }
}
