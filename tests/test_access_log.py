"""End-to-end: every decision leaves an access-log record and moves a
counter; `keygate logs` reads the log; no secret is ever written."""

import base64
import json
import re
import socket
import subprocess

import pytest

from tests.harness import KEYGATE, ROUTES, cred, request, wait_until

SECRETS = {
    "read": "log-read-key-7f3a", "inactive": "log-inactive-key-91c2", "ip": "log-ip-key-44d1",
    "limited": "log-limited-key-0b9e", "basic": "log-basic-key-5e6f", "basic_secret": "log-basic-secret-c3d8",
}
CONFIG = {
    "routes": ROUTES,
    "log_decisions": True,
    "tokens": {},
    "credentials": [
        cred("log-read", SECRETS["read"], scopes=["read"]),
        cred("log-inactive", SECRETS["inactive"], tenant="b", scopes=["read"], status="inactive"),
        cred("log-ip", SECRETS["ip"], tenant="c", scopes=["read"], allowed_ips=["10.0.0.0/8"]),
        cred("log-limited", SECRETS["limited"], tenant="d", scopes=["read"], rate_limit={"requests": 1, "window_secs": 60}),
        cred("log-basic", SECRETS["basic"], tenant="e", scopes=["read"], secret=SECRETS["basic_secret"]),
    ],
}

# (case, method, headers, expected status, decision, reason, key_id, outcome)
CASES = [
    ("allowed", "GET", [("x-api-key", SECRETS["read"])], 200, "allowed", None, "log-read", "allowed"),
    ("public", "GET", [], 200, "public", None, None, "public"),
    ("unknown", "GET", [("x-api-key", "no-such-key-123")], 401, "denied", "unknown_key", None, "denied_unknown_key"),
    ("inactive", "GET", [("x-api-key", SECRETS["inactive"])], 403, "denied", "inactive", "log-inactive", "denied_inactive"),
    ("ip", "GET", [("x-api-key", SECRETS["ip"])], 403, "denied", "ip_not_allowed", "log-ip", "denied_ip_not_allowed"),
    ("scope", "POST", [("x-api-key", SECRETS["read"])], 403, "denied", "insufficient_scope", "log-read",
     "denied_insufficient_scope"),
    ("limited1", "GET", [("x-api-key", SECRETS["limited"])], 200, "allowed", None, "log-limited", "allowed"),
    ("limited2", "GET", [("x-api-key", SECRETS["limited"])], 429, "denied", "rate_limited", "log-limited",
     "denied_rate_limited"),
    ("basic", "GET", [("authorization", "Basic " + base64.b64encode(
        f"{SECRETS['basic']}:{SECRETS['basic_secret']}".encode()).decode())], 200, "allowed", None, "log-basic", "allowed"),
]


CRED_TENANT = {c["key_id"]: c["tenant"] for c in CONFIG["credentials"]}


def counters(envoy):
    text = envoy.admin("/stats/prometheus")
    return {m[0]: int(m[1]) for m in re.findall(r'^(?:envoy_dynamicmodulescustom_)?keygate_requests_total\{outcome="(\w+)"\} (\d+)', text, re.M)}


@pytest.fixture(scope="module")
def logged(envoy_factory, tmp_path_factory):
    log = tmp_path_factory.mktemp("access") / "access.log"
    with envoy_factory(CONFIG, access_log=log) as envoy:
        before = counters(envoy)
        responses = {}
        for case, method, headers, *_ in CASES:
            path = "/health" if case == "public" else f"/v1/items/{case}"
            responses[case] = request(envoy.port, method, path + "?api_key=leaked-in-query", headers)
        login = request(envoy.port, "POST", "/auth/login", [], json.dumps({"api_key": SECRETS["read"]}).encode())
        # Counts reach Envoy on the filter's flush tick (every 0.5 s).
        after = wait_until(lambda: (c := counters(envoy)) and sum(c.values()) - sum(before.values()) >= len(CASES) + 1
                           and c)
        records = wait_until(lambda: [json.loads(l) for l in log.read_text().splitlines()]
                             if log.exists() and len(log.read_text().splitlines()) >= len(CASES) + 1 else None)
        yield {"responses": responses, "records": records, "before": before, "after": after, "log": log,
               "envoy_log": envoy.log, "login": login}


