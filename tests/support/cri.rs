//! A kubelet stand-in: the CRI calls kubelet makes for a pod (the `k8s-cri` client over
//! containerd's unix socket, runtime handler `kata`), the pod cgroup kubelet creates before
//! RunPodSandbox with the cgroupfs driver, and on drop what kubelet would do to a pod it gives up
//! on (stop, remove, pod cgroups gone), so a failing test leaves nothing behind either.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

use super::containerd::{Containerd, IMAGE};

/// The RuntimeClass handler that containerd-env.sh maps to `io.containerd.kata.v2`.
pub const HANDLER: &str = "kata";
/// How long the stand-in waits for one CRI call (RunPodSandbox boots a VM under TCG).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A CRI client of one containerd, with the runtime that drives it (the tests are synchronous).
pub struct Kubelet {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    containerd_log: PathBuf,
}

impl Kubelet {
    pub fn connect(env: &Containerd) -> Kubelet {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let socket = env.socket();
        // The URI is a placeholder: every connection goes to the unix socket.
        let endpoint = Endpoint::try_from("http://[::]:50051").expect("endpoint");
        let channel = runtime
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                })),
            )
            .expect("connect to containerd's CRI socket");
        Kubelet {
            runtime,
            channel,
            containerd_log: env.dir.path().join("containerd.log"),
        }
    }

    /// Runs one CRI call to its end (or `CALL_TIMEOUT`).
    fn call<T, F>(&self, rpc: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = RuntimeServiceClient::new(self.channel.clone());
        self.runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, rpc(client)).await })
            .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    }

    /// [`Kubelet::call`] that must succeed; a failure shows containerd's log.
    fn must<T, F>(&self, what: &str, rpc: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> T
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(rpc).unwrap_or_else(|err| {
            let log = std::fs::read_to_string(&self.containerd_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("{what}: {err}\ncontainerd log (end):\n{}", tail.join("\n"))
        })
    }

    /// What kubelet does for a new pod: its cgroup, then RunPodSandbox with handler `kata`.
    pub fn run_pod(&self, name: &str) -> Pod<'_> {
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), next());
        let cgroup = PodCgroup::create(&uid);
        let log_dir = tempfile::Builder::new()
            .prefix("ksm-pod-logs-")
            .tempdir()
            .expect("a pod log directory");
        let namespace = "ksm-tests".to_string();
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.namespace".to_string(), namespace.clone()),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
        ]);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: uid.clone(),
                namespace,
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_dir.path().display().to_string(),
            labels,
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup.parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: HANDLER.to_string(),
        };
        let id = self
            .must("RunPodSandbox", |mut c| async move {
                c.run_pod_sandbox(request).await
            })
            .pod_sandbox_id;
        Pod {
            kubelet: self,
            id,
            uid,
            config,
            log_dir,
            containers: RefCell::new(Vec::new()),
            removed: Cell::new(false),
            cgroup,
        }
    }
}

fn next() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One pod sandbox of the stand-in, and the containers it created in it.
pub struct Pod<'k> {
    kubelet: &'k Kubelet,
    pub id: String,
    pub uid: String,
    pub config: PodSandboxConfig,
    /// Where CRI writes the containers' logs (`<name>.log`).
    pub log_dir: tempfile::TempDir,
    containers: RefCell<Vec<String>>,
    removed: Cell<bool>,
    // Last: dropped after the pod is gone, as kubelet removes the cgroup after the pod.
    cgroup: PodCgroup,
}

