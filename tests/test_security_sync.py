"""End-to-end security properties of credential sync (issue 14, items 2 and 7),
through real Envoys and the real `keygate sync`:

- however many session revocations the store holds, every push is paginated,
  so an Envoy restart is repaired within seconds and revoked tokens stay
  refused;
- a push Envoy refuses is reported (log, counter, status file) and not
  retried in a loop, and the rest of the fleet stays in sync;
- a push (incremental or full, any number of batches) becomes visible all at
  once at its last batch; a half-delivered one changes nothing that serves
  requests; a full set removes what it leaves out; a deleted key answers
  nothing on any worker.
"""

import hashlib
import hmac
import json
import re
import time

import pytest

from tests.harness import ROUTES, SYNC_SECRET, Envoy, Sidecar, cred, keygate, request, wait_until

STATE = "/keygate/sync/v1/state"
PUSH = "/keygate/sync/v1/push"
FLOOD = 50_000


def status(envoy, key, proto="http1", method="GET"):
    return request(envoy.port, method, "/v1/items", [("x-api-key", key)], proto=proto).status


def everywhere(envoy, key, proto, n=12):
    """Statuses of `n` requests: Envoy spreads connections over its workers,
    each with its own cache of parsed credentials."""
    return {status(envoy, key, proto) for _ in range(n)}


def sync_state(envoy):
    return request(envoy.sync_port, "GET", STATE).json()


