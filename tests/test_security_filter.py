"""End-to-end, over HTTP/1.1 and HTTP/2: the request-path classes of issue 14
(security round 2) — undecided requests, path and method tricks, header
spellings, failing closed."""

import json

import pytest

from tests.harness import ROUTES, cred, request

CONFIG = {
    "routes": ROUTES,
    "tokens": {"login_path": "/auth/login", "lifetime_secs": 600},
    "credentials": [
        cred("s-read", "s-read-key", scopes=["read"]),
        cred("s-admin", "s-admin-key", tenant="other", scopes=["admin"]),
    ],
}
READ = [("x-api-key", "s-read-key")]
ADMIN = [("x-api-key", "s-admin-key")]
SPOOF = [("x-keygate-tenant", "evil"), ("x-keygate-key-id", "root"), ("x-keygate-scopes", "admin")]


@pytest.fixture(scope="module")
def gate(envoy_factory):
    with envoy_factory(CONFIG) as envoy:
        yield envoy


def hcm(config):
    gate = next(lst for lst in config["static_resources"]["listeners"] if lst["name"] == "gate")
    return gate["filter_chains"][0]["filters"][0]["typed_config"]


def allow_underscores(config):
    hcm(config)["common_http_protocol_options"] = {"headers_with_underscores_action": "ALLOW"}


@pytest.fixture(scope="module")
def lenient_gate(envoy_factory):
    """The same filter behind an Envoy that lets underscore header names in."""
    with envoy_factory(CONFIG, mutate=allow_underscores) as envoy:
        yield envoy


def upstream_total(echo):
    return sum(echo.hits.values())


def login_body(key="s-read-key"):
    return json.dumps({"api_key": key, "session_id": "sec"}).encode()


# --- 1. Nothing reaches upstream undecided -------------------------------


@pytest.mark.parametrize("trailers", [None, [("x-checksum", "1")]], ids=["body", "body+trailers"])
@pytest.mark.parametrize("key, status", [("s-read-key", 200), ("wrong-key", 401)])
def test_login_is_always_answered_locally_and_never_reaches_upstream(gate, echo, proto, trailers, key, status):
    if trailers and proto != "h2":
        pytest.skip("request trailers are an HTTP/2 feature here")
    before = upstream_total(echo)
    r = request(gate.port, "POST", "/auth/login", [("content-type", "application/json"), *SPOOF],
                login_body(key), proto=proto, trailers=trailers)
    assert r.status == status, r
    if status == 200:
        assert r.json()["access_token"].startswith("kg1.")
    else:
        assert r.json()["error"] == "authentication_failed"
    assert upstream_total(echo) == before, "a login reached the upstream"


@pytest.mark.parametrize("path", ["/auth/%6Cogin", "/auth/login?x=1", "/auth/./login", "/auth//login"])
def test_login_path_spellings_are_answered_locally_too(gate, echo, proto, path):
    before = upstream_total(echo)
    trailers = [("x-checksum", "1")] if proto == "h2" else None
    r = request(gate.port, "POST", path, SPOOF, login_body(), proto=proto, trailers=trailers)
    assert r.status == 200 and r.json()["access_token"].startswith("kg1."), r
    assert upstream_total(echo) == before


def test_login_ending_with_only_trailers_is_answered_locally(gate, echo):
    before = upstream_total(echo)
    r = request(gate.port, "POST", "/auth/login", SPOOF, b"", proto="h2", trailers=[("x-api-key", "s-read-key")])
    assert r.status == 400, r
    assert upstream_total(echo) == before


def test_token_from_a_trailer_ended_login_works_like_any_other(gate, proto):
    r = request(gate.port, "POST", "/auth/login", [], login_body(), proto="h2", trailers=[("x-t", "1")])
    token = r.json()["access_token"]
    assert request(gate.port, "GET", "/v1/items", [("authorization", f"Bearer {token}")], proto=proto).status == 200
    assert request(gate.port, "POST", "/v1/items", [("authorization", f"Bearer {token}")], proto=proto).status == 403


# --- 5. Identity headers in every spelling --------------------------------

UNDERSCORED = [("x_keygate_tenant", "evil"), ("x-keygate_key-id", "root"), ("x_keygate_scopes", "admin")]


@pytest.mark.parametrize("path, headers", [("/health", []), ("/v1/items", READ)], ids=["public", "allowed"])
def test_shipped_envoy_refuses_underscore_header_names(gate, echo, proto, path, headers):
    before = upstream_total(echo)
    try:
        r = request(gate.port, "GET", path, [*headers, ("x_keygate_tenant", "evil")], proto=proto)
        assert r.status == 400, r
    except ConnectionError:
        # HTTP/2: Envoy resets the stream instead of answering.
        assert proto == "h2"
    assert upstream_total(echo) == before


