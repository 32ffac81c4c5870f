# Shared steps of the offline image scripts (build-busybox-image.sh, build-pause-image.sh): Debian's
# busybox-static in a fresh umoci bundle, repacked into an OCI layout, tarred for `ctr images import`.
# Source it; the caller defines die().

# The path of a statically linked busybox, or dies saying what to install.
static_busybox() {
    local busybox
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
    echo "$busybox"
}

# Creates an empty image in <work>/oci and unpacks it to <work>/bundle (the rootfs to fill is
# <work>/bundle/rootfs, with the usual top-level directories).
image_start() {
    local work=$1
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:latest"
    umoci unpack --image "$work/oci:latest" "$work/bundle"
    local rootfs=$work/bundle/rootfs
    mkdir -p "$rootfs"/{bin,etc,proc,sys,dev,tmp,root,var,run}
    chmod 1777 "$rootfs/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$rootfs/etc/group"
}

# Repacks <work>/bundle with the umoci config options given after <out.tar> and <name>, and writes
# the layout as <out.tar>, which `ctr images import` names <name>.
image_finish() {
    local work=$1 out=$2 name=$3
    shift 3
    local layout=$work/oci
    umoci repack --image "$layout:latest" "$work/bundle"
    umoci config --image "$layout:latest" --os linux --architecture amd64 "$@"
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
}
