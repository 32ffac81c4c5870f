//! QEMU as the sandbox hypervisor, with the agent reached over vsock.
//!
//! With `/dev/vhost-vsock` the guest gets a `vhost-vsock-pci` device and a free context id, and the
//! agent is `vsock://<cid>:1024`. Without it (nested or restricted hosts), a `vhost-device-vsock`
//! daemon per VM serves a `vhost-user-vsock-pci` device and joins unix connections on
//! `<state_dir>/vm.vsock` to guest ports (hybrid vsock: `hvsock://<state_dir>/vm.vsock:1024`); QEMU's
//! guest memory must then be a shared memfd so that the daemon can map it.
//!
//! Files in the state directory: `console.log` (serial console), `qemu.log` (QEMU's own output),
//! `qemu.pid`, `qmp.sock`, and with the daemon `vsock-daemon.log`, `vsock-daemon.pid`, `vhu.sock`,
//! `vm.vsock`.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{
    Accel, BootTimings, VmConfig, VmError, BASE_KERNEL_PARAMS, MAX_SOCKET_PATH, SHARE_MOUNT_TAG,
};
use crate::agent::url::{AgentUrl, DEFAULT_AGENT_PORT};
use crate::agent_client::{AgentClient, AgentTimeouts, RpcDurations};

pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";
pub const QEMU_PID: &str = "qemu.pid";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const DAEMON_LOG: &str = "vsock-daemon.log";
pub const DAEMON_PID: &str = "vsock-daemon.pid";
pub const VHOST_USER_SOCKET: &str = "vhu.sock";
pub const HYBRID_VSOCK_SOCKET: &str = "vm.vsock";

const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";
/// The guest context id given to the vsock daemon (each VM has its own daemon).
const HYBRID_GUEST_CID: u32 = 3;
/// How long the vsock daemon may take to create its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process gets to exit after a polite request, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long QEMU gets after `quit` before [`Vm::stop`] suspects the vsock daemon holds it up.
const QUIT_WAIT: Duration = Duration::from_secs(1);
/// How much of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 3000;
const LOG_TAIL_LINES: usize = 25;
/// The KVM probe's limit: a working KVM reaches the kernel's root-mount panic well within it.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_millis(3500);

/// A running sandbox VM. Dropping it without [`Vm::stop`] kills its processes and removes its state
/// directory (best effort, without waiting).
pub struct Vm {
    state_dir: PathBuf,
    agent_url: AgentUrl,
    timings: BootTimings,
    accel: Accel,
    qemu: Option<Child>,
    qemu_pid: i32,
    daemon: Option<Child>,
    daemon_pid: Option<i32>,
    /// Set once the state directory is ours to remove (we created it).
    owns_state_dir: bool,
}

