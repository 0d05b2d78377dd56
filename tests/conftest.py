import contextlib
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import BUILD, NATIVE_DIR, NATIVE_MODULE, WASM, EchoServer, Envoy, free_port, render, sha256_hex  # noqa: E402


def cred(key_id, key, tenant="acme", **fields):
    """A credential record for plugin config: only hashes, like the real thing."""
    rec = {"key_id": key_id, "key_hash": sha256_hex(key), "tenant": tenant}
    secret = fields.pop("secret", None)
    if secret is not None:
        rec["secret_hash"] = sha256_hex(secret)
    rec.update(fields)
    return rec


ROUTES = [
    {"path": "/health", "public": True},
    {"path_prefix": "/webhooks", "public": True},
    {"methods": ["GET", "HEAD"], "path_prefix": "/v1", "scope": "read"},
    {"methods": ["POST", "PUT", "PATCH", "DELETE"], "path_prefix": "/v1", "scope": "write"},
    {"path_prefix": "/admin", "scope": "admin"},
]


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


@pytest.fixture(scope="session")
def envoy_factory(echo, tmp_path_factory):
    """Starts Envoys with a given plugin config; stops them all at the end."""
    started = []

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
        started.append(envoy)
        try:
            envoy.start(wait=wait)
            yield envoy
        finally:
            envoy.stop()
        assert_no_wasm_panic(envoy)

    yield start
    for envoy in started:
        envoy.stop()


def assert_no_wasm_panic(envoy):
    """A panic kills the worker's VM: every e2e test checks none happened."""
    log = envoy.log()
    for marker in ("panicked at", "Uncaught RuntimeError", "wasm VM failed", "keygate: internal error"):
        assert marker not in log, f"wasm failure in {envoy.log_path}: {marker}"


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Polls `predicate` until truthy or the deadline; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
