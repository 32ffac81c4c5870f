//! The agent running containers: a real `kata-agent` on a unix socket (the test runs as root),
//! a busybox rootfs built by the test, and the shim's AgentClient.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_shim_metrics::agent_client::{AgentClient, AgentError, AgentTimeouts};
use kata_shim_metrics::protocols::{agent, oci};
use support::Proc;

const APPLETS: [&str; 11] = [
    "sh", "echo", "cat", "sleep", "id", "pwd", "hostname", "env", "tty", "true", "dd",
];

struct Sandbox {
    client: AgentClient,
    rootfs: PathBuf,
    agent: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SIGTERM first: the agent kills its containers, which a failed test may have left.
        if let Some(agent) = self.agent.take() {
            agent.terminate(Duration::from_secs(15));
        }
    }
}

/// A busybox rootfs and an agent serving it.
fn sandbox() -> Sandbox {
    sandbox_with_env(&[])
}

fn sandbox_with_env(env: &[(&str, &str)]) -> Sandbox {
    let dir = support::temp_dir();
    let rootfs = dir.path().join("rootfs");
    for sub in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
        std::fs::create_dir_all(rootfs.join(sub)).expect("create rootfs dirs");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("symlink applet");
    }
    let (agent, url) = support::start_agent_with_env(dir.path(), env);
    let client = AgentClient::new(
        url.parse().expect("agent url"),
        AgentTimeouts {
            request: Duration::from_secs(20),
            ..AgentTimeouts::default()
        },
    );
    Sandbox {
        client,
        rootfs,
        agent: Some(agent),
        _dir: dir,
    }
}

fn mount(dest: &str, ty: &str, options: &[&str]) -> oci::Mount {
    let mut m = oci::Mount::new();
    m.destination = dest.into();
    m.type_ = ty.into();
    m.source = ty.into();
    m.options = options.iter().map(|o| o.to_string()).collect();
    m
}

/// A spec like containerd's default: proc, tmpfs /dev, devpts, sysfs, cgroup (v2, read-only).
fn spec(rootfs: &Path, args: &[&str]) -> oci::Spec {
    let mut spec = oci::Spec::new();
    let mut root = oci::Root::new();
    root.Path = rootfs.display().to_string();
    spec.Root = Some(root).into();
    let mut process = oci::Process::new();
    process.Args = args.iter().map(|a| a.to_string()).collect();
    process.Env = vec!["PATH=/bin".into()];
    process.Cwd = "/".into();
    spec.Process = Some(process).into();
    spec.Hostname = "ctr".into();
    spec.Mounts = vec![
        mount("/proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666"],
        ),
        mount("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        mount("/sys/fs/cgroup", "cgroup", &["ro"]),
    ];
    spec
}

fn request(id: &str, spec: oci::Spec) -> agent::CreateContainerRequest {
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = id.into();
    req.OCI = Some(spec).into();
    req
}

fn process(spec: &mut oci::Spec) -> &mut oci::Process {
    spec.Process.as_mut().expect("spec has a process")
}

async fn create_and_start(sb: &Sandbox, id: &str, spec: oci::Spec) {
    sb.client
        .create_container(request(id, spec))
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    sb.client
        .start_container(agent::StartContainerRequest::of(id))
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
}

/// Reads a stream to EOF (an empty read).
async fn read_to_eof(client: &AgentClient, id: &str, stderr: bool) -> String {
    read_exec_to_eof(client, id, "", stderr).await
}

/// Runs a container to completion: (stdout, stderr, exit status).
async fn run(sb: &Sandbox, id: &str, spec: oci::Spec) -> (String, String, i32) {
    create_and_start(sb, id, spec).await;
    let (out, err) = tokio::join!(
        read_to_eof(&sb.client, id, false),
        read_to_eof(&sb.client, id, true)
    );
    let status = sb
        .client
        .wait_process(agent::WaitProcessRequest::of(id, ""))
        .await
        .expect("wait")
        .status;
    (out, err, status)
}

fn code(err: &AgentError) -> ttrpc::Code {
    err.code()
        .unwrap_or_else(|| panic!("expected a status from the agent, got {err}"))
}

/// The agent's message in an error status.
fn message(err: &AgentError) -> String {
    err.message()
        .unwrap_or_else(|| panic!("expected a status from the agent, got {err}"))
        .to_string()
}

fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(30), f)
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_prints_to_stdout_then_eof_and_status_zero() {
    let sb = sandbox();
    let (out, err, status) = run(&sb, "echo", spec(&sb.rootfs, &["echo", "hello"])).await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "");
    assert_eq!(status, 0);
    // EOF stays EOF; waiting again gives the same status.
    assert!(sb
        .client
        .read_stdout(agent::ReadStreamRequest::of("echo", "", 10))
        .await
        .expect("read")
        .data
        .is_empty());
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("echo", "echo"))
            .await
            .expect("wait")
            .status,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_is_passed_through() {
    let sb = sandbox();
    let (_, err, status) = run(
        &sb,
        "exit3",
        spec(&sb.rootfs, &["sh", "-c", "echo oops >&2; exit 3"]),
    )
    .await;
    assert_eq!(err, "oops\n");
    assert_eq!(status, 3);
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("exit3", ""))
            .await
            .expect("wait")
            .status,
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_gives_137_while_other_calls_block_on_the_same_connection() {
    let sb = sandbox();
    create_and_start(&sb, "sleeper", spec(&sb.rootfs, &["sleep", "600"])).await;
    // A blocked wait and a blocked read must not stall the signal on the same connection.
    let waiting = sb
        .client
        .wait_process(agent::WaitProcessRequest::of("sleeper", ""));
    let reading = sb
        .client
        .read_stdout(agent::ReadStreamRequest::of("sleeper", "", 100));
    let signalling = async {
        // Calls go out in order on the one connection: once a health check sent after the wait
        // and the read is answered, the agent holds both, blocked.
        sb.client.serving().await.expect("health check");
        sb.client
            .signal_process(agent::SignalProcessRequest::of("sleeper", "", 9))
            .await
    };
    let (status, data, signalled) = within(async { tokio::join!(waiting, reading, signalling) })
        .await
        .expect("calls finished");
    signalled.expect("signal");
    assert_eq!(status.expect("wait").status, 137);
    assert!(data.expect("read").data.is_empty(), "stdout at EOF");
    // Signalling an exited process is not an error.
    sb.client
        .signal_process(agent::SignalProcessRequest::of("sleeper", "", 15))
        .await
        .expect("signal after exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_round_trip_then_close_gives_eof() {
    let sb = sandbox();
    create_and_start(&sb, "cat", spec(&sb.rootfs, &["cat"])).await;
    let written = sb
        .client
        .write_stdin(agent::WriteStreamRequest::of("cat", "", b"ping\n".to_vec()))
        .await
        .expect("write")
        .len;
    assert_eq!(written, 5);
    let mut echoed = Vec::new();
    while echoed.len() < 5 {
        let data = within(
            sb.client
                .read_stdout(agent::ReadStreamRequest::of("cat", "", 100)),
        )
        .await
        .expect("echo in time")
        .expect("read")
        .data;
        assert!(!data.is_empty(), "EOF before the echo");
        echoed.extend(data);
    }
    assert_eq!(echoed, b"ping\n");
    sb.client
        .close_stdin(agent::CloseStdinRequest::of("cat", ""))
        .await
        .expect("close stdin");
    assert_eq!(read_to_eof(&sb.client, "cat", false).await, "");
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("cat", ""))
            .await
            .expect("wait")
            .status,
        0
    );
    let err = sb
        .client
        .write_stdin(agent::WriteStreamRequest::of("cat", "", b"late".to_vec()))
        .await
        .expect_err("stdin is closed");
    assert_eq!(code(&err), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test(flavor = "multi_thread")]
