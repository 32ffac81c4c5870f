#!/usr/bin/env bash
# The README's main command (`make demo`): a private containerd runs one busybox sandbox with our
# runtime, `kata-runtime metrics <id>` prints its metrics, then everything is torn down.
# Works without `make install`: containerd finds the shim in KSM_BIN_DIR (target/release), and the
# shim reads a configuration generated for the guest image in KSM_GUEST_DIR (build/guest).
# Exits non-zero if any step failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KSM_BIN_DIR=${KSM_BIN_DIR:-$repo/target/release}
export KSM_GUEST_DIR=${KSM_GUEST_DIR:-$repo/build/guest}
image_tar=$repo/build/busybox.tar
env_sh=$repo/scripts/containerd-env.sh
dir=$(mktemp -d /tmp/ksm-XXXX)
id=demo-$$
status=0

step() { echo; echo "==> $*"; }
cleanup() {
    step "tearing down"
    "$env_sh" ctr "$dir" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        "$env_sh" ctr "$dir" task ls 2>/dev/null | grep -q "^$id .*RUNNING" || break
        sleep 0.2
    done
    "$env_sh" ctr "$dir" task delete "$id" >/dev/null 2>&1 || true
    "$env_sh" ctr "$dir" container delete "$id" >/dev/null 2>&1 || true
    "$env_sh" stop "$dir"
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
exit $status
