#!/usr/bin/env bash
# The README's main command (`make demo`): a private containerd runs one busybox sandbox with our
# runtime and `kata-runtime metrics <id>` prints its metrics; then a private containerd with CRI
# runs a Kubernetes-style pod of two containers in one VM (examples/cri-pod.rs acts as kubelet),
# shown by `kata-runtime metrics`, CRI's stats and kata-monitor's series with the pod's labels.
# Everything is torn down at the end.
# Works without `make install`: containerd finds the shim in KSM_BIN_DIR (target/release), and the
# shim reads a configuration generated for the guest image in KSM_GUEST_DIR (build/guest).
# Exits non-zero if any step failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KSM_BIN_DIR=${KSM_BIN_DIR:-$repo/target/release}
export KSM_GUEST_DIR=${KSM_GUEST_DIR:-$repo/build/guest}
image_tar=$repo/build/busybox.tar
env_sh=$repo/scripts/containerd-env.sh
# shellcheck source=scripts/lib/ctr-sandbox.sh
source "$repo/scripts/lib/ctr-sandbox.sh"
dir=$(mktemp -d /tmp/ksm-XXXX)
id=demo-$$
cri_dir=
socket=
pod=
monitor_pid=
status=0

step() { echo; echo "==> $*"; }
# The ctr sandbox of the first part (a no-op once it is gone).
stop_ctr_sandbox() {
    [[ -n $dir ]] || return 0
    remove_ctr_sandbox "$env_sh" "$dir" "$id"
    "$env_sh" stop "$dir"
    dir=
}
cleanup() {
    step "tearing down"
    [[ -z $monitor_pid ]] || kill "$monitor_pid" 2>/dev/null || true
    if [[ -n $pod ]]; then
        "$KSM_BIN_DIR/examples/cri-pod" --endpoint "$socket" remove "$pod" || true
    fi
    [[ -z $cri_dir ]] || "$env_sh" stop "$cri_dir"
    stop_ctr_sandbox
}

step "building the busybox image"
"$repo/scripts/build-busybox-image.sh" "$image_tar"

step "starting a private containerd in $dir"
"$env_sh" start "$dir"
trap 'cleanup' EXIT
"$env_sh" ctr "$dir" images import "$image_tar"

step "ctr run -d --runtime io.containerd.kata.v2 busybox $id sleep 600"
started=$(date +%s%N)
"$env_sh" ctr "$dir" run -d --runtime io.containerd.kata.v2 docker.io/library/busybox:latest "$id" sleep 600
echo "sandbox running after $(( ($(date +%s%N) - started) / 1000000 )) ms"
"$env_sh" ctr "$dir" task ls

step "kata-runtime metrics $id"
run_dir=$("$env_sh" env "$dir" | sed -n 's/^KATA_SANDBOX_RUN_DIR=//p')
if ! KATA_SANDBOX_RUN_DIR=$run_dir "$KSM_BIN_DIR/kata-runtime" metrics "$id"; then
    echo "demo: kata-runtime metrics failed" >&2
    status=1
fi
step "stopping sandbox $id"
stop_ctr_sandbox

step "a pod under containerd's CRI: starting a private containerd with CRI (its own network namespace)"
cri_dir=$(mktemp -d /tmp/ksm-XXXX)
"$env_sh" start-cri "$cri_dir"
"$env_sh" ctr "$cri_dir" images import "$image_tar" >/dev/null
socket=$("$env_sh" env "$cri_dir" | sed -n 's/^CONTAINERD_ADDRESS=//p')

step "RunPodSandbox web/demo (runtime handler kata) with two containers, as kubelet would"
pod=$("$KSM_BIN_DIR/examples/cri-pod" --endpoint "$socket" run web demo docker.io/library/busybox:latest \
    'server=echo hello from the pod > /tmp/index.html; exec httpd -f -p 8080 -h /tmp' \
    'worker=dd if=/dev/zero bs=32M count=1 | sleep 600')
pod_ip=$("$KSM_BIN_DIR/examples/cri-pod" --endpoint "$socket" ip "$pod")
echo "pod $pod at $pod_ip; QEMU processes running it: $(pgrep -fc -- "qemu.*$pod" || true)"

step "GET http://$pod_ip:8080/index.html from containerd's network namespace"
in_netns=(nsenter "--net=/run/netns/$(cat "$cri_dir/netns")")
answer=
for _ in $(seq 50); do
    # timeout(1), not wget's -T: busybox 1.35's static wget crashes with it.
    answer=$(timeout 5 "${in_netns[@]}" busybox wget -q -O - "http://$pod_ip:8080/index.html" 2>/dev/null) && break
    sleep 0.2
done
if [[ -n $answer ]]; then echo "$answer"; else echo "demo: the pod did not answer" >&2; status=1; fi

step "kata-runtime metrics $pod (selected lines; guest eth0 carries the pod's traffic)"
cri_run_dir=$("$env_sh" env "$cri_dir" | sed -n 's/^KATA_SANDBOX_RUN_DIR=//p')
if KATA_SANDBOX_RUN_DIR=$cri_run_dir "$KSM_BIN_DIR/kata-runtime" metrics "$pod" >"$cri_dir/pod-metrics.txt"; then
    echo "$(grep -vc '^#' "$cri_dir/pod-metrics.txt") samples, among them:"
    grep -E '^kata_guest_netdev_stat\{interface="eth0",item="(recv|sent)_bytes"\}|^kata_guest_meminfo\{item="Mem(Total|Free)"\}|^kata_hypervisor_proc_status\{item="VmRSS"\}' \
        "$cri_dir/pod-metrics.txt" || true
else
    echo "demo: kata-runtime metrics $pod failed" >&2
    status=1
fi

step "CRI stats: what kubectl top reads (containers measured in the guest, the pod on the host)"
"$KSM_BIN_DIR/examples/cri-pod" --endpoint "$socket" stats "$pod" || status=1

port=$(shuf -i 20000-40000 -n 1)
step "kata-monitor --runtime-endpoint on 127.0.0.1:$port: the pod's series carry its name and namespace"
"$KSM_BIN_DIR/kata-monitor" --listen-address "127.0.0.1:$port" --run-dir "$cri_run_dir" \
    --runtime-endpoint "$socket" --log-level warn &
monitor_pid=$!
labelled=
for _ in $(seq 50); do
    labelled=$(busybox wget -q -O - "http://127.0.0.1:$port/metrics" 2>/dev/null \
        | grep -E '^kata_guest_.*cri_name="web"') && break
    sleep 0.2
done
if [[ -n $labelled ]]; then
    echo "$(wc -l <<<"$labelled") kata_guest_* samples of pod web, among them:"
    grep -E '^kata_guest_(load\{item="load1"|meminfo\{item="MemTotal"|netdev_stat\{interface="eth0",item="recv_bytes")' <<<"$labelled" || true
else
    echo "demo: kata-monitor has no series of pod web" >&2
    status=1
fi

step "kata-monitor /metrics/cadvisor: cAdvisor's container_* series of pod web, measured in the guest"
cadvisor=$(busybox wget -q -O - "http://127.0.0.1:$port/metrics/cadvisor" 2>/dev/null \
    | grep -E '^container_(cpu_usage_seconds_total|memory_working_set_bytes|spec_memory_limit_bytes)\{.*pod="web"' || true)
if [[ -n $cadvisor ]]; then
    echo "$cadvisor"
else
    echo "demo: kata-monitor has no cAdvisor series of pod web" >&2
    status=1
fi
exit $status