async fn env_cwd_user_and_hostname_apply() {
    let sb = sandbox();
    let mut s = spec(
        &sb.rootfs,
        &[
            "sh",
            "-c",
            "echo $FOO; pwd; id -u; id -g; hostname; ulimit -n; cat /proc/self/oom_score_adj",
        ],
    );
    s.Hostname = "box-1".into();
    let p = process(&mut s);
    p.Env.push("FOO=bar".into());
    p.Cwd = "/tmp".into();
    let mut user = oci::User::new();
    user.UID = 1000;
    user.GID = 1001;
    p.User = Some(user).into();
    let mut limit = oci::POSIXRlimit::new();
    limit.Type = "RLIMIT_NOFILE".into();
    limit.Soft = 123;
    limit.Hard = 456;
    p.Rlimits = vec![limit];
    p.OOMScoreAdj = 100;
    p.NoNewPrivileges = true;
    let (out, err, status) = run(&sb, "env", s).await;
    assert_eq!(err, "");
    assert_eq!(out, "bar\n/tmp\n1000\n1001\nbox-1\n123\n100\n");
    assert_eq!(status, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_program_is_pid_1_of_its_own_namespace() {
    let sb = sandbox();
    let (out, _, status) = run(
        &sb,
        "pid",
        spec(
            &sb.rootfs,
            &["sh", "-c", "echo $$; cat /proc/1/cmdline; echo"],
        ),
    )
    .await;
    assert_eq!(out, "1\nsh\0-c\0echo $$; cat /proc/1/cmdline; echo\0\n");
    assert_eq!(status, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_fails_create_and_an_unrunnable_one_fails_start() {
    let sb = sandbox();
    let err = sb
        .client
        .create_container(request("missing", spec(&sb.rootfs, &["nosuch"])))
        .await
        .expect_err("no such program");
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        message(&err).contains("\"nosuch\" not found in $PATH"),
        "{err}"
    );
    let err = sb
        .client
        .create_container(request("missing", spec(&sb.rootfs, &["/bin/nosuch"])))
        .await
        .expect_err("no such program");
    assert!(message(&err).contains("/bin/nosuch not found"), "{err}");

    // Passes every check at create, and only execve itself can tell it is no program.
    std::fs::write(sb.rootfs.join("bin/garbage"), b"\x01\x02 not an executable")
        .expect("write garbage");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        sb.rootfs.join("bin/garbage"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    sb.client
        .create_container(request("garbage", spec(&sb.rootfs, &["garbage"])))
        .await
        .expect("create");
    let err = sb
        .client
        .start_container(agent::StartContainerRequest::of("garbage"))
        .await
        .expect_err("exec fails");
    assert_eq!(code(&err), ttrpc::Code::FAILED_PRECONDITION);
    assert!(
        message(&err).contains("executing /bin/garbage") && message(&err).contains("format"),
        "{err}"
    );
    // The failed init is reaped; its status is the init's own failure code.
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("garbage", ""))
            .await
            .expect("wait")
            .status,
        127
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_kills_a_running_container_and_forgets_it() {
    let sb = sandbox();
    create_and_start(&sb, "victim", spec(&sb.rootfs, &["sleep", "600"])).await;
    let err = sb
        .client
        .create_container(request("victim", spec(&sb.rootfs, &["true"])))
        .await
        .expect_err("duplicate");
    assert_eq!(code(&err), ttrpc::Code::ALREADY_EXISTS);

    within(
        sb.client
            .remove_container(agent::RemoveContainerRequest::of("victim", 10)),
    )
    .await
    .expect("remove in time")
    .expect("remove");
    let err = sb
        .client
        .wait_process(agent::WaitProcessRequest::of("victim", ""))
        .await
        .expect_err("gone");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
    let err = sb
        .client
        .signal_process(agent::SignalProcessRequest::of("victim", "", 9))
        .await
        .expect_err("gone");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
    let err = sb
        .client
        .remove_container(agent::RemoveContainerRequest::of("victim", 1))
        .await
        .expect_err("gone");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);

    // A created, never started container is removed as well, and the id is free again.
    sb.client
        .create_container(request("victim", spec(&sb.rootfs, &["true"])))
        .await
        .expect("create again");
    sb.client
        .remove_container(agent::RemoveContainerRequest::of("victim", 10))
        .await
        .expect("remove created");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_container_runs_on_a_pty() {
    let sb = sandbox();
    let mut s = spec(&sb.rootfs, &["sh", "-c", "tty; read line; echo got $line"]);
    process(&mut s).Terminal = true;
    create_and_start(&sb, "tty", s).await;
    // No separate stderr on a terminal.
    assert!(sb
        .client
        .read_stderr(agent::ReadStreamRequest::of("tty", "", 100))
        .await
        .expect("read")
        .data
        .is_empty());
    sb.client
        .tty_win_resize(agent::TtyWinResizeRequest::of("tty", "", 40, 120))
        .await
        .expect("resize");
    sb.client
        .write_stdin(agent::WriteStreamRequest::of("tty", "", b"abc\n".to_vec()))
        .await
        .expect("write");
    let out = within(read_to_eof(&sb.client, "tty", false))
        .await
        .expect("output");
    // The pty echoes the input too, in whatever order it arrives relative to `tty`'s output.
    assert!(out.lines().any(|l| l.starts_with("/dev/pts/")), "{out:?}");
    assert!(out.contains("got abc"), "{out:?}");
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("tty", ""))
            .await
            .expect("wait")
            .status,
        0
    );

    create_and_start(&sb, "notty", spec(&sb.rootfs, &["true"])).await;
    let err = sb
        .client
        .tty_win_resize(agent::TtyWinResizeRequest::of("notty", "", 1, 1))
        .await
        .expect_err("no tty");
    assert_eq!(code(&err), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_status_codes() {
    let sb = sandbox();
    let err = sb
        .client
        .start_container(agent::StartContainerRequest::of("nope"))
        .await
        .expect_err("unknown");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
    assert!(message(&err).contains("\"nope\""), "{err}");
    let err = sb
        .client
        .read_stdout(agent::ReadStreamRequest::of("nope", "", 1))
        .await
        .expect_err("unknown");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);

    let mut s = spec(&sb.rootfs, &["true"]);
    s.Root.as_mut().expect("root").Path = "relative/rootfs".into();
    let err = sb
        .client
        .create_container(request("bad", s))
        .await
        .expect_err("bad spec");
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);
    assert!(message(&err).contains("Root.Path"), "{err}");

    let mut s = spec(&sb.rootfs, &["true"]);
    s.Mounts.push(mount("/mnt", "nfs", &[]));
    let err = sb
        .client
        .create_container(request("bad", s))
        .await
        .expect_err("bad mount");
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);

    let mut storage = agent::Storage::new();
    storage.driver = "virtio-fs".into();
    storage.source = "tag".into();
    storage.mount_point = "/run/x".into();
    let mut req = agent::CreateSandboxRequest::new();
    req.storages = vec![storage];
    let err = sb.client.create_sandbox(req).await.expect_err("driver");
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);
    assert!(message(&err).contains("virtio-fs"), "{err}");

    // With nothing mounted, destroying the sandbox still works (and kills what runs).
    create_and_start(&sb, "last", spec(&sb.rootfs, &["sleep", "600"])).await;
    sb.client
        .destroy_sandbox(agent::DestroySandboxRequest::new())
        .await
        .expect("destroy");
    let err = sb
        .client
        .wait_process(agent::WaitProcessRequest::of("last", ""))
        .await
        .expect_err("gone");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
}