def record_for(records, case):
    path = "/health" if case == "public" else f"/v1/items/{case}"
    matches = [r for r in records if r["path"] == path]
    assert len(matches) == 1, (case, matches)
    return matches[0]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_each_outcome_has_a_record_with_the_right_fields(logged, case):
    _, method, _, status, decision, reason, key_id, _ = next(c for c in CASES if c[0] == case)
    assert logged["responses"][case].status == status
    r = record_for(logged["records"], case)
    # Absent values are left out; the identity fields join a request header
    # and filter state, "" when neither has a value (envoy/envoy.yaml).
    assert (r["method"], r["status"], r["decision"], r.get("reason"), r.get("key_id") or None) == (
        method, status, decision, reason, key_id)
    assert r["client_ip"] == "127.0.0.1" and isinstance(r["duration_ms"], int)
    if key_id:
        assert r["tenant"] == CRED_TENANT[key_id] and r["environment"] == "live"
    else:
        assert not (r.get("tenant") or r.get("environment") or r.get("owner")), r
    if case == "limited1":
        # From keygate's x-ratelimit-remaining response header.
        assert r["rate_remaining"] == "0"
    if case == "scope":
        assert r["scope_required"] == "write"


def test_login_is_logged_as_an_allowed_login(logged):
    assert logged["login"].status == 200
    r = next(r for r in logged["records"] if r["path"] == "/auth/login")
    # A login's identity is filter state (it never goes upstream).
    assert (r["decision"], r["reason"], r["key_id"], r["tenant"], r["environment"]) == (
        "allowed", "login", "log-read", CRED_TENANT["log-read"], "live")
    assert r["session_expires_ms"]


def test_counters_move_by_exactly_the_requests_made(logged):
    expected = {}
    for *_, outcome in CASES:
        expected[outcome] = expected.get(outcome, 0) + 1
    expected["login"] = 1
    delta = {k: logged["after"].get(k, 0) - logged["before"].get(k, 0) for k in logged["after"]}
    assert {k: v for k, v in delta.items() if v} == expected


def test_no_key_or_secret_appears_in_any_log(logged):
    texts = logged["log"].read_text() + logged["envoy_log"]()
    token = logged["login"].json()["access_token"]
    for secret in [*SECRETS.values(), token, "leaked-in-query"]:
        assert secret not in texts, secret
    # log_decisions is on; the name appears once ("wasm log keygate: decision {" from the wasm build)
    assert "keygate: decision {" in logged["envoy_log"]()
    assert "keygate keygate" not in logged["envoy_log"]()


