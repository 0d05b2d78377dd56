#!/usr/bin/env python3
"""Ingest lag under the filter benchmark's full load. Part of `make bench`.

One Envoy (concurrency 1, pinned to CPU 0, answering itself as in bench.py)
writes its JSON access log to a file; `keygate serve --access-log` (SQLite
store, pinned to CPU 1 with wrk) ingests it while wrk -c32 sends keyed
requests as fast as they are answered. /healthz's `ingest.lag_seconds` (now
minus the newest stored record's time) is sampled every 100 ms; the report
gives its p50/p99/max over the load, how far behind the file the ingester
was at the end, and how long it took to catch up.

Environment: BENCH_DURATION (seconds of load, default 20), BENCH_CONNECTIONS
(default 32)."""

import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.bench import WRK_LUA, direct_response, gate_filters
from tests.harness import SYNC_SECRET, Envoy, free_port, keygate, render, request, wait_until
from tests.test_api import Server

DURATION = int(os.environ.get("BENCH_DURATION", "20"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
CONFIG = {"routes": [{"methods": ["GET"], "path_prefix": "/v1", "scope": "read"}],
          "rate_limit": {"requests": 1_000_000_000, "window_secs": 60}}


def healthz(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.loads(r.read())["ingest"]


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def main():
    with tempfile.TemporaryDirectory(prefix="keygate-ingest-lag-") as tmp:
        tmp = Path(tmp)
        store = str(tmp / "keygate.db")
        log = tmp / "access.log"
        keygate(store, "store", "init")
        key = keygate(store, "key", "create", "--tenant", "acme", "--scope", "read")["api_key"]
        config = render(CONFIG, gate_port=free_port(), admin_port=free_port(), upstream_port=free_port(),
                        access_log=log)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        access_log = hcm["access_log"]
        config = direct_response(config)
        hcm["access_log"] = access_log  # direct_response drops it; here it is the point
        filters = gate_filters(config)
        filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.buffer"]
        envoy = Envoy(config, concurrency=1, workdir=tmp / "envoy", log_level="warn")
        (tmp / "envoy").mkdir()
        envoy.start()
        try:
            subprocess.run(["taskset", "-acp", "0", str(envoy.proc.pid)], capture_output=True, check=False)
            with Server(store, tmp, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}", "--access-log", str(log),
                        secret=SYNC_SECRET) as srv:
                subprocess.run(["taskset", "-acp", "1", str(srv.proc.pid)], capture_output=True, check=False)
                if not wait_until(lambda: request(envoy.port, "GET", "/v1/items", [("x-api-key", key)]).status == 200,
                                  timeout=10):
                    raise RuntimeError("the key never reached Envoy")
                lags, stop = [], threading.Event()

                def sample():
                    while not stop.wait(0.1):
                        s = healthz(srv.port).get("lag_seconds")
                        if s is not None:
                            lags.append(s)

                sampler = threading.Thread(target=sample)
                lua = tmp / "load.lua"
                lua.write_text(WRK_LUA)
                sampler.start()
                out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s",
                                      "-s", str(lua), f"http://127.0.0.1:{envoy.port}", "--", "x-api-key", key],
                                     capture_output=True, text=True, timeout=DURATION + 60).stdout
                stop.set()
                sampler.join()
                end = time.monotonic()
                behind = healthz(srv.port)["bytes_behind"]
                caught_up = wait_until(lambda: healthz(srv.port)["bytes_behind"] == 0, timeout=120, interval=0.1)
                catch_up = time.monotonic() - end
                fields = out.split("BENCH ", 1)[1].split() if "BENCH " in out else None
                if not fields:
                    raise RuntimeError(f"wrk output not understood:\n{out}")
                rps = int(fields[0]) / float(fields[1])
                print(f"ingest lag under load: {rps:,.0f} req/s (wrk -t1 -c{CONNECTIONS} -d{DURATION}s, Envoy "
                      f"--concurrency 1 on CPU 0, keygate serve + wrk on CPU 1), {len(lags)} samples: "
                      f"p50 {percentile(lags, 0.5):.2f} s, p99 {percentile(lags, 0.99):.2f} s, "
                      f"max {max(lags, default=float('nan')):.2f} s; {behind:,} bytes behind at the end, "
                      f"{'caught up' if caught_up else 'NOT caught up'} in {catch_up:.1f} s; "
                      f"{log.stat().st_size / 1e6:.0f} MB of log")
        finally:
            envoy.stop()


if __name__ == "__main__":
    main()
