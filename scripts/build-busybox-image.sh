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

busybox=$(command -v busybox || true)
[[ -n $busybox ]] || die "busybox is not installed (run: make deps, package busybox-static)"
# Static means no PT_INTERP program header (checked without file(1), which a fresh Debian lacks).
python3 - "$(realpath "$busybox")" <<'PY' || die "$busybox is not statically linked; install Debian's busybox-static"
import struct, sys
with open(sys.argv[1], "rb") as f:
    elf = f.read(1 << 20)
if elf[:4] != b"\x7fELF" or elf[4] != 2:
    sys.exit(1)
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
PT_INTERP = 3
sys.exit(any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == PT_INTERP for i in range(phnum)))
PY
command -v umoci >/dev/null || die "umoci is not installed (run: make deps)"

# Skip the work when the tarball is newer than busybox and this script.
if [[ -f $out && $out -nt $busybox && $out -nt ${BASH_SOURCE[0]} ]]; then
    echo "build-busybox-image: $out is up to date"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layout=$work/oci

umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle"

rootfs=$work/bundle/rootfs
mkdir -p "$rootfs"/{bin,etc,proc,sys,dev,tmp,root,var,run}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
# Every applet as a symlink in /bin, the way the Docker Hub busybox image lays it out.
for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$rootfs/etc/group"

umoci repack --image "$layout:latest" "$work/bundle"
umoci config --image "$layout:latest" --os linux --architecture amd64 \
    --config.cmd sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci gc --layout "$layout"

# containerd takes the image name from this annotation; the OCI ref name alone is just "latest".
python3 - "$layout/index.json" "$name" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for manifest in index.get("manifests", []):
    manifest.setdefault("annotations", {})["io.containerd.image.name"] = name
with open(path, "w") as f:
    json.dump(index, f)
PY

mkdir -p "$(dirname "$out")"
tar -C "$layout" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-busybox-image: wrote $out ($name)"
