#!/usr/bin/env python3
"""Several keygate .wasm builds (and the no-op filter) measured in one run:
Envoy CPU per request, interleaved wrk rounds, medians and per-round figures.

For A/B and ablation builds (e.g. main's .wasm against this tree's, or a
build with one kind of host call left out): bench/bench.py measures one
baseline only. Same Envoy config as bench.py's 1k-key keygate rows (config
credentials, login route, buffer filter disabled except on it); a ":nobuf"
suffix drops the buffer filter from the chain.

    .venv/bin/python -m bench.wasm_ab main=/tmp/main.wasm this=target/wasm32-wasip1/release/keygate_filter.wasm

Env: BENCH_DURATION (s per run, default 3), AB_ROUNDS (default 6), AB_HEADERS
(comma list of x, basic, token; default x), AB_CHECK (0: do not check that
each build enforces, for ablation builds). Other load on the machine moves
the absolute figures: compare rows within one run, round by round."""

import base64
import os
import statistics
import sys

os.environ.setdefault("BENCH_DURATION", "3")

from bench import bench as b  # noqa: E402  (reads BENCH_DURATION at import)

ROUNDS = int(os.environ.get("AB_ROUNDS", "6"))
HEADERS = os.environ.get("AB_HEADERS", "x").split(",")
# AB_CHECK=0 for ablation builds that let everything through on purpose.
CHECK = os.environ.get("AB_CHECK", "1") != "0"


def config(wasm, buffer_filter):
    creds = [b.record(0, secret_hash=b.sha(b.SECRET))] + [b.record(i) for i in range(1, 1000)]
    c = b.keygate_config({"routes": b.ROUTES, "credentials": creds, "tokens": {"lifetime_secs": 86400}}, login=True)
    for f in b.gate_filters(c):
        if f["name"] == "keygate":
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = wasm
    if not buffer_filter:
        b.gate_filters(c)[:] = [f for f in b.gate_filters(c) if f["name"] != "envoy.filters.http.buffer"]
    c["static_resources"]["listeners"] = c["static_resources"]["listeners"][:1]
    return c


def main(args):
    if not args or any("=" not in a for a in args):
        sys.exit(__doc__)
    basic = "Basic " + base64.b64encode(f"{b.KEY}:{b.SECRET}".encode()).decode()
    fixed = {"x": ("x-api-key", "bench-key-1"), "basic": ("authorization", basic)}
    envoys, rows = {}, []
    try:
        envoys["no-op"] = b.start("no-op", b.noop_config())
        rows.append(("no-op", "no-op", fixed["x"]))
        for arg in args:
            name, spec = arg.split("=", 1)
            wasm, _, flag = spec.partition(":")
            envoys[name] = b.start(name, config(wasm, buffer_filter=flag != "nobuf"))
            for h in HEADERS:
                header = b.login(envoys[name], "bench-key-1") if h == "token" else fixed[h]
                if CHECK:
                    b.check_enforces(f"keygate {name}", envoys[name], header)
                rows.append((f"{name} {h}", name, header))
        cpu = {row: [] for row, _, _ in rows}
        for rnd in range(ROUNDS):
            for row, name, header in rows:
                cpu[row].append(b.wrk(envoys[name], header)["cpu_us"])
            print(f"round {rnd + 1}/{ROUNDS} done", flush=True)
    finally:
        for e in envoys.values():
            e.stop()
    noop = statistics.median(cpu["no-op"])
    print("\n| row | Envoy CPU/request (median) | no-op/this | per round |\n|---|---|---|---|")
    for row, _, _ in rows:
        m = statistics.median(cpu[row])
        print(f"| {row} | {m:.1f} µs | {noop / m:.2f} | {' '.join(f'{v:.1f}' for v in cpu[row])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
