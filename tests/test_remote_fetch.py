"""End-to-end: Envoy fetches the filter over HTTP (envoy/envoy-remote.yaml)
and loads it only with the pinned SHA-256; when it cannot, it fails closed."""

import hashlib
import re
import time

import pytest

import yaml

from tests.harness import (
    BUILD, ENVOY_REMOTE_YAML, ROUTES, WASM, cred, free_port, load_envoy_yaml, request, wait_until, wasm_filter,
)

# Envoy fetching a .wasm over HTTP is how the wasm build is distributed; the
# native module is a shared library Envoy loads from its search path.
pytestmark = pytest.mark.skipif(BUILD == "native", reason="remote fetch applies to the wasm build")

CONFIG = {"routes": ROUTES, "credentials": [cred("remote-read", "remote-read-key", scopes=["read"])]}
KEY = [("x-api-key", "remote-read-key")]


def wasm_digest():
    return hashlib.sha256(WASM.read_bytes()).hexdigest()


def test_filter_fetched_with_its_pinned_digest_gates_requests(remote_envoy_factory, wasm_server, echo, proto):
    with remote_envoy_factory(CONFIG, wasm_url=wasm_server.url("keygate.wasm"), wasm_server_port=wasm_server.port,
                              sha256=wasm_digest()) as envoy:
        assert wasm_server.hits.get("/keygate.wasm", 0) >= 1, "Envoy did not fetch the filter"
        before = echo.hits["remote-read"]
        r = request(envoy.port, "GET", "/v1/items", KEY, proto=proto)
        assert r.status == 200, r
        assert ("x-keygate-key-id", "remote-read") in r.upstream_headers()
        assert request(envoy.port, "GET", "/v1/items", proto=proto).status == 401
        assert request(envoy.port, "POST", "/v1/items", KEY, proto=proto).status == 403
        assert echo.hits["remote-read"] - before == 1
        assert re.search(r"wasm log keygate: version \d+\.\d+\.\d+\S* \(\w+\) starting", envoy.log()), "version and commit at start"


def observe_until_settled(envoy, timeout=30):
    """Requests with a valid key until Envoy has given up fetching (bounded);
    returns every outcome seen: a status, "refused" or "exited"."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if envoy.proc.poll() is not None:
            seen.append("exited")
            break
        try:
            seen.append(request(envoy.port, "GET", "/v1/items", KEY, timeout=5).status)
        except (ConnectionError, OSError):
            seen.append("refused")
        if "Plugin configured to fail closed failed to load" in envoy.log() and isinstance(seen[-1], int):
            break
        time.sleep(0.2)
    return seen


@pytest.mark.parametrize("fault", ["wrong-digest", "server-unreachable"])
def test_unverifiable_filter_fails_closed_never_open(remote_envoy_factory, wasm_server, echo, fault):
    if fault == "wrong-digest":
        port, digest = wasm_server.port, hashlib.sha256(b"not the filter").hexdigest()
    else:
        port, digest = free_port(), wasm_digest()  # nothing listens there
    before = echo.hits["remote-read"]
    with remote_envoy_factory(CONFIG, wasm_url=f"http://127.0.0.1:{port}/keygate.wasm", wasm_server_port=port,
                              sha256=digest, wait=False) as envoy:
        seen = observe_until_settled(envoy)
        assert seen, "no observation made"
        assert all(s in ("refused", "exited") or s >= 500 for s in seen), seen
        assert echo.hits["remote-read"] == before, "a request reached the upstream without the filter"
        if seen[-1] != "exited":
            assert isinstance(seen[-1], int) and seen[-1] >= 500, f"Envoy never settled into refusing: {seen}"
            assert wait_until(lambda: "failed to load" in envoy.log(), timeout=5)
            assert request(envoy.port, "GET", "/health", proto="h2").status >= 500, "public routes fail closed too"


def gate_hcm(config):
    gate = next(lst for lst in config["static_resources"]["listeners"] if lst["name"] == "gate")
    return gate["filter_chains"][0]["filters"][0]["typed_config"]


def test_envoy_remote_yaml_stays_in_step_with_envoy_yaml():
    local, remote = load_envoy_yaml(), yaml.safe_load(ENVOY_REMOTE_YAML.read_text())
    for name in ("gate", "sync"):
        lv, rv = wasm_filter(local, name), wasm_filter(remote, name)
        assert (rv.get("name"), rv.get("root_id")) == (lv.get("name"), lv.get("root_id"))
        assert rv["configuration"]["@type"] == lv["configuration"]["@type"]
        for field in ("vm_id", "runtime", "environment_variables"):
            assert rv["vm_config"][field] == lv["vm_config"][field], field
        assert rv.get("failure_policy", "FAIL_CLOSED") == "FAIL_CLOSED"
    for field in ("use_remote_address", "normalize_path", "merge_slashes", "codec_type"):
        assert gate_hcm(remote).get(field) == gate_hcm(local).get(field), field
    remote_code = wasm_filter(remote)["vm_config"]["code"]["remote"]
    assert remote_code["http_uri"]["cluster"] in {c["name"] for c in remote["static_resources"]["clusters"]}
    assert isinstance(remote_code["sha256"], str) and len(remote_code["sha256"]) == 64