fn exec_request(id: &str, exec_id: &str, args: &[&str]) -> agent::ExecProcessRequest {
    let mut process = oci::Process::new();
    process.Args = args.iter().map(|a| a.to_string()).collect();
    process.Env = vec!["PATH=/bin".into(), "WHO=exec".into()];
    process.Cwd = "/tmp".into();
    let mut req = agent::ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req.process = Some(process).into();
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_the_containers_namespaces() {
    let sb = sandbox();
    let mut s = spec(&sb.rootfs, &["sleep", "600"]);
    s.Hostname = "host-of-c".into();
    create_and_start(&sb, "c", s).await;
    std::fs::write(sb.rootfs.join("tmp/marker"), "in the rootfs\n").expect("marker");

    sb.client
        .exec_process(exec_request(
            "c",
            "e1",
            &[
                "sh",
                "-c",
                "echo $WHO; pwd; hostname; cat /proc/1/cmdline; echo; cat marker; exit 5",
            ],
        ))
        .await
        .expect("exec");
    let (out, err) = tokio::join!(
        read_exec_to_eof(&sb.client, "c", "e1", false),
        read_exec_to_eof(&sb.client, "c", "e1", true)
    );
    assert_eq!(err, "");
    assert_eq!(
        out,
        "exec\n/tmp\nhost-of-c\nsleep\u{0}600\u{0}\nin the rootfs\n"
    );
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("c", "e1"))
            .await
            .expect("wait exec")
            .status,
        5
    );

    // Duplicate exec ids, unknown ones, and a missing program are refused clearly.
    let err = sb
        .client
        .exec_process(exec_request("c", "e1", &["true"]))
        .await
        .expect_err("duplicate");
    assert_eq!(code(&err), ttrpc::Code::ALREADY_EXISTS);
    let err = sb
        .client
        .wait_process(agent::WaitProcessRequest::of("c", "nope"))
        .await
        .expect_err("unknown");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
    let err = sb
        .client
        .exec_process(exec_request("c", "e2", &["nosuch"]))
        .await
        .expect_err("missing program");
    assert!(message(&err).contains("\"nosuch\" not found"), "{err}");

    // A long-running exec is signalled on its own; the container keeps running.
    sb.client
        .exec_process(exec_request("c", "e3", &["sleep", "600"]))
        .await
        .expect("exec sleep");
    sb.client
        .signal_process(agent::SignalProcessRequest::of("c", "e3", 9))
        .await
        .expect("signal exec");
    assert_eq!(
        sb.client
            .wait_process(agent::WaitProcessRequest::of("c", "e3"))
            .await
            .expect("wait")
            .status,
        137
    );
    let err = sb
        .client
        .signal_process(agent::SignalProcessRequest::of("c", "e3", 9))
        .await;
    assert!(err.is_ok(), "signalling an exited exec is fine: {err:?}");
    sb.client
        .remove_container(agent::RemoveContainerRequest::of("c", 10))
        .await
        .expect("remove");
}

