"""End-to-end: the management API of a real `keygate serve` (SQLite store,
sync daemon and access-log ingester in the same process) in front of a real
Envoy. Tenant isolation on every route, token brute force slowed, bad bodies
refused, API changes live in Envoy, Envoy's requests in the API's logs, and
the OpenAPI document matching the routes the server answers."""

import datetime
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness import KEYGATE, ROUTES, SYNC_SECRET, Managed, free_port, keygate, request, wait_until

# The bound on every wait for a change to show (in Envoy, in the logs): generous,
# since five test runs may share two cores; a wait ends as soon as the change shows.
SOON = 30

CONFIG = {"routes": ROUTES, "rate_limit": {"requests": 1000, "window_secs": 60},
          "tokens": {"login_path": "/auth/login", "lifetime_secs": 7200}}


class Server(Managed):
    """`keygate serve` on a free loopback port."""

    def __init__(self, store, workdir, *extra, secret=SYNC_SECRET, log_name=None):
        listen = extra[extra.index("--listen") + 1] if "--listen" in extra else f"127.0.0.1:{free_port()}"
        self.port = int(listen.rsplit(":", 1)[1])
        self.store = store
        self.secret = secret
        self.log_path = Path(workdir) / (log_name or f"serve-{self.port}.log")
        self.args = [KEYGATE, "--store", store, "serve", *(() if "--listen" in extra else ("--listen", listen)),
                     *extra]

    def start(self):
        self._spawn(self.args, env={**os.environ, "KEYGATE_SYNC_SECRET": self.secret})
        ok = wait_until(lambda: self.proc.poll() is not None or call(self, "GET", "/healthz")[0] == 200, timeout=20)
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"keygate serve did not start: {self.log()}")
        return self


def call(server, method, path, token=None, body=None, *, raw=None, content_type="application/json"):
    """(status, parsed JSON or None) of one request to the API."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None and content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
            return r.status, (json.loads(text) if text and r.headers.get_content_type() == "application/json" else None)
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def _no_redirects():
    """A plain HTTP client that neither follows redirects nor raises on 4xx."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    return urllib.request.build_opener(NoRedirect)


def portal_http(url, *, cookie=None, data=None, headers=()):
    """(status, headers, body text) of one portal request (a POST with `data`)."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if cookie:
        req.add_header("Cookie", cookie)
    for k, v in headers:
        req.add_header(k, v)
    try:
        with _no_redirects().open(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def portal_session(url):
    """Opens a portal link; returns the session cookie (`name=value`), after
    checking its flags and the page's security headers."""
    s, h, body = portal_http(url)
    assert s == 200, body
    cookie = h["Set-Cookie"].split(";")[0]
    flags = h["Set-Cookie"]
    assert "HttpOnly" in flags and "SameSite=Strict" in flags and "Max-Age=28800" in flags
    assert h["Content-Security-Policy"].startswith("default-src 'self'; script-src 'self'")
    assert h["X-Frame-Options"] == "DENY" and h["Referrer-Policy"] == "no-referrer"
    return cookie


def token(store, *args):
    return keygate(store, "token", "create", *args)["token"]


@pytest.fixture(scope="module")
def rig(envoy_factory, tmp_path_factory):
    """Envoy (writing its access log) + `keygate serve` syncing it and
    ingesting that log, over a new SQLite store; an operator token and two
    tenant tokens."""
    tmp = tmp_path_factory.mktemp("api")
    store = str(tmp / "keygate.db")
    keygate(store, "store", "init")
    log = tmp / "access.log"
    with envoy_factory(CONFIG, access_log=log) as envoy:
        with Server(store, tmp, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}", "--access-log", str(log),
                    "--auth-failures", "1000/min") as server:
            yield {
                "envoy": envoy, "server": server, "store": store, "log": log,
                "op": token(store, "--operator"),
                "acme": token(store, "--tenant", "acme"),
                "globex": token(store, "--tenant", "globex"),
            }
            assert "kgt_" not in server.log(), "a token reached the server's log"


def create_key(rig, tenant, tok, **fields):
    body = {"name": "k", "scopes": ["read"], **fields}
    s, v = call(rig["server"], "POST", f"/api/v1/tenants/{tenant}/keys", tok, body)
    assert s == 201, v
    return v


def live(rig, headers, expected=200, timeout=SOON):
    """Waits (bounded) until Envoy answers `expected` for a request with `headers`."""
    got = wait_until(lambda: request(rig["envoy"].port, "GET", "/v1/items", headers).status == expected,
                     timeout=timeout, interval=0.1)
    assert got, f"Envoy still answers {request(rig['envoy'].port, 'GET', '/v1/items', headers).status}, " \
                f"not {expected}, after {timeout} s"


def synced(rig):
    """Returns once Envoy holds every change made before the call: a key made
    now is live only in a push of a snapshot that has every earlier change
    (snapshots are the whole store, pushed in order). Deleted again, so a
    tenant's key allowance never fills."""
    k = create_key(rig, "sync-barrier", rig["op"], name="barrier")
    live(rig, [("x-api-key", k["api_key"])])
    assert call(rig["server"], "DELETE", f"/api/v1/tenants/sync-barrier/keys/{k['key_id']}", rig["op"])[0] == 204


