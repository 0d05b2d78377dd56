"""End-to-end: the management API and the portal of a real `keygate serve`
on the fleet store, a real PostgreSQL, in front of a real Envoy. The same
flows as tests/test_api.py (each test below is that file's, run against
this module's PostgreSQL rig): keys created, rotated and deleted through
the API enforced by Envoy, tenant isolation on every route, sessions listed
and revoked, Envoy's requests ingested into PostgreSQL and read back through
the API. Plus the portal's one-time link and key creation over HTTP, and
portal sessions fenced off from the API."""

import os
import re
import subprocess
import time
import urllib.parse

import pytest

from tests.harness import keygate, pg_bindir, Postgres, request, wait_until
from tests.test_api import (  # noqa: F401  (imported tests run here against PostgreSQL)
    CONFIG, Server, call, create_key, portal_http, portal_session, token,
    test_a_key_id_reused_in_another_tenant_lists_none_of_the_old_keys_sessions,
    test_a_request_through_envoy_shows_in_the_api_logs,
    test_a_tenant_token_never_reads_or_changes_another_tenants_objects,
    test_an_operator_cannot_revoke_a_tenants_token_through_another_tenants_path,
    test_healthz_reports_the_store_each_envoy_and_ingest_lag,
    test_keys_created_through_the_api_and_the_cli_both_work_through_envoy_and_are_audited,
    test_no_token_on_another_tenants_path_reads_or_changes_a_key_or_its_sessions,
    test_revoking_a_session_through_the_api_refuses_its_tokens_in_envoy,
    test_rotate_secret_keeps_the_old_one_for_the_grace_period,
    test_the_sixth_scoped_key_gets_409_and_the_api_flow_works_end_to_end,
    test_usage_of_another_tenants_key_is_404_on_the_tenant_token_and_operator_path_forms,
)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    if pg_bindir() is None:
        message = "PostgreSQL server not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run installs it, so CI must run these tests")
        pytest.skip(f"{message}; CI runs these tests")
    pg = Postgres(tmp_path_factory.mktemp("pg")).init().start().create_db()
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture(scope="module")
def rig(postgres, envoy_factory, tmp_path_factory):
    """Envoy (writing its access log) + `keygate serve` on the PostgreSQL
    store, syncing that Envoy and ingesting its log into PostgreSQL."""
    tmp = tmp_path_factory.mktemp("api-pg")
    store = postgres.url
    keygate(store, "store", "init")
    log = tmp / "access.log"
    with envoy_factory(CONFIG, access_log=log) as envoy:
        with Server(store, tmp, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}", "--access-log", str(log),
                    "--auth-failures", "1000/min") as server:
            yield {
                "envoy": envoy, "server": server, "store": store, "log": log, "pg": postgres,
                "op": token(store, "--operator"),
                "acme": token(store, "--tenant", "acme"),
                "globex": token(store, "--tenant", "globex"),
            }
            assert "kgt_" not in server.log(), "a token reached the server's log"


