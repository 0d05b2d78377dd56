"""End-to-end: the keygate filter in a real Envoy (foundation behaviour)."""

import base64
import http.client
import json
import time

import pytest

from tests.harness import DEMO_KEYS, PROTOCOLS, ROUTES, cred, demo_plugin_config, request

HEX_KEY = "0123456789abcdef" * 4

CONFIG = {
    "routes": ROUTES,
    "credentials": [
        cred("t-default", "default-key", kind="default"),
        cred("t-read", "read-key", scopes=["read"]),
        cred("t-write", "write-key", scopes=["write"], environment="test"),
        cred("t-basic", "basic-key", tenant="globex", secret="basic-secret", scopes=["read", "write"]),
        cred("t-inactive", "inactive-key", tenant="initech", status="inactive", scopes=["read"]),
        cred("t-ip-refused", "ip-refused-key", tenant="initech", scopes=["read"],
             allowed_ips=["10.0.0.0/8", "2001:db8::/32"]),
        cred("t-ip-allowed", "ip-allowed-key", tenant="initech", scopes=["read"], allowed_ips=["127.0.0.0/8"]),
        cred("t-expired", "expired-key", tenant="initech", scopes=["read"], expires_at=int(time.time()) - 10),
        cred("t-hex", HEX_KEY, tenant="hooli", scopes=["read"]),
        # One budget per protocol, for the rate-limit header test.
        *[cred(f"t-rl-{p}", f"rl-{p}-key", tenant="umbrella", scopes=["read"],
               rate_limit={"requests": 3, "window_secs": 60}) for p in PROTOCOLS],
        *[cred(f"t-rl-up-{p}", f"rl-up-{p}-key", tenant="umbrella", scopes=["read"],
               rate_limit={"requests": 10, "window_secs": 60}) for p in PROTOCOLS],
    ],
}

AUTH_FAILED = "authentication_failed"


@pytest.fixture(scope="module")
def gate(envoy_factory):
    with envoy_factory(CONFIG) as envoy:
        yield envoy


def basic(key, secret):
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


def get(gate, path="/v1/items", headers=(), method="GET", proto="http1", **kw):
    return request(gate.port, method, path, list(headers), proto=proto, **kw)


def assert_denied(r, status, error, message=None):
    assert r.status == status, r
    assert r.header("content-type") == "application/json"
    body = r.json()
    assert body["error"] == error, body
    assert set(body) == {"error", "message"}
    if message is not None:
        assert body["message"] == message


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", "read-key")],
        [("authorization", "Bearer read-key")],
        [("authorization", "bearer read-key")],
        [("authorization", basic("basic-key", "basic-secret"))],
    ],
    ids=["x-api-key", "bearer", "bearer-lowercase", "basic"],
)
def test_each_credential_form_is_accepted(gate, headers, proto):
    r = get(gate, headers=headers, proto=proto)
    assert r.status == 200, r
    assert r.json()["path"] == "/v1/items"


def test_missing_credential_gets_401_with_www_authenticate(gate, proto):
    r = get(gate, proto=proto)
    assert_denied(r, 401, AUTH_FAILED, "Missing API key")
    assert "Bearer" in r.header("www-authenticate")


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", "no-such-key")],
        [("authorization", "Bearer no-such-key")],
        [("authorization", basic("no-such-key", "x"))],
    ],
)
def test_unknown_key_gets_401(gate, headers, proto):
    assert_denied(get(gate, headers=headers, proto=proto), 401, AUTH_FAILED, "Invalid API key")


@pytest.mark.parametrize(
    "value",
    [
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Basic " + base64.b64encode(b":secret").decode(),
        "Basic " + base64.b64encode(b"basic-key:").decode(),
        "Basic " + base64.b64encode(b"basic-key\xff:x").decode(),
        "Basic",
        "Digest abc",
    ],
)
def test_malformed_authorization_gets_401(gate, value):
    assert_denied(get(gate, headers=[("authorization", value)]), 401, AUTH_FAILED)


def test_wrong_secret_gets_401(gate):
    r = get(gate, headers=[("authorization", basic("basic-key", "wrong-secret"))])
    assert_denied(r, 401, AUTH_FAILED, "Invalid API key or secret")


def test_secret_key_without_its_secret_gets_401(gate):
    assert_denied(get(gate, headers=[("x-api-key", "basic-key")]), 401, AUTH_FAILED)


def test_two_different_credentials_get_401(gate):
    r = get(gate, headers=[("x-api-key", "read-key"), ("x-api-key", "write-key")])
    assert_denied(r, 401, AUTH_FAILED, "Conflicting credentials in request")
    r = get(gate, headers=[("x-api-key", "read-key"), ("authorization", "Bearer default-key")])
    assert_denied(r, 401, AUTH_FAILED, "Conflicting credentials in request")


