//! A small CRI client for the demo, doing what kubelet does for one pod (there is no crictl in
//! Debian): `run` makes the pod's cgroup (`/kubepods/besteffort/pod<uid>`, cgroupfs driver),
//! runs the pod with runtime handler `kata` and starts its containers; `stats` prints what
//! `kubectl top` is computed from; `remove` stops and removes the pod and its cgroup.
//!
//! cri-pod --endpoint <containerd.sock> run <name> <namespace> <image> <container>=<command>...
//! cri-pod --endpoint <containerd.sock> ip <pod id>
//! cri-pod --endpoint <containerd.sock> stats <pod id>
//! cri-pod --endpoint <containerd.sock> remove <pod id>

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = RuntimeServiceClient<Channel>;
type Error = Box<dyn std::error::Error>;

#[derive(Parser)]
struct Args {
    /// containerd's socket (CRI is served there).
    #[arg(long)]
    endpoint: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a pod and its containers; prints the pod's id.
    Run {
        name: String,
        namespace: String,
        image: String,
        /// `<name>=<shell command>`, one per container.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// The pod's IP (from CNI).
    Ip { pod: String },
    /// ContainerStats of each container and PodSandboxStats of the pod.
    Stats { pod: String },
    /// StopPodSandbox, RemovePodSandbox, and the pod's cgroup.
    Remove { pod: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let mut client = connect(args.endpoint).await?;
    match args.command {
        Cmd::Run {
            name,
            namespace,
            image,
            containers,
        } => run(&mut client, name, namespace, image, containers).await,
        Cmd::Ip { pod } => {
            let status = client
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod,
                    verbose: false,
                })
                .await?
                .into_inner();
            let ip = status.status.and_then(|s| s.network).map(|n| n.ip);
            println!("{}", ip.ok_or("the pod has no network status")?);
            Ok(())
        }
        Cmd::Stats { pod } => stats(&mut client, pod).await,
        Cmd::Remove { pod } => remove(&mut client, pod).await,
    }
}

async fn connect(socket: PathBuf) -> Result<Client, Error> {
    // The URI is a placeholder: every connection goes to the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .timeout(Duration::from_secs(300))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Where kubelet's cgroupfs driver puts a BestEffort pod.
fn pod_cgroup(uid: &str) -> String {
    format!("/kubepods/besteffort/pod{uid}")
}

/// The mount points of every cgroup hierarchy (v1 and v2).
fn cgroup_mounts() -> Result<Vec<PathBuf>, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let point = fields.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect())
}

/// Makes the pod's cgroup in every hierarchy, as kubelet does before RunPodSandbox.
fn create_pod_cgroup(path: &str) -> Result<(), Error> {
    for mount in cgroup_mounts()? {
        let mut dir = mount;
        for part in path.trim_start_matches('/').split('/') {
            let parent = dir.clone();
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)?;
                // A new v1 cpuset has no CPUs or memory nodes: nothing could join it.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
                        let _ = std::fs::write(dir.join(file), value.trim());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Removes the pod's cgroup (and what the runtime made under it) in every hierarchy.
fn remove_pod_cgroup(path: &str) -> Result<(), Error> {
    fn remove_tree(dir: &std::path::Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for mount in cgroup_mounts()? {
        let dir = mount.join(path.trim_start_matches('/'));
        remove_tree(&dir);
        for up in dir.ancestors().skip(1).take(2) {
            let _ = std::fs::remove_dir(up);
        }
    }
    Ok(())
}

async fn run(
    client: &mut Client,
    name: String,
    namespace: String,
    image: String,
    containers: Vec<String>,
) -> Result<(), Error> {
    let uid = format!("{:08x}-0000-4000-8000-000000000001", std::process::id());
    let cgroup = pod_cgroup(&uid);
    create_pod_cgroup(&cgroup)?;
    let log_dir = std::env::temp_dir().join(format!("cri-pod-{uid}"));
    std::fs::create_dir_all(&log_dir)?;
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: namespace.clone(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([
            ("io.kubernetes.pod.name".into(), name),
            ("io.kubernetes.pod.namespace".into(), namespace),
            ("io.kubernetes.pod.uid".into(), uid),
        ]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "kata".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    println!("{pod}");
    for spec in containers {
        let (container, command) = spec
            .split_once('=')
            .ok_or_else(|| format!("container {spec:?} is not <name>=<command>"))?;
        let created = client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: container.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    command: vec!["sh".into(), "-c".into(), command.into()],
                    log_path: format!("{container}.log"),
                    linux: Some(LinuxContainerConfig::default()),
                    ..Default::default()
                }),
                sandbox_config: Some(config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        client
            .start_container(StartContainerRequest {
                container_id: created.clone(),
            })
            .await?;
        eprintln!("container {container} started: {created}");
    }
    Ok(())
}

fn value(v: &Option<UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

const MIB: f64 = (1 << 20) as f64;

async fn stats(client: &mut Client, pod: String) -> Result<(), Error> {
    let containers = client
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    println!("CONTAINER            CPU (s)  WORKING SET (MiB)  RSS (MiB)  PAGE FAULTS");
    for container in containers {
        let stats = client
            .container_stats(ContainerStatsRequest {
                container_id: container.id.clone(),
            })
            .await?
            .into_inner()
            .stats
            .ok_or("ContainerStats gave no stats")?;
        let name = container.metadata.map(|m| m.name).unwrap_or_default();
        let cpu = stats
            .cpu
            .as_ref()
            .map_or(0, |c| value(&c.usage_core_nano_seconds));
        let memory = stats.memory.unwrap_or_default();
        println!(
            "{name:<20} {:>7.2}  {:>17.1}  {:>9.1}  {:>11}",
            cpu as f64 / 1e9,
            value(&memory.working_set_bytes) as f64 / MIB,
            value(&memory.rss_bytes) as f64 / MIB,
            value(&memory.page_faults),
        );
    }
    let stats = client
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod,
        })
        .await?
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .ok_or("PodSandboxStats gave no Linux stats")?;
    let cpu = stats
        .cpu
        .as_ref()
        .map_or(0, |c| value(&c.usage_core_nano_seconds));
    let memory = stats.memory.unwrap_or_default();
    println!(
        "{:<20} {:>7.2}  {:>17.1}  (the pod's cgroup on the host: the VM)",
        "POD",
        cpu as f64 / 1e9,
        value(&memory.working_set_bytes) as f64 / MIB,
    );
    if let Some(nic) = stats.network.and_then(|n| n.default_interface) {
        println!(
            "POD NETWORK {}: rx {} bytes, tx {} bytes",
            nic.name,
            value(&nic.rx_bytes),
            value(&nic.tx_bytes)
        );
    }
    Ok(())
}

async fn remove(client: &mut Client, pod: String) -> Result<(), Error> {
    let status = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner();
    let uid = status
        .status
        .and_then(|s| s.metadata)
        .map(|m| m.uid)
        .ok_or("the pod has no metadata")?;
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await?;
    remove_pod_cgroup(&pod_cgroup(&uid))?;
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("cri-pod-{uid}")));
    Ok(())
}
