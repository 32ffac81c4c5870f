#!/usr/bin/env bash
# Installs what building and testing kata-shim-metrics needs on Debian 12, skipping what is there:
# the Debian packages (containerd, runc, QEMU, busybox, umoci, prometheus/promtool, image tools, CNI
# plugins, protoc) and the vhost-device-vsock daemon (from crates.io) used for hybrid vsock when
# /dev/vhost-vsock is absent.
# Usage: scripts/install-deps.sh   (as root)
set -euo pipefail

packages=(
  containerd runc            # the container runtime under test, and its reference runtime
  qemu-system-x86            # the hypervisor
  busybox-static umoci       # the offline busybox image
  prometheus                 # promtool, and a real Prometheus for scrape tests
  cpio xz-utils zstd kmod    # guest initramfs: archive, module decompression, modinfo
  util-linux bsdutils iproute2 procps # setpriv, unshare, nsenter, script, ip, ps in tests
  containernetworking-plugins # CNI for the CRI tests: bridge, host-local, loopback in /usr/lib/cni
  protobuf-compiler          # protoc: the k8s-cri crate (the tests' CRI client) compiles its protos
  python3 ca-certificates   # python3: the guest image script extracts vmlinux
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  apt-get clean # the downloaded .debs are not needed again, and CI disks can be small
fi

# The guest image downloads Debian's kernel package: the package lists must know it.
kernel_policy=$(apt-cache policy linux-image-amd64 2>/dev/null || true)
if [[ $kernel_policy != *"Candidate: "[0-9]* ]]; then
  echo "refreshing the package lists (needed for the guest kernel download)"
  apt-get update -qq
fi

# containerd's Debian package starts a system containerd; the tests start their own and never need it.

if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  echo "installing vhost-device-vsock from crates.io"
  cargo install --locked vhost-device-vsock --version 0.3.0
fi
