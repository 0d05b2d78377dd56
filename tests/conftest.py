"""Fixtures of the e2e suite. Helpers (requests, configs, processes) live in
tests/harness.py; every fixture here stops what it started, even when a test
fails."""

import contextlib
import shutil

import pytest

from tests.harness import (
    BUILD, NATIVE_DIR, NATIVE_MODULE, PROTOCOLS, WASM, EchoServer, Envoy, FileServer, assert_no_wasm_panic, free_port, render, render_remote,
)


@pytest.fixture(scope="session", autouse=True)
def built_wasm():
    if BUILD == "native":
        module = NATIVE_DIR / f"lib{NATIVE_MODULE}.so"
        if not module.exists():
            pytest.exit(f"{module} is missing: run `make native`", returncode=2)
    elif not WASM.exists():
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


@pytest.fixture
def wasm_server(tmp_path):
    """An HTTP server on loopback serving the built filter as /keygate.wasm."""
    root = tmp_path / "wasm-server"
    root.mkdir()
    shutil.copyfile(WASM, root / "keygate.wasm")
    with FileServer(root) as server:
        yield server


@pytest.fixture
def remote_envoy_factory(echo, tmp_path_factory):
    """Like envoy_factory, for envoy/envoy-remote.yaml: Envoy fetches the
    filter from `wasm_url` and loads it only if it hashes to `sha256`."""

    @contextlib.contextmanager
    def start(plugin_config=None, *, wasm_url, wasm_server_port, sha256, wait=True):
        config = render_remote(plugin_config, gate_port=free_port(), admin_port=free_port(), upstream_port=echo.port,
                               wasm_url=wasm_url, wasm_server_port=wasm_server_port, sha256=sha256)
        envoy = Envoy(config, concurrency=2, workdir=tmp_path_factory.mktemp("envoy-remote"))
        try:
            envoy.start(wait=wait)
            yield envoy
        finally:
            envoy.stop()
        assert_no_wasm_panic(envoy)

    return start