def test_oversized_credential_gets_401(gate):
    r = get(gate, headers=[("x-api-key", "k" * 5000)])
    assert_denied(r, 401, AUTH_FAILED, "Credential too long")


def test_non_utf8_key_gets_401_and_the_vm_keeps_serving(gate):
    for _ in range(4):  # reach both workers
        assert_denied(get(gate, headers=[("x-api-key", b"bad\xff\xfekey")]), 401, AUTH_FAILED)
        assert_denied(get(gate, headers=[("authorization", b"Bearer \xc3\x28")]), 401, AUTH_FAILED)
    assert get(gate, headers=[("x-api-key", "read-key")]).status == 200


def test_expired_key_gets_401(gate):
    assert_denied(get(gate, headers=[("x-api-key", "expired-key")]), 401, AUTH_FAILED, "API key has expired")


def test_inactive_key_gets_403(gate, proto):
    assert_denied(get(gate, headers=[("x-api-key", "inactive-key")], proto=proto), 403, "forbidden", "API key is inactive")


def test_ip_allowlist_refusing_loopback_gets_403(gate):
    r = get(gate, headers=[("x-api-key", "ip-refused-key")])
    assert_denied(r, 403, "forbidden", "Requests from this IP address are not allowed for this API key")


def test_ip_allowlist_containing_loopback_passes(gate):
    assert get(gate, headers=[("x-api-key", "ip-allowed-key")]).status == 200


def test_spoofed_x_forwarded_for_does_not_pass_the_allowlist(gate):
    r = get(gate, headers=[("x-api-key", "ip-refused-key"), ("x-forwarded-for", "10.1.2.3")])
    assert_denied(r, 403, "forbidden")


def test_trusted_xff_hops_take_the_client_from_forwarded_for(envoy_factory):
    """Behind one trusted proxy: Envoy appends the peer, the proxy's entry is next."""
    config = {**CONFIG, "trusted_xff_hops": 2}
    with envoy_factory(config) as envoy:
        ok = request(envoy.port, "GET", "/v1/x", [("x-api-key", "ip-refused-key"), ("x-forwarded-for", "10.1.2.3")])
        assert ok.status == 200
        spoofed = [("x-api-key", "ip-refused-key"), ("x-forwarded-for", "10.9.9.9, 192.0.2.1")]
        assert_denied(request(envoy.port, "GET", "/v1/x", spoofed), 403, "forbidden")


def test_insufficient_scope_gets_403_with_exact_body(gate, proto):
    r = get(gate, method="POST", headers=[("x-api-key", "read-key")], proto=proto)
    assert r.status == 403
    assert r.body == b'{"error":"insufficient_scope","message":"This endpoint requires \'write\' scope"}'
    r = get(gate, path="/admin/users", headers=[("x-api-key", "write-key")], proto=proto)
    assert_denied(r, 403, "insufficient_scope", "This endpoint requires 'admin' scope")


def test_scope_hierarchy_write_implies_read(gate):
    assert get(gate, headers=[("x-api-key", "write-key")]).status == 200


def test_default_credential_passes_every_scope_rule(gate):
    for method, path in [("GET", "/v1/x"), ("POST", "/v1/x"), ("DELETE", "/admin/users/1")]:
        assert get(gate, path=path, method=method, headers=[("x-api-key", "default-key")]).status == 200


def test_path_tricks_do_not_dodge_scope_rules(gate):
    for path in ["/v1/../admin/users", "//admin/users", "/%61dmin/users", "/admin/users?x=/v1"]:
        r = get(gate, path=path, headers=[("x-api-key", "read-key")])
        assert_denied(r, 403, "insufficient_scope")


def test_public_paths_are_open_without_credentials(gate):
    assert get(gate, path="/health").status == 200
    assert get(gate, path="/webhooks/stripe", method="POST").status == 200
    assert_denied(get(gate, path="/healthz"), 401, AUTH_FAILED)


def test_credential_is_stripped_and_identity_injected_upstream(gate, proto):
    for headers in ([("x-api-key", "write-key")], [("authorization", "Bearer write-key")]):
        r = get(gate, headers=headers, proto=proto)
        up = dict(r.upstream_headers())
        assert "x-api-key" not in up and "authorization" not in up
        assert "write-key" not in r.body.decode()
        assert up["x-keygate-tenant"] == "acme"
        assert up["x-keygate-environment"] == "test"
        assert up["x-keygate-key-id"] == "t-write"
        assert up["x-keygate-scopes"] == "write"
    r = get(gate, headers=[("authorization", basic("basic-key", "basic-secret"))], proto=proto)
    up = dict(r.upstream_headers())
    assert "authorization" not in up and "basic-secret" not in r.body.decode()
    assert (up["x-keygate-tenant"], up["x-keygate-scopes"]) == ("globex", "read write")
    # A default (full-access) key holds every scope: the upstream is told which.
    up = dict(get(gate, headers=[("x-api-key", "default-key")], proto=proto).upstream_headers())
    assert (up["x-keygate-key-id"], up["x-keygate-scopes"]) == ("t-default", "admin write read")


