"""End-to-end: the sync listener refuses anything it cannot trust, and a bad
push leaves the credentials in force untouched. Pushes are built and signed
here, as the sidecar would."""

import hashlib
import hmac
import json

import pytest

from tests.harness import ROUTES, SYNC_SECRET, cred, request

STATE = "/keygate/sync/v1/state"
PUSH = "/keygate/sync/v1/push"


def sign(body, secret=SYNC_SECRET):
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def push(envoy, payload, *, secret=SYNC_SECRET, raw=None, signature=None):
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = [("content-type", "application/json"), ("x-keygate-signature", signature or sign(body, secret))]
    return request(envoy.sync_port, "POST", PUSH, headers, body)


def state(envoy):
    r = request(envoy.sync_port, "GET", STATE)
    assert r.status == 200
    return r.json()


def full(generation, version, upserts, batch=0, last=True):
    return {"mode": "full", "generation": generation, "version": version, "batch": batch, "last": last,
            "upserts": upserts}


def incr(generation, base, version, upserts=(), deletes=()):
    return {"mode": "incremental", "generation": generation, "base_version": base, "version": version,
            "last": True, "upserts": list(upserts), "deletes": list(deletes)}


def status_of(envoy, key):
    return request(envoy.port, "GET", "/v1/items", [("x-api-key", key)]).status


@pytest.fixture
def envoy(envoy_factory):
    with envoy_factory({"routes": ROUTES}) as e:
        yield e


def test_fresh_envoy_holds_nothing(envoy):
    assert state(envoy) == {"generation": 0, "version": 0, "stamp": 0}
    assert status_of(envoy, "k1") == 401


def test_pushed_credential_is_enforced_by_every_worker(envoy):
    r = push(envoy, full(1, 5, [cred("k1", "key-1", scopes=["read"])]))
    assert r.status == 200, r
    assert r.json() == {"generation": 1, "version": 5, "stamp": 1}
    assert state(envoy) == {"generation": 1, "version": 5, "stamp": 1}
    assert all(status_of(envoy, "key-1") == 200 for _ in range(8))


def test_forged_malformed_replayed_and_oversized_pushes_are_refused(envoy):
    assert push(envoy, full(1, 1, [cred("k1", "key-1", scopes=["read"])])).status == 200
    update = incr(1, 1, 2, [cred("k1", "key-1", scopes=["read"], status="inactive")])
    refused = {
        "forged": push(envoy, update, secret="another-secret-that-is-long-enough-000"),
        "unsigned": push(envoy, update, signature="v1=00"),
        "malformed": push(envoy, None, raw=b'{"mode": "incremental", '),
        "stale": push(envoy, incr(1, 0, 2, update["upserts"])),
        "old-generation": push(envoy, full(1, 9, [])),
        "bad-record": push(envoy, incr(1, 1, 2, [cred("k2", "key-2", scopes=["read"]),
                                                 cred("k3", "key-3", allowed_ips=["not-an-ip"])])),
        "oversized": push(envoy, None, raw=b" " * (800 * 1024)),
    }
    assert {k: r.status for k, r in refused.items()} == {
        "forged": 401, "unsigned": 401, "malformed": 400, "stale": 409, "old-generation": 409,
        "bad-record": 400, "oversized": 413,
    }
    assert "upserts[1].allowed_ips[0]" in refused["bad-record"].json()["message"]
    # The project's error shape: a code and a message.
    assert {k: r.json()["error"] for k, r in refused.items()} == {
        "forged": "invalid_signature", "unsigned": "invalid_signature", "malformed": "invalid_request",
        "stale": "conflict", "old-generation": "conflict", "bad-record": "invalid_request",
        "oversized": "payload_too_large",
    }
    assert state(envoy) == {"generation": 1, "version": 1, "stamp": 1}
    assert status_of(envoy, "key-1") == 200  # still the last good set
    assert status_of(envoy, "key-2") == 401  # nothing of the bad batch applied


def test_replaying_an_applied_push_is_refused(envoy):
    assert push(envoy, full(1, 1, [cred("k1", "key-1", scopes=["read"])])).status == 200
    revoke = json.dumps(incr(1, 1, 2, deletes=[hashlib.sha256(b"key-1").hexdigest()])).encode()
    assert push(envoy, None, raw=revoke).status == 200
    assert status_of(envoy, "key-1") == 401
    readd = json.dumps(incr(1, 2, 3, [cred("k1", "key-1", scopes=["read"])])).encode()
    assert push(envoy, None, raw=readd).status == 200
    assert push(envoy, None, raw=revoke).status == 409  # the old revoke cannot be replayed
    assert status_of(envoy, "key-1") == 200


