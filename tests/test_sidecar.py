"""End-to-end: the keygate CLI and sync daemon against a real Envoy. Every
change made with the CLI reaches the running Envoy without a restart."""

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from tests.harness import KEYGATE, ROUTES, SYNC_SECRET, keygate, request, Sidecar, wait_until
from tests.test_rate_limit import worker_connections

CONFIG = {"routes": ROUTES, "rate_limit": {"requests": 1000, "window_secs": 60}}


@pytest.fixture
def rig(envoy_factory, tmp_path):
    """Envoy + `keygate sync` + an empty store."""
    store = tmp_path / "store.json"
    with envoy_factory(CONFIG) as envoy:
        with Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=tmp_path) as sidecar:
            yield envoy, store, sidecar
            # The store's path may contain the test's name; nothing else may say "secret".
            log = sidecar.log().lower().replace(str(store).lower(), "").replace("sync secret", "")
            assert "secret" not in log


def status(envoy, headers, method="GET", path="/v1/items"):
    return request(envoy.port, method, path, headers).status


def key_header(key):
    return [("x-api-key", key)]


def basic(key, secret):
    return [("authorization", "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode())]


def becomes(envoy, headers, expected, method="GET", timeout=10):
    got = wait_until(lambda: status(envoy, headers, method) == expected, timeout=timeout)
    assert got, f"expected {expected}, still {status(envoy, headers, method)}"


def create(store, *args):
    return keygate(store, "key", "create", *args)


def test_created_key_works_without_restarting_envoy(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    becomes(envoy, key_header(k["api_key"]), 200)
    r = request(envoy.port, "GET", "/v1/items", key_header(k["api_key"]))
    up = dict(r.upstream_headers())
    assert (up["x-keygate-key-id"], up["x-keygate-tenant"]) == (k["key_id"], "acme")
    assert status(envoy, key_header(k["api_key"]), method="POST") == 403


def test_revoke_deactivate_activate_take_effect_live(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    keygate(store, "key", "deactivate", k["key_id"])
    becomes(envoy, h, 403)
    keygate(store, "key", "activate", k["key_id"])
    becomes(envoy, h, 200)
    keygate(store, "key", "revoke", k["key_id"])
    becomes(envoy, h, 401)


def test_rotate_secret_refuses_the_old_one_or_keeps_it_for_the_grace_period(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read", "--with-secret")
    assert k["authorization_basic"] == basic(k["api_key"], k["secret"])[0][1]
    becomes(envoy, basic(k["api_key"], k["secret"]), 200)
    graced = keygate(store, "key", "rotate-secret", k["key_id"], "--grace", "10m")
    becomes(envoy, basic(k["api_key"], graced["secret"]), 200)
    assert status(envoy, basic(k["api_key"], k["secret"])) == 200  # old one still within grace
    fresh = keygate(store, "key", "rotate-secret", k["key_id"])
    becomes(envoy, basic(k["api_key"], fresh["secret"]), 200)
    assert status(envoy, basic(k["api_key"], graced["secret"])) == 401
    assert status(envoy, basic(k["api_key"], k["secret"])) == 401


def test_allowlist_and_scope_changes_take_effect_live(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    keygate(store, "key", "allow-ip", "add", k["key_id"], "10.0.0.0/8")
    becomes(envoy, h, 403)
    keygate(store, "key", "allow-ip", "add", k["key_id"], "127.0.0.0/8")
    becomes(envoy, h, 200)
    assert status(envoy, h, method="POST") == 403
    keygate(store, "key", "scope", "set", k["key_id"], "write")
    becomes(envoy, h, 200, method="POST")


def test_per_key_rate_limit_from_the_cli(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read", "--rate", "3/min")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    assert [status(envoy, h) for _ in range(3)] == [200, 200, 429]


def test_synced_key_first_use_on_two_workers_admits_exactly_the_limit(rig):
    """A synced key's counter lives in its credential entry, so its first use
    on two workers at once is still counted exactly (no counter entry that
    Envoy would create without a CAS check)."""
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read", "--rate", "20/min")
    h = key_header(k["api_key"])
    # POST is refused by scope before the budget is touched: the key is
    # known to Envoy, its counter still unused.
    becomes(envoy, h, 403, method="POST")
    statuses, lock, start = [], threading.Lock(), threading.Barrier(6)

    def client():
        start.wait(10)
        for _ in range(10):
            s = status(envoy, h)
            with lock:
                statuses.append(s)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (len(statuses), statuses.count(200), statuses.count(429)) == (60, 20, 40), sorted(statuses)
    per_worker = worker_connections(envoy)
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker


def test_a_synced_key_keeps_its_spent_budget_across_updates(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read", "--rate", "3/min")
    h = key_header(k["api_key"])
    becomes(envoy, h, 403, method="POST")
    assert [status(envoy, h) for _ in range(2)] == [200, 200]
    keygate(store, "key", "scope", "set", k["key_id"], "read", "write")
    becomes(envoy, h, 200, method="POST")  # the update is live: spends the third
    assert [status(envoy, h) for _ in range(2)] == [429, 429]


def test_envoy_restart_is_resynced(rig, envoy_factory):
    envoy, store, sidecar = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    envoy.stop()
    envoy.start()  # same ports, empty shared data
    becomes(envoy, h, 200)
    assert "full push" in sidecar.log()
    # This release's filter reads binary pushes; the sidecar uses them for both kinds.
    assert "batches (binary)" in sidecar.log()
    assert "batches (JSON)" not in sidecar.log()


def test_envoy_keeps_the_last_good_set_while_the_sidecar_is_down(rig):
    envoy, store, sidecar = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    sidecar.stop()
    keygate(store, "key", "revoke", k["key_id"])
    assert all(status(envoy, h) == 200 for _ in range(5))  # nobody pushed the revoke
    sidecar.start()
    becomes(envoy, h, 401)  # the restarted sidecar reconciles


def test_corrupt_store_is_refused_and_envoy_keeps_serving(rig):
    envoy, store, sidecar = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    h = key_header(k["api_key"])
    becomes(envoy, h, 200)
    good = store.read_bytes()
    store.write_bytes(good[: len(good) // 2])
    proc = keygate(store, "key", "list", check=False)
    assert proc.returncode != 0 and "corrupt" in proc.stderr
    assert wait_until(lambda: "cannot use the store" in sidecar.log(), timeout=5)
    assert all(status(envoy, h) == 200 for _ in range(5))
    store.write_bytes(good)


def test_tenant_limits_and_bad_arguments_change_nothing(rig):
    _, store, _ = rig
    create(store, "--tenant", "acme", "--kind", "default")
    for _ in range(5):
        create(store, "--tenant", "acme", "--scope", "read")
    before = json.loads(store.read_text())
    failures = [
        keygate(store, "key", "create", "--tenant", "acme", "--kind", "default", check=False),
        keygate(store, "key", "create", "--tenant", "acme", "--scope", "read", check=False),
        keygate(store, "key", "create", "--tenant", "beta", "--scope", "read", "--allow-ip", "10.0.0/8", check=False),
        keygate(store, "key", "create", "--tenant", "beta", "--scope", "read", "--rate", "often", check=False),
        keygate(store, "key", "create", "--tenant", "beta", "--scope", "read", "--expires", "2001-01-01T00:00:00Z",
                check=False),
        keygate(store, "key", "revoke", "no-such-key", check=False),
    ]
    assert [p.returncode for p in failures] == [1, 1, 1, 2, 1, 1], [p.stderr for p in failures]
    errors = [json.loads(p.stderr) for p in failures]
    assert [e["error"] for e in errors] == ["tenant_limit", "tenant_limit", "bad_input", "usage", "bad_input",
                                            "no_such_key"], errors
    # A refusal says what was refused and what to do about it.
    assert errors[0]["message"].startswith("refused: tenant 'acme' already has 1 default")
    assert "5 scoped" in errors[1]["message"] and "keygate key revoke" in errors[1]["message"]
    assert json.loads(store.read_text()) == before


def test_keys_and_secrets_are_shown_once_and_never_stored(rig, tmp_path):
    _, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read", "--with-secret")
    stored = store.read_text()
    listed = keygate(store, "key", "list", json_out=False).stdout + json.dumps(keygate(store, "key", "list"))
    shown = json.dumps(keygate(store, "key", "show", k["key_id"]))
    for secret in (k["api_key"], k["secret"]):
        assert secret not in stored and secret not in listed and secret not in shown
    assert k["key_id"] in listed
    human = keygate(store, "key", "create", "--tenant", "zeta", "--scope", "read", json_out=False).stdout
    assert "API key:" in human and "cannot show it again" in human


def test_sync_daemon_refuses_a_short_secret(tmp_path):
    proc_env = {**os.environ, "KEYGATE_SYNC_SECRET": "short"}
    import subprocess

    from tests.harness import KEYGATE

    p = subprocess.run([str(KEYGATE), "--store", str(tmp_path / "s.json"), "sync", "--once", "--endpoint",
                        "http://127.0.0.1:1"], env=proc_env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "at least 32" in p.stderr
    assert SYNC_SECRET not in p.stderr


def test_envoy_keeps_its_store_and_only_takeover_replaces_it(rig, tmp_path):
    envoy, store_a, sidecar = rig
    a = create(store_a, "--tenant", "acme", "--scope", "read")
    becomes(envoy, key_header(a["api_key"]), 200)
    store_a_id = json.loads(store_a.read_text())["store_id"]
    state = request(envoy.sync_port, "GET", "/keygate/sync/v1/state").json()
    assert state["store_id"] == store_a_id
    sidecar.stop()

    # Another store (here: empty but for one key) must not silently replace A's set.
    store_b = tmp_path / "other.json"
    b = create(store_b, "--tenant", "globex", "--scope", "read")
    endpoint = f"http://127.0.0.1:{envoy.sync_port}"
    env = {**os.environ, "KEYGATE_SYNC_SECRET": SYNC_SECRET}
    refused = subprocess.run([str(KEYGATE), "--store", str(store_b), "sync", "--once", "--endpoint", endpoint],
                             capture_output=True, text=True, timeout=30, env=env)
    assert refused.returncode == 1
    assert store_a_id in refused.stderr and "--takeover" in refused.stderr, refused.stderr
    assert status(envoy, key_header(a["api_key"])) == 200
    assert status(envoy, key_header(b["api_key"])) == 401

    taken = subprocess.run([str(KEYGATE), "--store", str(store_b), "sync", "--once", "--takeover", "--endpoint",
                            endpoint], capture_output=True, text=True, timeout=30, env=env)
    assert taken.returncode == 0, taken.stderr
    assert status(envoy, key_header(a["api_key"])) == 401
    assert status(envoy, key_header(b["api_key"])) == 200
    assert request(envoy.sync_port, "GET", "/keygate/sync/v1/state").json()["store_id"] == \
        json.loads(store_b.read_text())["store_id"]


def test_the_filter_itself_refuses_a_full_push_from_another_store(rig):
    envoy, store, _ = rig
    k = create(store, "--tenant", "acme", "--scope", "read")
    becomes(envoy, key_header(k["api_key"]), 200)
    held = request(envoy.sync_port, "GET", "/keygate/sync/v1/state").json()
    other = "0123456789abcdef" if held["store_id"] != "0123456789abcdef" else "fedcba9876543210"
    payload = {"mode": "full", "generation": held["generation"] + 1, "version": 1, "batch": 0, "last": True,
               "upserts": [], "store_id": other}
    body = json.dumps(payload).encode()
    sig = "v1=" + hmac.new(SYNC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = [("content-type", "application/json"), ("x-keygate-signature", sig)]
    r = request(envoy.sync_port, "POST", "/keygate/sync/v1/push", headers, body)
    assert r.status == 409 and "takeover" in r.body.decode(), r
    assert status(envoy, key_header(k["api_key"])) == 200
    payload["takeover"] = True
    body = json.dumps(payload).encode()
    sig = "v1=" + hmac.new(SYNC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = [("content-type", "application/json"), ("x-keygate-signature", sig)]
    assert request(envoy.sync_port, "POST", "/keygate/sync/v1/push", headers, body).status == 200
    assert status(envoy, key_header(k["api_key"])) == 401


class HungEndpoint:
    """A sync endpoint that accepts connections and never answers. Tells,
    for each connection, whether the client has given up on it yet (closed
    it: the sidecar does after its request timeout)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.closed = []  # one Event per accepted connection, set once the client closes it
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            closed = threading.Event()
            with self.lock:
                self.closed.append(closed)
            t = threading.Thread(target=self._hold, args=(conn, closed), daemon=True)
            self.threads.append(t)
            t.start()

    def _hold(self, conn, closed):
        conn.settimeout(0.2)
        with conn:
            while not self.stop.is_set():
                try:
                    if not conn.recv(65536):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
        closed.set()

    def next_connection(self, timeout=30):
        """The next connection the sidecar opens from now on (its Event)."""
        with self.lock:
            n = len(self.closed)
        assert wait_until(lambda: len(self.closed) > n, timeout=timeout), \
            f"the sidecar opened no connection to the hung endpoint in {timeout} s"
        with self.lock:
            return self.closed[n]

    def close(self):
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)


def test_a_hung_endpoint_does_not_delay_the_others(envoy_factory, tmp_path):
    """One endpoint accepts connections and never answers: the live Envoy
    gets each change while the sidecar is still waiting on the hung one
    (each endpoint has its own thread). A serial sync would deliver it only
    after giving up on the hung endpoint (its 5 s request timeout)."""
    hung = HungEndpoint()
    store = tmp_path / "store.json"
    try:
        with envoy_factory(CONFIG) as envoy:
            endpoints = [f"http://127.0.0.1:{hung.port}", f"http://127.0.0.1:{envoy.sync_port}"]
            with Sidecar(store, endpoints, workdir=tmp_path):
                for change in ("create", "revoke"):
                    # Made just after the sidecar starts waiting on the hung endpoint.
                    waiting = hung.next_connection()
                    if change == "create":
                        k = create(store, "--tenant", "acme", "--scope", "read")
                        becomes(envoy, key_header(k["api_key"]), 200, timeout=30)
                    else:
                        keygate(store, "key", "revoke", k["key_id"])
                        becomes(envoy, key_header(k["api_key"]), 401, timeout=30)
                    assert not waiting.is_set(), \
                        f"the {change} reached the live Envoy only after the sidecar gave up on the hung endpoint"
                    # ... which it does in the end: the check above can tell the two apart.
                    assert wait_until(waiting.is_set, timeout=30), "the sidecar never gave up on the hung endpoint"
    finally:
        hung.close()