def test_client_sent_identity_headers_never_reach_upstream(gate, proto):
    spoof = [("x-keygate-tenant", "evil"), ("x-keygate-key-id", "root"), ("x-keygate-scopes", "admin"),
             ("x-keygate-environment", "live")]
    r = get(gate, headers=[("x-api-key", "read-key"), *spoof], proto=proto)
    up = r.upstream_headers()
    assert ("x-keygate-tenant", "acme") in up
    assert ("x-keygate-scopes", "read") in up
    assert not any(v in ("evil", "root", "admin") for _, v in up)
    r = get(gate, path="/health", headers=spoof, proto=proto)
    assert not any(name.startswith("x-keygate-") for name, _ in r.upstream_headers())


def test_other_client_headers_reach_upstream_in_order_with_repeats(gate, proto):
    # The wasm build rewrites the whole request header map in one call: every
    # header it does not own must survive, in the client's order, repeats kept.
    sent = [("a-first", "1"), ("x-keygate-tenant", "evil"), ("b-repeated", "2"), ("x-api-key", "read-key"),
            ("b-repeated", "3"), ("c-last", "4")]
    up = get(gate, headers=sent, proto=proto).upstream_headers()
    assert [h for h in up if h[0] in ("a-first", "b-repeated", "c-last")] == [
        ("a-first", "1"), ("b-repeated", "2"), ("b-repeated", "3"), ("c-last", "4")]
    assert [v for n, v in up if n == "x-keygate-tenant"] == ["acme"]
    assert "x-api-key" not in dict(up)


def test_a_request_with_more_headers_than_one_host_map_write_keeps_them_all(envoy_factory, proto, monkeypatch):
    # Over 1024 headers (an operator raised Envoy's limit): proxy-wasm would
    # read a one-call rewrite of the map as empty, so the wasm build edits
    # header by header there. Every header still reaches upstream, edited.
    def raise_limit(config):
        for lst in config["static_resources"]["listeners"]:
            if lst["name"] == "gate":
                hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
                hcm.setdefault("common_http_protocol_options", {})["max_headers_count"] = 2000
                hcm["max_request_headers_kb"] = 96
    monkeypatch.setattr(http.client, "_MAXHEADERS", 5000)  # the echo upstream's parser
    many = [(f"h-{i:04d}", str(i)) for i in range(1100)]
    sent = [("x-keygate-tenant", "evil"), *many, ("x-api-key", "read-key")]
    with envoy_factory(CONFIG, mutate=raise_limit) as envoy:
        r = get(envoy, headers=sent, proto=proto)
    assert r.status == 200, r.body[:300]
    up = r.upstream_headers()
    assert [h for h in up if h[0].startswith("h-")] == many
    assert [v for n, v in up if n == "x-keygate-tenant"] == ["acme"]
    assert "x-api-key" not in dict(up)


def test_hex_key_is_accepted_and_hashed_as_presented(gate):
    assert get(gate, headers=[("x-api-key", HEX_KEY)]).status == 200


def test_refusals_never_reach_the_upstream(gate):
    r = get(gate, method="POST", headers=[("x-api-key", "read-key")])
    assert b'"headers"' not in r.body


def test_rate_limit_headers_count_down_and_429_over_each_protocol(gate, proto):
    key = [("x-api-key", f"rl-{proto}-key")]
    remaining = []
    for _ in range(3):
        r = get(gate, headers=key, proto=proto)
        assert r.status == 200, r
        assert r.header("x-ratelimit-limit") == "3"
        remaining.append(int(r.header("x-ratelimit-remaining")))
    assert remaining == [2, 1, 0]
    r = get(gate, headers=key, proto=proto)
    assert_denied(r, 429, "rate_limit_exceeded")
    assert int(r.header("retry-after")) >= 1


