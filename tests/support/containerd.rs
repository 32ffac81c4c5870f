//! A private containerd for the tests that run real sandboxes (scripts/containerd-env.sh), with or
//! without its CRI plugin, and what those tests check around it: the processes, directories,
//! mounts and sockets a sandbox may leave behind, task pids, and waiting for processes to go.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "docker.io/library/busybox:latest";
pub const RUNTIME: &str = "io.containerd.kata.v2";
/// The guest memory the tests configure (MiB).
pub const GUEST_MEMORY_MIB: u64 = 512;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A private containerd (scripts/containerd-env.sh) with the busybox image imported; stopped and
/// removed on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start(guest: &Path) -> Containerd {
        Containerd::start_with(guest, None)
    }

    /// With `conf`, the shims read that file (`KATA_CONF_FILE`) instead of a generated one.
    pub fn start_with(guest: &Path, conf: Option<&Path>) -> Containerd {
        Containerd::launch("start", guest, conf)
    }

    /// With the CRI plugin (`start-cri`): in a network namespace of its own, runtime handler
    /// `kata`, the pause image and busybox in containerd namespace k8s.io.
    pub fn start_cri(guest: &Path) -> Containerd {
        Containerd::launch("start-cri", guest, None)
    }

    fn launch(command: &str, guest: &Path, conf: Option<&Path>) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("ksm-")
            .tempdir_in("/tmp")
            .expect("create a temporary directory in /tmp");
        let shim = super::bin("containerd-shim-kata-v2");
        let bin_dir = shim.parent().expect("the shim's directory");
        let mut start = Command::new(repo().join("scripts/containerd-env.sh"));
        start
            .args([command.as_ref(), dir.path().as_os_str()])
            .env("KSM_BIN_DIR", bin_dir)
            .env("KSM_GUEST_DIR", guest)
            .env("KSM_DEFAULT_MEMORY", GUEST_MEMORY_MIB.to_string())
            .env_remove("KATA_CONF_FILE")
            .env_remove("KATA_SANDBOX_RUN_DIR")
            .env_remove("KSM_NAMESPACE");
        if let Some(conf) = conf {
            start.env("KATA_CONF_FILE", conf);
        }
        // Owned before it is started: a failed start still stops what it began (Drop).
        let env = Containerd { dir };
        let out = start.output().expect("run scripts/containerd-env.sh");
        assert!(
            out.status.success(),
            "containerd did not start: {}\ncontainerd log:\n{}",
            text(&out),
            env.log()
        );
        let image = repo().join("build/busybox.tar");
        let built = Command::new(repo().join("scripts/build-busybox-image.sh"))
            .arg(&image)
            .output()
            .expect("run scripts/build-busybox-image.sh");
        assert!(built.status.success(), "busybox image: {}", text(&built));
        let imported = env.ctr(&["images", "import", image.to_str().expect("utf-8 path")]);
        assert!(
            imported.status.success(),
            "ctr images import: {}",
            text(&imported)
        );
        env
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("run ctr")
    }

    /// `ctr <args>` against this containerd, stdin from /dev/null.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut ctr = Command::new(repo().join("scripts/containerd-env.sh"));
        ctr.arg("ctr")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null());
        ctr
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        let file = self.dir.path().join("containerd.pid");
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", file.display()))
    }

    /// The network namespace containerd runs in (`start-cri`), by name.
    pub fn netns(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("netns"))
            .ok()
            .map(|name| name.trim().to_string())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/containerd-env.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a sandbox or container may leave behind: processes, its run directory, mounts and sockets
/// naming it.
pub fn leftovers(env: &Containerd, id: &str) -> Vec<String> {
    let mut left: Vec<String> = super::processes_mentioning(&format!("/{id}/"))
        .into_iter()
        .chain(super::processes_mentioning(&format!("-id {id}")))
        .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
        .collect();
    let dir = env.run_dir().join(id);
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    // Shim sockets (named by a hash, so: any that no one serves, made since this containerd began).
    let since = std::fs::metadata(env.dir.path().join("config.toml")).and_then(|m| m.modified());
    for entry in std::fs::read_dir("/run/containerd/s")
        .into_iter()
        .flatten()
        .flatten()
    {
        let newer = match (&since, entry.metadata().and_then(|m| m.modified())) {
            (Ok(since), Ok(made)) => made >= *since,
            _ => false,
        };
        if newer && std::os::unix::net::UnixStream::connect(entry.path()).is_err() {
            left.push(format!("stale shim socket {}", entry.path().display()));
        }
    }
    // Mounts under containerd's directory: task rootfs, the VM's shared directory, CRI's shm and
    // the pod's network namespace.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let under = format!("{}/", env.dir.path().display());
    left.extend(
        mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|point| point.starts_with(&under) && point.contains(id))
            .map(|point| format!("mount {point}")),
    );
    // Unix sockets are listed per network namespace: containerd's is where its shims live (the
    // abstract management socket in particular).
    let unix = std::fs::read_to_string(format!("/proc/{}/net/unix", env.pid()))
        .or_else(|_| std::fs::read_to_string("/proc/net/unix"))
        .unwrap_or_default();
    left.extend(
        unix.lines()
            .filter(|l| l.contains(&format!("/{id}/")))
            .map(|l| format!("socket {l}")),
    );
    left
}

pub fn assert_clean(env: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftovers(env, id);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "sandbox {id} left behind:\n{}\ncontainerd log:\n{}",
                left.join("\n"),
                env.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run_detached(env: &Containerd, id: &str) -> Duration {
    let started = Instant::now();
    // The pod annotations CRI would set: the shim serves them to kata-monitor as pod labels.
    let out = env.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-name=pod-{id}"),
        "--annotation",
        "io.kubernetes.cri.sandbox-namespace=tests",
        "--annotation",
        "io.kubernetes.cri.sandbox-uid=0000-1111",
        IMAGE,
        id,
        "sleep",
        "600",
    ]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "ctr run -d: {}\ncontainerd log:\n{}",
        text(&out),
        env.log()
    );
    took
}

/// The task's pid as `ctr task ls` shows it (the shim reports QEMU's).
pub fn task_pid(env: &Containerd, id: &str) -> i32 {
    let out = env.ctr(&["task", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(id)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("task {id} not in ctr task ls: {}", text(&out)))
}

pub fn kill_and_delete(env: &Containerd, id: &str) {
    let out = env.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = env.ctr(&["task", "ls"]);
        let stopped = String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"));
        if stopped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} did not stop: {}",
            text(&ls)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.ctr(&["task", "delete", id]);
    assert!(out.status.success(), "ctr task delete: {}", text(&out));
    let out = env.ctr(&["container", "delete", id]);
    assert!(out.status.success(), "ctr container delete: {}", text(&out));
}

/// Waits until `pid` no longer runs (a zombie counts as gone: nothing of it is left but its entry).
pub fn assert_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        if state.is_empty() || zombie {
            return;
        }
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The child's exit status, killing it when it takes longer than `limit`.
pub fn wait_with_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for ctr") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctr did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn shim_pid(id: &str) -> i32 {
    super::processes_mentioning(&format!("-id {id}"))
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .map(|(pid, _)| pid)
        .expect("the shim process")
}
