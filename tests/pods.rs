//! Kubernetes' path: a kubelet stand-in (tests/support/cri.rs) drives containerd's CRI plugin,
//! which starts our shim for a pod's sandbox (the pause container) and then for each of its
//! containers, all in the pod's one VM. ExecSync, the container and pod stats, the pod's network
//! (CNI in containerd's own network namespace) and the orders in which kubelet tears pods down
//! are checked against /proc, cgroup files and `ip` output.
//!
//! Needs the guest image (`make guest-image`; set `KSM_GUEST_DIR`, as `make test` does), plus
//! containerd, QEMU, umoci, busybox-static, iproute2 and the CNI plugins (`make deps`). One VM at
//! a time (`VM_LOCK`); two VM boots in all.

mod support;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerState, PodSandboxState};
use support::containerd::*;
use support::cri::{Kubelet, Pod};
use support::pod_checks::*;

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Names of the links enslaved to the CNI bridge in containerd's network namespace.
fn bridge_ports(env: &Containerd) -> Vec<String> {
    let netns = PathBuf::from("/run/netns").join(env.netns().expect("a CRI containerd"));
    let links = ip_in(&netns, &["link", "show", "master", "cni0"]);
    links
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The host-local IPAM reservation of `ip` (a file named by the address, holding the owner's id).
fn ip_reservation(env: &Containerd, ip: &str) -> PathBuf {
    let network = env.netns().expect("a CRI containerd");
    env.dir.path().join("cni/ipam").join(network).join(ip)
}

fn log_of(pod: &Pod, name: &str) -> String {
    std::fs::read_to_string(pod.log_dir.path().join(format!("{name}.log"))).unwrap_or_default()
}

fn assert_exited(pod: &Pod, id: &str, code: i32) {
    let status = pod.container_status(id).status.expect("a container status");
    assert_eq!(
        (status.state(), status.exit_code),
        (ContainerState::ContainerExited, code),
        "container {id}: {}",
        status.reason
    );
}

fn ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    ids.into_iter().map(str::to_string).collect()
}

#[test]
#[ignore = "boots the guest image under containerd's CRI plugin: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn a_pods_containers_share_its_vm_and_stopping_and_removing_the_pod_leaves_nothing() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start_cri(&guest);
    let kubelet = Kubelet::connect(&env);
    let started = Instant::now();
    let pod = kubelet.run_pod("web");
    eprintln!("BENCH RunPodSandbox (VM boot): {:?}", started.elapsed());

    // CNI gave the pod an address in its own namespace, reserved in the private IPAM directory,
    // and plugged it into the bridge in containerd's namespace (the host has no bridge).
    let ip = pod
        .status()
        .status
        .and_then(|s| s.network)
        .expect("pod network")
        .ip;
    let netns = pod_netns(&pod);
    let eth0 = ip_in(&netns, &["addr", "show", "eth0"]);
    assert!(
        eth0[0]["addr_info"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["local"] == ip.as_str())),
        "the pod's eth0 does not have {ip}: {eth0}"
    );
    let reservation = std::fs::read_to_string(ip_reservation(&env, &ip)).unwrap_or_default();
    assert!(
        reservation.starts_with(&pod.id),
        "IPAM {ip}: {reservation:?}"
    );
    assert_eq!(bridge_ports(&env).len(), 1, "one veth for the pod");
    let on_host = Command::new("ip").args(["link", "show", "cni0"]).output();
    assert!(
        on_host.is_ok_and(|out| !out.status.success()),
        "the bridge must not be in the host's namespace"
    );

    let one = pod.run_container("one", &["sh", "-c", "echo one is up; exec sleep 600"]);
    let two = pod.run_container("two", &["sleep", "600"]);

    // One VM runs the sandbox and both containers: one QEMU, every task's pid, one guest kernel.
    let qemu = the_pods_qemu(&env, &pod);
    for id in [&one, &two] {
        assert_eq!(cri_task_pid(&pod, id), i64::from(qemu), "task pid of {id}");
    }
    let boot_id = |id: &str| exec_text(&pod, id, &["cat", "/proc/sys/kernel/random/boot_id"]);
    let host_boot_id =
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("the host's boot id");
    assert_eq!(boot_id(&one), boot_id(&two), "both containers in one guest");
    assert_ne!(boot_id(&one), host_boot_id, "the containers run in a VM");

    // ExecSync: both streams and the exit code.
    let reply = pod.exec_sync(&one, &["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    assert_eq!(
        (
            String::from_utf8_lossy(&reply.stdout).as_ref(),
            String::from_utf8_lossy(&reply.stderr).as_ref(),
            reply.exit_code
        ),
        ("hi\n", "oops\n", 3)
    );
    // A container's output reaches its CRI log file.
    wait_until("one's log line", Duration::from_secs(20), || {
        log_of(&pod, "one").contains(" stdout F one is up")
    });

    // Stats: each container's from the guest, the pod's from the pod cgroup on the host and the
    // pod's network namespace.
    let stats = pod.container_stats(&two);
    let attributes = stats.attributes.as_ref().expect("attributes");
    assert_eq!(attributes.id, two);
    let cpu = stats.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds);
    assert!(cpu.is_some_and(|v| v.value > 0), "two's CPU: {stats:?}");
    let working_set = stats.memory.as_ref().and_then(|m| m.working_set_bytes);
    assert!(
        working_set.is_some_and(|v| v.value > 0 && v.value < GUEST_MEMORY_MIB << 20),
        "two's working set: {stats:?}"
    );
    let listed = pod.list_container_stats();
    let listed_ids = listed
        .iter()
        .filter_map(|s| Some(s.attributes.as_ref()?.id.as_str()));
    assert_eq!(ids(listed_ids), ids([one.as_str(), two.as_str()]));

    pod.spend_cpu_in_cgroup();
    let pod_stats = pod.stats();
    let cgroup_cpu_after = pod.cgroup_cpu_ns();
    let attributes = pod_stats.attributes.as_ref().expect("pod attributes");
    let metadata = attributes.metadata.as_ref().expect("pod metadata");
    assert_eq!(
        (attributes.id.as_str(), metadata.uid.as_str()),
        (pod.id.as_str(), pod.uid.as_str())
    );
    let linux = pod_stats.linux.as_ref().expect("linux pod stats");
    let in_pod = linux
        .containers
        .iter()
        .filter_map(|s| Some(s.attributes.as_ref()?.id.as_str()));
    assert_eq!(ids(in_pod), ids([one.as_str(), two.as_str()]));
    let pod_cpu = linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds)
        .expect("the pod's CPU");
    assert!(
        pod_cpu.value > 0 && pod_cpu.value <= cgroup_cpu_after,
        "the pod's CPU {} is not within (0, {}] (its cgroup's, read afterwards)",
        pod_cpu.value,
        cgroup_cpu_after
    );
    let interface = linux
        .network
        .as_ref()
        .and_then(|n| n.default_interface.as_ref())
        .expect("the pod's network stats");
    let rx = interface.rx_bytes.expect("rx bytes").value;
    let link = ip_in(&netns, &["-s", "link", "show", "eth0"]);
    let rx_after = link[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .expect("eth0 rx bytes");
    assert_eq!(interface.name, "eth0");
    assert!(rx <= rx_after, "rx {rx} > {rx_after} read afterwards");

    // StopPodSandbox with both containers running: they are killed, the VM and the pod's network
    // go; RemovePodSandbox takes the rest.
    let started = Instant::now();
    pod.stop();
    eprintln!("BENCH StopPodSandbox: {:?}", started.elapsed());
    assert_exited(&pod, &one, 137);
    assert_exited(&pod, &two, 137);
    assert_gone(qemu, "the pod's QEMU");
    assert!(
        !netns.exists(),
        "the pod's netns {} is left",
        netns.display()
    );
    assert!(
        !ip_reservation(&env, &ip).exists(),
        "{ip} is still reserved"
    );
    assert_eq!(bridge_ports(&env), Vec::<String>::new(), "veths left");
    pod.remove();
    for id in [&pod.id, &one, &two] {
        assert_clean(&env, id);
    }
}