def test_rate_limit_headers_the_upstream_sent_are_replaced_by_keygates(gate, proto):
    # The client sees one budget, keygate's, whatever the upstream says (both builds).
    upstream = [("x-echo-set", f"{name}=upstream") for name in
                ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy")]
    r = get(gate, headers=[("x-api-key", f"rl-up-{proto}-key"), *upstream], proto=proto)
    assert r.status == 200, r
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy"):
        values = [v for n, v in r.headers if n == name]
        assert len(values) == 1 and values[0] != "upstream", (name, values)
    assert [v for n, v in r.headers if n == "x-ratelimit-remaining"] == ["9"]


def test_h2c_prior_knowledge_is_served_as_http2(gate):
    """The `proto` parametrisation proves something only if h2 really is h2."""
    def h2_streams():
        stats = gate.admin("/stats?filter=^http.gate.downstream_rq_http2_total$")
        return int(stats.split(":")[1])
    before = h2_streams()
    assert get(gate, headers=[("x-api-key", "read-key")], proto="h2").status == 200
    assert h2_streams() == before + 1


# (headers, trailers) of a POST /v1/items with a body; over h2 the trailers
# go out after the body, over HTTP/1.1 they are left off.
TRAILER_CASES = {
    "allowed": ([("x-api-key", "write-key")], [("x-checksum", "abc")]),
    "no-credential": ([], [("x-checksum", "abc")]),
    "credential-only-in-trailers": ([], [("x-api-key", "write-key")]),
    "insufficient-scope": ([("x-api-key", "read-key")], [("x-checksum", "abc")]),
    "identity-spoof-in-trailers": ([("x-api-key", "write-key")], [("x-keygate-tenant", "evil")]),
}


@pytest.mark.parametrize("case", TRAILER_CASES)
def test_h2_request_with_body_and_trailers_is_decided_like_http1(gate, case):
    headers, trailers = TRAILER_CASES[case]
    body = b'{"order": 1}' * 100
    h1 = get(gate, method="POST", headers=headers, body=body)
    h2 = get(gate, method="POST", headers=headers, body=body, trailers=trailers, proto="h2")
    assert h2.status == h1.status, (h1, h2)
    if h1.status == 200:
        identity = lambda r: sorted(h for h in r.upstream_headers() if h[0].startswith("x-keygate-"))  # noqa: E731
        assert identity(h2) == identity(h1)
        assert ("x-keygate-tenant", "evil") not in h2.upstream_headers()
    else:
        assert h2.body == h1.body
        assert h2.header("content-type") == h1.header("content-type")
    expected = {"allowed": 200, "identity-spoof-in-trailers": 200, "insufficient-scope": 403}.get(case, 401)
    assert h1.status == expected


def test_documented_demo_keys_work_with_envoy_yaml(envoy_factory):
    """The keys README and `make run` show must match the hashes in envoy/envoy.yaml."""
    with envoy_factory(demo_plugin_config()) as envoy:
        key = lambda name: DEMO_KEYS[name]["key"]  # noqa: E731
        assert request(envoy.port, "GET", "/v1/items", [("x-api-key", key("acme-read"))]).status == 200
        assert request(envoy.port, "POST", "/v1/items", [("x-api-key", key("acme-default"))]).status == 200
        partner = DEMO_KEYS["acme-partner"]
        r = request(envoy.port, "POST", "/v1/orders", [("authorization", basic(partner["key"], partner["secret"]))])
        assert r.status == 200
        assert request(envoy.port, "GET", "/v1/items", [("x-api-key", key("acme-suspended"))]).status == 403


@pytest.mark.parametrize(
    "raw, field",
    [
        ("{not json", "invalid plugin configuration"),
        (json.dumps({"routes": [{"path_prefix": "v1", "scope": "read"}]}), "routes[0].path_prefix"),
        (json.dumps({"credentials": [{"key_id": "a", "key_hash": "xyz", "tenant": "t"}]}), "credentials[0].key_hash"),
        (json.dumps({"credentials": [cred("a", "k", allowed_ips=["10.0.0/8"])]}), "credentials[0].allowed_ips[0]"),
        (json.dumps({"rate_limit": {"requests": 0, "window_secs": 60}}), "rate_limit.requests"),
        (json.dumps({"unknown_option": True}), "unknown field `unknown_option`"),
        (json.dumps({"rate_limit": {"requests": "5", "window_secs": 60}}), "rate_limit.requests: invalid type: string"),
        (json.dumps({"role": "gateway"}), "role: unknown variant `gateway`"),
        (json.dumps({"credentials": [{**cred("a", "k"), "scopes": "read"}]}), "credentials[0].scopes: invalid type"),
        (json.dumps({"scope_hierarchy": [], "routes": [{"path_prefix": "/v1", "scope": "read"}]}),
         "scope_hierarchy: is empty"),
    ],
    ids=["bad-json", "route-path", "key-hash", "cidr", "rate-limit", "unknown-field", "mistyped-value", "unknown-variant",
         "mistyped-nested", "no-strictest-scope"],
)
def test_invalid_plugin_config_is_refused_by_envoy_naming_the_field(envoy_factory, raw, field):
    with envoy_factory(raw=raw, wait=False) as envoy:
        code = envoy.wait_exit(60)
        assert code is not None and code != 0, "Envoy accepted an invalid keygate configuration"
        log = envoy.log()
        assert "keygate: invalid plugin configuration" in log
        assert field in log
        assert "invalid plugin configuration: invalid plugin configuration" not in log