impl Pod<'_> {
    /// The cgroup kubelet made for the pod (`cgroup_parent`), e.g. `/kubepods/besteffort/pod<uid>`.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup.parent
    }

    /// The pod cgroup's CPU time as the kernel counts it (v1 cpuacct.usage, else v2 usage_usec).
    pub fn cgroup_cpu_ns(&self) -> u64 {
        self.cgroup.cpu_usage_ns()
    }

    /// Runs a short CPU-bound shell in the pod's cgroups, as a process of the pod would, so that
    /// their CPU counters are not zero.
    pub fn spend_cpu_in_cgroup(&self) {
        let join: String = self
            .cgroup
            .dirs
            .iter()
            .map(|dir| format!("echo $$ > {}/cgroup.procs; ", dir.display()))
            .collect();
        let script = format!("{join}i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done");
        let status = std::process::Command::new("sh")
            .args(["-ec", &script])
            .status()
            .expect("run sh");
        assert!(
            status.success(),
            "the CPU-bound shell in the pod cgroup: {status}"
        );
    }

    /// CreateContainer of a busybox container named `name` running `command`; returns its id.
    pub fn create_container(&self, name: &str, command: &[&str]) -> String {
        self.create_container_with(name, command, None)
    }

    /// CreateContainer with kubelet's resources (limits and requests) for the container.
    pub fn create_container_with(
        &self,
        name: &str,
        command: &[&str],
        resources: Option<LinuxContainerResources>,
    ) -> String {
        let request = CreateContainerRequest {
            pod_sandbox_id: self.id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.to_string(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: IMAGE.to_string(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                linux: Some(LinuxContainerConfig {
                    resources,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(self.config.clone()),
        };
        let id = self
            .kubelet
            .must("CreateContainer", |mut c| async move {
                c.create_container(request).await
            })
            .container_id;
        self.containers.borrow_mut().push(id.clone());
        id
    }

    /// UpdateContainerResources, as kubelet sends it for an in-place resize.
    pub fn update_resources(&self, id: &str, resources: LinuxContainerResources) {
        let request = UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(resources),
            ..Default::default()
        };
        self.kubelet
            .must("UpdateContainerResources", |mut c| async move {
                c.update_container_resources(request).await
            });
    }

    pub fn start_container(&self, id: &str) {
        let request = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.kubelet.must("StartContainer", |mut c| async move {
            c.start_container(request).await
        });
    }

    /// CreateContainer and StartContainer, as kubelet starts each container of a pod.
    pub fn run_container(&self, name: &str, command: &[&str]) -> String {
        let id = self.create_container(name, command);
        self.start_container(&id);
        id
    }

    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        let request = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.kubelet.must(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        )
    }

    /// ContainerStatus with containerd's verbose info (its `info` JSON has the task's pid).
    pub fn container_status(&self, id: &str) -> ContainerStatusResponse {
        let request = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        };
        self.kubelet.must("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })
    }

    pub fn container_stats(&self, id: &str) -> ContainerStats {
        let request = ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.kubelet
            .must("ContainerStats", |mut c| async move {
                c.container_stats(request).await
            })
            .stats
            .unwrap_or_else(|| panic!("ContainerStats of {id} has no stats"))
    }

    /// ListContainerStats of this pod's containers.
    pub fn list_container_stats(&self) -> Vec<ContainerStats> {
        let request = ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: self.id.clone(),
                ..Default::default()
            }),
        };
        self.kubelet
            .must("ListContainerStats", |mut c| async move {
                c.list_container_stats(request).await
            })
            .stats
    }

    pub fn stats(&self) -> PodSandboxStats {
        let request = PodSandboxStatsRequest {
            pod_sandbox_id: self.id.clone(),
        };
        self.kubelet
            .must("PodSandboxStats", |mut c| async move {
                c.pod_sandbox_stats(request).await
            })
            .stats
            .unwrap_or_else(|| panic!("PodSandboxStats of {} has no stats", self.id))
    }

    /// ListPodSandboxStats filtered to this pod's id.
    pub fn list_stats(&self) -> Vec<PodSandboxStats> {
        let request = ListPodSandboxStatsRequest {
            filter: Some(PodSandboxStatsFilter {
                id: self.id.clone(),
                ..Default::default()
            }),
        };
        self.kubelet
            .must("ListPodSandboxStats", |mut c| async move {
                c.list_pod_sandbox_stats(request).await
            })
            .stats
    }

    pub fn status(&self) -> PodSandboxStatusResponse {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: self.id.clone(),
            verbose: true,
        };
        self.kubelet.must("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(request).await
        })
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout` seconds.
    pub fn stop_container(&self, id: &str, timeout: i64) {
        let request = StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        };
        self.kubelet.must("StopContainer", |mut c| async move {
            c.stop_container(request).await
        });
    }

    pub fn remove_container(&self, id: &str) {
        let request = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.kubelet.must("RemoveContainer", |mut c| async move {
            c.remove_container(request).await
        });
        self.containers.borrow_mut().retain(|c| c != id);
    }

    pub fn stop(&self) {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        };
        self.kubelet.must("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(request).await
        });
    }

    /// RemovePodSandbox (which removes the pod's remaining containers too).
    pub fn remove(&self) {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        };
        self.kubelet.must("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(request).await
        });
        self.containers.borrow_mut().clear();
        self.removed.set(true);
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if self.removed.get() {
            return;
        }
        // A test that failed half-way: kubelet's order, errors ignored (something may be gone).
        let kubelet = self.kubelet;
        for id in self.containers.borrow().iter() {
            let stop = StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            };
            let _ = kubelet.call(|mut c| async move { c.stop_container(stop).await });
            let remove = RemoveContainerRequest {
                container_id: id.clone(),
            };
            let _ = kubelet.call(|mut c| async move { c.remove_container(remove).await });
        }
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        };
        let _ = kubelet.call(|mut c| async move { c.stop_pod_sandbox(stop).await });
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        };
        let _ = kubelet.call(|mut c| async move { c.remove_pod_sandbox(remove).await });
    }
}

/// The pod's cgroup as kubelet's cgroupfs driver makes it on this host before RunPodSandbox:
/// `/kubepods/besteffort/pod<uid>` in every cgroup v1 hierarchy (named ones such as
/// name=systemd included) and in the cgroup v2 one (unified, on a hybrid host). containerd's
/// PodSandboxStats reads it there. Removed on drop, deepest first.
pub struct PodCgroup {
    /// The path kubelet passes as `cgroup_parent`.
    pub parent: String,
    /// `<hierarchy mount>/kubepods/besteffort/pod<uid>` in each hierarchy.
    pub dirs: Vec<PathBuf>,
}

impl PodCgroup {
    pub fn create(uid: &str) -> PodCgroup {
        let parent = format!("/kubepods/besteffort/pod{uid}");
        let mut dirs = Vec::new();
        for mount in cgroup_mounts() {
            let mut dir = mount.clone();
            for part in parent.trim_start_matches('/').split('/') {
                let parent_dir = dir.clone();
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => inherit_cpuset(&parent_dir, &dir),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("create the pod cgroup {}: {e}", dir.display()),
                }
            }
            dirs.push(dir);
        }
        assert!(!dirs.is_empty(), "no cgroup hierarchy is mounted");
        PodCgroup { parent, dirs }
    }
}

impl PodCgroup {
    fn cpu_usage_ns(&self) -> u64 {
        let read = |file: PathBuf| std::fs::read_to_string(file).ok();
        let v1 = self
            .dirs
            .iter()
            .find_map(|dir| read(dir.join("cpuacct.usage")))
            .and_then(|text| text.trim().parse().ok());
        let v2 = || {
            self.dirs
                .iter()
                .find_map(|dir| read(dir.join("cpu.stat")))
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                })
                .map(|usec| usec * 1000)
        };
        v1.or_else(v2)
            .unwrap_or_else(|| panic!("no CPU usage in the pod cgroups {:?}", self.dirs))
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // The runtime may still be stopping the VM in the pod's cgroup (a test that failed
        // half-way): a cgroup with processes cannot go yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.dirs.iter().any(|dir| dir.exists()) && std::time::Instant::now() < deadline {
            for dir in &self.dirs {
                remove_cgroup_tree(dir);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for dir in &self.dirs {
            // besteffort and kubepods too, when no other pod is left in them.
            for up in dir.ancestors().skip(1).take(2) {
                let _ = std::fs::remove_dir(up);
            }
        }
    }
}

/// The mount points of the cgroup hierarchies (v1 and v2), from /proc/self/mountinfo.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let point = fields.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect();
    mounts.sort();
    mounts.dedup();
    mounts
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, so nothing could join it:
/// like kubelet (runc's cgroup code), copy the parent's.
fn inherit_cpuset(parent: &Path, dir: &Path) {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
            let _ = std::fs::write(dir.join(file), value.trim());
        }
    }
}

/// Removes a cgroup and the cgroups below it (a cgroup directory goes with rmdir, not unlink).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