impl Vm {
    /// Starts the VM and waits until its agent answers `grpc.Health/Check`. On any failure, whatever
    /// was started is killed and the state directory removed.
    pub async fn start(cfg: &VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        check_config(cfg)?;
        let hybrid = !Path::new(VHOST_VSOCK_DEVICE).exists();
        for name in [QMP_SOCKET, VHOST_USER_SOCKET, HYBRID_VSOCK_SOCKET] {
            check_socket_path(&cfg.state_dir.join(name))?;
        }
        if cfg.state_dir.exists() {
            return Err(VmError::StateDirExists(cfg.state_dir.clone()));
        }
        if let Some(parent) = cfg.state_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| VmError::io(format!("creating directory {}", parent.display()), e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(|e| {
                VmError::io(
                    format!("creating VM state directory {}", cfg.state_dir.display()),
                    e,
                )
            })?;
        let mut vm = Vm {
            state_dir: cfg.state_dir.clone(),
            agent_url: AgentUrl::Hvsock {
                path: cfg.state_dir.join(HYBRID_VSOCK_SOCKET),
                port: DEFAULT_AGENT_PORT,
            },
            timings: BootTimings::default(),
            accel: cfg.accel,
            qemu: None,
            qemu_pid: 0,
            daemon: None,
            daemon_pid: None,
            owns_state_dir: true,
        };
        match vm.boot(cfg, hybrid, started).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                vm.kill_now().await;
                Err(err)
            }
        }
    }

    /// Where the guest's agent answers.
    pub fn agent_url(&self) -> &AgentUrl {
        &self.agent_url
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.qemu_pid
    }

    /// The vsock daemon's process id, when the VM uses one.
    pub fn vsock_daemon_pid(&self) -> Option<i32> {
        self.daemon_pid
    }

    /// The accelerator QEMU runs with (never [`Accel::Auto`] once started).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// Stops QEMU (QMP `quit`, then SIGTERM, then SIGKILL), then the vsock daemon, and removes the
    /// state directory. Calling it again does nothing.
    pub async fn stop(&mut self) -> Result<(), VmError> {
        if let Some(mut qemu) = self.qemu.take() {
            let quit = tokio::time::timeout(STOP_GRACE, qmp_quit(&self.state_dir.join(QMP_SOCKET)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "QMP did not answer"))
                .and_then(|r| r);
            if let Err(err) = quit {
                tracing::debug!("QMP quit failed ({err}); sending SIGTERM to QEMU");
                signal_child(&qemu, Signal::SIGTERM);
            }
            let exited = tokio::time::timeout(QUIT_WAIT, qemu.wait()).await.is_ok();
            if !exited {
                // With guest connections still open, QEMU's vhost-user teardown waits on the vsock
                // daemon: take the daemon away (nothing of it outlives the VM) and QEMU goes on.
                if let Some(mut daemon) = self.daemon.take() {
                    tracing::debug!(
                        "QEMU still running after quit; killing the vsock daemon first"
                    );
                    let _ = daemon.start_kill();
                    let _ = tokio::time::timeout(STOP_GRACE, daemon.wait()).await;
                }
                stop_child(&mut qemu, "QEMU").await;
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            signal_child(&daemon, Signal::SIGTERM);
            stop_child(&mut daemon, "the vsock daemon").await;
        }
        self.remove_state_dir()
    }

    async fn boot(
        &mut self,
        cfg: &VmConfig,
        hybrid: bool,
        started: Instant,
    ) -> Result<(), VmError> {
        // The accelerator first: the KVM probe boots a VM of its own.
        let probe_started = Instant::now();
        self.accel = resolve_accel(cfg).await?;
        self.timings.accel_probe = probe_started.elapsed();

        let vsock = if hybrid {
            let daemon_started = Instant::now();
            self.start_daemon(cfg).await?;
            self.timings.vsock_daemon = daemon_started.elapsed();
            VsockDevice::VhostUser
        } else {
            let cid = find_free_cid().map_err(|e| {
                VmError::io(
                    format!("finding a free vsock context id in {VHOST_VSOCK_DEVICE}"),
                    e,
                )
            })?;
            self.agent_url = AgentUrl::Vsock {
                cid,
                port: DEFAULT_AGENT_PORT,
            };
            VsockDevice::Vhost { cid }
        };

        let qemu_started = Instant::now();
        self.start_qemu(cfg, vsock)?;
        self.wait_for_agent(cfg.boot_timeout, cfg.agent_durations.clone())
            .await?;
        self.timings.qemu_to_agent = qemu_started.elapsed();
        self.timings.total = started.elapsed();
        tracing::info!(
            pid = self.qemu_pid,
            accel = %self.accel,
            agent = %self.agent_url,
            boot_ms = self.timings.qemu_to_agent.as_millis() as u64,
            "VM ready"
        );
        Ok(())
    }

    async fn start_daemon(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let vhu = self.state_dir.join(VHOST_USER_SOCKET);
        let uds = self.state_dir.join(HYBRID_VSOCK_SOCKET);
        for stale in [&vhu, &uds] {
            let _ = std::fs::remove_file(stale);
        }
        let log = log_file(&self.state_dir.join(DAEMON_LOG))?;
        let mut cmd = Command::new(&cfg.vsock_daemon);
        cmd.arg("--guest-cid")
            .arg(HYBRID_GUEST_CID.to_string())
            .arg("--socket")
            .arg(&vhu)
            .arg("--uds-path")
            .arg(&uds);
        let child = spawn_detached(cmd, log, "the vsock daemon", &cfg.vsock_daemon)?;
        let pid = child_pid(&child);
        self.daemon_pid = Some(pid);
        self.daemon = Some(child);
        write_pid_file(&self.state_dir.join(DAEMON_PID), pid)?;

        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        while !vhu.exists() {
            if let Some(err) = self.daemon_exited() {
                return Err(err);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: "the vsock daemon",
                    timeout: DAEMON_START_TIMEOUT,
                    reason: format!("{} was not created", vhu.display()),
                    log_name: DAEMON_LOG,
                    log_tail: log_tail(&self.state_dir.join(DAEMON_LOG)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The vsock daemon's exit, if it has exited (the VM cannot work without it).
    fn daemon_exited(&mut self) -> Option<VmError> {
        let status = self.daemon.as_mut()?.try_wait().ok()??;
        Some(VmError::Exited {
            what: "the vsock daemon",
            status: status.to_string(),
            log_name: DAEMON_LOG,
            log_tail: log_tail(&self.state_dir.join(DAEMON_LOG)),
        })
    }

    fn start_qemu(&mut self, cfg: &VmConfig, vsock: VsockDevice) -> Result<(), VmError> {
        let args = qemu_args(cfg, self.accel, vsock, &self.state_dir);
        let log = log_file(&self.state_dir.join(QEMU_LOG))?;
        let mut cmd = Command::new(&cfg.qemu_path);
        cmd.args(&args);
        tracing::debug!(qemu = %cfg.qemu_path.display(), args = ?args, "starting QEMU");
        let child = spawn_detached(cmd, log, "QEMU", &cfg.qemu_path)?;
        self.qemu_pid = child_pid(&child);
        self.qemu = Some(child);
        Ok(())
    }

    /// Health checks until one succeeds; fails at once when QEMU or the daemon exits.
    async fn wait_for_agent(
        &mut self,
        timeout: Duration,
        durations: Option<RpcDurations>,
    ) -> Result<(), VmError> {
        let attempt_limit = Duration::from_secs(1);
        let client = AgentClient::new(
            self.agent_url.clone(),
            AgentTimeouts {
                connect: attempt_limit,
                metrics: attempt_limit,
                request: attempt_limit,
            },
        )
        .with_durations(durations);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(qemu) = self.qemu.as_mut() {
                if let Ok(Some(status)) = qemu.try_wait() {
                    return Err(self.exited("QEMU", status.to_string()));
                }
            }
            if let Some(err) = self.daemon_exited() {
                return Err(err);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = Instant::now();
            let err = match tokio::time::timeout(left, client.serving()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer to a health check within {left:?}"),
            };
            tracing::debug!(
                took_ms = attempt.elapsed().as_millis() as u64,
                "agent not ready yet: {err}"
            );
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: "the guest's agent",
                    timeout,
                    reason: err,
                    log_name: CONSOLE_LOG,
                    log_tail: self.console_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }

    fn exited(&self, what: &'static str, status: String) -> VmError {
        let console = self.console_tail();
        let qemu_log = log_tail(&self.state_dir.join(QEMU_LOG));
        VmError::Exited {
            what,
            status,
            log_name: "console.log and qemu.log",
            log_tail: format!("{console}\n--- qemu.log (tail) ---\n{qemu_log}"),
        }
    }

    fn console_tail(&self) -> String {
        log_tail(&self.state_dir.join(CONSOLE_LOG))
    }

    /// SIGKILL everything and remove the state directory (the failure path of `start`).
    async fn kill_now(&mut self) {
        for mut child in [self.qemu.take(), self.daemon.take()].into_iter().flatten() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
        }
        let _ = self.remove_state_dir();
    }

    fn remove_state_dir(&mut self) -> Result<(), VmError> {
        if !self.owns_state_dir {
            return Ok(());
        }
        match std::fs::remove_dir_all(&self.state_dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(VmError::io(
                    format!("removing VM state directory {}", self.state_dir.display()),
                    err,
                ))
            }
        }
        self.owns_state_dir = false;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.daemon.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.start_kill();
        }
        let _ = self.remove_state_dir();
    }
}

#[derive(Debug, Clone, Copy)]
enum VsockDevice {
    /// `vhost-user-vsock-pci` served by the vsock daemon.
    VhostUser,
    /// `vhost-vsock-pci` with this guest context id.
    Vhost { cid: u32 },
}

fn check_config(cfg: &VmConfig) -> Result<(), VmError> {
    for (what, path) in [("guest kernel", &cfg.kernel), ("guest initrd", &cfg.initrd)] {
        if !path.is_file() {
            return Err(VmError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    if !cfg.share_dir.is_dir() {
        return Err(VmError::Config(format!(
            "shared directory {} does not exist or is not a directory",
            cfg.share_dir.display()
        )));
    }
    if cfg.memory_mib < 64 {
        return Err(VmError::Config(format!(
            "memory_mib {} is too small (at least 64)",
            cfg.memory_mib
        )));
    }
    if cfg.vcpus == 0 || cfg.vcpus > 255 {
        return Err(VmError::Config(format!(
            "vcpus {} is out of range (1 to 255)",
            cfg.vcpus
        )));
    }
    if !cfg.state_dir.is_absolute() {
        return Err(VmError::Config(format!(
            "state directory {} must be an absolute path",
            cfg.state_dir.display()
        )));
    }
    // Commas separate QEMU option values; a path with one would be misread.
    for (what, path) in [
        ("state directory", &cfg.state_dir),
        ("shared directory", &cfg.share_dir),
    ] {
        if path.as_os_str().as_bytes().contains(&b',') {
            return Err(VmError::Config(format!(
                "{what} {} contains a comma, which QEMU's option syntax cannot take",
                path.display()
            )));
        }
    }
    if cfg.kernel_params.contains('\n') {
        return Err(VmError::Config(
            "kernel parameters contain a newline".to_string(),
        ));
    }
    Ok(())
}

fn check_socket_path(path: &Path) -> Result<(), VmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmError::SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

async fn resolve_accel(cfg: &VmConfig) -> Result<Accel, VmError> {
    match cfg.accel {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm => {
            if Path::new("/dev/kvm").exists() {
                Ok(Accel::Kvm)
            } else {
                Err(VmError::KvmUnusable("/dev/kvm does not exist".to_string()))
            }
        }
        Accel::Auto => {
            let qemu = cfg.qemu_path.clone();
            let kernel = cfg.kernel.clone();
            let usable = tokio::task::spawn_blocking(move || kvm_usable(&qemu, &kernel))
                .await
                .unwrap_or(false);
            Ok(if usable { Accel::Kvm } else { Accel::Tcg })
        }
    }
}

/// The QEMU command line (without the program).
fn qemu_args(cfg: &VmConfig, accel: Accel, vsock: VsockDevice, dir: &Path) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mem = cfg.memory_mib;
    let mut append = BASE_KERNEL_PARAMS.to_string();
    if !cfg.kernel_params.trim().is_empty() {
        append.push(' ');
        append.push_str(cfg.kernel_params.trim());
    }
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("sandbox-{}", vm_name(dir)),
        "-accel".into(),
        match accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg | Accel::Auto => "tcg".into(),
        },
    ];
    if accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    args.extend([
        "-machine".into(),
        "q35,memory-backend=mem".into(),
        "-m".into(),
        format!("{mem}M"),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", path(CONSOLE_LOG)),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-initrd".into(),
        cfg.initrd.display().to_string(),
        "-append".into(),
        append,
        // Shared memory so that a vhost-user daemon can map the guest's RAM.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-fsdev".into(),
        format!(
            "local,id=fs0,path={},security_model=none",
            cfg.share_dir.display()
        ),
        "-device".into(),
        format!("virtio-9p-pci,fsdev=fs0,mount_tag={SHARE_MOUNT_TAG}"),
        "-netdev".into(),
        "user,id=net0".into(),
        "-device".into(),
        "virtio-net-pci,netdev=net0".into(),
        "-pidfile".into(),
        path(QEMU_PID),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(QMP_SOCKET)),
    ]);
    match vsock {
        VsockDevice::VhostUser => args.extend([
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", path(VHOST_USER_SOCKET)),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ]),
        VsockDevice::Vhost { cid } => args.extend([
            "-device".into(),
            format!("vhost-vsock-pci,id=vsock0,guest-cid={cid}"),
        ]),
    }
    args
}

/// The VM's name for `-name sandbox-<name>`: the sandbox id when the state directory is
/// `<run dir>/<sandbox id>/vm`, else the state directory's own name (QEMU option syntax: no commas).
fn vm_name(state_dir: &Path) -> String {
    let own = state_dir.file_name();
    let name = match (own, state_dir.parent().and_then(Path::file_name)) {
        (Some(own), Some(parent)) if own == "vm" => parent,
        (Some(own), _) => own,
        (None, _) => std::ffi::OsStr::new("vm"),
    };
    name.to_string_lossy().replace(',', "_")
}

/// Stdout and stderr of a child: a log file in the state directory.
fn log_file(path: &Path) -> Result<std::fs::File, VmError> {
    std::fs::File::create(path).map_err(|e| VmError::io(format!("creating {}", path.display()), e))
}

/// Spawns `cmd` in a process group of its own (no terminal signals from the shim's group), with
/// stdin from /dev/null and its output in `log`.
fn spawn_detached(
    mut cmd: Command,
    log: std::fs::File,
    what: &str,
    program: &Path,
) -> Result<Child, VmError> {
    let err_log = log
        .try_clone()
        .map_err(|e| VmError::io(format!("duplicating the log of {what}"), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| VmError::io(format!("starting {what} ({})", program.display()), e))
}

fn child_pid(child: &Child) -> i32 {
    child.id().map(|id| id as i32).unwrap_or(0)
}

fn write_pid_file(path: &Path, pid: i32) -> Result<(), VmError> {
    std::fs::write(path, format!("{pid}\n"))
        .map_err(|e| VmError::io(format!("writing {}", path.display()), e))
}

fn signal_child(child: &Child, signal: Signal) {
    if let Some(id) = child.id() {
        let _ = kill(Pid::from_raw(id as i32), signal);
    }
}

/// Waits up to the grace period, then SIGKILLs and waits.
async fn stop_child(child: &mut Child, what: &str) {
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
        return;
    }
    let state = child
        .id()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| {
            Some(
                stat.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .unwrap_or_default();
    tracing::warn!("{what} did not exit within {STOP_GRACE:?} (state {state:?}); killing it");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// QMP: read the greeting, leave negotiation mode, ask QEMU to quit.
async fn qmp_quit(socket: &Path) -> io::Result<()> {
    let stream = UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = next_line(&mut lines).await?;
    if !greeting.contains("\"QMP\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a QMP greeting: {greeting}"),
        ));
    }
    write
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await?;
    // Events may come first; the reply is the line with "return" or "error".
    let reply = loop {
        let line = next_line(&mut lines).await?;
        if !line.contains("\"event\"") {
            break line;
        }
    };
    if !reply.contains("\"return\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("qmp_capabilities refused: {reply}"),
        ));
    }
    write.write_all(b"{\"execute\":\"quit\"}\n").await?;
    // Stay connected until QEMU has taken the command: a quit followed at once by a hang-up can
    // be dropped with the connection. Its reply, or QEMU closing the socket as it exits, will do.
    loop {
        match lines.next_line().await? {
            None => return Ok(()),
            Some(line) if line.contains("\"return\"") => return Ok(()),
            Some(line) if line.contains("\"error\"") => {
                return Err(io::Error::other(format!("quit refused: {line}")))
            }
            Some(_) => {}
        }
    }
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> io::Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed early"))
}

/// The last lines of a log file (empty when there is none).
pub fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    let tail = lines[skip..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".to_string()
    } else {
        tail
    }
}