async fn read_exec_to_eof(client: &AgentClient, id: &str, exec: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let request = agent::ReadStreamRequest::of(id, exec, 4096);
        let reply = if stderr {
            client.read_stderr(request).await
        } else {
            client.read_stdout(request).await
        };
        let data = reply.expect("read stream").data;
        if data.is_empty() {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend(data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bind_mounts_tmpfs_and_a_read_only_root() {
    let sb = sandbox();
    let data = sb.rootfs.parent().expect("temp dir").join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("f"), "from-host\n").expect("data file");
    let mut s = spec(
        &sb.rootfs,
        &[
            "sh",
            "-c",
            "cat /data/f; (echo > /data/g) 2>/dev/null || echo ro-bind; \
             (echo > /x) 2>/dev/null || echo ro-root; echo ok > /tmp/t && cat /tmp/t",
        ],
    );
    s.Root.as_mut().expect("root").Readonly = true;
    let mut bind = mount("/data", "bind", &["rbind", "ro"]);
    bind.source = data.display().to_string();
    s.Mounts.push(bind);
    s.Mounts
        .push(mount("/tmp", "tmpfs", &["nosuid", "size=1m"]));
    let (out, err, status) = run(&sb, "mounts", s).await;
    assert_eq!(out, "from-host\nro-bind\nro-root\nok\n", "stderr: {err}");
    assert_eq!(status, 0);
    assert!(!data.join("g").exists());
    assert!(!sb.rootfs.join("tmp/t").exists(), "tmpfs, not the rootfs");
}

/// A cgroup2 directory for the agent's container cgroups, removed on drop; `None` when the host
/// has no writable cgroup2 hierarchy (the agent then measures processes).
struct TestCgroupRoot(PathBuf);

impl TestCgroupRoot {
    fn create() -> Option<Self> {
        // Found independently of the agent: the first cgroup2 mount in /proc/self/mounts.
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let mount = mounts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })?;
        let dir = mount.join(support::unique_id("ksm-test-stats"));
        std::fs::create_dir(&dir).ok()?;
        Some(TestCgroupRoot(dir))
    }
}