def keygate_logs(log, *args):
    out = subprocess.run([str(KEYGATE), "--json", "logs", "--file", str(log), *args], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [json.loads(l) for l in out.splitlines()]


def test_keygate_logs_filters_by_key_tenant_and_status(logged):
    log = logged["log"]
    by_key = keygate_logs(log, "--key", "log-limited")
    assert [r["status"] for r in by_key] == [200, 429]
    # Envoy logs the field as a string; keygate logs gives it as a number.
    assert [r["rate_remaining"] for r in by_key] == [0, 0]
    assert {r["key_id"] for r in keygate_logs(log)} == {"log-read", "log-inactive", "log-ip", "log-limited", "log-basic"}
    assert [r["key_id"] for r in keygate_logs(log, "--tenant", "c")] == ["log-ip"]
    assert sorted(r["status"] for r in keygate_logs(log, "--status", "4xx")) == [403, 403, 403, 429]
    assert keygate_logs(log, "--since", "10m") and not keygate_logs(log, "--key", "nobody")
    table = subprocess.run([str(KEYGATE), "logs", "--file", str(log), "--key", "log-read"], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert "KEY ID" in table and "/v1/items/scope" in table and "log-inactive" not in table


SPOOF = [("x-keygate-tenant", "victim"), ("x-keygate-key-id", "victim-key"), ("x-keygate-environment", "victim-env"),
         ("x-keygate-owner", "victim-owner")]
# path → (method, headers, body, status): every way keygate decides a request.
SPOOFED = {
    "/health": ("GET", [], None, 200),
    "/webhooks/spoof-public": ("POST", [], b"{}", 200),
    "/v1/items/spoof-allowed": ("GET", [("x-api-key", SECRETS["read"])], None, 200),
    "/v1/items/spoof-missing": ("GET", [], None, 401),
    "/v1/items/spoof-unknown": ("GET", [("x-api-key", "no-such-key-123")], None, 401),
    "/v1/items/spoof-scope": ("POST", [("x-api-key", SECRETS["read"])], b"{}", 403),
    "/v1/items/spoof-ip": ("GET", [("x-api-key", SECRETS["ip"])], None, 403),
    "/v1/items/spoof-inactive": ("GET", [("x-api-key", SECRETS["inactive"])], None, 403),
}


def no_host_request(port, path):
    """HTTP/1.1 without Host: Envoy answers 400 itself, before any filter."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in SPOOF)
                  + b"\r\n")
        return s.recv(64).split(b"\r\n")[0]


RENAMED = {"tenant": "x-tenant", "environment": "x-env", "key_id": "x-key-id", "owner": "x-owner", "scopes": "x-scopes"}


# Renamed identity headers with the access-log format left at the default
# names: the client's x-keygate-* copies must still never reach a record.
@pytest.mark.parametrize("renamed", [False, True], ids=["default-names", "renamed-headers"])
def test_spoofed_identity_headers_never_reach_a_record_keygate_decided(envoy_factory, tmp_path, renamed):
    log = tmp_path / "access.log"
    config = {**CONFIG, "headers": RENAMED} if renamed else CONFIG
    with envoy_factory(config, access_log=log) as envoy:
        for path, (method, headers, body, status) in SPOOFED.items():
            assert request(envoy.port, method, path, SPOOF + headers, body).status == status, path
        login = json.dumps({"api_key": SECRETS["read"]}).encode()
        assert request(envoy.port, "POST", "/auth/login", SPOOF, login).status == 200
        assert request(envoy.port, "POST", "/auth/login", SPOOF, b"not json").status == 400
        assert request(envoy.port, "POST", "/auth/login", SPOOF, json.dumps({"api_key": "nope-123"}).encode()).status \
            == 401
        assert no_host_request(envoy.port, "/v1/items/spoof-no-host").startswith(b"HTTP/1.1 400")
        want = len(SPOOFED) + 4
        records = wait_until(lambda: [json.loads(l) for l in log.read_text().splitlines()]
                             if log.exists() and len(log.read_text().splitlines()) >= want else None)
    assert records and len(records) == want, records
    decided = [r for r in records if r.get("decision")]
    assert len(decided) == want - 1
    for r in decided:
        assert "victim" not in json.dumps(r), r
    allowed = next(r for r in decided if r["path"] == "/v1/items/spoof-allowed")
    if renamed:
        # The format still reads the default names, which keygate stripped.
        assert not (allowed.get("key_id") or allowed.get("tenant")), allowed
    else:
        assert (allowed["key_id"], allowed["tenant"], allowed["environment"], allowed.get("owner") or None) == \
            ("log-read", "acme", "live", None)
    logins = [r for r in decided if r["path"] == "/auth/login"]
    assert sorted((r["status"], r.get("key_id") or None) for r in logins) == \
        [(200, "log-read"), (400, None), (401, None)]
    # Envoy logs the request it refused with what the client sent, but with
    # no decision: nothing that reads the log attributes it to anyone.
    refused = next(r for r in records if r["path"] == "/v1/items/spoof-no-host")
    assert refused["status"] == 400 and "decision" not in refused
    assert keygate_logs(log, "--tenant", "victim") == [] and keygate_logs(log, "--key", "victim-key") == []
    assert {r["key_id"] for r in keygate_logs(log)} == {"log-read", "log-ip", "log-inactive"}
