#!/usr/bin/env bash
# Builds a busybox OCI image tarball offline, from Debian's busybox-static, with umoci.
# `ctr images import <out.tar>` names it docker.io/library/busybox:latest (the index carries
# io.containerd.image.name); Cmd is ["sh"] as in the Docker Hub image.
#
# usage: scripts/build-busybox-image.sh <out.tar>
set -euo pipefail

die() { echo "build-busybox-image: $*" >&2; exit 1; }
[[ $# -eq 1 ]] || die "usage: $0 <out.tar>"
out=$(realpath -m "$1")
name=docker.io/library/busybox:latest
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/oci-image.sh
source "$here/lib/oci-image.sh"
busybox=$(static_busybox)

# Skip the work when the tarball is newer than busybox and the scripts that make it.
if [[ -f $out && $out -nt $busybox && $out -nt ${BASH_SOURCE[0]} && $out -nt $here/lib/oci-image.sh ]]; then
    echo "build-busybox-image: $out is up to date"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
image_start "$work"
rootfs=$work/bundle/rootfs
install -m 0755 "$busybox" "$rootfs/bin/busybox"
# Every applet as a symlink in /bin, the way the Docker Hub busybox image lays it out.
for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
done
image_finish "$work" "$out" "$name" \
    --config.cmd sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "build-busybox-image: wrote $out ($name)"