def as_stored(view):
    """A key as the API shows it, less what Envoy's traffic updates."""
    return {f: v for f, v in view.items() if f != "last_used_at"}


def test_a_tenant_token_never_reads_or_changes_another_tenants_objects(rig):
    srv, acme, globex = rig["server"], rig["acme"], rig["globex"]
    theirs = create_key(rig, "acme", acme, with_secret=True)
    kid = theirs["key_id"]
    doc = call(srv, "GET", "/api/v1/openapi.json")[1]
    probed = 0
    for path, ops in doc["paths"].items():
        if "{tenant}" not in path:
            continue
        for method in ops:
            body = {} if method in ("post", "put", "patch") else None
            # acme's objects under acme's path, and acme's key under globex's own path.
            for tenant in ("acme", "globex"):
                if tenant == "globex" and "{key_id}" not in path:
                    continue
                url = path.replace("{tenant}", tenant).replace("{key_id}", kid) \
                    .replace("{session_id}", "s1").replace("{token_id}", "tok_0000000000000000")
                s, v = call(srv, method.upper(), url, globex, body)
                assert s == 404 and v["error"] == "not_found", (method, url, s, v)
                probed += 1
    assert probed >= 20
    # Nothing changed: acme still sees its key, unchanged and usable.
    s, v = call(srv, "GET", f"/api/v1/tenants/acme/keys/{kid}", acme)
    assert s == 200 and v["status"] == "active"
    s, v = call(srv, "GET", "/api/v1/tenants", globex)
    assert [t["tenant"] for t in v["tenants"]] in ([], ["globex"])
    assert call(srv, "GET", "/api/v1/audit", acme)[0] == 403


def test_keys_created_through_the_api_and_the_cli_both_work_through_envoy_and_are_audited(rig):
    """How soon a change reaches Envoy is measured by `make bench`
    (bench/propagation.py), never asserted here: on a shared machine a time
    budget fails for reasons that are not the product's."""
    envoy, srv = rig["envoy"], rig["server"]
    k = create_key(rig, "initech", rig["op"])
    live(rig, [("x-api-key", k["api_key"])])
    by_cli = keygate(rig["store"], "key", "create", "--tenant", "initech", "--scope", "read")
    live(rig, [("x-api-key", by_cli["api_key"])])
    # Both changes are in the audit trail: the API's with its token id, the CLI's as the CLI's.
    recs = call(srv, "GET", "/api/v1/tenants/initech/audit", rig["op"])[1]["records"]
    by = {r["object"]: r for r in recs if r["action"] == "key.create"}
    assert by[k["key_id"]]["actor_token_id"].startswith("tok_")
    assert by[by_cli["key_id"]]["detail"] == {"via": "cli"} and by[by_cli["key_id"]]["actor_token_id"] is None
    s, _ = call(srv, "DELETE", f"/api/v1/tenants/initech/keys/{k['key_id']}", rig["op"])
    assert s == 204
    live(rig, [("x-api-key", k["api_key"])], 401)
    assert request(envoy.port, "GET", "/v1/items", [("x-api-key", by_cli["api_key"])]).status == 200


def test_a_request_through_envoy_shows_in_the_api_logs(rig):
    """Found by polling within a generous bound; the ingest lag itself is
    measured by `make bench` (bench/ingest_lag.py)."""
    envoy, srv = rig["envoy"], rig["server"]
    k = create_key(rig, "acme", rig["acme"], name="logged key")
    live(rig, [("x-api-key", k["api_key"])])
    r = request(envoy.port, "GET", "/v1/items/find-me", [("x-api-key", k["api_key"])])
    assert r.status == 200

    def found():
        s, v = call(srv, "GET", f"/api/v1/tenants/acme/logs?key_id={k['key_id']}&path=/v1/items/find-me",
                    rig["acme"])
        return v["records"] if s == 200 and v["records"] else None

    recs = wait_until(found, timeout=SOON, interval=0.1)
    assert recs, f"the request never showed up in the API's logs within {SOON} s"
    rec = recs[0]
    assert (rec["key_id"], rec["key_name"], rec["method"], rec["status"], rec["decision"]) == \
        (k["key_id"], "logged key", "GET", 200, "allowed")
    assert rec["time"] and rec["client_ip"] and "request_id" in rec
    # Another tenant sees none of it, even naming the key.
    s, v = call(srv, "GET", f"/api/v1/tenants/globex/logs?key_id={k['key_id']}", rig["globex"])
    assert s == 200 and v["records"] == []
    s, v = call(srv, "GET", "/api/v1/tenants/acme/usage?granularity=hour", rig["acme"])
    assert s == 200
    used = {x["key_id"]: x["last_used_at"] for x in v["keys"]}
    assert wait_until(lambda: call(srv, "GET", "/api/v1/tenants/acme/usage", rig["acme"])[1]["points"], timeout=SOON)
    assert k["key_id"] in used