@pytest.mark.parametrize("path, headers", [("/health", []), ("/v1/items", READ)], ids=["public", "allowed"])
def test_filter_strips_identity_spellings_when_envoy_lets_them_in(lenient_gate, proto, path, headers):
    r = request(lenient_gate.port, "GET", path, [*headers, *UNDERSCORED, *SPOOF], proto=proto)
    assert r.status == 200, r
    seen = r.upstream_headers()
    names = {n.lower().replace("_", "-") for n, _ in seen}
    assert not any(v in ("evil", "root") for _, v in seen), seen
    if path == "/health":
        assert not any(n.startswith("x-keygate-") for n in names), seen
    else:
        assert ("x-keygate-key-id", "s-read") in seen
        assert ("x-keygate-scopes", "read") in seen


def test_login_strips_identity_in_every_spelling(lenient_gate, echo, proto):
    before = upstream_total(echo)
    r = request(lenient_gate.port, "POST", "/auth/login", [*UNDERSCORED, *SPOOF], login_body(), proto=proto)
    assert r.status == 200, r
    assert upstream_total(echo) == before


@pytest.mark.parametrize("value", [" s-read-key", "s-read-key\t", "\t s-read-key  "])
def test_credentials_with_surrounding_whitespace_count_as_trimmed(gate, proto, value):
    assert request(gate.port, "GET", "/v1/items", [("x-api-key", value)], proto=proto).status == 200
    body = json.dumps({"api_key": value}).encode()
    assert request(gate.port, "POST", "/auth/login", [], body, proto=proto).status == 200


# --- 4. Path and method tricks --------------------------------------------


@pytest.mark.parametrize("path", [
    "/admin;x=1/users",
    "/v1/items;jsessionid=abc",
    "/admin%3Bx/users",
    "/v1/%252e%252e/admin",
    "/%2561dmin",
])
def test_path_parameters_and_double_escapes_are_refused(gate, echo, proto, path):
    before = upstream_total(echo)
    r = request(gate.port, "GET", path, READ, proto=proto)
    assert r.status == 400, r
    assert r.json()["error"] == "invalid_request"
    assert upstream_total(echo) == before


@pytest.mark.parametrize("path", ["/v1;/../admin", "/v1/%3b/../../admin"])
def test_dot_segments_around_path_parameters_end_on_the_admin_rule(gate, echo, proto, path):
    # Envoy's normalize_path resolves these to /admin before keygate sees them.
    before = upstream_total(echo)
    assert request(gate.port, "GET", path, READ, proto=proto).status in (400, 403)
    assert upstream_total(echo) == before


@pytest.mark.parametrize("method, path", [
    ("PROPFIND", "/v1/items"),
    ("OPTIONS", "/v1/items"),
    ("GET", "/ADMIN/users"),
    ("GET", "/administrator"),
    ("GET", "/unlisted"),
])
def test_requests_no_rule_matches_need_the_strictest_scope(gate, proto, method, path):
    r = request(gate.port, method, path, READ, proto=proto)
    assert r.status == 403, r
    assert r.json()["message"] == "This endpoint requires 'admin' scope"
    # Passed to the upstream (whose echo server has no PROPFIND: 501).
    assert request(gate.port, method, path, ADMIN, proto=proto).status in (200, 501)


def test_lowercase_method_spelling_gets_no_weaker_treatment(gate):
    # HTTP/1.1 only: HTTP/2 clients send the method as written, but h2
    # stacks (and Envoy) accept any token; the rule is the same either way.
    r = request(gate.port, "get", "/v1/items", READ)
    assert r.status in (400, 403), r


def test_unmatched_any_key_is_an_explicit_opt_out(envoy_factory, proto):
    with envoy_factory({**CONFIG, "unmatched": "any_key"}) as envoy:
        assert request(envoy.port, "GET", "/unlisted", READ, proto=proto).status == 200
        assert request(envoy.port, "GET", "/admin/x", READ, proto=proto).status == 403


# --- 10. /admin vs /admin/ -------------------------------------------------


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/users", "/admin/./users", "/v1/../admin"])
def test_admin_rule_covers_the_bare_path_and_everything_below(gate, proto, path):
    assert request(gate.port, "GET", path, READ, proto=proto).status == 403
    assert request(gate.port, "GET", path, ADMIN, proto=proto).status == 200


# --- 10. One admission, one count ------------------------------------------


