#!/usr/bin/env python3
"""`make soak`: minutes of mixed load with key churn through Envoy + keygate +
the sidecar, checking that nothing breaks and memory stays flat.

- load: wrk with several valid keys (X-API-Key, Bearer, Basic) at full speed;
  a Lua hook counts 5xx responses;
- churn: every second the CLI creates a key and revokes an older one;
- verdicts: a checker asks continuously with live keys (must be 200) and with
  keys revoked over a second ago (must be 401);
- memory: Envoy's RSS every 5 s; after warm-up it must stay within 10 %.

SOAK_SECONDS (default 300) sets the length. Exits non-zero on any 5xx, wrong
verdict or RSS growth over 10 %."""

import atexit
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from tests.harness import Envoy, Sidecar, free_port, keygate, render, request

SECONDS = int(os.environ.get("SOAK_SECONDS", "300"))
WARMUP = min(60, SECONDS // 5)

WRK_LUA = """
local keys = {}
local i = 0
local fivexx = 0
function init(args) for _, a in ipairs(args) do table.insert(keys, a) end end
function request()
  i = i + 1
  local h = keys[(i % #keys) + 1]
  local name, value = h:match("^([^=]+)=(.*)$")
  return wrk.format("GET", "/v1/items", {[name] = value})
end
function response(status) if status >= 500 then fivexx = fivexx + 1 end end
function done(summary, latency, requests)
  io.write(string.format("SOAK_WRK %d %d %d\\n", summary.requests, fivexx, summary.errors.status))
end
"""


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    work = Path(tempfile.mkdtemp(prefix="keygate-soak-"))
    # Removed at exit: a 1M-key store is ~250 MB per run.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    store = work / "store.json"
    config = render({"routes": [{"path_prefix": "/v1", "scope": "read"}]}, gate_port=free_port(),
                    admin_port=free_port(), upstream_port=free_port())
    # Answer from Envoy itself so the soak measures Envoy + keygate, not an upstream.
    for lst in config["static_resources"]["listeners"]:
        if lst["name"] == "gate":
            vh = lst["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
            vh["routes"] = [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]
    envoy = Envoy(config, concurrency=2, workdir=work, log_level="warn")
    sidecar = Sidecar(store, [f"http://127.0.0.1:{envoy.sync_port}"], workdir=work)
    wrk = None
    stop = threading.Event()
    stats = {"created": 0, "revoked": 0, "checks": 0, "wrong": [], "rss": []}
    live, revoked = [], []  # (since, key)
    lock = threading.Lock()
    try:
        envoy.start()
        sidecar.start()
        load_keys = [keygate(store, "key", "create", "--tenant", f"load{i}", "--scope", "read", "--rate", "1000000/1s",
                             *(["--with-secret"] if i == 2 else [])) for i in range(3)]
        deadline = time.monotonic() + 10
        while request(envoy.port, "GET", "/v1/items", [("x-api-key", load_keys[0]["api_key"])]).status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("load keys never became usable")
            time.sleep(0.05)
        basic = base64.b64encode(f"{load_keys[2]['api_key']}:{load_keys[2]['secret']}".encode()).decode()
        args = [f"x-api-key={load_keys[0]['api_key']}", f"authorization=Bearer {load_keys[1]['api_key']}",
                f"authorization=Basic {basic}"]
        lua = work / "soak.lua"
        lua.write_text(WRK_LUA)
        print(f"soak: {SECONDS} s of load with key churn; progress every 5 s", flush=True)
        wrk = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{SECONDS}s", "-s", str(lua), f"http://127.0.0.1:{envoy.port}",
                                "--", *args], stdout=subprocess.PIPE, text=True)

        def churn():
            i = 0
            while not stop.wait(1.0):
                i += 1
                k = keygate(store, "key", "create", "--tenant", f"churn{i}", "--scope", "read")
                stats["created"] += 1
                with lock:
                    live.append((time.monotonic(), k))
                    if len(live) > 3:
                        _, old = live.pop(0)
                        keygate(store, "key", "revoke", old["key_id"])
                        stats["revoked"] += 1
                        revoked.append((time.monotonic(), old))
                        del revoked[:-20]

        def check():
            while not stop.wait(0.05):
                now = time.monotonic()
                with lock:
                    ok = [k for t, k in live if now - t > 1.0]
                    gone = [k for t, k in revoked if now - t > 1.0]
                for want, pool in ((200, ok), (401, gone)):
                    if pool:
                        k = random.choice(pool)
                        got = request(envoy.port, "GET", "/v1/items", [("x-api-key", k["api_key"])]).status
                        stats["checks"] += 1
                        if got != want:
                            stats["wrong"].append((k["key_id"], want, got))

        def sample():
            start = time.monotonic()
            while not stop.wait(5.0):
                elapsed = time.monotonic() - start
                kib = rss_kib(envoy.proc.pid)
                stats["rss"].append((elapsed, kib))
                # A line every 5 s, so a long run visibly makes progress.
                print(f"soak: {elapsed:4.0f}/{SECONDS} s  keys created {stats['created']}, revoked "
                      f"{stats['revoked']}, verdict checks {stats['checks']}, wrong {len(stats['wrong'])}, "
                      f"Envoy RSS {kib} KiB", flush=True)

        threads = [threading.Thread(target=f, daemon=True) for f in (churn, check, sample)]
        for t in threads:
            t.start()
        out, _ = wrk.communicate(timeout=SECONDS + 60)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        if wrk and wrk.poll() is None:
            wrk.kill()
        sidecar.stop()
        envoy.stop()

    line = next((l for l in out.splitlines() if l.startswith("SOAK_WRK")), "SOAK_WRK 0 -1 -1")
    total, fivexx, non2xx = (int(x) for x in line.split()[1:])
    after = [kib for t, kib in stats["rss"] if t >= WARMUP] or [0]
    growth = (after[-1] - after[0]) / after[0] * 100 if after[0] else 0.0
    report = {
        "seconds": SECONDS, "requests": total, "rps": round(total / SECONDS), "5xx": fivexx, "non_2xx": non2xx,
        "keys_created": stats["created"], "keys_revoked": stats["revoked"], "verdict_checks": stats["checks"],
        "wrong_verdicts": len(stats["wrong"]), "rss_kib_after_warmup": [after[0], max(after), after[-1]],
        "rss_growth_percent": round(growth, 1),
    }
    print("\nSoak results:\n")
    print("| figure | value |\n|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v} |")
    if stats["wrong"]:
        print("\nwrong verdicts (key, expected, got):", stats["wrong"][:10])
    failed = fivexx != 0 or stats["wrong"] or abs(growth) > 10 or total == 0 or non2xx != 0
    print("\nSOAK", "FAILED" if failed else "PASSED")
    (Path(__file__).parent / "out").mkdir(exist_ok=True)
    (Path(__file__).parent / "out" / "soak.json").write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
