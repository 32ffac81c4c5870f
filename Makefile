# kata-shim-metrics: build, guest image, tests, install and demo.
# `make demo` runs a real sandbox and prints its metrics; `make test` runs every test (CI calls it).

SHELL := /bin/bash
CARGO ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
BUILD_DIR := build
GUEST_DIR := $(BUILD_DIR)/guest
STATIC_AGENT := target/$(TRIPLE)/release/kata-agent
PREFIX ?= /usr/local

.PHONY: all deps build agent-static guest-image test lint bench install demo clean

all: build guest-image

## deps: Debian packages and tools the build and the tests need (idempotent).
deps:
	scripts/install-deps.sh

## build: the host binaries (release).
build:
	$(CARGO) build --release --bins

## agent-static: the agent as a static binary, to run as the guest's init.
agent-static:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --no-default-features \
		--bin kata-agent --target $(TRIPLE)

## guest-image: kernel and initramfs (with the static agent as /init) in build/guest.
guest-image: agent-static
	scripts/build-guest-image.sh $(STATIC_AGENT) $(GUEST_DIR)

## lint: formatting and clippy, warnings as errors.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## test: everything CI runs.
test: deps guest-image lint
	KSM_GUEST_DIR=$(abspath $(GUEST_DIR)) $(CARGO) test

## bench: the benchmarks; results are written down in BENCHMARKS.md.
bench: deps guest-image
	$(CARGO) bench

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
