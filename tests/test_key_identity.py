"""End-to-end: key identity (issue 18) through a real Envoy, on both builds.
Identifiable keys refused by checksum at the gate, the owner and allowlisted
metadata sent upstream (client copies stripped, HTTP/1.1 and h2c), a whole-key
roll whose old value works until its grace ends and shares the counter, and
expiry seen the same way by the gate, the CLI, the API and the portal."""

import datetime
import http.cookiejar
import json
import re
import urllib.parse
import urllib.request

import pytest

from tests.harness import ROUTES, Sidecar, keygate, request, wait_until
from tests.test_api import Server, call, token

# The regular expression the README publishes for every identifiable key.
KEY_RE = re.compile(r"\b[a-z][a-z0-9]{0,9}_[a-z0-9]{1,16}_[0-9A-Za-z]{28}\b")

CONFIG = {
    "routes": ROUTES,
    "rate_limit": {"requests": 1000, "window_secs": 60},
    "key_prefixes": ["kg", "acme"],
    "headers": {"metadata": {"plan_tier": "x-keygate-meta-plan-tier", "region": "x-keygate-meta-region"}},
}


@pytest.fixture
def rig(envoy_factory, tmp_path):
    """Envoy + `keygate sync` forwarding the plan_tier and region metadata
    fields + an empty store."""
    store = tmp_path / "store.json"
    with envoy_factory(CONFIG) as envoy:
        sidecar = Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path)
        sidecar.args += ["--forward-metadata", "plan_tier,region"]
        with sidecar:
            yield envoy, store, sidecar


def get(envoy, key, proto="http1", extra=()):
    return request(envoy.port, "GET", "/v1/items", [("x-api-key", key), *extra], proto=proto)


def becomes(envoy, key, expected, timeout=10):
    got = wait_until(lambda: get(envoy, key).status == expected, timeout=timeout)
    assert got, f"expected {expected}, still {get(envoy, key).status}"


def typo(key):
    """The key with its last character changed: same shape, bad checksum."""
    return key[:-1] + ("0" if key[-1] != "0" else "1")


def test_new_keys_are_identifiable_and_a_mistyped_one_is_refused_by_its_checksum(rig, proto):
    envoy, store, _ = rig
    k = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", "--env", "test")
    assert KEY_RE.fullmatch(k["api_key"]) and k["api_key"].startswith("kg_test_"), k["api_key"]
    becomes(envoy, k["api_key"], 200)
    r = get(envoy, typo(k["api_key"]), proto)
    assert r.status == 401
    assert r.json() == {"error": "authentication_failed",
                        "message": "Invalid API key: checksum mismatch (mistyped or truncated key?)"}
    r = get(envoy, k["api_key"][:-3], proto)
    assert (r.status, r.json()["message"]) == (401, "Invalid API key format")
    # A deployment prefix the gate lists, and the 64-hex format on request.
    custom = keygate(store, "--key-prefix", "acme", "key", "create", "--tenant", "acme", "--scope", "read")
    assert custom["api_key"].startswith("acme_live_")
    becomes(envoy, custom["api_key"], 200)
    hex_key = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", "--format", "hex64")
    assert re.fullmatch(r"[0-9a-f]{64}", hex_key["api_key"])
    becomes(envoy, hex_key["api_key"], 200)


def test_bad_key_prefix_config_is_refused_naming_the_field(envoy_factory):
    with envoy_factory(raw=json.dumps({"key_prefixes": ["Kg_"]}), wait=False) as envoy:
        code = envoy.wait_exit(60)
        assert code is not None and code != 0
        assert "key_prefixes[0]" in envoy.log()


def test_a_bad_key_prefix_is_refused_by_the_cli(tmp_path):
    p = keygate(tmp_path / "s.json", "--key-prefix", "Bad!", "key", "create", "--tenant", "acme",
                "--scope", "read", check=False)
    assert p.returncode != 0 and "--key-prefix" in p.stderr