def test_spoofed_identity_headers_never_reach_a_tenants_request_logs(rig):
    """The access log reads identity from the headers keygate sets: a client
    sending them on its own, on any path, is never attributed to their tenant
    or key, nor is a request Envoy refused before keygate saw it."""
    envoy, srv = rig["envoy"], rig["server"]
    victim = create_key(rig, "globex", rig["globex"], name="victim key")
    k = create_key(rig, "acme", rig["acme"], name="spoofing key")
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", [("x-api-key", k["api_key"])]).status == 200,
                      timeout=SOON)
    spoof = [("x-keygate-tenant", "globex"), ("x-keygate-key-id", victim["key_id"]),
             ("x-keygate-environment", "live"), ("x-keygate-owner", "mallory")]
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=5) as s:
        s.sendall(b"GET /v1/items/spoof-api-no-host HTTP/1.1\r\n"
                  + b"".join(f"{n}: {v}\r\n".encode() for n, v in spoof) + b"\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400")
    sent = [("GET", "/webhooks/spoof-api-public", [], None, 200),
            ("GET", "/v1/items/spoof-api-missing", [], None, 401),
            ("GET", "/v1/items/spoof-api-unknown", [("x-api-key", "kg_no_such_key_0000")], None, 401),
            ("POST", "/v1/items/spoof-api-scope", [("x-api-key", k["api_key"])], b"{}", 403),
            ("POST", "/auth/login", [], json.dumps({"api_key": k["api_key"]}).encode(), 200),
            ("POST", "/auth/login", [], b"not json", 400),
            ("GET", "/v1/items/spoof-api-allowed", [("x-api-key", k["api_key"])], None, 200)]
    for method, path, headers, body, status in sent:
        assert request(envoy.port, method, path, spoof + headers, body).status == status, path

    def acme_allowed():
        s, v = call(srv, "GET", "/api/v1/tenants/acme/logs?path=/v1/items/spoof-api-allowed", rig["acme"])
        return v["records"] if s == 200 and v["records"] else None

    # Ingested in order: once the last request shows, every earlier one has.
    recs = wait_until(acme_allowed, timeout=SOON)
    assert recs and (recs[0]["key_id"], recs[0]["decision"], recs[0].get("owner")) == (k["key_id"], "allowed", None)
    s, v = call(srv, "GET", "/api/v1/tenants/globex/logs", rig["globex"])
    assert s == 200 and [r for r in v["records"] if "spoof" in (r["path"] or "") or r["key_id"] == victim["key_id"]] \
        == [], v["records"]
    s, v = call(srv, "GET", f"/api/v1/tenants/globex/logs?key_id={victim['key_id']}", rig["globex"])
    assert s == 200 and v["records"] == []
    s, v = call(srv, "GET", "/api/v1/tenants/globex/usage", rig["globex"])
    assert s == 200 and victim["key_id"] not in {x["key_id"] for x in v["keys"] if x.get("last_used_at")}
    s, v = call(srv, "GET", "/api/v1/tenants/acme/logs?path=/auth/login", rig["acme"])
    assert s == 200 and k["key_id"] in {r["key_id"] for r in v["records"]}


def test_oversize_and_malformed_bodies_are_refused_in_the_error_shape(rig):
    srv, tok = rig["server"], rig["acme"]
    url = "/api/v1/tenants/acme/keys"
    s, v = call(srv, "POST", url, tok, raw=b'{"name": "' + b"x" * 70_000 + b'"}')
    assert (s, v["error"]) == (413, "body_too_large")
    s, v = call(srv, "POST", url, tok, raw=b'{"name": ')
    assert (s, v["error"]) == (400, "malformed_json")
    s, v = call(srv, "POST", url, tok, {"name": "k", "scopes": ["read"], "admin": True})
    assert s == 422 and "admin" in v["message"]
    s, v = call(srv, "POST", url, tok, {"name": "k", "scopes": ["read"], "allowed_ips": ["300.1.1.1"]})
    assert (s, v["field"]) == (422, "allowed_ips")
    s, v = call(srv, "POST", url, tok, {"scopes": ["read"]})
    assert s == 422 and "name" in v["message"]
    s, v = call(srv, "POST", url, tok, raw=b'{"name":"k"}', content_type="text/plain")
    assert (s, v["error"]) == (415, "unsupported_media_type")


