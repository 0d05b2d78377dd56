"""End-to-end: per-key rate limits shared by every Envoy worker."""

import re
import threading
import time

import pytest

from tests.harness import ROUTES, cred, request

CONFIG = {
    "routes": ROUTES,
    "rate_limit": {"requests": 1000, "window_secs": 60},
    "credentials": [
        cred("rl-burst", "burst-key", scopes=["read"], rate_limit={"requests": 20, "window_secs": 60}),
        cred("rl-seq", "seq-key", scopes=["read"], rate_limit={"requests": 5, "window_secs": 60}),
        cred("rl-a", "a-key", tenant="t2", scopes=["read"], rate_limit={"requests": 2, "window_secs": 60}),
        cred("rl-b", "b-key", tenant="t2", scopes=["read"], rate_limit={"requests": 2, "window_secs": 60}),
        cred("rl-default", "default-limit-key", tenant="t3", scopes=["read"]),
        cred("rl-scope", "scope-key", tenant="t3", scopes=["read"], rate_limit={"requests": 1, "window_secs": 60}),
    ],
}


@pytest.fixture(scope="module")
def gate(envoy_factory):
    with envoy_factory(CONFIG, concurrency=2) as envoy:
        yield envoy


def get(gate, key, method="GET"):
    return request(gate.port, method, "/v1/items", [("x-api-key", key)])


def worker_connections(envoy):
    """Connections each worker accepted on the gate listener."""
    prefix = f"listener.127.0.0.1_{envoy.port}."
    stats = envoy.admin(f"/stats?filter={prefix}worker_")
    return [int(v) for v in re.findall(re.escape(prefix) + r"worker_\d+\.downstream_cx_total: (\d+)", stats)]


def test_concurrent_clients_on_two_workers_get_exactly_the_limit(gate, echo):
    before = echo.hits["rl-burst"]
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def client():
        start.wait(10)
        for _ in range(10):
            status = get(gate, "burst-key").status
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 60
    assert statuses.count(200) == 20, sorted(statuses)
    assert statuses.count(429) == 40
    assert echo.hits["rl-burst"] - before == 20, "refused requests must not reach the upstream"
    per_worker = worker_connections(gate)
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker


def test_headers_count_down_and_429_says_when_to_retry(gate):
    now = time.time()
    remaining = []
    for _ in range(5):
        r = get(gate, "seq-key")
        assert r.status == 200
        assert r.header("x-ratelimit-limit") == "5"
        assert now <= int(r.header("x-ratelimit-reset")) <= now + 62
        assert r.header("ratelimit-policy") == '"default";q=5;w=60'
        remaining.append(int(r.header("x-ratelimit-remaining")))
        assert r.header("ratelimit") .startswith(f'"default";r={remaining[-1]};t=')
    assert remaining == [4, 3, 2, 1, 0]
    r = get(gate, "seq-key")
    assert r.status == 429
    retry = int(r.header("retry-after"))
    assert 1 <= retry <= 12  # one request every 60/5 s comes back
    assert r.json() == {
        "error": "rate_limit_exceeded",
        "message": f"Rate limit exceeded. Try again in {retry} second{'' if retry == 1 else 's'}.",
    }
    assert r.header("x-ratelimit-remaining") == "0"
    assert r.header("content-type") == "application/json"


def test_separate_keys_have_separate_budgets(gate):
    assert [get(gate, "a-key").status for _ in range(3)] == [200, 200, 429]
    assert [get(gate, "b-key").status for _ in range(3)] == [200, 200, 429]


def test_per_credential_limit_beats_the_plugin_default(gate):
    assert get(gate, "default-limit-key").header("x-ratelimit-limit") == "1000"
    assert get(gate, "a-key").header("x-ratelimit-limit") == "2"


def test_refusals_before_the_limit_do_not_spend_budget(gate):
    for _ in range(3):
        assert get(gate, "scope-key", method="POST").status == 403
    assert get(gate, "scope-key").status == 200


def test_header_styles_are_switchable(envoy_factory):
    config = {**CONFIG, "rate_limit_headers": {"x_ratelimit": False, "ietf": True}}
    with envoy_factory(config, concurrency=1) as envoy:
        r = get(envoy, "seq-key")
        assert r.status == 200
        assert r.header("x-ratelimit-limit") is None
        assert r.header("ratelimit-policy") == '"default";q=5;w=60'


def test_keys_without_any_limit_get_no_rate_headers(envoy_factory):
    config = {"unmatched": "any_key", "credentials": [cred("free", "free-key")]}
    with envoy_factory(config, concurrency=1) as envoy:
        r = get(envoy, "free-key")
        assert r.status == 200 and r.header("x-ratelimit-limit") is None and r.header("ratelimit") is None