impl Drop for TestCgroupRoot {
    fn drop(&mut self) {
        // Children first (a failed test may leave the container's).
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn cgroup_usage_usec(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("cpu.stat")).expect("read cpu.stat");
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .expect("usage_usec in cpu.stat")
}

fn cgroup_lines(dir: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("read {file}: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// A flat-keyed cgroup file ("key value" lines) read by the test; `None` when the cgroup has no
/// such file (its controller is not enabled in this hierarchy).
fn flat_keyed(dir: &Path, file: &str) -> Option<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    Some(
        text.lines()
            .map(|line| {
                let (key, value) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("{file}: {line:?}"));
                (key.to_string(), value.parse().expect("a number"))
            })
            .collect(),
    )
}

/// What the agent's memory.stat map should hold for the cgroup in `dir`: every memory.stat key,
/// and memory.events' counts as `memory.events.<key>` (the keys containerd's MemoryEvents has).
fn expected_memory_map(dir: &Path) -> BTreeMap<String, u64> {
    let mut map = flat_keyed(dir, "memory.stat").unwrap_or_default();
    for (key, count) in flat_keyed(dir, "memory.events").unwrap_or_default() {
        if ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"].contains(&key.as_str()) {
            map.insert(format!("memory.events.{key}"), count);
        }
    }
    map
}

/// cpu.stat's throttling figures as the agent sends them (time in ns); `None` without the cpu
/// controller, whose keys they are.
fn expected_throttling(dir: &Path) -> Option<(u64, u64, u64)> {
    let stat = flat_keyed(dir, "cpu.stat").expect("cpu.stat");
    Some((
        *stat.get("nr_periods")?,
        stat["nr_throttled"],
        stat["throttled_usec"] * 1000,
    ))
}

/// StatsContainer of `id` and the test's own reading of its cgroup `dir` taken around it, once
/// the files read the same before and after the call (so the agent saw what the test saw).
async fn stats_with_stable_files(
    sb: &Sandbox,
    id: &str,
    dir: &Path,
) -> (
    agent::StatsContainerResponse,
    BTreeMap<String, u64>,
    Option<(u64, u64, u64)>,
) {
    for _ in 0..50 {
        let map = expected_memory_map(dir);
        let throttling = expected_throttling(dir);
        let reply = sb
            .client
            .stats_container(agent::StatsContainerRequest::of(id))
            .await
            .expect("stats");
        if map == expected_memory_map(dir) && throttling == expected_throttling(dir) {
            return (reply, map, throttling);
        }
    }
    panic!("the cgroup files of {id} kept changing around StatsContainer");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_report_the_containers_cpu_memory_and_pids() {
    let cgroups = TestCgroupRoot::create();
    let root = cgroups.as_ref().map(|c| c.0.display().to_string());
    let env: Vec<(&str, &str)> = root
        .iter()
        .map(|r| ("KATA_AGENT_CGROUP_ROOT", r.as_str()))
        .collect();
    let sb = sandbox_with_env(&env);
    let err = sb
        .client
        .stats_container(agent::StatsContainerRequest::of("nobody"))
        .await
        .expect_err("unknown container");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);

    let script = "dd if=/dev/zero bs=1M count=200 of=/dev/null 2>/dev/null; echo done; sleep 600";
    create_and_start(&sb, "busy", spec(&sb.rootfs, &["sh", "-c", script])).await;
    let mut out = String::new();
    while !out.contains("done") {
        let data = within(
            sb.client
                .read_stdout(agent::ReadStreamRequest::of("busy", "", 4096)),
        )
        .await
        .expect("dd finishes in time")
        .expect("read stdout")
        .data;
        assert!(!data.is_empty(), "EOF before dd finished: {out:?}");
        out.push_str(&String::from_utf8_lossy(&data));
    }

    let cgroup = cgroups.as_ref().map(|c| c.0.join("busy"));
    if cgroups.is_some() {
        // An exec'd process is in the container's cgroup from its first instruction.
        sb.client
            .exec_process(exec_request("busy", "self", &["cat", "/proc/self/cgroup"]))
            .await
            .expect("exec");
        let out = read_exec_to_eof(&sb.client, "busy", "self", false).await;
        assert!(
            out.lines()
                .any(|line| line.starts_with("0::") && line.ends_with("/busy")),
            "the exec's /proc/self/cgroup: {out:?}"
        );
    }
    let before = cgroup.as_deref().map(cgroup_usage_usec);
    let reply = sb
        .client
        .stats_container(agent::StatsContainerRequest::of("busy"))
        .await
        .expect("stats");
    let after = cgroup.as_deref().map(cgroup_usage_usec);
    let stats = reply.cgroup_stats.as_ref().expect("cgroup stats");
    let cpu = stats.cpu_stats.cpu_usage.as_ref().expect("cpu usage");
    assert!(cpu.total_usage > 0, "{cpu:?}");
    assert!(
        cpu.usage_in_usermode + cpu.usage_in_kernelmode > 0,
        "{cpu:?}"
    );
    let pids = stats.pids_stats.as_ref().expect("pids stats");
    assert!(pids.current >= 1, "{pids:?}");
    let memory = stats.memory_stats.usage.as_ref().expect("memory usage");
    assert!(memory.usage > 0, "{memory:?}");
    assert!(
        reply.network_stats.iter().all(|n| n.name != "lo"),
        "{:?}",
        reply.network_stats
    );

    if let (Some(dir), Some(before), Some(after)) = (&cgroup, before, after) {
        // The agent read the same cgroup between the test's two reads.
        assert!(
            before * 1000 <= cpu.total_usage && cpu.total_usage <= after * 1000,
            "agent {} ns, cgroup {before}..{after} us",
            cpu.total_usage
        );
        // pids.current counts tasks, as cgroup.threads lists them (busybox sh execs its last
        // command, so only sleep may be left), and the container's init is one of them.
        let threads = cgroup_lines(dir, "cgroup.threads");
        assert_eq!(pids.current, threads.len() as u64, "{threads:?}");
        assert!(!threads.is_empty(), "{threads:?}");
        if let Ok(current) = std::fs::read_to_string(dir.join("memory.current")) {
            let current: u64 = current.trim().parse().expect("memory.current");
            assert!(memory.usage > 0 && current > 0, "{memory:?} vs {current}");
        }

        // memory.stat's every key and the throttling counts, as the cgroup's files say. Without
        // a memory or cpu controller in this hierarchy (a hybrid host) the files are missing and
        // so must the figures be.
        let (reply, map, throttling) = stats_with_stable_files(&sb, "busy", dir).await;
        let stats = reply.cgroup_stats.as_ref().expect("cgroup stats");
        let sent: BTreeMap<String, u64> = stats
            .memory_stats
            .stats
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_eq!(sent, map);
        let sent_throttling = stats
            .cpu_stats
            .throttling_data
            .as_ref()
            .map(|t| (t.periods, t.throttled_periods, t.throttled_time));
        assert_eq!(sent_throttling, throttling);
        eprintln!(
            "compared {} memory.stat/memory.events keys and throttling {throttling:?} with {}",
            map.len(),
            dir.display()
        );
        if !map.is_empty() {
            for key in ["anon", "file", "inactive_file", "pgfault"] {
                assert!(sent.contains_key(key), "no {key} in {sent:?}");
            }
            assert_eq!(stats.memory_stats.cache, map["file"]);
        }
    }

    within(
        sb.client
            .remove_container(agent::RemoveContainerRequest::of("busy", 10)),
    )
    .await
    .expect("remove in time")
    .expect("remove");
    if let Some(dir) = &cgroup {
        assert!(!dir.exists(), "the agent removed {}", dir.display());
    }
    let err = sb
        .client
        .stats_container(agent::StatsContainerRequest::of("busy"))
        .await
        .expect_err("removed container");
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
}