def test_the_sixth_scoped_key_gets_409_and_the_api_flow_works_end_to_end(rig):
    srv, tok, envoy = rig["server"], rig["op"], rig["envoy"]
    s, v = call(srv, "PUT", "/api/v1/tenants/hooli", tok, {"display_name": "Hooli"})
    assert s == 201, v
    keys = [create_key(rig, "hooli", tok, name=f"k{i}") for i in range(5)]
    s, v = call(srv, "POST", "/api/v1/tenants/hooli/keys", tok, {"name": "k6", "scopes": ["read"]})
    assert s == 409 and "5 scoped" in v["message"], v
    first = call(srv, "GET", "/api/v1/tenants/hooli/keys?limit=2", tok)[1]
    rest = call(srv, "GET", f"/api/v1/tenants/hooli/keys?limit=10&cursor={first['next_cursor']}", tok)[1]
    assert sorted(k["key_id"] for k in first["keys"] + rest["keys"]) == sorted(k["key_id"] for k in keys)
    k = keys[0]
    h = [("x-api-key", k["api_key"])]
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", h).status == 200, timeout=SOON)
    s, v = call(srv, "PATCH", f"/api/v1/tenants/hooli/keys/{k['key_id']}", tok, {"status": "inactive"})
    assert s == 200 and v["status"] == "inactive"
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", h).status == 403, timeout=SOON)
    s, v = call(srv, "GET", "/api/v1/tenants/hooli/audit", tok)
    actions = [r["action"] for r in v["records"]]
    assert actions[0] == "key.update" and "tenant.create" in actions
    assert all(r["actor_token_id"].startswith("tok_") and r["actor_ip"] == "127.0.0.1" for r in v["records"])


def test_rotate_secret_keeps_the_old_one_for_the_grace_period(rig):
    srv, tok, envoy = rig["server"], rig["op"], rig["envoy"]
    k = create_key(rig, "umbrella", tok, with_secret=True)
    import base64
    basic = lambda s: [("authorization", "Basic " + base64.b64encode(f"{k['api_key']}:{s}".encode()).decode())]
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", basic(k["secret"])).status == 200, timeout=SOON)
    s, v = call(srv, "POST", f"/api/v1/tenants/umbrella/keys/{k['key_id']}/rotate-secret", tok,
                {"grace_seconds": 600})
    assert s == 200 and v["secret"] != k["secret"] and v["previous_secret_valid_until"]
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", basic(v["secret"])).status == 200, timeout=SOON)
    assert request(envoy.port, "GET", "/v1/items", basic(k["secret"])).status == 200


def test_revoking_a_session_through_the_api_refuses_its_tokens_in_envoy(rig):
    srv, tok, envoy = rig["server"], rig["acme"], rig["envoy"]
    k = create_key(rig, "acme", tok, name="sessions")
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", [("x-api-key", k["api_key"])]).status == 200,
                      timeout=SOON)

    def login(session):
        r = request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")],
                    json.dumps({"api_key": k["api_key"], "session_id": session}).encode())
        assert r.status == 200, r
        return [("authorization", f"Bearer {r.json()['access_token']}")]

    a, b = login("phone"), login("laptop")
    assert request(envoy.port, "GET", "/v1/items", a).status == 200
    used = time.time()

    def listed():
        s, v = call(srv, "GET", f"/api/v1/tenants/acme/keys/{k['key_id']}/sessions", tok)
        assert s == 200, v
        return {x["session_id"]: x for x in v["sessions"]}

    # Live sessions come from Envoy's access log (the login answers and the
    # token's use), within the ingester's poll.
    assert wait_until(lambda: {"phone", "laptop"} <= listed().keys() and listed()["phone"]["last_seen_at"],
                      timeout=SOON), listed()
    phone = listed()["phone"]
    seen = datetime.datetime.fromisoformat(phone["last_seen_at"].replace("Z", "+00:00")).timestamp()
    assert abs(seen - used) <= 2, (phone, used)
    assert not phone["revoked"] and phone["created_at"] <= phone["last_seen_at"] < phone["expires_at"]
    s, _ = call(srv, "DELETE", f"/api/v1/tenants/acme/keys/{k['key_id']}/sessions/phone", tok)
    assert s == 204
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", a).status == 401, timeout=SOON)
    assert request(envoy.port, "GET", "/v1/items", b).status == 200
    s, v = call(srv, "GET", "/api/v1/tenants/acme/sessions", tok)
    assert s == 200 and {(x["key_id"], x["session_id"], x["revoked"]) for x in v["sessions"]} >= \
        {(k["key_id"], "phone", True), (k["key_id"], "laptop", False)}
    # The revoked session keeps what the log showed of it.
    assert {x["session_id"]: x for x in v["sessions"]}["phone"]["last_seen_at"] == phone["last_seen_at"]
    tokens = [h[0][1].split()[1] for h in (a, b)]
    assert not any(t in rig["log"].read_text() for t in tokens), "a token reached the access log"
    assert call(srv, "GET", "/api/v1/tenants/acme/sessions", rig["globex"])[0] == 404
    # The same session id signs in again: the new token works and the session
    # is listed live, while the token issued before the revocation stays
    # refused, also after later changes are pushed.
    again = login("phone")
    assert request(envoy.port, "GET", "/v1/items", again).status == 200
    assert wait_until(lambda: not listed()["phone"]["revoked"], timeout=SOON), listed()
    create_key(rig, "laterco", rig["op"], name="a later change")
    s, _ = call(srv, "DELETE", f"/api/v1/tenants/acme/keys/{k['key_id']}/sessions/laptop", tok)
    assert s == 204
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", b).status == 401, timeout=SOON)
    assert request(envoy.port, "GET", "/v1/items", a).status == 401
    assert request(envoy.port, "GET", "/v1/items", again).status == 200
    # Revoking all of the key's sessions: one change, one audit record.
    s, v = call(srv, "DELETE", f"/api/v1/tenants/acme/keys/{k['key_id']}/sessions", tok)
    assert s == 200 and v["revoked"] >= 3, v
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", again).status == 401, timeout=SOON)
    recs = call(srv, "GET", "/api/v1/tenants/acme/audit", rig["op"])[1]["records"]
    assert [r["object"] for r in recs if r["action"] == "session.revoke_all"] == [k["key_id"]]