def push(envoy, payload):
    body = json.dumps(payload).encode()
    sig = "v1=" + hmac.new(SYNC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return request(envoy.sync_port, "POST", PUSH, [("content-type", "application/json"),
                                                   ("x-keygate-signature", sig)], body)


def login(envoy, key, session, proto="http1"):
    body = json.dumps({"api_key": key, "session_id": session}).encode()
    r = request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")], body, proto=proto)
    assert r.status == 200, r
    return r.json()["access_token"]


def use(envoy, token, proto="http1"):
    return request(envoy.port, "GET", "/v1/items", [("authorization", f"Bearer {token}")], proto=proto)


def sync_requests(envoy):
    """Requests Envoy's sync listener has received: state questions and pushes."""
    line = envoy.admin("/stats?filter=^http.keygate_sync.downstream_rq_total$").strip()
    return int(line.rsplit(":", 1)[1]) if line else 0


def reconciled(envoy, passes, timeout=60):
    """Waits until the sync daemon has asked `envoy` what it holds `passes`
    more times (once per reconcile interval), bounded by `timeout`."""
    start = sync_requests(envoy)
    assert wait_until(lambda: sync_requests(envoy) >= start + passes, timeout=timeout, interval=0.1), \
        f"the daemon asked Envoy {sync_requests(envoy) - start} times in {timeout} s, not {passes}"


def sidecar_with_status(store, endpoints, workdir, status_file):
    s = Sidecar(store, endpoints, workdir=workdir)
    s.args += ["--status-file", str(status_file)]
    return s


def rewrite_store(store, snap):
    """Replaces the store file whole, as keygate does: the daemon never reads half of it."""
    tmp = store.with_name(store.name + ".edit")
    tmp.write_text(json.dumps(snap))
    tmp.replace(store)


def read_status(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- item 2: a revocation flood does not wedge sync ---------------------------

def test_fifty_thousand_revocations_are_pushed_in_pages_and_survive_an_envoy_restart(
        envoy_factory, tmp_path, proto):
    store = tmp_path / "store.json"
    status_file = tmp_path / "status.json"
    with envoy_factory({"routes": ROUTES, "tokens": {"lifetime_secs": 7200}}) as envoy:
        keys = [keygate(store, "key", "create", "--tenant", f"t{i // 5}", "--scope", "read") for i in range(10)]
        # A flood of revocations, as thousands of `session revoke` calls
        # leave them (written at once: one CLI call per revocation would
        # take minutes here), all within the token lifetime.
        snap = json.loads(store.read_text())
        now_ms = int(time.time() * 1000)
        snap["revoked_sessions"] = sorted(
            ({"key_id": keys[i % len(keys)]["key_id"], "session_id": f"flood-{i:05}", "revoked_at_ms": now_ms}
             for i in range(FLOOD)), key=lambda r: (r["key_id"], r["session_id"]))
        snap["version"] += 1
        rewrite_store(store, snap)
        # And one real session, revoked through the CLI, whose token must stay refused.
        victim = keys[0]
        sync = sidecar_with_status(store, [f"http://127.0.0.1:{envoy.sync_port}"], tmp_path, status_file)
        with sync:
            assert wait_until(lambda: status(envoy, keys[-1]["api_key"], proto) == 200, timeout=30)
            token = login(envoy, victim["api_key"], "stolen", proto)
            assert use(envoy, token, proto).status == 200
            keygate(store, "session", "revoke", "--key", victim["key_id"], "--session", "stolen")
            assert wait_until(lambda: use(envoy, token, proto).status == 401, timeout=10)

            envoy.stop()
            restarted = time.monotonic()
            envoy.start()
            ready = time.monotonic()
            assert wait_until(lambda: all(status(envoy, k["api_key"], proto) == 200 for k in keys), timeout=10), \
                "every key works again within 10 s of an Envoy restart"
            recovered = time.monotonic()
            assert use(envoy, token, proto).status == 401, "the revoked session stays revoked after the restart"
            assert use(envoy, login(envoy, victim["api_key"], "fresh", proto), proto).status == 200
            assert wait_until(lambda: (read_status(status_file) or {}).get("healthy") is True, timeout=10)
            log = sync.log()
        pushes = re.findall(r"full push of (\d+) credentials and (\d+) session revocations in (\d+) batches.*\(([\d.]+) ms\)",
                            log)
        assert pushes, log[-2000:]
        creds, revs, batches, ms = pushes[-1]
        assert int(creds) == len(keys) and int(revs) >= FLOOD and int(batches) >= FLOOD // 1000
        print(f"\nrevocation flood ({proto}): {revs} revocations, full push {batches} batches in {float(ms):.0f} ms; "
              f"restart -> all keys 200 in {recovered - restarted:.2f} s ({recovered - ready:.2f} s after ready)")


def test_revocations_older_than_the_token_lifetime_are_not_pushed(envoy_factory, tmp_path):
    store = tmp_path / "store.json"
    with envoy_factory({"routes": ROUTES, "tokens": {"lifetime_secs": 60}}) as envoy:
        k = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
        snap = json.loads(store.read_text())
        old_ms = int(time.time() * 1000) - 3_600_000
        snap["revoked_sessions"] = [{"key_id": k["key_id"], "session_id": f"old-{i}", "revoked_at_ms": old_ms}
                                    for i in range(3000)]
        snap["version"] += 1
        rewrite_store(store, snap)
        sync = Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path)
        sync.args += ["--token-lifetime", "60s"]
        with sync:
            assert wait_until(lambda: status(envoy, k["api_key"]) == 200, timeout=15)
            log = sync.log()
        assert re.search(r"full push of 1 credentials and 0 session revocations in 1 batches", log), log[-2000:]


# --- item 2: a refused push is reported, not looped ----------------------------

def test_a_refused_push_is_reported_once_and_the_rest_of_the_fleet_stays_in_sync(envoy_factory, tmp_path, proto):
    store = tmp_path / "store.json"
    status_file = tmp_path / "status.json"
    with envoy_factory({"routes": ROUTES}) as good, envoy_factory({"routes": ROUTES}) as other:
        other.stop()
        # The same listeners, started with another sync secret: it refuses every push (401).
        bad = Envoy(other.config, workdir=other.dir, sync_secret="a-different-sync-secret-0123456789abcdef")
        bad.start()
        try:
            good_ep, bad_ep = f"127.0.0.1:{good.sync_port}", f"127.0.0.1:{bad.sync_port}"

            def refused_pushes():
                return ((read_status(status_file) or {}).get("endpoints", {}).get(bad_ep, {})
                        .get("metrics", {}).get("refused_pushes"))
            with sidecar_with_status(store, [f"http://{good_ep}", f"http://{bad_ep}"], tmp_path, status_file) as sync:
                k1 = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
                assert wait_until(lambda: status(good, k1["api_key"], proto) == 200, timeout=10)
                assert wait_until(lambda: (read_status(status_file) or {}).get("endpoints", {})
                                  .get(bad_ep, {}).get("state") == "refused", timeout=10)
                # The daemon asks each Envoy what it holds every reconcile
                # interval; 15 such questions to the refusing one are 15
                # chances to push it again, whatever the machine's speed.
                reconciled(bad, 15)
                st = read_status(status_file)
                assert st["healthy"] is False
                assert st["endpoints"][good_ep]["state"] == "in_sync"
                refused = st["endpoints"][bad_ep]["metrics"]["refused_pushes"]
                assert 1 <= refused <= 2, f"a refused push is not retried in a loop: {st}"
                # A store change is pushed to the good Envoy at once and tried once on the bad one.
                k2 = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")
                assert wait_until(lambda: status(good, k2["api_key"], proto) == 200, timeout=30)
                assert wait_until(lambda: refused_pushes() == refused + 1, timeout=30), read_status(status_file)
                reconciled(bad, 5)
                assert refused_pushes() == refused + 1, read_status(status_file)
                assert status(bad, k2["api_key"], proto) == 401
                log = sync.log()
            assert 1 <= log.count("Envoy refused the push (401)") <= 2, log[-2000:]
            assert "not pushed again until the store or Envoy changes" in log
        finally:
            bad.stop()


# --- item 7: atomic sync ---------------------------------------------------------

def h(key):
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def gate(envoy_factory):
    with envoy_factory({"routes": ROUTES}) as envoy:
        r = push(envoy, {"mode": "full", "generation": 1, "version": 1, "batch": 0, "last": True,
                         "upserts": [cred("a", "key-a", scopes=["read"]), cred("b", "key-b", scopes=["read"])]})
        assert r.status == 200, r
        yield envoy


def test_a_multi_batch_incremental_push_switches_all_at_once_at_its_last_batch(gate, proto):
    def batch(n, last, **items):
        return {"mode": "incremental", "generation": 1, "base_version": 1, "version": 2, "batch": n, "last": last,
                **items}

    # Batch 0 adds c and gives b write access; batch 1 deletes a.
    r = push(gate, batch(0, False, upserts=[cred("c", "key-c", scopes=["read"]),
                                            cred("b", "key-b", scopes=["read", "write"])]))
    assert r.status == 200 and r.json()["pending"]["mode"] == "incremental"
    # Nothing of the push serves requests yet, on any worker.
    assert everywhere(gate, "key-c", proto) == {401}
    assert {status(gate, "key-b", proto, "POST") for _ in range(8)} == {403}
    assert everywhere(gate, "key-a", proto) == {200}
    # Another push cannot slip in between the batches.
    other = {"mode": "incremental", "generation": 1, "base_version": 1, "version": 3, "batch": 0, "last": True,
             "deletes": [h("key-b")]}
    assert push(gate, other).status == 409
    r = push(gate, batch(1, True, deletes=[h("key-a")]))
    assert r.status == 200 and "pending" not in r.json() and r.json()["version"] == 2
    assert everywhere(gate, "key-c", proto) == {200}
    assert {status(gate, "key-b", proto, "POST") for _ in range(8)} == {200}
    assert everywhere(gate, "key-a", proto) == {401}, "a deleted key answers nothing on any worker"


def test_a_half_delivered_full_push_changes_nothing_and_its_successor_drops_absent_keys(gate, proto):
    # A full push that stops after its first batch: a loses its scope, b is
    # left out, c is new.
    half = {"mode": "full", "generation": 2, "version": 5, "batch": 0, "last": False,
            "upserts": [cred("a", "key-a", scopes=["write"]), cred("c", "key-c", scopes=["read"])]}
    assert push(gate, half).status == 200
    assert everywhere(gate, "key-a", proto) == {200}, "a keeps its committed scopes"
    assert everywhere(gate, "key-b", proto) == {200}
    assert everywhere(gate, "key-c", proto) == {401}
    # The sidecar's next full push (a newer generation) supersedes it: only a.
    full = {"mode": "full", "generation": 3, "version": 6, "batch": 0, "last": False,
            "upserts": [cred("a", "key-a", scopes=["read"])]}
    assert push(gate, full).status == 200
    assert everywhere(gate, "key-b", proto) == {200}, "nothing disappears before the commit"
    assert push(gate, {**full, "batch": 1, "last": True, "upserts": []}).status == 200
    assert everywhere(gate, "key-a", proto) == {200}
    assert everywhere(gate, "key-b", proto) == {401}, "left out of the new set: gone"
    assert everywhere(gate, "key-c", proto) == {401}, "the abandoned push never serves"
    # A deleted key stays gone through later pushes.
    assert push(gate, {"mode": "incremental", "generation": 3, "base_version": 6, "version": 7, "last": True,
                       "deletes": [h("key-a")]}).status == 200
    assert push(gate, {"mode": "incremental", "generation": 3, "base_version": 7, "version": 8, "last": True,
                       "upserts": [cred("d", "key-d", scopes=["read"])]}).status == 200
    assert everywhere(gate, "key-a", proto) == {401}
    assert everywhere(gate, "key-d", proto) == {200}


def test_the_sidecar_pushes_a_large_change_as_one_atomic_multi_batch_push(envoy_factory, tmp_path, proto):
    store = tmp_path / "store.json"
    with envoy_factory({"routes": ROUTES}) as envoy:
        first = keygate(store, "key", "create", "--tenant", "first", "--scope", "read")
        with Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path) as sync:
            assert wait_until(lambda: status(envoy, first["api_key"], proto) == 200, timeout=10)
            # 2,500 keys at once (5 per tenant), more than one batch holds.
            snap = json.loads(store.read_text())
            for i in range(2500):
                rec = cred(f"bulk-{i}", f"bulk-key-{i}", tenant=f"bulk{i // 5}", scopes=["read"])
                snap["keys"].append({"created_at": 1, "updated_at": 1, "record": rec})
            snap["version"] += 1
            rewrite_store(store, snap)
            assert wait_until(lambda: status(envoy, "bulk-key-2499", proto) == 200, timeout=15)
            assert status(envoy, "bulk-key-0", proto) == 200
            log = sync.log()
        m = re.search(r"pushed 2500 upserts, 0 deletes, 0 session revocations in (\d+) batches", log)
        assert m and int(m.group(1)) >= 3, log[-2000:]
        assert "doing a full push" not in log