def test_owner_and_allowlisted_metadata_go_upstream_and_spoofed_copies_never(rig, proto):
    envoy, store, _ = rig
    owned = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", "--owner", "alice@example.com",
                    "--metadata", json.dumps({"plan_tier": "gold", "internal_note": "never upstream",
                                              "nested": {"a": 1}}))
    plain = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
    becomes(envoy, owned["api_key"], 200)
    becomes(envoy, plain["api_key"], 200)
    spoof = [("x-keygate-owner", "mallory"), ("x-keygate-meta-plan-tier", "platinum"),
             ("x-keygate-meta-region", "spoofed")]
    up = dict(get(envoy, owned["api_key"], proto, spoof).upstream_headers())
    assert up["x-keygate-owner"] == "alice@example.com"
    assert up["x-keygate-meta-plan-tier"] == "gold"
    assert "x-keygate-meta-region" not in up
    assert not any("internal" in v or "never upstream" in v for v in up.values())
    up = dict(get(envoy, plain["api_key"], proto, spoof).upstream_headers())
    assert not {"x-keygate-owner", "x-keygate-meta-plan-tier", "x-keygate-meta-region"} & set(up)
    # Public routes too.
    r = request(envoy.port, "GET", "/health", spoof, proto=proto)
    assert not {"x-keygate-owner", "x-keygate-meta-plan-tier"} & set(dict(r.upstream_headers()))
    # The CLI shows the owner; a changed owner reaches the gate.
    shown = keygate(store, "key", "show", owned["key_id"])
    assert shown["owner"] == "alice@example.com" and shown["metadata"]["plan_tier"] == "gold"
    keygate(store, "key", "owner", owned["key_id"], "bob")
    assert wait_until(lambda: dict(get(envoy, owned["api_key"]).upstream_headers()).get("x-keygate-owner") == "bob")


def test_bad_owner_or_metadata_is_refused_by_the_cli_and_changes_nothing(rig):
    _, store, _ = rig
    before = keygate(store, "key", "list")
    for args, field in [
        (["--owner", "two words"], "--owner"),
        (["--metadata", "[1, 2]"], "--metadata"),
        (["--metadata", json.dumps({"a": "x" * 5000})], "--metadata"),
        (["--metadata", "{not json"], "--metadata"),
    ]:
        p = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", *args, check=False)
        assert p.returncode == 1, p.stderr
        assert json.loads(p.stderr)["message"].startswith(field), p.stderr
    assert keygate(store, "key", "list") == before


def test_a_rolled_key_old_value_works_until_the_grace_ends_and_shares_the_budget(rig):
    envoy, store, sidecar = rig
    k = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", "--rate", "5/min",
                "--owner", "alice")
    old = k["api_key"]
    becomes(envoy, old, 200)
    assert [get(envoy, old).status for _ in range(2)] == [200, 200]  # 3 of 5 spent
    rolled = keygate(store, "key", "roll", k["key_id"], "--grace", "3s")
    new = rolled["api_key"]
    assert new != old and rolled["key_id"] == k["key_id"] and rolled["previous_key_until"]
    becomes(envoy, new, 200)  # 4 of 5
    r = get(envoy, old)  # 5 of 5: the same budget
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "0"
    assert dict(r.upstream_headers())["x-keygate-key-id"] == k["key_id"]
    assert dict(r.upstream_headers())["x-keygate-owner"] == "alice"
    assert get(envoy, new).status == 429
    assert get(envoy, old).status == 429
    # After the grace: the old value is unknown, the new one is the key.
    assert wait_until(lambda: get(envoy, old).status == 401, timeout=15)
    assert get(envoy, old).json()["message"] == "Invalid API key"
    assert get(envoy, new).status == 429
    # The next change pushes the old value's alias entry away: the rolled
    # record without it, the new key, and one delete.
    other = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
    becomes(envoy, other["api_key"], 200)
    assert re.search(r"pushed 2 upserts, 1 deletes", sidecar.log()), sidecar.log()
    assert get(envoy, old).status == 401
    shown = keygate(store, "key", "show", k["key_id"])
    assert shown["previous_key_until"] is None and shown["owner"] == "alice"


