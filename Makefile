# kata-shim-metrics: build, guest image, tests, install and demo.
# `make demo` runs a real sandbox and prints its metrics; `make test` runs every test (CI calls it).

SHELL := /bin/bash
CARGO ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
BUILD_DIR := build
GUEST_DIR := $(BUILD_DIR)/guest
# Cargo's target directory (CARGO_TARGET_DIR when set, as the helpers' worktrees do).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
STATIC_AGENT := $(TARGET_DIR)/$(TRIPLE)/release/kata-agent
PREFIX ?= /usr/local
SHARE_DIR ?= $(PREFIX)/share/kata-shim-metrics
CONF_FILE ?= /etc/kata-containers/configuration.toml

.PHONY: all deps build agent-static guest-image busybox-image pause-image test lint bench install demo clean

all: build guest-image

## deps: Debian packages and tools the build and the tests need (idempotent).
deps:
	scripts/install-deps.sh

## build: the host binaries (release), and the demo's CRI client (examples/cri-pod.rs).
build:
	$(CARGO) build --release --bins --example cri-pod

## agent-static: the agent as a static binary, to run as the guest's init.
agent-static:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --no-default-features \
		--bin kata-agent --target $(TRIPLE)

## guest-image: kernel and initramfs (with the static agent as /init) in build/guest.
guest-image: agent-static
	scripts/build-guest-image.sh $(STATIC_AGENT) $(GUEST_DIR)

## install: binaries to $(PREFIX)/bin, the guest image to $(SHARE_DIR), and the default
## configuration to $(CONF_FILE) (only if there is none yet).
install: build guest-image
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SHARE_DIR)
	install -m 0755 $(TARGET_DIR)/release/containerd-shim-kata-v2 $(TARGET_DIR)/release/kata-runtime \
		$(TARGET_DIR)/release/kata-monitor $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(GUEST_DIR)/vmlinux $(GUEST_DIR)/initrd.img $(DESTDIR)$(SHARE_DIR)/
	install -m 0644 config/configuration.toml $(DESTDIR)$(SHARE_DIR)/configuration.toml.example
	@# containerd (a systemd service) does not see ~/.cargo/bin, where `make deps` puts the daemon.
	@daemon=$$(command -v vhost-device-vsock || true); \
	if [ -n "$$daemon" ] && [ ! -e $(DESTDIR)$(PREFIX)/bin/vhost-device-vsock ]; then \
		install -m 0755 "$$daemon" $(DESTDIR)$(PREFIX)/bin/; \
	fi
	@if [ -e $(DESTDIR)$(CONF_FILE) ]; then \
		echo "keeping the existing $(DESTDIR)$(CONF_FILE)"; \
	else \
		install -D -m 0644 config/configuration.toml $(DESTDIR)$(CONF_FILE); \
	fi

## busybox-image: the offline busybox OCI image for the demo and the tests.
busybox-image:
	scripts/build-busybox-image.sh $(BUILD_DIR)/busybox.tar

## pause-image: the offline pod sandbox image that the CRI set-up (containerd-env.sh start-cri) uses.
pause-image:
	scripts/build-pause-image.sh $(BUILD_DIR)/pause.tar

## demo: a private containerd runs a busybox sandbox with our runtime and prints its metrics;
## then containerd's CRI runs a pod of two containers, shown by kata-runtime and kata-monitor.
demo: deps build guest-image busybox-image pause-image
	KSM_BIN_DIR=$(abspath $(TARGET_DIR)/release) KSM_GUEST_DIR=$(abspath $(GUEST_DIR)) scripts/demo.sh

## lint: formatting and clippy, warnings as errors.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## test: everything CI runs, including the tests that boot the guest image (ignored by a plain
## `cargo test`, which lists how many it left out).
test: deps guest-image busybox-image pause-image lint
	KSM_GUEST_DIR=$(abspath $(GUEST_DIR)) $(CARGO) test -- --include-ignored

## bench: the benchmarks; results are written down in BENCHMARKS.md.
bench: deps guest-image
	$(CARGO) bench

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
