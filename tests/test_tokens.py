"""End-to-end: POST /auth/login exchanges an API key for a bearer token."""

import json
import time

import pytest

from tests.harness import ROUTES, TOKEN_KEYS, cred, Envoy, keygate, request, Sidecar, wait_until

CONFIG = {
    "routes": ROUTES,
    "tokens": {"login_path": "/auth/login", "lifetime_secs": 7200},
    "credentials": [
        cred("t-read", "read-key", scopes=["read"]),
        cred("t-inactive", "inactive-key", tenant="b", scopes=["read"], status="inactive"),
        cred("t-ip", "ip-key", tenant="c", scopes=["read"], allowed_ips=["10.0.0.0/8"]),
        cred("t-rate", "rate-key", tenant="d", scopes=["read"], rate_limit={"requests": 2, "window_secs": 60}),
        cred("t-secret", "secret-key", tenant="e", scopes=["read"], secret="s3cret"),
    ],
}


@pytest.fixture(scope="module")
def gate(envoy_factory):
    with envoy_factory(CONFIG) as envoy:
        yield envoy


def login(envoy, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")], raw)


def use(envoy, token, method="GET", path="/v1/items"):
    return request(envoy.port, method, path, [("authorization", f"Bearer {token}")])


def test_login_returns_a_bearer_token(gate, echo):
    before = sum(echo.hits.values())
    r = login(gate, {"api_key": "read-key"})
    assert r.status == 200, r
    body = r.json()
    assert set(body) == {"access_token", "expires_in", "token_type"}
    assert body["token_type"] == "Bearer" and 7190 <= body["expires_in"] <= 7200
    assert r.header("cache-control") == "no-store"
    assert "read-key" not in body["access_token"]
    assert sum(echo.hits.values()) == before, "the login never reaches the upstream"


def test_same_session_gets_the_same_token_on_every_worker_and_new_session_a_new_one(gate):
    tokens = {login(gate, {"api_key": "read-key", "session_id": "sess-a"}).json()["access_token"] for _ in range(10)}
    assert len(tokens) == 1
    other = login(gate, {"api_key": "read-key", "session_id": "sess-b"}).json()["access_token"]
    assert other not in tokens


def test_token_is_accepted_like_the_key_with_its_scopes(gate):
    token = login(gate, {"api_key": "read-key", "session_id": "use"}).json()["access_token"]
    r = use(gate, token)
    assert r.status == 200
    up = dict(r.upstream_headers())
    assert up["x-keygate-key-id"] == "t-read" and "authorization" not in up
    denied = use(gate, token, method="POST")
    assert denied.status == 403 and denied.json()["error"] == "insufficient_scope"


def test_tampered_or_foreign_tokens_get_401(gate):
    token = login(gate, {"api_key": "read-key", "session_id": "tamper"}).json()["access_token"]
    head, payload, tag = token.rsplit(".", 2)
    for bad in [token[:-2] + ("AA" if not token.endswith("AA") else "BB"), f"{head}.{payload}x.{tag}", "kg1.t1.e30.AAAA"]:
        r = use(gate, bad)
        assert r.status == 401 and r.json() == {"error": "authentication_failed", "message": "Invalid token"}, bad


@pytest.mark.parametrize(
    "body, status, error",
    [
        (b"{not json", 400, "invalid_request"),
        ({"session_id": "x"}, 400, "invalid_request"),
        ({"api_key": "read-key", "session_id": "has space"}, 400, "invalid_request"),
        ({"api_key": "nope"}, 401, "authentication_failed"),
        ({"api_key": "secret-key"}, 401, "authentication_failed"),
        ({"api_key": "inactive-key"}, 403, "forbidden"),
        ({"api_key": "ip-key"}, 403, "forbidden"),
    ],
    ids=["bad-json", "missing-key", "bad-session", "unknown", "secret-missing", "inactive", "ip"],
)
def test_login_refusals(gate, body, status, error):
    r = login(gate, body)
    assert r.status == status, r
    assert r.json()["error"] == error


def test_login_with_key_and_secret(gate):
    assert login(gate, {"api_key": "secret-key", "api_secret": "s3cret"}).status == 200


def test_login_spends_the_rate_limit(gate):
    statuses = [login(gate, {"api_key": "rate-key", "session_id": f"s{i}"}).status for i in range(3)]
    assert statuses == [200, 200, 429]


def test_expired_token_gets_401(envoy_factory):
    config = {**CONFIG, "tokens": {"lifetime_secs": 1}}
    with envoy_factory(config) as envoy:
        token = login(envoy, {"api_key": "read-key"}).json()["access_token"]
        assert use(envoy, token).status == 200
        time.sleep(1.1)
        r = use(envoy, token)
        assert r.status == 401 and r.json()["message"] == "Token has expired"
        fresh = login(envoy, {"api_key": "read-key"}).json()["access_token"]
        assert fresh != token and use(envoy, fresh).status == 200


def test_signing_key_rotation_keeps_old_tokens_valid(envoy_factory):
    with envoy_factory(CONFIG) as envoy:
        old = login(envoy, {"api_key": "read-key", "session_id": "rot"}).json()["access_token"]
        assert old.startswith("kg1.t1.")
        envoy.stop()
        rotated = Envoy(envoy.config, workdir=envoy.dir, token_keys="t2:the-next-signing-key-0123456789abcdef," + TOKEN_KEYS)
        try:
            rotated.start()
            assert use(rotated, old).status == 200
            new = login(rotated, {"api_key": "read-key", "session_id": "rot2"}).json()["access_token"]
            assert new.startswith("kg1.t2.") and use(rotated, new).status == 200
        finally:
            rotated.stop()
        dropped = Envoy(envoy.config, workdir=envoy.dir, token_keys="t2:the-next-signing-key-0123456789abcdef")
        try:
            dropped.start()
            assert use(dropped, old).status == 401
        finally:
            dropped.stop()


@pytest.fixture
def rig(envoy_factory, tmp_path):
    store = tmp_path / "store.json"
    with envoy_factory({"routes": ROUTES, "tokens": {}}) as envoy:
        with Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path):
            yield envoy, store