# --- item 6: TLS to the PostgreSQL store ------------------------------------------

def make_ca_and_server_cert(directory):
    """With `openssl`: a CA, a server certificate it signs for DNS name
    `localhost` only, and an unrelated CA; PEM files in `directory`."""
    import subprocess

    def run(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60, cwd=directory)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", f"/CN=keygate test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr")
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "server.ext", "-out", "server.crt")
    return directory / "ca.pem", directory / "other-ca.pem"


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory):
    import os
    import shutil

    from tests.harness import Postgres, pg_bindir

    if pg_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server not installed: .ci/run installs it, so CI must run these tests")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql); CI runs these tests")
    certs = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca_and_server_cert(certs)
    pg = Postgres(tmp_path_factory.mktemp("pg-tls")).init()
    try:
        for f in ("server.crt", "server.key"):
            shutil.copyfile(certs / f, pg.dir / f)
            (pg.dir / f).chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(pg.dir / f, "postgres")
        with open(pg.dir / "postgresql.conf", "a") as conf:
            conf.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        # Only TLS connections get in: a plain one is rejected by the server.
        (pg.dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostssl all all ::1/128 trust\n"
            "hostnossl all all all reject\n")
        pg.start().create_db()
        yield pg, ca, other_ca
    finally:
        pg.remove()