def test_a_roll_without_grace_refuses_the_old_value_at_once(rig):
    envoy, store, _ = rig
    k = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
    becomes(envoy, k["api_key"], 200)
    rolled = keygate(store, "key", "roll", k["key_id"])
    becomes(envoy, rolled["api_key"], 200)
    assert get(envoy, k["api_key"]).status == 401


def test_expiry_is_enforced_and_shown_by_cli_api_and_portal(envoy_factory, tmp_path):
    store = str(tmp_path / "keygate.db")
    keygate(store, "store", "init")
    with envoy_factory(CONFIG) as envoy:
        with Server(store, tmp_path, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}") as srv:
            op = token(store, "--operator")
            soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3))
            s, created = call(srv, "POST", "/api/v1/tenants/acme/keys", op,
                              {"name": "short-lived", "scopes": ["read"], "owner": "alice",
                               "expires_at": soon.strftime("%Y-%m-%dT%H:%M:%SZ")})
            assert s == 201, created
            key, key_id = created["api_key"], created["key_id"]
            assert created["key"]["expired"] is False and created["key"]["owner"] == "alice"
            becomes(envoy, key, 200)
            assert wait_until(lambda: get(envoy, key).status == 401, timeout=15)
            assert get(envoy, key).json()["message"] == "API key has expired"
            s, k = call(srv, "GET", f"/api/v1/tenants/acme/keys/{key_id}", op)
            assert (s, k["expired"], k["expires_at"] is not None) == (200, True, True)
            shown = keygate(store, "key", "show", key_id)
            assert shown["expired"] is True
            table = keygate(store, "key", "list", json_out=False).stdout
            assert "expired" in table and "alice" in table
            # The portal: a one-time link, then the keys page.
            s, link = call(srv, "POST", "/api/v1/tenants/acme/portal-sessions", op)
            assert s in (200, 201), link
            url = link["url"].replace("http://127.0.0.1:8080", f"http://127.0.0.1:{srv.port}")
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            with opener.open(url, timeout=10) as r:
                r.read()
            with opener.open(f"http://127.0.0.1:{srv.port}/portal/keys", timeout=10) as r:
                page = r.read().decode()
            assert "short-lived" in page and "expired" in page and "alice" in page
            with opener.open(f"http://127.0.0.1:{srv.port}/portal/keys/{key_id}", timeout=10) as r:
                page = r.read().decode()
            assert re.search(r'id="expires">[^<]*<span class="status off">expired</span>', page), page
            assert 'id="roll"' in page


def test_the_portal_roll_button_issues_a_new_value_owned_keys_show_their_owner(envoy_factory, tmp_path):
    store = str(tmp_path / "keygate.db")
    keygate(store, "store", "init")
    with envoy_factory(CONFIG) as envoy:
        with Server(store, tmp_path, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}") as srv:
            op = token(store, "--operator")
            s, link = call(srv, "POST", "/api/v1/tenants/acme/portal-sessions", op)
            url = link["url"].replace("http://127.0.0.1:8080", f"http://127.0.0.1:{srv.port}")
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            base = f"http://127.0.0.1:{srv.port}"
            with opener.open(url, timeout=10) as r:
                page = r.read().decode()
            with opener.open(f"{base}/portal/keys", timeout=10) as r:
                page = r.read().decode()
            csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)

            def post(path, fields):
                data = urllib.parse.urlencode(fields).encode()
                req = urllib.request.Request(f"{base}{path}", data=data, method="POST",
                                             headers={"Origin": base})
                with opener.open(req, timeout=10) as r:
                    return r.read().decode()

            made = post("/portal/keys", {"csrf": csrf, "name": "web", "scopes": "read"})
            key = KEY_RE.search(made).group(0)
            becomes(envoy, key, 200)
            s, keys = call(srv, "GET", "/api/v1/tenants/acme/keys", op)
            k = next(k for k in keys["keys"] if k["name"] == "web")
            assert k["owner"].startswith("portal:"), k
            up = dict(get(envoy, key).upstream_headers())
            assert up["x-keygate-owner"] == k["owner"]
            rolled = post(f"/portal/keys/{k['key_id']}/roll", {"csrf": csrf, "grace_seconds": "0"})
            new = KEY_RE.search(rolled).group(0)
            assert new != key
            becomes(envoy, new, 200)
            assert get(envoy, key).status == 401
            s, audit = call(srv, "GET", "/api/v1/tenants/acme/audit", op)
            assert "key.roll" in json.dumps(audit)


