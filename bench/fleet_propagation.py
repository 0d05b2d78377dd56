#!/usr/bin/env python3
"""Fleet propagation: one PostgreSQL store, two Envoys each with its own
`keygate sync`; time from a CLI command's exit until *both* Envoys see the
change (create → 200 on both, revoke → 401 on both). Part of `make bench`
when PostgreSQL is installed."""

import http.client
import atexit
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path


from tests.harness import EchoServer, Envoy, Postgres, Sidecar, free_port, keygate, pg_bindir, render
from bench.propagation import percentile

ROUNDS = int(os.environ.get("BENCH_PROPAGATION_ROUNDS", "100"))
TIMEOUT = 5.0


def connect(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def until_both(conns, key, want):
    start = time.perf_counter()
    pending = list(conns)
    while pending and time.perf_counter() - start < TIMEOUT:
        conn = pending[0]
        conn.request("GET", "/v1/items", headers={"x-api-key": key})
        r = conn.getresponse()
        r.read()
        if r.status == want:
            pending.pop(0)
    return None if pending else time.perf_counter() - start


def main():
    if pg_bindir() is None:
        print("\nFleet propagation: skipped, PostgreSQL is not installed (apt-get install postgresql).")
        return 0
    work = Path(tempfile.mkdtemp(prefix="keygate-fleet-"))
    # Removed at exit: a 1M-key store is ~250 MB per run.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    pg = Postgres(work).init().start().create_db()
    created, revoked, envoys, sidecars = [], [], [], []
    try:
        keygate(pg.url, "store", "migrate", json_out=False)
        with EchoServer() as echo:
            for name in ("a", "b"):
                config = render({"routes": [{"path_prefix": "/v1", "scope": "read"}]}, gate_port=free_port(),
                                admin_port=free_port(), upstream_port=echo.port)
                envoy = Envoy(config, concurrency=2, workdir=work / name, log_level="warn")
                (work / name).mkdir()
                envoys.append(envoy.start())
                sidecars.append(Sidecar(pg.url, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=work / name).start())
            conns = [connect(e.port) for e in envoys]
            for i in range(ROUNDS):
                k = keygate(pg.url, "key", "create", "--tenant", f"t{i}", "--scope", "read")
                t = until_both(conns, k["api_key"], 200)
                if t is None:
                    raise RuntimeError(f"round {i}: key not on both Envoys after {TIMEOUT}s")
                created.append(t)
                keygate(pg.url, "key", "revoke", k["key_id"])
                t = until_both(conns, k["api_key"], 401)
                if t is None:
                    raise RuntimeError(f"round {i}: revoke not on both Envoys after {TIMEOUT}s")
                revoked.append(t)
    finally:
        for s in sidecars:
            s.stop()
        for e in envoys:
            e.stop()
        pg.remove()
    print("\nFleet propagation (PostgreSQL store, 2 Envoys with a sidecar each; CLI exit → both see it):\n")
    print("| change | rounds | p50 | p99 | max |\n|---|---|---|---|---|")
    for name, xs in (("key create → 200 on both", created), ("key revoke → 401 on both", revoked)):
        ms = [x * 1e3 for x in xs]
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} ms | {percentile(ms, 99):.1f} ms | {max(ms):.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