#[test]
#[ignore = "boots the guest image under containerd's CRI plugin: `make test` runs it (KSM_GUEST_DIR, --include-ignored)"]
fn kubelets_orders_of_teardown_leave_nothing_behind() {
    let guest = support::guest_dir();
    let _vm = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let env = Containerd::start_cri(&guest);
    let kubelet = Kubelet::connect(&env);
    let pod = kubelet.run_pod("order");
    // `one` ends on SIGTERM with status 0 (the trap is set before it says it is up).
    let one = pod.run_container(
        "one",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo one is up; sleep 600 & wait",
        ],
    );
    let two = pod.run_container("two", &["sleep", "600"]);
    let qemu = the_pods_qemu(&env, &pod);
    wait_until("one's log line", Duration::from_secs(20), || {
        log_of(&pod, "one").contains(" stdout F one is up")
    });

    // A container stopped (SIGTERM first) and removed while its pod runs: gone, the VM stays.
    pod.stop_container(&one, 30);
    assert_exited(&pod, &one, 0);
    pod.remove_container(&one);
    assert_clean(&env, &one);
    assert_eq!(the_pods_qemu(&env, &pod), qemu);
    assert_eq!(
        exec_text(&pod, &two, &["echo", "still here"]),
        "still here\n"
    );

    // The sandbox's process dies first (its task is deleted before the last container's): the
    // VM stays for `two` until kubelet stops the pod.
    let killed = env.ctr(&["task", "kill", "-s", "SIGKILL", &pod.id]);
    assert!(killed.status.success(), "ctr task kill: {}", text(&killed));
    wait_until("the pod is not ready", Duration::from_secs(30), || {
        pod.status()
            .status
            .is_some_and(|s| s.state() == PodSandboxState::SandboxNotready)
    });
    wait_until(
        "the sandbox's rootfs unmounted",
        Duration::from_secs(20),
        || {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            !mounts.contains(&format!("{}/rootfs ", pod.id))
        },
    );
    assert_eq!(the_pods_qemu(&env, &pod), qemu);
    assert_eq!(
        exec_text(&pod, &two, &["echo", "still here"]),
        "still here\n"
    );

    // StopPodSandbox kills `two`; it is removed after its sandbox stopped, then the pod.
    pod.stop();
    assert_exited(&pod, &two, 137);
    assert_gone(qemu, "the pod's QEMU");
    pod.remove_container(&two);
    assert_clean(&env, &two);
    pod.remove();
    assert_clean(&env, &pod.id);
}