def tls_url(pg, host="localhost", **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgres://postgres@{host}:{pg.port}/keygate?{query}"


def test_the_postgres_store_speaks_tls_and_verifies_the_server_as_asked(tls_postgres, envoy_factory, tmp_path, proto):
    pg, ca, other_ca = tls_postgres
    migrated = keygate(tls_url(pg, sslmode="require"), "store", "migrate", json_out=False, check=False)
    assert migrated.returncode == 0, migrated.stderr
    keygate(tls_url(pg, sslmode="require"), "store", "init", "--if-missing", json_out=False)
    # verify-full with the right CA and the certificate's name: in.
    full = tls_url(pg, sslmode="verify-full", sslrootcert=ca)
    k = keygate(full, "key", "create", "--tenant", f"tls-{proto}", "--scope", "read")
    # verify-ca checks the chain only, so the IP address is fine.
    assert keygate(tls_url(pg, host="127.0.0.1", sslmode="verify-ca", sslrootcert=ca), "key", "list",
                   json_out=False, check=False).returncode == 0
    refused = {
        "wrong CA": tls_url(pg, sslmode="verify-full", sslrootcert=other_ca),
        "name mismatch": tls_url(pg, host="127.0.0.1", sslmode="verify-full", sslrootcert=ca),
        "plain": tls_url(pg, host="127.0.0.1", sslmode="disable"),
    }
    for why, url in refused.items():
        r = keygate(url, "key", "list", json_out=False, check=False)
        assert r.returncode != 0, why
        assert "postgres@" not in r.stderr, "the URL is never echoed"
        if why == "wrong CA":
            assert "UnknownIssuer" in r.stderr or "certificate" in r.stderr, r.stderr
        if why == "name mismatch":
            assert "NotValidForName" in r.stderr or "name" in r.stderr, r.stderr
    # The sidecar reads the store over verify-full TLS and Envoy enforces the key.
    with envoy_factory({"routes": ROUTES}) as envoy:
        with Sidecar(full, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path):
            assert wait_until(lambda: status(envoy, k["api_key"], proto) == 200, timeout=15)
        assert status(envoy, "not-a-key", proto) == 401
