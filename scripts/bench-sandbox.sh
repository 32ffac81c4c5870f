#!/usr/bin/env bash
# Times the metrics of one real sandbox (BENCHMARKS.md, issue "Speed"): a private containerd runs a
# busybox sandbox with the binaries in KSM_BIN_DIR, then `/metrics` is fetched N times through the
# shim's socket (curl, a new connection each, as Prometheus and kata-monitor do) and
# `kata-runtime metrics <id>` is run N times as a whole process, next to `kata-runtime --version`
# timed the same way (process start and this script's own clock reads: the floor of the second).
# Prints min / p50 / p90 of each.
#
# usage: KSM_BIN_DIR=target/release KSM_GUEST_DIR=build/guest scripts/bench-sandbox.sh [N]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KSM_BIN_DIR=${KSM_BIN_DIR:-$repo/target/release}
export KSM_GUEST_DIR=${KSM_GUEST_DIR:-$repo/build/guest}
rounds=${1:-30}
env_sh=$repo/scripts/containerd-env.sh
# shellcheck source=scripts/lib/ctr-sandbox.sh
source "$repo/scripts/lib/ctr-sandbox.sh"
image_tar=$repo/build/busybox.tar
dir=$(mktemp -d /tmp/ksm-XXXX)
id=bench-$$

cleanup() {
    remove_ctr_sandbox "$env_sh" "$dir" "$id"
    "$env_sh" stop "$dir"
}

# min / p50 / p90 of the milliseconds on stdin, one per line.
summary() {
    sort -n | awk '{ v[NR] = $1 } END {
        printf "min %.1f ms, p50 %.1f ms, p90 %.1f ms (n=%d)\n", v[1], v[int((NR + 1) / 2)], v[int(NR * 0.9 + 0.5)], NR }'
}

[[ -f $image_tar ]] || "$repo/scripts/build-busybox-image.sh" "$image_tar"
"$env_sh" start "$dir" >/dev/null
trap cleanup EXIT
"$env_sh" ctr "$dir" images import "$image_tar" >/dev/null
"$env_sh" ctr "$dir" run -d --runtime io.containerd.kata.v2 docker.io/library/busybox:latest "$id" sleep 600
run_dir=$("$env_sh" env "$dir" | sed -n 's/^KATA_SANDBOX_RUN_DIR=//p')
socket=$run_dir/$id/shim-monitor.sock
# Warm up: the first scrape opens the agent connection.
for _ in 1 2 3; do curl -sf --unix-socket "$socket" http://localhost/metrics >/dev/null; done

echo -n "/metrics through the shim's socket: "
for _ in $(seq "$rounds"); do
    curl -sf -o /dev/null -w '%{time_total}\n' --unix-socket "$socket" http://localhost/metrics
done | awk '{ print $1 * 1000 }' | summary

echo -n "kata-runtime metrics $id (whole process): "
for _ in $(seq "$rounds"); do
    started=$(date +%s%N)
    KATA_SANDBOX_RUN_DIR=$run_dir "$KSM_BIN_DIR/kata-runtime" metrics "$id" >/dev/null
    echo $(( $(date +%s%N) - started ))
done | awk '{ print $1 / 1e6 }' | summary

echo -n "kata-runtime --version (the floor: process start and the clock reads): "
for _ in $(seq "$rounds"); do
    started=$(date +%s%N)
    "$KSM_BIN_DIR/kata-runtime" --version >/dev/null
    echo $(( $(date +%s%N) - started ))
done | awk '{ print $1 / 1e6 }' | summary