/// The sandbox image's /pause, run by its own busybox in a chroot (with the host's /dev, in a
/// mount namespace of its own), until `signal`; returns its exit status.
fn pause_until(rootfs: &Path, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
    let mut pause = Command::new("unshare");
    pause
        .args([
            "--mount",
            "sh",
            "-c",
            "mount --bind /dev \"$0/dev\" && exec chroot \"$0\" /pause",
        ])
        .arg(rootfs)
        .stdin(Stdio::null());
    // A container's process starts with every signal at its default (runc resets them). A test
    // run started as a background job inherits SIGINT ignored, and a shell cannot trap a signal
    // ignored on entry: reset it, as the runtime would.
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        pause.pre_exec(|| {
            use nix::sys::signal::{signal as set_handler, SigHandler, Signal};
            set_handler(Signal::SIGINT, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            set_handler(Signal::SIGQUIT, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut pause = pause.spawn().expect("run unshare");
    let pid = pause.id() as i32;
    // Its sleep runs once the trap is set (before, the child may be `mount`).
    wait_until("pause's sleep", Duration::from_secs(10), || {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children.split_whitespace().any(|child| {
            std::fs::read_to_string(format!("/proc/{child}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
        })
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal pause");
    wait_with_timeout(&mut pause, Duration::from_secs(10))
}

#[test]
fn the_pause_image_waits_and_exits_0_on_sigterm_and_sigint() {
    let dir = support::temp_dir();
    let image = dir.path().join("pause.tar");
    let built = Command::new(repo().join("scripts/build-pause-image.sh"))
        .arg(&image)
        .output()
        .expect("run scripts/build-pause-image.sh");
    assert!(built.status.success(), "pause image: {}", text(&built));
    let layout = dir.path().join("oci");
    std::fs::create_dir(&layout).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&image)
        .arg("-C")
        .arg(&layout)
        .output()
        .expect("run tar");
    assert!(untar.status.success(), "tar: {}", text(&untar));
    let bundle = dir.path().join("bundle");
    let unpacked = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .expect("run umoci");
    assert!(
        unpacked.status.success(),
        "umoci unpack: {}",
        text(&unpacked)
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bundle.join("config.json")).expect("the bundle's config.json"),
    )
    .expect("config.json is JSON");
    assert_eq!(config["process"]["args"], serde_json::json!(["/pause"]));

    let rootfs = bundle.join("rootfs");
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let status = pause_until(&rootfs, signal);
        assert_eq!(status.code(), Some(0), "after {signal}: {status:?}");
    }
}
