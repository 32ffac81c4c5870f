//! Turns the bundle's OCI `config.json` into the agent's `grpc.Spec`.
//!
//! The guest sees none of the host's paths: the root becomes the shared directory's path inside
//! the VM, host bind mounts are left out (they are not shared yet), and namespace paths (host
//! network namespaces and the like) are dropped so the agent creates fresh ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

use super::sandbox::SandboxSpec;
use crate::protocols::oci as grpc;

/// Where the agent mounts the shared directory (9p tag `kataShared`) inside the VM.
pub(crate) const GUEST_SHARED_DIR: &str = "/run/kata-containers/shared/containers";
/// The 9p tag of the shared directory.
pub(crate) const SHARED_TAG: &str = "kataShared";

/// Annotation that says whether a container is a pod sandbox or a container in one.
pub(crate) const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation naming the sandbox a container belongs to.
pub(crate) const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Mount types that the guest kernel provides itself; everything else needs host files.
const GUEST_FS_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpecError {
    #[error("reading the OCI spec {path}: {source}")]
    Load {
        path: String,
        source: oci_spec::OciSpecError,
    },
    #[error("the OCI spec {path} has no process")]
    NoProcess { path: String },
    #[error("the exec's OCI process: {0}")]
    ExecProcess(#[source] serde_json::Error),
    #[error("the exec's OCI process: no args")]
    ExecProcessWithoutArgs,
}

/// Loads `<bundle>/config.json`.
pub(crate) fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| SpecError::Load {
        path: path.display().to_string(),
        source,
    })
}

/// What the sandbox container's spec says about its sandbox: the pod and its network namespace.
pub(crate) fn sandbox_spec(spec: &Spec) -> SandboxSpec {
    SandboxSpec {
        pod: pod_identity(spec),
        netns: network_namespace(spec),
        cgroups_path: cgroups_path(spec),
    }
}

/// The path of the network namespace the spec joins (CRI's pod namespace, set up by CNI); `None`
/// when the spec asks for a new namespace or none.
pub(crate) fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|path| !path.as_os_str().is_empty())
}

/// The pod a sandbox belongs to (kata-monitor's `cri_*` labels), from the CRI annotations.
pub(crate) fn pod_identity(spec: &Spec) -> Option<crate::mgmt::PodIdentity> {
    crate::mgmt::pod_identity_from_annotations(spec.annotations().as_ref()?)
}

/// The sandbox a container joins, when its annotations say it is a container in an existing
/// sandbox (CRI's pattern). `None` means: this container is a sandbox of its own.
pub(crate) fn sandbox_of(spec: &Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    if annotations.get(CONTAINER_TYPE).map(String::as_str) != Some("container") {
        return None;
    }
    annotations
        .get(SANDBOX_ID)
        .filter(|id| !id.is_empty())
        .cloned()
}

/// The container's `linux.cgroupsPath` (for a sandbox: where its VM runs on the host), if set.
pub(crate) fn cgroups_path(spec: &Spec) -> Option<String> {
    spec.linux()
        .as_ref()?
        .cgroups_path()
        .as_ref()
        .map(|path| path.display().to_string())
        .filter(|path| !path.is_empty())
}

/// The limits of `resources` that the agent applies (memory, CPU, pids), in Kata's messages.
pub(crate) fn agent_resources(resources: &LinuxResources) -> grpc::LinuxResources {
    let memory = resources.memory().as_ref().map(|m| grpc::LinuxMemory {
        Limit: m.limit().unwrap_or(0),
        Reservation: m.reservation().unwrap_or(0),
        Swap: m.swap().unwrap_or(0),
        Swappiness: m.swappiness().unwrap_or(0),
        DisableOOMKiller: m.disable_oom_killer().unwrap_or(false),
        ..Default::default()
    });
    let cpu = resources.cpu().as_ref().map(|c| grpc::LinuxCPU {
        Shares: c.shares().unwrap_or(0),
        Quota: c.quota().unwrap_or(0),
        Period: c.period().unwrap_or(0),
        Cpus: c.cpus().clone().unwrap_or_default(),
        Mems: c.mems().clone().unwrap_or_default(),
        ..Default::default()
    });
    let pids = resources.pids().as_ref().map(|p| grpc::LinuxPids {
        Limit: p.limit(),
        ..Default::default()
    });
    grpc::LinuxResources {
        Memory: memory.into(),
        CPU: cpu.into(),
        Pids: pids.into(),
        ..Default::default()
    }
}