def test_the_api_roll_with_a_short_grace(envoy_factory, tmp_path):
    store = str(tmp_path / "keygate.db")
    keygate(store, "store", "init")
    with envoy_factory(CONFIG) as envoy:
        with Server(store, tmp_path, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}") as srv:
            op = token(store, "--operator")
            s, created = call(srv, "POST", "/api/v1/tenants/acme/keys", op, {"name": "api", "scopes": ["read"]})
            old = created["api_key"]
            becomes(envoy, old, 200)
            s, rolled = call(srv, "POST", f"/api/v1/tenants/acme/keys/{created['key_id']}/roll", op,
                             {"grace_seconds": 2})
            assert s == 200 and rolled["previous_key_valid_until"], rolled
            becomes(envoy, rolled["api_key"], 200)
            assert get(envoy, old).status == 200
            assert wait_until(lambda: get(envoy, old).status == 401, timeout=15)
            s, e = call(srv, "POST", f"/api/v1/tenants/acme/keys/{created['key_id']}/roll", op,
                        {"grace_seconds": -1})
            assert s == 422, e


def test_the_access_log_names_the_owner_of_a_key_that_has_one(envoy_factory, tmp_path):
    from tests.harness import cred
    config = {**CONFIG, "credentials": [cred("owned", "owned-key-0123456789", owner="alice@example.com",
                                             scopes=["read"]),
                                        cred("plain", "plain-key-0123456789", scopes=["read"])]}
    log = tmp_path / "access.log"
    with envoy_factory(config, access_log=log) as envoy:
        assert get(envoy, "owned-key-0123456789").status == 200
        assert get(envoy, "plain-key-0123456789").status == 200

        def records():
            lines = log.read_text().splitlines() if log.exists() else []
            return [json.loads(x) for x in lines if x.strip()]
        assert wait_until(lambda: len(records()) >= 2)
        by_key = {r["key_id"]: r for r in records()}
        assert by_key["owned"]["owner"] == "alice@example.com"
        # Read from the owner header, which a key without an owner leaves
        # unset: "" in envoy/envoy.yaml's two-source field.
        assert by_key["plain"].get("owner") in (None, "-", "")