/// `VHOST_VSOCK_SET_GUEST_CID`: `_IOW(VHOST_VIRTIO, 0x60, __u64)`.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_af60;

/// A guest context id no other VM uses: the first that `/dev/vhost-vsock` accepts (as Kata does).
fn find_free_cid() -> io::Result<u32> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK_DEVICE)?;
    let start = 3 + (std::process::id() % 1000);
    for offset in 0..4096u32 {
        let cid = u64::from(start + offset);
        // SAFETY: the ioctl reads one u64 from the pointer.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), VHOST_VSOCK_SET_GUEST_CID, &cid) };
        if rc == 0 {
            // Closing the descriptor releases the id for QEMU.
            return Ok(start + offset);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(err);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free vsock context id",
    ))
}

/// Whether QEMU can really run a guest with KVM here: `/dev/kvm` must exist, and a probe boot of
/// `kernel` without an initrd must reach the kernel's panic about the missing root filesystem
/// within a few seconds (some hosts offer a /dev/kvm that hangs or aborts). Decided once per process.
pub fn kvm_usable(qemu: &Path, kernel: &Path) -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| {
        let usable = probe_kvm(qemu, kernel);
        tracing::info!(usable, "KVM probe");
        usable
    })
}

fn probe_kvm(qemu: &Path, kernel: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(dir) = probe_dir() else {
        return false;
    };
    let console = dir.join(CONSOLE_LOG);
    let child = std::process::Command::new(qemu)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256M",
        ])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let usable = match child {
        Ok(mut child) => {
            let deadline = std::time::Instant::now() + KVM_PROBE_TIMEOUT;
            let mut panicked = false;
            while std::time::Instant::now() < deadline {
                let text = std::fs::read(&console).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains("Kernel panic") {
                    panicked = true;
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // Exited: a panic with panic=-1 -no-reboot, or QEMU refused KVM.
                    let text = std::fs::read(&console).unwrap_or_default();
                    panicked = String::from_utf8_lossy(&text).contains("Kernel panic");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panicked
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_dir_all(&dir);
    usable
}

fn probe_dir() -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ksm-kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// After a shim crash: kills the QEMU and vsock daemon named by the pid files in `state_dir` if
/// they still are ours (their command line mentions `state_dir`), then removes `state_dir`.
pub fn kill_leftovers(state_dir: &Path) -> io::Result<()> {
    if !state_dir.exists() {
        return Ok(());
    }
    for name in [QEMU_PID, DAEMON_PID] {
        let Some(pid) = read_pid_file(&state_dir.join(name)) else {
            continue;
        };
        if !cmdline_mentions(pid, state_dir) {
            continue;
        }
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGKILL);
        // Wait for it to go (it is not our child: poll).
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid.as_raw()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    match std::fs::remove_dir_all(state_dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn read_pid_file(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    (pid > 1).then_some(pid)
}

fn cmdline_mentions(pid: i32, state_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = state_dir.as_os_str().as_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1.trim_start().to_string();
            after.chars().next()
        })
        .is_some_and(|state| state == 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd.img");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        VmConfig::new(kernel, initrd, dir.to_path_buf(), dir.join("vm"))
    }

    #[test]
    fn command_line_has_the_devices() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let args = qemu_args(&cfg, Accel::Tcg, VsockDevice::VhostUser, &cfg.state_dir).join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(args.starts_with("-name sandbox-"), "{args}");
        assert_eq!(vm_name(Path::new("/run/vc/sbs/abc123/vm")), "abc123");
        assert_eq!(vm_name(Path::new("/tmp/x/state")), "state");
        assert!(args.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(args.contains("vhost-user-vsock-pci,chardev=vsock0"));
        assert!(args.contains("mount_tag=kataShared"));
        assert!(args.contains("console=ttyS0 panic=-1 quiet"));
        let args = qemu_args(
            &cfg,
            Accel::Kvm,
            VsockDevice::Vhost { cid: 7 },
            &cfg.state_dir,
        );
        assert!(args
            .join(" ")
            .contains("vhost-vsock-pci,id=vsock0,guest-cid=7"));
        assert!(args.join(" ").contains("-accel kvm -cpu host"));
    }

    #[test]
    fn bad_configs_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.vcpus = 0;
        assert!(check_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("vcpus"));
        let mut cfg = config(dir.path());
        cfg.kernel = dir.path().join("nope");
        assert!(check_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("guest kernel"));
        let long = PathBuf::from(format!("/{}/vm.vsock", "x".repeat(120)));
        assert!(check_socket_path(&long)
            .unwrap_err()
            .to_string()
            .contains("shorter state directory"));
    }

    #[test]
    fn a_vm_can_move_between_tasks() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<Vm>();
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.ends_with("line 99"));
        assert!(!tail.contains("line 70\n"));
        assert!(log_tail(&dir.path().join("none")).contains("missing"));
    }

    #[test]
    fn leftovers_of_someone_else_are_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vm");
        std::fs::create_dir(&state).unwrap();
        // Our own pid: its command line does not mention the state directory.
        std::fs::write(state.join(QEMU_PID), format!("{}\n", std::process::id())).unwrap();
        std::fs::write(state.join(DAEMON_PID), "garbage").unwrap();
        kill_leftovers(&state).unwrap();
        assert!(!state.exists());
        kill_leftovers(&state).unwrap();
    }
}