def test_full_push_in_batches_keeps_old_keys_until_commit_then_drops_absent_ones(envoy):
    assert push(envoy, full(1, 1, [cred("old", "old-key", scopes=["read"]),
                                   cred("kept", "kept-key", scopes=["read"])])).status == 200
    assert push(envoy, full(2, 2, [cred("kept", "kept-key", scopes=["read"])], batch=0, last=False)).status == 200
    assert state(envoy)["pending"] == {"mode": "full", "generation": 2, "next_batch": 1, "stamp": 2,
                                       "base_version": 0, "version": 2}
    assert status_of(envoy, "old-key") == 200  # during the full push nothing disappears
    assert push(envoy, full(2, 2, [cred("new", "new-key", scopes=["read"])], batch=2, last=True)).status == 409
    assert push(envoy, full(2, 2, [cred("new", "new-key", scopes=["read"])], batch=1, last=True)).status == 200
    assert state(envoy) == {"generation": 2, "version": 2, "stamp": 2}
    assert [status_of(envoy, k) for k in ("old-key", "kept-key", "new-key")] == [401, 200, 200]


# The binary push body (README "Sync protocol"), written here from its
# description: "KGP", the format version, then postcard (varints, strings
# as length + bytes, options as 0/1 + value, every field in order).
def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode()
    return _varint(len(b)) + b


def _seq(items, enc):
    return _varint(len(items)) + b"".join(enc(i) for i in items)


def _opt(v, enc):
    return b"\x00" if v is None else b"\x01" + enc(v)


def _record(r):
    digest = lambda h: bytes.fromhex(h)  # noqa: E731
    rl = r.get("rate_limit")
    return b"".join([
        _str(r["key_id"]), digest(r["key_hash"]), _opt(r.get("secret_hash"), digest),
        b"\x00", b"\x00",  # previous secret hash, its deadline
        _varint({"default": 0, "scoped": 1}[r.get("kind", "scoped")]), _str(r["tenant"]),
        _str(r.get("environment", "live")), _seq(r.get("scopes", []), _str), _seq(r.get("allowed_ips", []), _str),
        _opt(rl, lambda v: _varint(v["requests"]) + _varint(v["window_secs"])),
        _varint({"active": 0, "inactive": 1}[r.get("status", "active")]),
        b"\x00", b"\x00", b"\x00", b"\x00",  # expires_at, owner, previous key hash, its deadline
        b"\x00", b"\x00", b"\x00", b"\x00", b"\x00", b"\x00",  # metadata, limits, plan, tenant_limits, quota_used, credits
    ])


def binary(p, version=1):
    head = b"".join([
        _varint({"incremental": 0, "full": 1}[p["mode"]]), _varint(p["generation"]), _varint(p.get("base_version", 0)),
        _varint(p["version"]), _varint(p.get("batch", 0)), b"\x01" if p.get("last") else b"\x00",
        b"\x00", b"\x00",  # store_id, takeover
        _seq(p.get("deletes", []), bytes.fromhex), b"\x00", b"\x00",  # deletes, revoked sessions, limit records
    ])
    upserts = p.get("upserts", [])
    return b"KGP" + bytes([version]) + head + _varint(len(upserts)) + b"".join(_record(r) for r in upserts)


def test_a_binary_push_applies_like_its_json_and_bad_ones_change_nothing(envoy):
    r = request(envoy.sync_port, "GET", STATE)
    assert r.header("x-keygate-push-format") == "1"  # the sidecar sends binary only when told so
    one = cred("k1", "key-1", scopes=["read"], allowed_ips=["127.0.0.0/8"],
               rate_limit={"requests": 100, "window_secs": 60})
    body = binary(full(1, 1, [one, cred("k2", "key-2", secret="s2", kind="default", status="inactive")]))
    assert len(body) < len(json.dumps(full(1, 1, [one])).encode())
    r = push(envoy, None, raw=body)
    assert r.status == 200, r.body
    assert r.json() == {"generation": 1, "version": 1, "stamp": 1}
    assert status_of(envoy, "key-1") == 200
    assert status_of(envoy, "key-2") == 401  # inactive
    update = binary(incr(1, 1, 2, [cred("k3", "key-3", scopes=["read"])],
                         deletes=[hashlib.sha256(b"key-1").hexdigest()]))
    bad_ip = binary(incr(1, 1, 2, [cred("k3", "key-3", allowed_ips=["not-an-ip"])]))
    refused = {
        "forged": push(envoy, None, raw=update, signature=sign(update, "another-secret-that-is-long-enough-000")),
        "changed-after-signing": push(envoy, None, raw=update[:-1] + b"x", signature=sign(update)),
        "truncated": push(envoy, None, raw=update[:-5]),
        "trailing": push(envoy, None, raw=update + b"\x00"),
        "unknown-version": push(envoy, None, raw=b"KGP\x02" + update[4:]),
        "bad-record": push(envoy, None, raw=bad_ip),
    }
    assert {k: r.status for k, r in refused.items()} == {
        "forged": 401, "changed-after-signing": 401, "truncated": 400, "trailing": 400,
        "unknown-version": 400, "bad-record": 400,
    }
    assert "format 2" in refused["unknown-version"].json()["message"]
    assert "upserts[0].allowed_ips[0]" in refused["bad-record"].json()["message"]
    assert state(envoy) == {"generation": 1, "version": 1, "stamp": 1}
    assert status_of(envoy, "key-1") == 200  # nothing of the refused pushes applied
    assert push(envoy, None, raw=update).status == 200
    assert [status_of(envoy, k) for k in ("key-1", "key-3")] == [401, 200]