def live_key(envoy, store):
    k = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
    assert wait_until(lambda: login(envoy, {"api_key": k["api_key"]}).status == 200, timeout=10)
    return k


def test_revoking_or_deactivating_the_key_stops_its_tokens_at_once(rig):
    envoy, store = rig
    k = live_key(envoy, store)
    token = login(envoy, {"api_key": k["api_key"], "session_id": "s"}).json()["access_token"]
    assert use(envoy, token).status == 200
    keygate(store, "key", "deactivate", k["key_id"])
    assert wait_until(lambda: use(envoy, token).status == 403, timeout=10)
    keygate(store, "key", "activate", k["key_id"])
    assert wait_until(lambda: use(envoy, token).status == 200, timeout=10)
    keygate(store, "key", "revoke", k["key_id"])
    assert wait_until(lambda: use(envoy, token).status == 401, timeout=10)


def test_session_revocation_reaches_envoy_through_the_sidecar(rig):
    envoy, store = rig
    k = live_key(envoy, store)
    a = login(envoy, {"api_key": k["api_key"], "session_id": "phone"}).json()["access_token"]
    b = login(envoy, {"api_key": k["api_key"], "session_id": "laptop"}).json()["access_token"]
    keygate(store, "session", "revoke", "--key", k["key_id"], "--session", "phone")
    assert wait_until(lambda: use(envoy, a).status == 401, timeout=10)
    assert use(envoy, a).json()["message"] == "Token has been revoked"
    assert use(envoy, b).status == 200  # other sessions unaffected
    fresh = login(envoy, {"api_key": k["api_key"], "session_id": "phone"}).json()["access_token"]
    assert fresh != a and use(envoy, fresh).status == 200
