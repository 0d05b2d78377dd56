#!/usr/bin/env python3
"""Sync propagation: time from a `keygate` CLI command's exit to the first
request through Envoy that sees the change. Part of `make bench`.

For each round: `keygate key create` → poll the gate with the new key until
200; then `keygate key revoke` → poll until 401. Polling uses one keep-alive
connection, so each probe costs a fraction of a millisecond."""

import http.client
import atexit
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.harness import EchoServer, Envoy, Sidecar, free_port, keygate, render

ROUNDS = int(os.environ.get("BENCH_PROPAGATION_ROUNDS", "100"))
TIMEOUT = 5.0


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def wait_for(conn, key, want):
    """Seconds until a request with `key` answers `want`; None on timeout."""
    start = time.perf_counter()
    while time.perf_counter() - start < TIMEOUT:
        conn.request("GET", "/v1/items", headers={"x-api-key": key})
        r = conn.getresponse()
        r.read()
        if r.status == want:
            return time.perf_counter() - start
    return None


def measure(rounds=ROUNDS):
    work = Path(tempfile.mkdtemp(prefix="keygate-prop-"))
    # Removed at exit: a 1M-key store is ~250 MB per run.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    store = work / "store.json"
    created, revoked = [], []
    with EchoServer() as echo:
        config = render({"routes": [{"path_prefix": "/v1", "scope": "read"}]}, gate_port=free_port(),
                        admin_port=free_port(), upstream_port=echo.port)
        envoy = Envoy(config, concurrency=2, workdir=work, log_level="warn")
        sidecar = Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=work)
        try:
            envoy.start()
            sidecar.start()
            conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
            conn.connect()
            # Without it each keep-alive probe waits ~40 ms on delayed ACKs.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(rounds):
                k = keygate(store, "key", "create", "--tenant", f"t{i}", "--scope", "read")
                t = wait_for(conn, k["api_key"], 200)
                if t is None:
                    raise RuntimeError(f"round {i}: created key not usable after {TIMEOUT}s")
                created.append(t)
                keygate(store, "key", "revoke", k["key_id"])
                t = wait_for(conn, k["api_key"], 401)
                if t is None:
                    raise RuntimeError(f"round {i}: revoked key still accepted after {TIMEOUT}s")
                revoked.append(t)
            conn.close()
        finally:
            sidecar.stop()
            envoy.stop()
    return created, revoked


def table(created, revoked):
    rows = ["| change | rounds | p50 | p99 | max |", "|---|---|---|---|---|"]
    for name, xs in (("key create → first 200", created), ("key revoke → first 401", revoked)):
        ms = [x * 1e3 for x in xs]
        rows.append(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} ms | {percentile(ms, 99):.1f} ms "
                    f"| {max(ms):.1f} ms |")
    return "\n".join(rows)


def main():
    created, revoked = measure()
    print("\nSync propagation (CLI exit → first request that sees the change; sidecar poll 10 ms):\n")
    print(table(created, revoked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