def psql(pg, sql):
    out = subprocess.run([pg.bindir / "psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d",
                          "keygate", "-At", "-c", sql], check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_the_logs_the_api_shows_are_rows_in_postgresql(rig):
    k = create_key(rig, "acme", rig["acme"], name="pg logged")
    h = [("x-api-key", k["api_key"])]
    assert wait_until(lambda: request(rig["envoy"].port, "GET", "/v1/items/pg-row", h).status == 200, timeout=5)
    assert wait_until(lambda: psql(rig["pg"], f"SELECT count(*) FROM request_logs WHERE key_id = '{k['key_id']}' "
                                              "AND path = '/v1/items/pg-row'") != "0", timeout=5)
    s, v = call(rig["server"], "GET", f"/api/v1/tenants/acme/logs?key_id={k['key_id']}", rig["acme"])
    assert s == 200 and v["records"][0]["key_name"] == "pg logged", v
    # The key's last use is kept in PostgreSQL too, and shown with the key.
    assert wait_until(lambda: call(rig["server"], "GET", f"/api/v1/tenants/acme/keys/{k['key_id']}",
                                   rig["acme"])[1]["last_used_at"], timeout=5)


def test_the_portal_link_and_key_creation_work_on_postgresql(rig):
    base = f"http://127.0.0.1:{rig['server'].port}"
    s, v = call(rig["server"], "POST", "/api/v1/tenants/acme/portal-sessions", rig["op"], {})
    assert s == 201, v
    cookie = portal_session(v["url"])
    assert portal_http(v["url"])[0] == 410, "a link works once"
    _, _, page = portal_http(f"{base}/portal/keys", cookie=cookie)
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "name": "from the portal", "scopes": "read"}).encode()
    s, _, page = portal_http(f"{base}/portal/keys", cookie=cookie, data=form,
                             headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert s == 201, page
    api_key = re.search(r'id="api-key"[^>]*>(kg_live_[0-9A-Za-z]{28})<', page).group(1)
    assert wait_until(lambda: request(rig["envoy"].port, "GET", "/v1/items", [("x-api-key", api_key)]).status == 200,
                      timeout=5)
    keys = call(rig["server"], "GET", "/api/v1/tenants/acme/keys", rig["acme"])[1]["keys"]
    assert "from the portal" in [k["name"] for k in keys]
    # The CLI's link works once on PostgreSQL too.
    v = keygate(rig["store"], "portal", "link", "--tenant", "acme", "--base-url", base)
    portal_session(v["url"])
    assert portal_http(v["url"])[0] == 410


def test_a_portal_session_is_no_api_token_and_no_api_token_is_a_portal_session(rig):
    base = f"http://127.0.0.1:{rig['server'].port}"
    s, v = call(rig["server"], "POST", "/api/v1/tenants/acme/portal-sessions", rig["op"], {})
    assert s == 201, v
    link = urllib.parse.parse_qs(urllib.parse.urlparse(v["url"]).query)["link"][0]
    # An unopened link is not an API token either.
    assert call(rig["server"], "GET", "/api/v1/tenants/acme/keys", link)[0] == 401
    cookie = portal_session(v["url"])
    session_token = cookie.split("=", 1)[1]
    assert portal_http(f"{base}/portal/keys", cookie=cookie)[0] == 200
    s, body = call(rig["server"], "GET", "/api/v1/tenants/acme/keys", session_token)
    assert (s, body["error"]) == (401, "invalid_token"), body
    listed = call(rig["server"], "GET", "/api/v1/tenants/acme/tokens", rig["op"])[1]["tokens"]
    cli_listed = keygate(rig["store"], "token", "list", "--tenant", "acme")
    api_token_ids = {t["token_id"] for t in listed}
    assert api_token_ids == {t["token_id"] for t in cli_listed}
    assert len(api_token_ids) >= 1
    audit = call(rig["server"], "GET", "/api/v1/tenants/acme/audit", rig["op"])[1]["records"]
    portal_ids = {r["object"] for r in audit if r["action"] == "portal.login"}
    assert portal_ids and not (portal_ids & api_token_ids), "a portal session is listed as an API token"
    # A tenant API token in the cookie is no portal session.
    assert portal_http(f"{base}/portal/keys", cookie=f"keygate_portal={rig['acme']}")[0] == 401


def test_the_credits_left_are_counted_from_the_request_log_in_postgresql(rig):
    # A tenant of its own: the module's other tests fill acme's key allowance.
    k = create_key(rig, "credited", rig["op"], name="pg credited")
    path = f"/api/v1/tenants/credited/keys/{k['key_id']}"
    s, v = call(rig["server"], "PATCH", path, rig["op"], {"credits": {"balance": 10}})
    assert s == 200 and v["credits"]["used"] == 0, v
    h = [("x-api-key", k["api_key"])]
    # Every allowed request after the top-up counts, pushed yet or not.
    allowed = 0
    for _ in range(50):
        r = request(rig["envoy"].port, "GET", "/v1/items", h)
        allowed += r.status == 200
        if '"credits"' in (r.header("ratelimit-policy") or "") and allowed >= 3:
            break
        time.sleep(0.05)
    assert wait_until(lambda: call(rig["server"], "GET", path, rig["op"])[1]["credits"]["remaining"] == 10 - allowed,
                      timeout=10), call(rig["server"], "GET", path, rig["op"])[1]