def test_concurrent_admissions_report_distinct_remaining_counts(envoy_factory):
    """Two workers, many clients at once over both protocols: each admitted
    response reports the count of the very update that admitted it, so no
    two admitted responses report the same remaining budget."""
    import threading

    limit = 120
    config = {"routes": ROUTES, "credentials": [
        cred("s-burst", "s-burst-key", scopes=["read"], rate_limit={"requests": limit, "window_secs": 86400})]}
    with envoy_factory(config, concurrency=2) as envoy:
        seen, statuses, lock = [], [], threading.Lock()
        # Generous bounds: the machine may be busy; the test is about counts.
        start = threading.Barrier(8, timeout=60)

        def client(proto):
            start.wait()
            for _ in range(20):
                r = request(envoy.port, "GET", "/v1/items", [("x-api-key", "s-burst-key")], proto=proto)
                with lock:
                    statuses.append(r.status)
                    if r.status == 200:
                        seen.append(int(r.header("x-ratelimit-remaining")))

        threads = [threading.Thread(target=client, args=(p,)) for p in ["http1", "h2"] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(statuses) == 160, f"{len(statuses)} of 160 requests answered"
        assert statuses.count(200) == limit, sorted(statuses)
        assert sorted(seen) == list(range(limit)), "each remaining count is reported exactly once"


# --- 9. Fail closed --------------------------------------------------------

# A valid wasm module whose start function traps: the VM can never start.
TRAP_IN_START = bytes.fromhex(
    "0061736d01000000"            # magic, version 1
    "010401600000"                # type section: () -> ()
    "03020100"                    # function section: one function of type 0
    "070a01065f737461727400 00".replace(" ", "")  # export "_start" = function 0
    + "080100"                    # start section: function 0
    + "0a0501030000 0b".replace(" ", "")          # code: unreachable; end
)


@pytest.mark.parametrize("failure", [{"fail_open": False}, {"failure_policy": "FAIL_CLOSED"}],
                         ids=["fail_open-false", "failure_policy-closed"])
@pytest.mark.parametrize("fault", ["trap-in-start", "config-refused"])
def test_vm_that_cannot_start_refuses_with_5xx_never_passes_through(echo, tmp_path, proto, failure, fault):
    import hashlib

    from tests.harness import Envoy, FileServer, WASM, free_port, render_remote, wasm_filter
    from tests.test_remote_fetch import observe_until_settled

    root = tmp_path / "srv"
    root.mkdir()
    code = TRAP_IN_START if fault == "trap-in-start" else WASM.read_bytes()
    (root / "keygate.wasm").write_bytes(code)
    plugin = {"routes": [{"path_prefix": "v1"}]} if fault == "config-refused" else CONFIG
    with FileServer(root) as server:
        config = render_remote(plugin, gate_port=free_port(), admin_port=free_port(), upstream_port=echo.port,
                               wasm_url=server.url("keygate.wasm"), wasm_server_port=server.port,
                               sha256=hashlib.sha256(code).hexdigest())
        filt = wasm_filter(config)
        filt.pop("failure_policy", None)
        filt.update(failure)
        (tmp_path / "envoy").mkdir()
        # The wasm VM is what cannot start here, whichever build the suite runs.
        envoy = Envoy(config, concurrency=2, workdir=tmp_path / "envoy", build="wasm")
        before = upstream_total(echo)
        try:
            envoy.start(wait=False)
            seen = observe_until_settled(envoy)
            assert seen and all(s in ("refused", "exited") or s >= 500 for s in seen), seen
            if seen[-1] != "exited":
                for path, headers in [("/v1/items", READ), ("/health", [])]:
                    assert request(envoy.port, "GET", path, headers, proto=proto).status >= 500
        finally:
            envoy.stop()
        assert upstream_total(echo) == before, "a request passed without the filter"


# --- 10. trusted_xff_hops counts the peer Envoy appended ------------------


@pytest.mark.parametrize("hops, forwarded, allowed", [
    (0, "10.1.2.3", False),   # source.address: the TCP peer (127.0.0.1)
    (1, "10.1.2.3", False),   # the last entry: the peer, appended by Envoy
    (2, "10.1.2.3", True),    # the entry the peer reported
    (2, "10.1.2.3, 192.0.2.1", False),  # only the nearest reported entry counts
    (3, "10.1.2.3", False),   # fewer entries than hops: no address at all
])
def test_trusted_xff_hops_count_the_peer_envoy_appended(envoy_factory, proto, hops, forwarded, allowed):
    config = {"routes": ROUTES, "trusted_xff_hops": hops, "credentials": [
        cred("s-ip", "s-ip-key", scopes=["read"], allowed_ips=["10.0.0.0/8"])]}
    with envoy_factory(config, concurrency=1) as envoy:
        r = request(envoy.port, "GET", "/v1/items", [("x-api-key", "s-ip-key"), ("x-forwarded-for", forwarded)],
                    proto=proto)
        assert r.status == (200 if allowed else 403), r


def test_every_shipped_envoy_config_rejects_underscore_header_names():
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parent.parent

    def hcms(node):
        if isinstance(node, dict):
            if str(node.get("@type", "")).endswith("HttpConnectionManager"):
                yield node
            for v in node.values():
                yield from hcms(v)
        elif isinstance(node, list):
            for v in node:
                yield from hcms(v)

    found = 0
    for path in sorted([*root.glob("envoy/*.yaml"), *root.glob("deploy/**/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            for hcm_config in hcms(doc):
                found += 1
                options = hcm_config.get("common_http_protocol_options", {})
                assert options.get("headers_with_underscores_action") == "REJECT_REQUEST", path
    assert found >= 4