def test_a_tenant_cannot_lift_its_plans_limit_with_a_rate_limit_of_its_own(rig):
    """A key's own rate limit replaces its plan's limits in the gateway: a
    tenant token that could set one would pass the 1/min its operator chose.
    It gets 403, and Envoy keeps refusing the second request of the minute."""
    srv, envoy, op = rig["server"], rig["envoy"], rig["op"]
    s, v = call(srv, "POST", "/api/v1/plans", op, {"name": "p6-free", "limits": ["1/min"]})
    assert s == 201, v
    s, v = call(srv, "PUT", "/api/v1/tenants/ratecap/limits", op, {"plan": "p6-free"})
    assert s == 200, v
    tenant = token(rig["store"], "--tenant", "ratecap")
    s, v = call(srv, "POST", "/api/v1/tenants/ratecap/keys", tenant,
                {"name": "fast", "scopes": ["read"], "rate_limit": "1000000/1s"})
    assert (s, v["error"]) == (403, "forbidden") and v["message"].startswith("rate_limit:"), v
    k = create_key(rig, "ratecap", tenant)
    key = [("x-api-key", k["api_key"])]
    # The key's first request passes once it is served; the minute is then spent.
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", key).status != 401, timeout=10)
    assert request(envoy.port, "GET", "/v1/items", key).status == 429
    for body in ({"rate_limit": "1000000/1s"}, {"rate_limit": None}):
        s, v = call(srv, "PATCH", f"/api/v1/tenants/ratecap/keys/{k['key_id']}", tenant, body)
        assert (s, v["error"]) == (403, "forbidden"), (body, v)
    s, v = call(srv, "GET", f"/api/v1/tenants/ratecap/keys/{k['key_id']}", tenant)
    assert s == 200 and v["rate_limit"] is None and v["plan"] is None, v
    # A push would have reached Envoy by now; still the plan's 1/min.
    time.sleep(1.5)
    assert [request(envoy.port, "GET", "/v1/items", key).status for _ in range(3)] == [429, 429, 429]
    # The operator still can: the key's own rule then replaces the plan's.
    s, v = call(srv, "PATCH", f"/api/v1/tenants/ratecap/keys/{k['key_id']}", op, {"rate_limit": "100/min"})
    assert (s, v["rate_limit"]) == (200, "100/60s"), v
    assert wait_until(lambda: request(envoy.port, "GET", "/v1/items", key).status == 200, timeout=10)


def test_a_path_parameter_that_is_not_utf8_gets_the_json_error_shape_after_authentication(rig):
    """Axum's own plain-text 400 never reaches a client: without a token the
    answer is 401, with one a JSON 400 naming the parameter."""
    srv, op = rig["server"], rig["op"]
    for path, field in (("/api/v1/tenants/%FF/keys", "tenant"), ("/api/v1/tenants/acme/keys/%FF", "key_id"),
                        ("/api/v1/tenants/acme/keys/k/sessions/%C3%28", "session_id"),
                        ("/api/v1/plans/%FF", "plan")):
        s, v = call(srv, "GET" if "sessions" not in path else "DELETE", path)
        assert (s, v and v["error"]) == (401, "invalid_token"), (path, s, v)
        s, v = call(srv, "GET" if "sessions" not in path else "DELETE", path, op)
        assert (s, v and v["error"], v and v["field"]) == (400, "bad_path", field), (path, s, v)


def test_every_documented_operation_is_routed(rig):
    srv, tok = rig["server"], rig["op"]
    doc = call(srv, "GET", "/api/v1/openapi.json")[1]
    assert doc["openapi"].startswith("3.1")
    for path, ops in doc["paths"].items():
        url = path.replace("{tenant}", "nobody").replace("{key_id}", "k").replace("{session_id}", "s") \
            .replace("{token_id}", "t")
        for method in ops:
            s, v = call(srv, method.upper(), url, tok, {} if method in ("post", "put", "patch") else None)
            assert s != 405, (method, path)
            assert not (s == 404 and v and v["message"] == "no such route"), (method, path)
    s, v = call(srv, "GET", "/api/v1/no-such-thing", tok)
    assert (s, v["message"]) == (404, "no such route")


def test_healthz_reports_the_store_each_envoy_and_ingest_lag(rig):
    s, v = call(rig["server"], "GET", "/healthz")
    assert s == 200 and v["store"]["reachable"]
    assert [e["in_sync"] for e in v["sync"]] == [True], v
    assert v["ingest"] is not None and "lag_seconds" in v["ingest"]


