#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image offline, from Debian's busybox-static, with umoci: what
# containerd's CRI plugin runs as each pod's sandbox container (its `sandbox_image`). Like
# Kubernetes' pause, its entrypoint /pause only waits, and exits 0 on SIGTERM or SIGINT.
# `ctr images import <out.tar>` names it localhost/kata-shim-metrics/pause:latest (a name no
# registry serves, so nothing is ever pulled for it).
#
# usage: scripts/build-pause-image.sh <out.tar>
set -euo pipefail

die() { echo "build-pause-image: $*" >&2; exit 1; }
[[ $# -eq 1 ]] || die "usage: $0 <out.tar>"
out=$(realpath -m "$1")
name=localhost/kata-shim-metrics/pause:latest
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/oci-image.sh
source "$here/lib/oci-image.sh"
busybox=$(static_busybox)

if [[ -f $out && $out -nt $busybox && $out -nt ${BASH_SOURCE[0]} && $out -nt $here/lib/oci-image.sh ]]; then
    echo "build-pause-image: $out is up to date"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
image_start "$work"
rootfs=$work/bundle/rootfs
install -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in sh sleep kill; do ln -s busybox "$rootfs/bin/$applet"; done
# The shell is PID 1 of the sandbox's PID namespace, where signals without a handler are ignored:
# the trap is what makes SIGTERM/SIGINT end it. `wait` returns as soon as a trapped signal arrives.
cat >"$rootfs/pause" <<'SH'
#!/bin/sh
# The pod's sandbox process: waits until SIGTERM or SIGINT, then exits 0 (as Kubernetes' pause does).
trap 'kill $! 2>/dev/null; exit 0' TERM INT
while :; do
    sleep 86400 &
    # A trapped signal exits 0 from the trap; any other failure is a broken sleep: no busy loop.
    wait $! || exit 1
done
SH
chmod 0755 "$rootfs/pause"
image_finish "$work" "$out" "$name" --config.entrypoint /pause \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "build-pause-image: wrote $out ($name)"
