#!/usr/bin/env python3
"""Two keygate .wasm builds answer the same requests the same way: status,
body, response headers, and every header the upstream received, in order.

For changes meant to keep behaviour (e.g. fewer host calls): each build runs
in its own Envoy (concurrency 1) in front of the echo upstream, and the same
requests — allowed, spoofed identity and repeated headers, a key without
scopes, Basic, token login and use, denials, public — go through both, over
HTTP/1.1 and h2. Headers that differ between any two runs (date, request
id, rate-limit reset) are left out.

    .venv/bin/python -m bench.wasm_same /tmp/main.wasm target/wasm32-wasip1/release/keygate_filter.wasm

Exit status 1 when an answer differs (each difference printed)."""

import base64
import json
import sys
import tempfile

from tests.harness import ROUTES, EchoServer, Envoy, cred, free_port, render, request

# GCRA regains one request every window/limit: 86 s here, so
# `x-ratelimit-remaining` does not depend on how fast the requests ran.
LIMIT = {"requests": 1000, "window_secs": 86400}
CONFIG = {
    "routes": ROUTES,
    "headers": {"metadata": {"plan_tier": "x-keygate-meta-plan-tier", "region": "x-keygate-meta-region"}},
    "credentials": [
        cred("k-read", "read-key", scopes=["read"], rate_limit=LIMIT),
        cred("k-none", "none-key", scopes=[]),
        cred("k-default", "default-key", kind="default"),
        cred("k-owner", "owner-key", scopes=["read", "write"], owner="alice@example.com",
             metadata={"plan_tier": "gold"}, rate_limit=LIMIT),
        cred("k-basic", "basic-key", tenant="globex", secret="basic-secret", scopes=["read", "write"]),
        cred("k-ip", "ip-refused-key", scopes=["read"], allowed_ips=["10.0.0.0/8"]),
    ],
    "tokens": {"lifetime_secs": 3600},
}
SPOOF = [("x-keygate-tenant", "victim"), ("x-keygate-owner", "mallory"), ("x-keygate-meta-plan-tier", "plat"),
         ("x-keygate-key-id", "x"), ("x-keygate-scopes", "admin"), ("x-keygate-environment", "prod"),
         ("x-keygate-meta-region", "eu")]
BASIC = "Basic " + base64.b64encode(b"basic-key:basic-secret").decode()
CASES = [
    ("GET", "/v1/items", [("x-api-key", "default-key")]),
    ("GET", "/v1/items", [("x-api-key", "default-key"), ("x-keygate-scopes", "admin")]),
    ("GET", "/v1/items", [("x-api-key", "read-key")]),
    ("GET", "/v1/items", [("a", "1"), ("x-api-key", "read-key"), ("b", "2"), ("b", "3")] + SPOOF + [("c", "4")]),
    ("GET", "/v1/items", [("x-api-key", "none-key"), ("x-keygate-scopes", "admin")]),
    ("GET", "/v1/items", [("x-api-key", "owner-key")] + SPOOF),
    ("GET", "/v1/items", [("x-api-key", "owner-key"), ("x-api-key", "read-key")]),
    ("GET", "/v1/items", [("authorization", BASIC), ("x-keygate-tenant", "v"), ("x-api-key", "junk")]),
    ("GET", "/v1/items", [("authorization", BASIC), ("cookie", "a=1"), ("cookie", "b=2")]),
    ("GET", "/v1/items", [("x-api-key", "bad-key")] + SPOOF),
    ("GET", "/v1/items", [("x-api-key", "ip-refused-key")]),
    ("GET", "/v1/items", SPOOF),
    ("GET", "/health", SPOOF),
    ("GET", "/health", [("x-z", "1")]),
    ("POST", "/v1/items", [("x-api-key", "read-key")]),
    ("DELETE", "/admin/x", [("x-api-key", "owner-key")]),
    ("GET", "/v1/items?x=1", [("x-api-key", "read-key"), ("te", "trailers")]),
]
VOLATILE = {"date", "x-request-id", "x-envoy-upstream-service-time", "ratelimit-reset", "x-ratelimit-reset",
            "ratelimit", "x-envoy-expected-rq-timeout-ms"}


def answer(r):
    """What a request's answer says, without what differs between runs."""
    headers = [(k, v) for k, v in r.headers if k not in VOLATILE]
    if r.status == 200 and r.body.startswith(b"{\n"):  # the echo upstream: what it received
        return r.status, headers, [tuple(h) for h in r.upstream_headers() if h[0] not in VOLATILE]
    return r.status, headers, r.body


def answers(echo, wasm):
    config = render(CONFIG, gate_port=free_port(), admin_port=free_port(), upstream_port=echo.port, wasm=wasm)
    envoy = Envoy(config, concurrency=1, workdir=tempfile.mkdtemp(prefix="keygate-same-")).start()
    out = []
    try:
        for proto in ("http1", "h2"):
            for method, path, headers in CASES:
                out.append((proto, method, path, answer(request(envoy.port, method, path, headers, proto=proto))))
            login = request(envoy.port, "POST", "/auth/login", [("x-keygate-tenant", "v")],
                            json.dumps({"api_key": "read-key"}).encode(), proto=proto)
            out.append((proto, "POST", "/auth/login", (login.status, sorted(k for k, _ in login.headers))))
            token = [("authorization", "Bearer " + login.json()["access_token"])]
            out.append((proto, "GET", "token", answer(request(envoy.port, "GET", "/v1/items", token + SPOOF,
                                                              proto=proto))))
    finally:
        envoy.stop()
    return out


def main(args):
    if len(args) != 2:
        sys.exit(__doc__)
    with EchoServer() as echo:
        a, b = answers(echo, args[0]), answers(echo, args[1])
    differ = [(x, y) for x, y in zip(a, b) if x != y]
    for x, y in differ:
        print(f"DIFFERS {x[0]} {x[1]} {x[2]}\n  a: {x[3]}\n  b: {y[3]}")
    print(f"{len(a)} answers compared, {len(differ)} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