def test_repeated_bad_tokens_from_one_address_get_429(tmp_path):
    store = str(tmp_path / "k.db")
    keygate(store, "store", "init")
    good = token(store, "--operator")
    with Server(store, tmp_path, "--auth-failures", "5/min") as srv:
        for _ in range(5):
            assert call(srv, "GET", "/api/v1/tenants", "kgt_" + "0" * 64)[0] == 401
        s, v = call(srv, "GET", "/api/v1/tenants", "kgt_" + "1" * 64)
        assert (s, v["error"]) == (429, "too_many_failures")
        # Even the right token waits: guessing must not learn anything meanwhile.
        assert call(srv, "GET", "/api/v1/tenants", good)[0] == 429
        assert call(srv, "GET", "/api/v1/tenants")[0] == 429


def test_sigterm_stops_the_server_cleanly(tmp_path):
    store = str(tmp_path / "k.db")
    keygate(store, "store", "init")
    srv = Server(store, tmp_path).start()
    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert '"stopped"' in srv.log()
    finally:
        srv.stop()


def log_line(i):
    """One access-log record as envoy/envoy.yaml writes it, request id r<i>."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    return json.dumps({"time": stamp, "method": "GET", "path": "/v1/items", "status": 200, "client_ip": "127.0.0.1",
                       "duration_ms": 1, "request_id": f"r{i}", "decision": "allowed", "reason": None,
                       "key_id": "crash-key", "tenant": "crash", "environment": "live"}) + "\n"


def test_kill_9_mid_ingest_and_mid_write_loses_nothing_committed_and_duplicates_nothing(tmp_path):
    """SIGKILL of `keygate serve` while it ingests a growing access log and
    answers key creations: after a restart every record is in the API's logs
    exactly once and every key answered 201 is there."""
    store, log = str(tmp_path / "keygate.db"), tmp_path / "access.log"
    keygate(store, "store", "init")
    op = token(store, "--operator")
    server = Server(store, tmp_path, "--access-log", str(log), "--auth-failures", "100000/min")
    written, acked, tried = [0], [], [0]
    stop_writing, stop_creating = threading.Event(), threading.Event()

    def append():
        # Until told, at a few thousand records a second (bounded by count).
        with open(log, "a") as f:
            while not stop_writing.is_set() and written[0] < 200_000:
                f.write("".join(log_line(written[0] + i) for i in range(20)))
                f.flush()
                written[0] += 20
                time.sleep(0.005)

    def create():
        while not stop_creating.is_set() and tried[0] < 5_000:
            # One tenant per key: no tenant limit in the way.
            n = tried[0]
            tried[0] += 1
            s, v = call(server, "POST", f"/api/v1/tenants/t{n}/keys", op, {"name": f"k{n}", "scopes": ["read"]})
            if s == 201:
                acked.append((f"t{n}", v["key_id"]))

    server.start()
    try:
        writer = threading.Thread(target=append)
        writer.start()
        for kill in range(2):
            stop_creating.clear()
            creator = threading.Thread(target=create)
            creator.start()
            acked_before = len(acked)

            def busy():
                h = call(server, "GET", "/healthz")[1]
                return h and h["ingest"]["records"] > 500 and len(acked) > acked_before + 3
            # Killed while records and keys are flowing in.
            assert wait_until(busy, timeout=30), (written[0], len(acked), server.log()[-2000:])
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
            stop_creating.set()
            creator.join(30)
            if kill == 0:
                server.start()
        stop_writing.set()
        writer.join(30)
        assert not writer.is_alive() and not creator.is_alive()
        server.start()
        total = written[0]

        def ingested():
            h = call(server, "GET", "/healthz")[1]
            return h and h["ingest"]["bytes_behind"] == 0
        assert wait_until(ingested, timeout=60), call(server, "GET", "/healthz")
        ids, cursor = [], None
        for _ in range(total // 1000 + 5):
            q = "/api/v1/tenants/crash/logs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            s, page = call(server, "GET", q, op)
            assert s == 200, page
            ids += [r["request_id"] for r in page["records"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} records stored twice"
        assert set(ids) == {f"r{i}" for i in range(total)}, f"{total - len(set(ids))} records lost"
        for tenant, kid in acked:
            s, _ = call(server, "GET", f"/api/v1/tenants/{tenant}/keys/{kid}", op)
            assert s == 200, f"key {kid} answered 201, then lost"
    finally:
        stop_writing.set()
        stop_creating.set()
        server.stop()


# --- cross-tenant isolation, route by route (audit p6 item 7) -----------------
# Each test below uses tenants of its own: a tenant holds at most 5 scoped
# keys, and the module's other tests fill acme's.

def test_usage_of_another_tenants_key_is_404_on_the_tenant_token_and_operator_path_forms(rig):
    srv, op = rig["server"], rig["op"]
    owner_tok = token(rig["store"], "--tenant", "usage-owner")
    other_tok = token(rig["store"], "--tenant", "usage-other")
    theirs = create_key(rig, "usage-owner", owner_tok, name="usage owner key")
    mine = create_key(rig, "usage-other", other_tok, name="usage other key")
    kid = theirs["key_id"]
    live(rig, [("x-api-key", theirs["api_key"])])
    assert request(rig["envoy"].port, "GET", "/v1/items/usage-probe", [("x-api-key", theirs["api_key"])]).status == 200

    def owner_points():
        s, v = call(srv, "GET", f"/api/v1/tenants/usage-owner/usage?key_id={kid}", owner_tok)
        assert s == 200, v
        return [p for p in v["points"] if p["key_id"] == kid and p["allowed"]]
    # There is usage to leak: its owner sees it (ingested from Envoy's log).
    assert wait_until(owner_points, timeout=SOON, interval=0.2), "the owner never saw its key's usage"
    # The other tenant's own key answers on the same route: the 404s below are the key's, not the route's.
    for tok in (other_tok, op):
        s, v = call(srv, "GET", f"/api/v1/tenants/usage-other/usage?key_id={mine['key_id']}", tok)
        assert s == 200 and [k["key_id"] for k in v["keys"]] == [mine["key_id"]], v
    for tok, who in ((other_tok, "tenant token"), (op, "operator")):
        for gran in ("hour", "day"):
            url = f"/api/v1/tenants/usage-other/usage?key_id={kid}&granularity={gran}"
            s, v = call(srv, "GET", url, tok)
            assert (s, v and v.get("error"), v and v.get("message")) == (404, "not_found", "no such key"), \
                (who, url, s, v)
            assert kid not in json.dumps(v) and "usage owner key" not in json.dumps(v)
        # Unfiltered, the other tenant's usage names none of the owner's keys or points.
        s, v = call(srv, "GET", "/api/v1/tenants/usage-other/usage", tok)
        assert s == 200 and kid not in json.dumps(v), (who, v)
    # A tenant token on the owner's path: 404, as for every route of another tenant.
    s, v = call(srv, "GET", f"/api/v1/tenants/usage-owner/usage?key_id={kid}", other_tok)
    assert (s, v["error"]) == (404, "not_found") and kid not in json.dumps(v), v
    assert owner_points(), "the owner's usage is gone"


def test_an_operator_cannot_revoke_a_tenants_token_through_another_tenants_path(rig):
    srv, op = rig["server"], rig["op"]
    s, v = call(srv, "POST", "/api/v1/tenants/token-owner/tokens", op, {})
    assert s == 201, v
    tid, tok = v["token_id"], v["token"]
    create_key(rig, "token-other", op, name="makes token-other a tenant")
    s, v = call(srv, "DELETE", f"/api/v1/tenants/token-other/tokens/{tid}", op)
    assert (s, v["error"], v["message"]) == (404, "not_found", "no such token"), (s, v)
    # The token still works, is listed unrevoked under its tenant, and no audit record says otherwise.
    assert call(srv, "GET", "/api/v1/tenants/token-owner/keys", tok)[0] == 200
    listed = {t["token_id"]: t for t in call(srv, "GET", "/api/v1/tenants/token-owner/tokens", op)[1]["tokens"]}
    assert listed[tid]["revoked_at"] is None, listed[tid]
    assert tid not in {t["token_id"] for t in call(srv, "GET", "/api/v1/tenants/token-other/tokens", op)[1]["tokens"]}
    for tenant in ("token-owner", "token-other"):
        recs = call(srv, "GET", f"/api/v1/tenants/{tenant}/audit", op)[1]["records"]
        assert not [r for r in recs if r["action"] == "token.revoke"], recs
    # On its own tenant's path the same call revokes it: the refusal above was the path's.
    assert call(srv, "DELETE", f"/api/v1/tenants/token-owner/tokens/{tid}", op)[0] == 204
    s, v = call(srv, "GET", "/api/v1/tenants/token-owner/keys", tok)
    assert (s, v["error"]) == (401, "invalid_token"), (s, v)


def test_no_token_on_another_tenants_path_reads_or_changes_a_key_or_its_sessions(rig):
    """Every route naming a key, on a tenant that is not the key's, with the
    operator token and with that tenant's own token, each with a body that
    would change the key: 404, and the key, its secret, its value and its
    session stay as they were, in the store and in Envoy."""
    srv, op, envoy = rig["server"], rig["op"], rig["envoy"]
    owner_tok = token(rig["store"], "--tenant", "keys-owner")
    k = create_key(rig, "keys-owner", owner_tok, name="owned key", with_secret=True)
    kid = k["key_id"]
    other_tok = token(rig["store"], "--tenant", "keys-other")
    create_key(rig, "keys-other", other_tok, name="keys-other's own key")
    import base64
    basic = [("authorization", "Basic " + base64.b64encode(f"{k['api_key']}:{k['secret']}".encode()).decode())]
    live(rig, basic)
    r = request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")],
                json.dumps({"api_key": k["api_key"], "api_secret": k["secret"], "session_id": "owners-phone"}).encode())
    assert r.status == 200, r
    bearer = [("authorization", f"Bearer {r.json()['access_token']}")]
    assert request(envoy.port, "GET", "/v1/items", bearer).status == 200

    def sessions():
        s, v = call(srv, "GET", f"/api/v1/tenants/keys-owner/keys/{kid}/sessions", owner_tok)
        assert s == 200, v
        return {x["session_id"]: x["revoked"] for x in v["sessions"]}
    assert wait_until(lambda: "owners-phone" in sessions(), timeout=SOON, interval=0.2), sessions()
    before = as_stored(call(srv, "GET", f"/api/v1/tenants/keys-owner/keys/{kid}", owner_tok)[1])
    # Bodies that would change the key if the route took it.
    bodies = {("patch", "/api/v1/tenants/{tenant}/keys/{key_id}"): {"name": "taken", "status": "inactive",
                                                                     "scopes": ["write"],
                                                                     "allowed_ips": ["10.0.0.0/8"]},
              ("post", "/api/v1/tenants/{tenant}/keys/{key_id}/rotate-secret"): {"grace_seconds": 0},
              ("post", "/api/v1/tenants/{tenant}/keys/{key_id}/roll"): {"grace_seconds": 0}}
    doc = call(srv, "GET", "/api/v1/openapi.json")[1]
    probed = set()
    for path, ops in doc["paths"].items():
        if "{key_id}" not in path:
            continue
        for method in ops:
            body = bodies.get((method, path), {} if method in ("post", "put", "patch") else None)
            url = path.replace("{tenant}", "keys-other").replace("{key_id}", kid) \
                .replace("{session_id}", "owners-phone")
            for who, tok in (("operator", op), ("keys-other's token", other_tok)):
                s, v = call(srv, method.upper(), url, tok, body)
                assert (s, v and v.get("error"), v and v.get("message")) == (404, "not_found", "no such key"), \
                    (who, method, url, s, v)
                assert "owners-phone" not in json.dumps(v) and "owned key" not in json.dumps(v)
            probed.add((method, path.removeprefix("/api/v1/tenants/{tenant}/keys/{key_id}")))
    assert {("get", ""), ("patch", ""), ("delete", ""), ("post", "/rotate-secret"), ("post", "/roll"),
            ("get", "/sessions"), ("delete", "/sessions"), ("delete", "/sessions/{session_id}")} <= probed, probed
    # Its owner sees it unchanged, with its session live; nothing was audited against it.
    s, v = call(srv, "GET", f"/api/v1/tenants/keys-owner/keys/{kid}", owner_tok)
    assert s == 200 and as_stored(v) == before, (before, v)
    assert sessions() == {"owners-phone": False}
    recs = call(srv, "GET", "/api/v1/tenants/keys-owner/audit", op)[1]["records"]
    assert [r["action"] for r in recs if r["object"] == kid] == ["key.create"], recs
    assert [r["action"] for r in call(srv, "GET", "/api/v1/tenants/keys-other/audit", op)[1]["records"]] == \
        ["key.create"]
    # And Envoy, once it holds every change made so far: the same value,
    # secret (no roll, no rotation), status, scopes, addresses and session.
    synced(rig)
    assert request(envoy.port, "GET", "/v1/items", basic).status == 200
    assert request(envoy.port, "GET", "/v1/items", bearer).status == 200


def test_a_key_id_reused_in_another_tenant_lists_none_of_the_old_keys_sessions(rig):
    srv, op = rig["server"], rig["op"]
    old = create_key(rig, "reuse-old", op, name="old key")
    kid = old["key_id"]
    assert call(srv, "DELETE", f"/api/v1/tenants/reuse-old/keys/{kid}/sessions/old-owners-phone", op)[0] == 204
    s, v = call(srv, "GET", f"/api/v1/tenants/reuse-old/keys/{kid}/sessions", op)
    assert s == 200 and [(x["session_id"], x["revoked"]) for x in v["sessions"]] == [("old-owners-phone", True)], v
    assert call(srv, "DELETE", f"/api/v1/tenants/reuse-old/keys/{kid}", op)[0] == 204
    new = keygate(rig["store"], "key", "create", "--tenant", "reuse-new", "--id", kid, "--scope", "read")
    assert new["key_id"] == kid
    s, v = call(srv, "GET", f"/api/v1/tenants/reuse-new/keys/{kid}/sessions", op)
    assert (s, v["sessions"]) == (200, []), v
    s, v = call(srv, "GET", "/api/v1/tenants/reuse-new/sessions", op)
    assert (s, v["sessions"]) == (200, []), v


def test_cli_token_list_is_a_table_with_status_and_expiry_and_no_token(tmp_path):
    store = str(tmp_path / "keygate.db")
    keygate(store, "store", "init")
    op = keygate(store, "token", "create", "--operator")
    tenant = keygate(store, "token", "create", "--tenant", "acme", "--expires", "30d")
    keygate(store, "token", "revoke", op["token_id"])
    table = keygate(store, "token", "list", json_out=False).stdout
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["TOKEN", "ID", "ROLE", "TENANT"], table
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[op["token_id"]][1:4] == ["operator", "-", "revoked"], table
    assert rows[op["token_id"]][5] == "never", table
    acme = rows[tenant["token_id"]]
    assert acme[1:4] == ["tenant", "acme", "active"], table
    assert acme[5].startswith(str(time.gmtime(time.time() + 30 * 86400).tm_year)), table
    assert op["token"] not in table and tenant["token"] not in table
