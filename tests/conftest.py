"""Fixtures of the e2e suite. Helpers (requests, configs, processes) live in
tests/harness.py; every fixture here stops what it started, even when a test
fails."""

import contextlib

import pytest

from tests.harness import PROTOCOLS, WASM, EchoServer, Envoy, assert_no_wasm_panic, free_port, render


@pytest.fixture(scope="session", autouse=True)
def built_wasm():
    if not WASM.exists():
        pytest.exit(f"{WASM} is missing: run `make wasm` (make test does it)", returncode=2)


@pytest.fixture(scope="session")
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(params=PROTOCOLS)
def proto(request):
    """The client protocol: a test taking `proto` runs once per protocol."""
    return request.param


@pytest.fixture(scope="session")
def envoy_factory(echo, tmp_path_factory):
    """A context manager starting an Envoy with a given plugin config; the
    Envoy stops when the `with` block ends (and is checked for wasm panics)."""

    @contextlib.contextmanager
    def start(plugin_config=None, *, concurrency=2, raw=None, wait=True, mutate=None, access_log=None):
        config = render(
            plugin_config,
            gate_port=free_port(),
            admin_port=free_port(),
            upstream_port=echo.port,
            raw_plugin_config=raw,
            access_log=access_log,
        )
        if mutate:
            mutate(config)
        envoy = Envoy(config, concurrency=concurrency, workdir=tmp_path_factory.mktemp("envoy"))
        try:
            envoy.start(wait=wait)
            yield envoy
        finally:
            envoy.stop()
        assert_no_wasm_panic(envoy)

    return start
