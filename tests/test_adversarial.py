"""End-to-end: hostile requests get a clean 4xx and never disturb the VM."""

import base64
import http.client
import json

import pytest

from tests.harness import ROUTES, SYNC_SECRET, cred, request

HEX_KEY = "ab" * 32
CONFIG = {
    "routes": ROUTES,
    "key_format": "hex64",
    "credentials": [
        cred("hex-read", HEX_KEY, scopes=["read"]),
        cred("hex-secret", "cd" * 32, tenant="b", scopes=["read"], secret="s3cret"),
    ],
}


@pytest.fixture(scope="module")
def gate(envoy_factory):
    with envoy_factory(CONFIG) as envoy:
        yield envoy


def status(gate, headers, path="/v1/items", method="GET", proto="http1"):
    return request(gate.port, method, path, headers, proto=proto).status


def test_huge_authorization_header(gate):
    assert status(gate, [("authorization", "Bearer " + "a" * 10_000)]) == 401  # keygate: too long
    assert status(gate, [("authorization", "Bearer " + "a" * 100_000)]) == 431  # Envoy's header limit


def test_thousands_of_headers(gate):
    assert status(gate, [(f"x-junk-{i}", "v") for i in range(2000)] + [("x-api-key", HEX_KEY)]) == 431
    assert status(gate, [(f"x-junk-{i}", "v") for i in range(80)] + [("x-api-key", HEX_KEY)]) == 200


def test_repeated_and_mixed_credentials(gate):
    assert status(gate, [("x-api-key", HEX_KEY)] * 3) == 200
    assert status(gate, [("x-api-key", HEX_KEY), ("x-api-key", "cd" * 32)]) == 401
    for scheme in ("BEARER", "bEaReR"):
        assert status(gate, [("authorization", f"{scheme} {HEX_KEY}")]) == 200


def test_nul_and_non_utf8_bytes(gate):
    assert status(gate, [("x-api-key", HEX_KEY[:10] + "\x00" + HEX_KEY[11:])]) == 400  # Envoy's codec
    assert status(gate, [("x-api-key", b"\xff" * 64)]) == 401
    assert status(gate, [("authorization", b"Basic \xc3\x28")]) == 401
    assert status(gate, [("x-api-key", HEX_KEY)]) == 200


def test_base64_padding_tricks_and_lone_colon(gate):
    good = base64.b64encode(("cd" * 32 + ":s3cret").encode()).decode()
    assert status(gate, [("authorization", f"Basic {good}")]) == 200
    for bad in [good.rstrip("="), good + "=", good + "==", good.replace("=", "%3D"), f" {good}x",
                base64.b64encode(b":").decode(), base64.urlsafe_b64encode(b"\xfb\xff:x").decode()]:
        assert status(gate, [("authorization", f"Basic {bad}")]) == 401, bad


def test_keys_of_the_wrong_length_are_refused_before_lookup(gate):
    for key in (HEX_KEY[:-1], HEX_KEY + "a", "zz" * 32):
        r = request(gate.port, "GET", "/v1/items", [("x-api-key", key)])
        assert r.status == 401 and r.json()["message"] == "Invalid API key format"
    assert status(gate, [("x-api-key", HEX_KEY.upper())]) == 200  # hex is case-insensitive


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/admin/users", 403),
        ("/v1/../admin/users", 403),
        ("//admin/users", 403),
        ("/%61dmin/users", 403),
        ("/admin/users?scope=read", 403),
        ("/admin%2fusers", 400),
        ("/v1/..%2fadmin", 400),
        ("/v1/items#frag", 400),  # Envoy refuses a fragment in the request target
        # Paths are case-sensitive, like most upstreams: /ADMIN is not /admin,
        # but no rule matches it, so it needs the strictest scope.
        ("/ADMIN/users", 403),
    ],
)
def test_path_tricks_against_scope_rules(gate, path, expected, proto):
    assert status(gate, [("x-api-key", HEX_KEY)], path=path, proto=proto) == expected


def test_forwarded_for_and_identity_spoofing(gate, proto):
    r = request(gate.port, "GET", "/v1/items", [("x-api-key", HEX_KEY), ("x-keygate-key-id", "root"),
                                                ("x-forwarded-for", "10.0.0.1")], proto=proto)
    assert ("x-keygate-key-id", "hex-read") in r.upstream_headers()
    assert ("x-keygate-key-id", "root") not in r.upstream_headers()


def test_sync_endpoint_rejects_garbage_without_disturbing_the_gate(gate):
    for body in [b"", b"\x00" * 100, b"[]" * 1000, json.dumps({"mode": "full"}).encode()]:
        conn = http.client.HTTPConnection("127.0.0.1", gate.sync_port, timeout=5)
        try:
            conn.request("POST", "/keygate/sync/v1/push", body=body, headers={"x-keygate-signature": "v1=" + "0" * 64})
            assert conn.getresponse().status in (400, 401)
        finally:
            conn.close()
    assert SYNC_SECRET not in request(gate.sync_port, "GET", "/keygate/sync/v1/state").body.decode()
    assert status(gate, [("x-api-key", HEX_KEY)]) == 200
