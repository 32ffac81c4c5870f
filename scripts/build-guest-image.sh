#!/usr/bin/env bash
# Builds the guest image for the VM sandbox: kernel (vmlinuz and its uncompressed vmlinux) and an
# initramfs whose /init is the static kata-agent, with the kernel modules in guest-modules.txt.
#
# usage: scripts/build-guest-image.sh <static kata-agent binary> <out dir>
#
# The kernel is Debian's: the linux-image-<version>-amd64 package that the linux-image-amd64
# metapackage depends on, fetched with `apt-get download` into <out dir>/../cache (no install).
# Set KSM_KERNEL_PACKAGE to pin another concrete package. Nothing is rebuilt when the agent binary,
# this script, the module list and the kernel package are unchanged (see <out dir>/stamp).
set -euo pipefail

die() { echo "build-guest-image: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 <static kata-agent binary> <out dir>"
agent=$1
out=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modlist=$here/guest-modules.txt

[[ -f $agent && -x $agent ]] || die "agent binary $agent does not exist or is not executable (run: make agent-static)"
[[ -f $modlist ]] || die "module list $modlist is missing"
for tool in apt-cache apt-get dpkg-deb modinfo python3 cpio gzip sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not installed (run: make deps)"
done
# The guest has no libc and no dynamic loader: the agent must be a static ELF (no PT_INTERP).
python3 - "$agent" <<'PY' || die "$agent is not a static x86-64 ELF binary; build it with: make agent-static"
import struct, sys
data = open(sys.argv[1], "rb").read()
if data[:4] != b"\x7fELF" or data[4] != 2:
    sys.exit(1)
phoff, = struct.unpack_from("<Q", data, 0x20)
phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
for i in range(phnum):
    if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3:  # PT_INTERP
        sys.exit(1)
PY

mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$(dirname "$out")/cache
mkdir -p "$cache"

# The concrete kernel image package behind the metapackage.
pkg=${KSM_KERNEL_PACKAGE:-}
if [[ -z $pkg ]]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    [[ -n $pkg ]] || die "cannot tell which linux-image-*-amd64 package linux-image-amd64 depends on (apt-get update?)"
fi
kver=${pkg#linux-image-}
pkgver=$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')
[[ -n $pkgver && $pkgver != "(none)" ]] || die "package $pkg has no candidate version (apt-get update?)"

stamp_text=$(
    printf 'kernel %s %s\n' "$pkg" "$pkgver"
    sha256sum "$agent" "$0" "$modlist" | awk '{print $1}'
)
if [[ -f $out/stamp && -f $out/vmlinux && -f $out/vmlinuz && -f $out/initrd.img ]] &&
    [[ $(cat "$out/stamp") == "$stamp_text" ]]; then
    echo "build-guest-image: $out is up to date ($pkg $pkgver)"
    exit 0
fi
rm -f "$out/stamp"

# Fetch and unpack the kernel package (once per version).
deb=$(ls "$cache"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
if [[ -z $deb ]]; then
    echo "build-guest-image: downloading $pkg $pkgver"
    (cd "$cache" && apt-get download "$pkg" 2>&1) >"$cache/apt-download.log" || {
        cat "$cache/apt-download.log" >&2
        die "apt-get download $pkg failed"
    }
    deb=$(ls "$cache"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    [[ -n $deb ]] || die "apt-get download $pkg left no .deb in $cache"
fi
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Unpacked in the work directory, removed on exit: the tree is ~0.5 GB and the stamp makes it rare.
rm -rf "$cache/$pkg" # left by older versions of this script
kroot=$work/kernel-package
mkdir -p "$kroot"
dpkg-deb -x "$deb" "$kroot"
vmlinuz=$kroot/boot/vmlinuz-$kver
moddir=$kroot/lib/modules/$kver
[[ -f $vmlinuz ]] || die "$deb has no boot/vmlinuz-$kver"
[[ -d $moddir/kernel ]] || die "$deb has no lib/modules/$kver/kernel"

# vmlinux: the ELF kernel inside the bzImage. Like the kernel's scripts/extract-vmlinux: find a
# compressed stream's magic, decompress from there, keep the first result that is an ELF file.
python3 - "$vmlinuz" "$work/vmlinux" <<'PY'
import gzip, lzma, shutil, subprocess, sys, zlib

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()

def gunzip(blob):
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)

def unxz(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)

def unlzma(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)

def unzstd(blob):
    if shutil.which("zstd") is None:
        return b""
    p = subprocess.run(["zstd", "-dcq"], input=blob, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return p.stdout

formats = [
    (b"\xfd7zXZ\x00", unxz),
    (b"\x28\xb5\x2f\xfd", unzstd),
    (b"\x1f\x8b\x08", gunzip),
    (b"\x5d\x00\x00", unlzma),
]
for magic, decompress in formats:
    start = data.find(magic)
    while start != -1:
        try:
            out = decompress(data[start:])
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(dst, "wb").write(out)
            sys.exit(0)
        start = data.find(magic, start + 1)
sys.exit("no compressed ELF kernel found in " + src)
PY

# The initramfs tree: /init (the agent) and the listed modules, uncompressed.
tree=$work/initrd
mkdir -p "$tree"/{dev,proc,sys,run,tmp,etc,lib/modules/"$kver"/kernel}
install -m 0755 "$agent" "$tree/init"
loaded=" "
while read -r line; do
    mod=${line%%#*}
    mod=$(echo "$mod" | tr -d '[:space:]')
    [[ -n $mod ]] || continue
    src=
    for ext in .ko .ko.xz .ko.zst .ko.gz; do
        if [[ -f $moddir/kernel/$mod$ext ]]; then src=$moddir/kernel/$mod$ext; break; fi
    done
    [[ -n $src ]] || die "module $mod (from $modlist) is not in $pkg"
    name=$(basename "$mod")
    for dep in $(modinfo -F depends "$src" | tr ',' ' '); do
        [[ $loaded == *" $dep "* || $loaded == *" ${dep//-/_} "* ]] ||
            die "module $name needs $dep, which is not listed before it in $modlist"
    done
    dst=$tree/lib/modules/$kver/kernel/$mod.ko
    mkdir -p "$(dirname "$dst")"
    case $src in
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -dcq "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
    echo "$mod" >>"$tree/lib/modules/$kver/load-order"
    loaded="$loaded${name//-/_} "
done <"$modlist"
echo "kata-guest" >"$tree/etc/hostname"

(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9n >"$work/initrd.img"

install -m 0644 "$vmlinuz" "$out/vmlinuz"
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initrd.img" "$out/initrd.img"
echo "$kver" >"$out/kernel-version"
printf '%s\n' "$stamp_text" >"$out/stamp"
echo "build-guest-image: $out: vmlinuz, vmlinux ($(du -h "$out/vmlinux" | cut -f1)), initrd.img ($(du -h "$out/initrd.img" | cut -f1)); kernel $kver"