/// The container's root inside the guest.
pub(crate) fn guest_rootfs(container_id: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
}

/// The agent's view of `spec` for container `container_id`.
pub(crate) fn to_agent_spec(
    spec: &Spec,
    container_id: &str,
    bundle: &Path,
) -> Result<grpc::Spec, SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::NoProcess {
            path: bundle.join("config.json").display().to_string(),
        })?;
    let mut out = grpc::Spec {
        Version: spec.version().clone(),
        Hostname: spec.hostname().clone().unwrap_or_default(),
        Annotations: spec.annotations().clone().unwrap_or_default(),
        ..Default::default()
    };
    out.Process = Some(to_agent_process(process)).into();
    out.Root = Some(grpc::Root {
        Path: guest_rootfs(container_id),
        Readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        ..Default::default()
    })
    .into();
    out.Mounts = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| {
            m.typ()
                .as_deref()
                .is_some_and(|t| GUEST_FS_TYPES.contains(&t))
        })
        .map(|m| grpc::Mount {
            destination: m.destination().display().to_string(),
            source: m
                .source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            type_: m.typ().clone().unwrap_or_default(),
            options: m.options().clone().unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    if let Some(linux) = spec.linux() {
        out.Linux = Some(grpc::Linux {
            Sysctl: linux.sysctl().clone().unwrap_or_else(HashMap::new),
            Resources: linux.resources().as_ref().map(agent_resources).into(),
            CgroupsPath: linux
                .cgroups_path()
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            Namespaces: linux
                .namespaces()
                .iter()
                .flatten()
                .map(|ns| grpc::LinuxNamespace {
                    Type: namespace_name(ns.typ()).to_string(),
                    // A host path means nothing inside the VM.
                    Path: String::new(),
                    ..Default::default()
                })
                .collect(),
            MaskedPaths: linux.masked_paths().clone().unwrap_or_default(),
            ReadonlyPaths: linux.readonly_paths().clone().unwrap_or_default(),
            ..Default::default()
        })
        .into();
    }
    Ok(out)
}

/// The agent's view of one OCI process (a container's or an exec'd one).
pub(crate) fn to_agent_process(process: &Process) -> grpc::Process {
    let user = process.user();
    grpc::Process {
        Terminal: process.terminal().unwrap_or(false),
        ConsoleSize: process
            .console_size()
            .map(|size| grpc::Box {
                Height: u32::try_from(size.height()).unwrap_or(u32::MAX),
                Width: u32::try_from(size.width()).unwrap_or(u32::MAX),
                ..Default::default()
            })
            .into(),
        User: Some(grpc::User {
            UID: user.uid(),
            GID: user.gid(),
            AdditionalGids: user.additional_gids().clone().unwrap_or_default(),
            Username: user.username().clone().unwrap_or_default(),
            ..Default::default()
        })
        .into(),
        Args: process.args().clone().unwrap_or_default(),
        Env: process.env().clone().unwrap_or_default(),
        Cwd: process.cwd().display().to_string(),
        NoNewPrivileges: process.no_new_privileges().unwrap_or(false),
        ..Default::default()
    }
}

/// The agent's view of the OCI process JSON that containerd sends with an exec.
pub(crate) fn exec_process(json: &[u8]) -> Result<grpc::Process, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::ExecProcess)?;
    if process.args().as_deref().unwrap_or_default().is_empty() {
        return Err(SpecError::ExecProcessWithoutArgs);
    }
    Ok(to_agent_process(&process))
}

