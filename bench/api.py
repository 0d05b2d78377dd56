#!/usr/bin/env python3
"""Management API throughput: `keygate serve` on a new SQLite store, N
client threads on keep-alive connections. Part of `make bench`.

create-key: POST /api/v1/tenants/t<i>/keys, one tenant per client thread and
five keys per tenant (the scoped limit), so each create is a real insert.
list-keys:  GET /api/v1/tenants/t0/keys (a page of five keys) with a tenant
token, which includes the token check on every request."""

import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import keygate
from tests.test_api import Server

THREADS = int(os.environ.get("BENCH_API_THREADS", "4"))
SECONDS = float(os.environ.get("BENCH_API_SECONDS", "5"))


def run(port, threads, work):
    """Runs `work(conn, i, n)` in `threads` threads for SECONDS; (count, latencies)."""
    stop = time.monotonic() + SECONDS
    lat, lock = [], threading.Lock()

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, n = [], 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            if not work(conn, i, n):
                break
            mine.append(time.perf_counter() - t0)
            n += 1
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(lat), time.monotonic() - t0, lat


def request(conn, method, path, token, body=None):
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    r.read()
    return r.status


def report(name, count, took, lat):
    if not lat:
        print(f"{name}: no requests")
        return
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"{name:<11} {count / took:8.0f} req/s   p50 {statistics.median(lat) * 1000:6.2f} ms   "
          f"p99 {p99 * 1000:6.2f} ms   ({count} requests, {THREADS} threads, {took:.1f} s)")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "bench.db")
        keygate(store, "store", "init")
        op = keygate(store, "token", "create", "--operator")["token"]
        tenant = keygate(store, "token", "create", "--tenant", "t0")["token"]
        with Server(store, tmp, "--auth-failures", "1000000/min") as srv:
            tenants = iter(range(10**9))
            lock = threading.Lock()
            current = {}

            def create(conn, i, n):
                # Five scoped keys per tenant, then the next tenant.
                with lock:
                    if n % 5 == 0:
                        current[i] = f"t{next(tenants)}"
                t = current[i]
                return request(conn, "POST", f"/api/v1/tenants/{t}/keys", op,
                               {"name": "bench", "scopes": ["read"]}) == 201

            report("create-key", *run(srv.port, THREADS, create))

            def listing(conn, i, n):
                return request(conn, "GET", "/api/v1/tenants/t0/keys", tenant) == 200

            report("list-keys", *run(srv.port, THREADS, listing))


if __name__ == "__main__":
    main()
