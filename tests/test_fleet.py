"""End-to-end: fleet mode. One PostgreSQL store, two Envoys, each with its
own `keygate sync`; changes reach both, and restarts of PostgreSQL or of an
Envoy are caught up without anyone's help."""

import os
import subprocess

import pytest

from tests.harness import (
    ENVOY_YAML, ROOT, ROUTES, SYNC_SECRET, WASM, envoy_binary, keygate, pg_bindir, Postgres, render, request, Sidecar,
    wait_until,
)

CONFIG = {"routes": ROUTES}


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


@pytest.fixture
def fleet(postgres, envoy_factory, tmp_path):
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", "-d", "keygate", "-c",
                    "DROP TABLE IF EXISTS keygate_meta, keygate_keys, keygate_revoked_sessions, keygate_limit_sets"],
                   check=True, capture_output=True, timeout=30)
    migrated = keygate(postgres.url, "store", "migrate", json_out=False)
    assert "version 5" in migrated.stdout
    with (
        envoy_factory(CONFIG) as a,
        envoy_factory(CONFIG) as b,
        Sidecar(postgres.url, [f"http://127.0.0.1:{a.sync_port}"], workdir=tmp_path, log_name="a.log") as sa,
        Sidecar(postgres.url, [f"http://127.0.0.1:{b.sync_port}"], workdir=tmp_path, log_name="b.log") as sb,
    ):
        yield postgres, (a, b), (sa, sb)


def status(envoy, key):
    return request(envoy.port, "GET", "/v1/items", [("x-api-key", key)]).status


def on_both(envoys, key, expected, timeout=15):
    assert wait_until(lambda: all(status(e, key) == expected for e in envoys), timeout=timeout), \
        [status(e, key) for e in envoys]


def test_a_key_created_through_the_cli_works_on_both_and_a_revoke_reaches_both(fleet):
    pg, envoys, _ = fleet
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read")
    on_both(envoys, k["api_key"], 200)
    keygate(pg.url, "key", "deactivate", k["key_id"])
    on_both(envoys, k["api_key"], 403)
    keygate(pg.url, "key", "revoke", k["key_id"])
    on_both(envoys, k["api_key"], 401)