/// The namespace names of the OCI JSON (`mount`, `network`, ...).
fn namespace_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mount",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "network",
        LinuxNamespaceType::Time => "time",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
      "ociVersion": "1.0.2-dev",
      "process": {"terminal": false, "user": {"uid": 1000, "gid": 1000},
                  "args": ["sh", "-c", "exit 3"], "env": ["PATH=/bin"], "cwd": "/work"},
      "root": {"path": "rootfs"},
      "hostname": "box",
      "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind"]}
      ],
      "annotations": {"io.kubernetes.cri.container-type": "container",
                      "io.kubernetes.cri.sandbox-id": "sb1"},
      "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}
    }"#;

    fn spec() -> Spec {
        serde_json::from_str(CONFIG).expect("test spec")
    }

    #[test]
    fn the_guest_gets_its_own_root_and_no_host_paths() {
        let out = to_agent_spec(&spec(), "c1", Path::new("/b")).expect("spec");
        assert_eq!(
            out.Root.Path,
            "/run/kata-containers/shared/containers/c1/rootfs"
        );
        let process = out.Process.as_ref().expect("process");
        assert_eq!(process.Args, vec!["sh", "-c", "exit 3"]);
        assert_eq!(process.Cwd, "/work");
        assert_eq!(process.User.UID, 1000);
        assert_eq!(out.Mounts.len(), 1, "the host bind mount is left out");
        assert_eq!(out.Mounts[0].destination, "/proc");
        let namespaces: Vec<_> = out
            .Linux
            .Namespaces
            .iter()
            .map(|n| (n.Type.as_str(), n.Path.as_str()))
            .collect();
        assert_eq!(namespaces, vec![("pid", ""), ("network", "")]);
    }

    #[test]
    fn an_exec_process_is_parsed_from_containerds_json() {
        let json = br#"{"terminal": true, "consoleSize": {"height": 40, "width": 120},
                        "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "exit 5"],
                        "env": ["PATH=/bin"], "cwd": "/"}"#;
        let process = exec_process(json).expect("process");
        assert_eq!(process.Args, vec!["sh", "-c", "exit 5"]);
        assert!(process.Terminal);
        assert_eq!(
            (process.ConsoleSize.Height, process.ConsoleSize.Width),
            (40, 120)
        );
        assert!(exec_process(b"not json").is_err());
        let no_args = br#"{"user": {"uid": 0, "gid": 0}, "cwd": "/"}"#;
        assert!(exec_process(no_args).is_err());
    }

    #[test]
    fn cri_annotations_name_the_sandbox() {
        assert_eq!(sandbox_of(&spec()).as_deref(), Some("sb1"));
        let mut plain = spec();
        plain.set_annotations(None);
        assert_eq!(sandbox_of(&plain), None);
    }

    #[test]
    fn the_network_namespace_comes_from_the_spec_when_it_names_a_path() {
        let with = |namespaces: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion": "1.0.2", "linux": {{"namespaces": [{namespaces}]}}}}"#
            ))
            .unwrap()
        };
        let cri =
            with(r#"{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}"#);
        assert_eq!(
            network_namespace(&cri),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        assert_eq!(network_namespace(&with(r#"{"type": "network"}"#)), None);
        assert_eq!(network_namespace(&with(r#"{"type": "pid"}"#)), None);
    }

    #[test]
    fn the_cgroups_path_is_read_as_containerd_writes_it() {
        let json = CONFIG.replace(
            r#""linux": {"#,
            r#""linux": {"cgroupsPath": "/kubepods/besteffort/pod42/sb1", "#,
        );
        let with_path: Spec = serde_json::from_str(&json).expect("spec");
        assert_eq!(
            cgroups_path(&with_path).as_deref(),
            Some("/kubepods/besteffort/pod42/sb1")
        );
        assert_eq!(cgroups_path(&spec()), None);
    }
}