def test_unknown_paths_and_methods_on_the_sync_listener_get_404(envoy):
    for method, path in (("GET", "/v1/items"), ("DELETE", STATE)):
        r = request(envoy.sync_port, method, path)
        assert r.status == 404
        assert r.json() == {"error": "not_found", "message": "not found"}
        assert r.header("content-type") == "application/json"


def test_a_push_ending_with_trailers_is_decided_like_one_without(envoy):
    good = json.dumps(full(1, 1, [cred("k1", "key-1", scopes=["read"])])).encode()

    def h2_push(body, signature, trailers):
        headers = [("content-type", "application/json"), ("x-keygate-signature", signature)]
        return request(envoy.sync_port, "POST", PUSH, headers, body, proto="h2", trailers=trailers)

    forged = [h2_push(good, "v1=" + "00" * 32, t) for t in (None, [("x-t", "1")])]
    assert [r.status for r in forged] == [401, 401]
    assert forged[0].json() == forged[1].json() == {"error": "invalid_signature",
                                                    "message": "bad or missing signature"}
    assert state(envoy)["version"] == 0
    applied = h2_push(good, sign(good), [("x-t", "1")])
    assert applied.status == 200, applied.body
    assert applied.json() == {"generation": 1, "version": 1, "stamp": 1}
    assert status_of(envoy, "key-1") == 200


def test_sync_listener_refuses_to_load_without_a_secret(envoy_factory):
    from tests.harness import Envoy

    with envoy_factory({"routes": ROUTES}, wait=False) as e:
        e.stop()
    e2 = Envoy(e.config, workdir=e.dir / "nosecret", sync_secret="")
    e2.dir.mkdir(exist_ok=True)
    try:
        e2.start(wait=False)
        assert e2.wait_exit(60) not in (None, 0)
        assert "sync_secret: the sync role needs a secret" in e2.log()
    finally:
        e2.stop()


def with_limits(p, *limits):
    return {**p, "limit_records": [{"kind": kind, "name": name, "limits": list(ls)} for kind, name, ls in limits]}


def statuses(envoy, key, n=3):
    return [status_of(envoy, key) for _ in range(n)]


def test_a_plan_change_is_served_only_once_its_push_commits(envoy):
    key = [cred("k1", "key-1", scopes=["read"], plan="free")]
    assert push(envoy, with_limits(full(1, 1, key), ("plan", "free", ["100/min"]))).status == 200
    # Batch 0 of 2 tightens the plan to 1/min; its batch 1 is not sent yet.
    r = push(envoy, with_limits(full(2, 2, key, batch=0, last=False), ("plan", "free", ["1/min"])))
    assert r.status == 200, r.body
    assert state(envoy)["pending"]["next_batch"] == 1
    assert statuses(envoy, "key-1") == [200, 200, 200]
    # A last batch Envoy refuses changes nothing either.
    bad = full(2, 2, [cred("k2", "key-2", allowed_ips=["not-an-ip"])], batch=1, last=True)
    assert push(envoy, bad).status == 400
    assert statuses(envoy, "key-1") == [200, 200, 200]
    assert state(envoy)["version"] == 1
    # The good last batch commits the plan with the key.
    assert push(envoy, full(2, 2, [], batch=1, last=True)).status == 200
    assert state(envoy)["version"] == 2
    assert statuses(envoy, "key-1")[-1] == 429


def test_an_abandoned_push_emptying_a_plan_and_a_tenant_limit_leaves_their_keys_limited(envoy):
    keys = [cred("k1", "key-1", scopes=["read"], plan="free"),
            cred("k2", "key-2", tenant="globex", scopes=["read"], tenant_limits=True)]
    limited = [("plan", "free", ["1/min"]), ("tenant", "globex", ["1/min"])]
    emptied = [("plan", "free", []), ("tenant", "globex", [])]
    assert push(envoy, with_limits(full(1, 1, keys), *limited)).status == 200
    assert [statuses(envoy, k, 2) for k in ("key-1", "key-2")] == [[200, 429], [200, 429]]
    # An incremental push emptying both is never finished: both stay as committed.
    half = {**incr(1, 1, 2), "last": False}
    assert push(envoy, with_limits(half, *emptied)).status == 200
    assert state(envoy)["pending"]["version"] == 2
    assert [statuses(envoy, k) for k in ("key-1", "key-2")] == [[429] * 3, [429] * 3]
    # A full push (what the sidecar sends after a conflict) empties them for real.
    assert push(envoy, with_limits(full(2, 3, keys), *emptied)).status == 200
    assert [statuses(envoy, k) for k in ("key-1", "key-2")] == [[200] * 3, [200] * 3]