def test_the_shared_store_enforces_tenant_limits_in_a_transaction(fleet):
    pg, _, _ = fleet
    keygate(pg.url, "key", "create", "--tenant", "acme", "--kind", "default")
    second = keygate(pg.url, "key", "create", "--tenant", "acme", "--kind", "default", check=False)
    assert second.returncode == 1 and "default" in second.stderr
    assert len(keygate(pg.url, "key", "list")) == 1
    # Concurrent creations serialise on the version row: none is lost.
    procs = [subprocess.Popen([str(ROOT / "target/release/keygate"), "--store", pg.url, "key", "create", "--tenant",
                               f"t{i}", "--scope", "read"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(8)]
    assert all(p.wait(60) == 0 for p in procs)
    assert len(keygate(pg.url, "key", "list")) == 9


def psql(pg, sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", "keygate", "-c", sql],
                   check=True, capture_output=True, timeout=30)


def test_a_key_name_set_through_the_cli_round_trips_and_an_old_schema_is_migrated(fleet):
    pg, envoys, _ = fleet
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read", "--name", "billing job")
    other = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read")
    names = {x["key_id"]: x["name"] for x in keygate(pg.url, "key", "list")}
    assert names[k["key_id"]] == "billing job" and names[other["key_id"]] in ("", None), names
    on_both(envoys, k["api_key"], 200)
    # A store written by the previous schema (no name column): refused with
    # the remedy until `store migrate`, which keeps every key (names empty).
    psql(pg, "ALTER TABLE keygate_keys DROP COLUMN name; UPDATE keygate_meta SET schema_version = 2")
    refused = keygate(pg.url, "key", "list", check=False)
    assert refused.returncode != 0 and "store migrate" in refused.stdout + refused.stderr
    assert "version 5" in keygate(pg.url, "store", "migrate", json_out=False).stdout
    listed = {x["key_id"]: x["name"] for x in keygate(pg.url, "key", "list")}
    assert listed.keys() == names.keys() and all(n in ("", None) for n in listed.values()), listed
    on_both(envoys, k["api_key"], 200)


def test_owner_metadata_and_a_roll_round_trip_through_postgres_and_reach_both_envoys(fleet):
    pg, envoys, _ = fleet
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read", "--owner", "alice",
                "--metadata", '{"plan_tier": "gold"}')
    on_both(envoys, k["api_key"], 200)
    rolled = keygate(pg.url, "key", "roll", k["key_id"], "--grace", "1h")
    on_both(envoys, rolled["api_key"], 200)
    on_both(envoys, k["api_key"], 200)  # the old value, within its grace
    shown = keygate(pg.url, "key", "show", k["key_id"])
    assert (shown["owner"], shown["metadata"], bool(shown["previous_key_until"])) == ("alice", {"plan_tier": "gold"}, True)
    keygate(pg.url, "key", "roll", k["key_id"])
    on_both(envoys, k["api_key"], 401)


def test_postgres_restart_sidecars_reconnect_and_catch_up(fleet):
    pg, envoys, sidecars = fleet
    before = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read")
    on_both(envoys, before["api_key"], 200)
    pg.stop()
    # Both sidecars notice at their next catch-up check and say so...
    assert wait_until(lambda: all("cannot use the store" in s.log() for s in sidecars), timeout=10)
    # ...while Envoy keeps enforcing the last good set.
    assert all(status(e, before["api_key"]) == 200 for e in envoys)
    pg.start()
    after = keygate(pg.url, "key", "create", "--tenant", "beta", "--scope", "read")
    on_both(envoys, after["api_key"], 200)


def test_envoy_restart_is_resynced_from_the_shared_store(fleet):
    pg, (a, b), _ = fleet
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read")
    on_both((a, b), k["api_key"], 200)
    a.stop()
    a.start()
    on_both((a, b), k["api_key"], 200)


def test_fleet_rate_limit_config_loads_in_envoy(tmp_path):
    """envoy/fleet-ratelimit.yaml is a documented composition: keep it valid."""
    cfg = (ENVOY_YAML.parent / "fleet-ratelimit.yaml").read_text().replace("/etc/envoy/keygate.wasm", str(WASM))
    path = tmp_path / "fleet.yaml"
    path.write_text(cfg)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                       timeout=120, env={"KEYGATE_SYNC_SECRET": "x" * 32, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout + r.stderr
    assert render(None, gate_port=1, admin_port=2, upstream_port=3)  # the main harness config still renders


def test_a_file_store_cannot_empty_an_envoy_fed_from_postgres(fleet, tmp_path):
    pg, (a, _), _ = fleet
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read")
    on_both([a], k["api_key"], 200)
    stray = tmp_path / "stray.json"
    keygate(stray, "store", "init")
    env = {**os.environ, "KEYGATE_SYNC_SECRET": SYNC_SECRET}
    p = subprocess.run([str(ROOT / "target/release/keygate"), "--store", str(stray), "sync", "--once", "--endpoint",
                        f"http://127.0.0.1:{a.sync_port}"], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1 and "--takeover" in p.stderr, p.stderr
    assert status(a, k["api_key"]) == 200


def test_store_init_on_postgres_gives_an_identity_once(postgres):
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", "-d", "keygate", "-c",
                    "DROP TABLE IF EXISTS keygate_meta, keygate_keys, keygate_revoked_sessions, keygate_limit_sets"],
                   check=True, capture_output=True, timeout=30)
    missing = keygate(postgres.url, "key", "list", check=False)
    assert missing.returncode == 1 and "store init" in missing.stdout + missing.stderr
    first = keygate(postgres.url, "store", "init")
    assert len(first["store_id"]) == 16
    again = keygate(postgres.url, "store", "init", check=False)
    assert again.returncode == 1 and first["store_id"] in again.stderr
    assert keygate(postgres.url, "key", "list") == []


def test_plans_and_tenant_limits_in_postgres_reach_every_envoy(fleet):
    pg, envoys, _ = fleet
    keygate(pg.url, "plan", "create", "free", "--limit", "1/min")
    k = keygate(pg.url, "key", "create", "--tenant", "acme", "--scope", "read", "--plan", "free")
    keygate(pg.url, "tenant", "limits", "acme", "--limit", "100/min")
    shown = keygate(pg.url, "key", "show", k["key_id"])
    assert (shown["plan"], keygate(pg.url, "plan", "show", "free")["limits"]) == ("free", ["1/min"])
    # Counters are per Envoy: each admits its one request a minute, then refuses.
    on_both(envoys, k["api_key"], 429)
    for e in envoys:
        r = request(e.port, "GET", "/v1/items", [("x-api-key", k["api_key"])])
        assert '"minute";q=1;w=60' in r.header("ratelimit-policy"), r.headers
        assert '"tenant-minute";q=100;w=60' in r.header("ratelimit-policy"), r.headers