def test_the_owner_reaches_the_api_logs_is_filterable_and_stays_in_its_tenant(envoy_factory, tmp_path):
    """The record is polled for within a generous bound; the ingest lag
    itself is measured by `make bench` (bench/ingest_lag.py)."""
    import subprocess
    from tests.harness import KEYGATE
    store = str(tmp_path / "keygate.db")
    keygate(store, "store", "init")
    log = tmp_path / "access.log"
    with envoy_factory(CONFIG, access_log=log) as envoy:
        with Server(store, tmp_path, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}",
                    "--access-log", str(log)) as srv:
            op = token(store, "--operator")
            acme, globex = token(store, "--tenant", "acme"), token(store, "--tenant", "globex")

            def make(tenant, tok, name, **fields):
                s, v = call(srv, "POST", f"/api/v1/tenants/{tenant}/keys", tok,
                            {"name": name, "scopes": ["read"], **fields})
                assert s == 201, v
                becomes(envoy, v["api_key"], 200, timeout=30)
                return v
            owned = make("acme", acme, "owned", owner="alice@example.com")
            plain = make("acme", acme, "plain")
            # The same owner name in another tenant: its records stay there.
            theirs = make("globex", globex, "theirs", owner="alice@example.com")
            assert get(envoy, theirs["api_key"]).status == 200
            assert get(envoy, plain["api_key"]).status == 200
            assert request(envoy.port, "GET", "/v1/items/owned-here", [("x-api-key", owned["api_key"])]).status == 200

            def logs(tenant, tok, query):
                s, v = call(srv, "GET", f"/api/v1/tenants/{tenant}/logs?{query}", tok)
                assert s == 200, v
                return v["records"]
            recs = wait_until(lambda: logs("acme", acme, "path=/v1/items/owned-here"), timeout=30, interval=0.1)
            assert recs, "the request never showed up in the API's logs within 30 s"
            assert (recs[0]["key_id"], recs[0]["owner"]) == (owned["key_id"], "alice@example.com")
            # Filtered by owner: only that key's records of this tenant; a
            # key without an owner shows null.
            mine = logs("acme", acme, "owner=alice@example.com&limit=1000")
            assert mine and {(r["key_id"], r["owner"]) for r in mine} == {(owned["key_id"], "alice@example.com")}
            assert all(r["owner"] is None for r in logs("acme", acme, f"key_id={plain['key_id']}"))
            assert logs("acme", acme, f"key_id={plain['key_id']}")
            assert logs("acme", acme, "owner=bob") == []
            # Another tenant never sees them, by owner or by key id; its own
            # "alice" records are its own.
            assert wait_until(lambda: logs("globex", globex, "owner=alice@example.com"), timeout=30)
            assert {r["key_id"] for r in logs("globex", globex, "owner=alice@example.com&limit=1000")} == \
                {theirs["key_id"]}
            assert logs("globex", globex, f"key_id={owned['key_id']}") == []
            assert call(srv, "GET", "/api/v1/tenants/acme/logs?owner=alice@example.com", globex)[0] == 404
            # A value no key can have is refused naming the field.
            for bad in ["has%20space", "", "a" * 129]:
                s, e = call(srv, "GET", f"/api/v1/tenants/acme/logs?owner={bad}", acme)
                assert (s, e.get("field")) == (422, "owner"), (bad, e)
            # The OpenAPI document lists the filter and the field.
            doc = call(srv, "GET", "/api/v1/openapi.json")[1]
            params = {p["name"] for p in doc["paths"]["/api/v1/tenants/{tenant}/logs"]["get"]["parameters"]}
            assert "owner" in params and "owner" in doc["components"]["schemas"]["LogRecord"]["properties"]

            # The portal's request log has an Owner column.
            s, link = call(srv, "POST", "/api/v1/tenants/acme/portal-sessions", op)
            url = link["url"].replace("http://127.0.0.1:8080", f"http://127.0.0.1:{srv.port}")
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            with opener.open(url, timeout=10) as r:
                r.read()
            with opener.open(f"http://127.0.0.1:{srv.port}/portal/logs?key={owned['key_id']}", timeout=10) as r:
                page = r.read().decode()
            assert '<th scope="col">Owner</th>' in page
            assert '<td data-label="Owner">alice@example.com</td>' in page, page

            # `keygate logs` prints it per record too.
            table = subprocess.run([str(KEYGATE), "logs", "--file", str(log), "--key", owned["key_id"]],
                                   capture_output=True, text=True, timeout=30, check=True).stdout
            assert " OWNER " in table.splitlines()[0] and "alice@example.com" in table, table