/// The memory figures of a container: the memory.stat keys the test looks at, or, in a hierarchy
/// without the memory controller, the resident memory of its processes (what the agent then
/// sends as usage).
#[derive(Debug, Clone, Copy)]
struct MemoryFigures {
    usage: u64,
    anon: u64,
    file: u64,
    inactive_file: u64,
    active_file: u64,
}

async fn memory_figures(sb: &Sandbox, id: &str) -> MemoryFigures {
    let reply = sb
        .client
        .stats_container(agent::StatsContainerRequest::of(id))
        .await
        .expect("stats");
    let memory = &reply.cgroup_stats.memory_stats;
    let key = |k: &str| memory.stats.get(k).copied().unwrap_or(0);
    MemoryFigures {
        usage: memory.usage.usage,
        anon: key("anon"),
        file: key("file"),
        inactive_file: key("inactive_file"),
        active_file: key("active_file"),
    }
}

/// The host pid of the process named `comm` in the cgroup `dir`, once there is one.
fn wait_for_process(dir: &Path, comm: &str) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = cgroup_lines(dir, "cgroup.procs").iter().find_map(|pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (name.trim() == comm).then(|| pid.parse().expect("a pid"))
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {comm} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `pid` has touched `bytes` of anonymous memory (RssAnon in its /proc status).
fn wait_for_rss_anon(pid: i32, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon");
        if kib * 1024 >= bytes {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pid} has {kib} kB of anonymous memory"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the container's stdout until `word` shows.
async fn wait_for_output(sb: &Sandbox, id: &str, word: &str) {
    let mut out = String::new();
    while !out.contains(word) {
        let data = within(
            sb.client
                .read_stdout(agent::ReadStreamRequest::of(id, "", 4096)),
        )
        .await
        .unwrap_or_else(|_| panic!("{id} prints {word:?} in time"))
        .expect("read stdout")
        .data;
        assert!(!data.is_empty(), "EOF before {word:?} from {id}: {out:?}");
        out.push_str(&String::from_utf8_lossy(&data));
    }
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_64_mib_buffer_moves_anon_and_a_64_mib_file_moves_the_page_cache() {
    let cgroups = TestCgroupRoot::create().expect("a writable cgroup2 hierarchy (run as root)");
    let root = cgroups.0.display().to_string();
    let sb = sandbox_with_env(&[("KATA_AGENT_CGROUP_ROOT", root.as_str())]);
    // Alike but for what they hold: nothing; a 64 MiB buffer (dd filled it from /dev/zero and
    // is blocked writing it into a pipe that sleep never reads); 64 MiB written to a file.
    let containers = [
        (
            "idle",
            "dd if=/dev/zero bs=1 count=1 2>/dev/null | sleep 600",
        ),
        (
            "anon",
            "dd if=/dev/zero bs=64M count=1 2>/dev/null | sleep 600",
        ),
        (
            "file",
            "dd if=/dev/zero of=/tmp/f bs=1M count=64 2>/dev/null; echo written; sleep 600",
        ),
    ];
    for (id, script) in containers {
        create_and_start(&sb, id, spec(&sb.rootfs, &["sh", "-c", script])).await;
    }
    let dir = |id: &str| cgroups.0.join(id);
    wait_for_process(&dir("idle"), "sleep");
    wait_for_rss_anon(wait_for_process(&dir("anon"), "dd"), 64 * MIB);
    wait_for_output(&sb, "file", "written").await;

    let idle = memory_figures(&sb, "idle").await;
    let anon = memory_figures(&sb, "anon").await;
    let file = memory_figures(&sb, "file").await;
    let with_memory_controller = dir("idle").join("memory.stat").exists();
    eprintln!(
        "memory controller: {with_memory_controller}; idle {idle:?}, anon {anon:?}, file {file:?}"
    );
    let near_64_mib = |more: u64| (60 * MIB..72 * MIB).contains(&more);
    if with_memory_controller {
        assert!(
            near_64_mib(anon.anon.saturating_sub(idle.anon)),
            "{anon:?} vs {idle:?}"
        );
        assert!(anon.file < idle.file + 16 * MIB, "{anon:?} vs {idle:?}");
        assert!(file.file >= idle.file + 60 * MIB, "{file:?} vs {idle:?}");
        // Written pages are page cache on the file LRUs (new ones on the inactive list).
        assert!(
            file.inactive_file + file.active_file
                >= idle.inactive_file + idle.active_file + 60 * MIB,
            "{file:?} vs {idle:?}"
        );
        assert!(file.anon < idle.anon + 16 * MIB, "{file:?} vs {idle:?}");
        // The agent read the cgroup the test reads.
        let map = expected_memory_map(&dir("anon"));
        assert!(map["anon"].abs_diff(anon.anon) < 4 * MIB, "{map:?}");
    } else {
        // A hybrid host: usage is the resident memory of the container's processes, which holds
        // the buffer but not the page cache.
        assert!(
            near_64_mib(anon.usage.saturating_sub(idle.usage)),
            "{anon:?} vs {idle:?}"
        );
        assert!(file.usage < idle.usage + 16 * MIB, "{file:?} vs {idle:?}");
        assert_eq!((anon.anon, file.file), (0, 0), "no memory.stat, no keys");
    }

    for (id, _) in containers {
        within(
            sb.client
                .remove_container(agent::RemoveContainerRequest::of(id, 10)),
        )
        .await
        .expect("remove in time")
        .expect("remove");
    }
}
