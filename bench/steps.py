#!/usr/bin/env python3
"""Throwaway per-step pricing of keygate's hot path (issue 17).

`bench/steps-filter` repeats one host call (or one SHA-256) N times per
request; each step runs as its own Envoy beside the no-op filter, wrk loads
them in interleaved rounds, and the cost of one call is

    (1/rps(step) - 1/rps(no-op)) / N

(Envoy runs one worker pinned to CPU 0 and is the bottleneck, so 1/rps is its
CPU time per request.) Medians of the rounds. Noisy on a shared machine: read
the figures as ±0.2 µs.

    .venv/bin/python -m bench.steps                  in-VM timing (default)
    STEPS_MODE=wrk .venv/bin/python -m bench.steps   throughput difference
                                 (BENCH_DURATION=3 STEPS_ROUNDS=3 STEPS_N=10)
"""

import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.bench import DURATION, gate_filters, keygate_config, start, wrk

HERE = Path(__file__).resolve().parent / "steps-filter"
WASM = HERE / "target/wasm32-wasip1/release/steps_filter.wasm"
ROUNDS = int(os.environ.get("STEPS_ROUNDS", "3"))
N = int(os.environ.get("STEPS_N", "10"))

# (step, what keygate uses it for, bytes crossing into the VM per call)
STEPS = [
    ("time", "clock (get_current_time)", "8"),
    ("hdr", "read a present request header (x-api-key)", "11"),
    ("hdr_absent", "read an absent request header", "0"),
    ("hdr_map", "read the whole request header map (wrk: 6 headers)", "~120"),
    ("set_req", "replace a request header (identity header)", "0"),
    ("add_req", "add a request header", "0"),
    ("remove_req", "remove a request header", "0"),
    ("addr", "property source.address", "15"),
    ("set_prop", "set_property (access-log filter state)", "0"),
    ("shared_get", "get_shared_data of a 140-byte credential entry", "140"),
    ("shared_cas", "shared-data read + CAS write of an 8-byte counter", "8"),
    ("metric", "increment_metric", "0"),
    ("set_resp", "replace a response header (rate-limit header)", "0"),
    ("add_resp", "add a response header", "0"),
    ("sha", "SHA-256 of a 13-byte key (no host call)", "-"),
]


def config(step, n):
    cfg = keygate_config({})
    for f in gate_filters(cfg):
        if f["name"] == "keygate":
            c = f["typed_config"]["config"]
            c["vm_config"]["code"]["local"]["filename"] = str(WASM)
            c["vm_config"]["vm_id"] = f"steps-{step}"
            c["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": f"{step} {n}"}
    cfg["static_resources"]["listeners"] = cfg["static_resources"]["listeners"][:1]
    return cfg


def timed(samples=40, n_calls=200):
    """In-VM timing: the filter times its own loop of n calls (x-step-ns);
    the minimum over `samples` requests is the least disturbed by other
    processes on the machine, the median shows the spread."""
    from tests.harness import request
    envoy = start("steps-timed", config("none", 0))
    try:
        out = {}
        for name in ["none"] + [s for s, _, _ in STEPS]:
            per_call = []
            # Added headers accumulate: fewer, or the response grows past
            # what an HTTP client accepts.
            n = 50 if name.startswith("add_") else n_calls
            for _ in range(samples):
                r = request(envoy.port, "GET", "/v1/items", [("x-api-key", "bench-key-0"), ("x-step", f"{name} {n}")])
                per_call.append(int(r.header("x-step-ns")) / n / 1000)
            out[name] = (min(per_call), statistics.median(per_call))
    finally:
        envoy.stop()
    base = out["none"][0]
    print("| step | keygate use | bytes into the VM | µs per call (min) | (median) |\n|---|---|---|---|---|")
    for step, use, size in STEPS:
        print(f"| `{step}` | {use} | {size} | {out[step][0] - base:.2f} | {out[step][1] - base:.2f} |")
    print(f"\nin-VM timing: {n_calls} calls per request (50 for add_*), {samples} requests per step, loop overhead {base:.3f} µs subtracted")


def main():
    if os.environ.get("STEPS_MODE", "timed") == "timed":
        subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                        str(HERE / "Cargo.toml")], check=True, timeout=600)
        timed()
        return 0
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                    str(HERE / "Cargo.toml")], check=True, timeout=600)
    header = ("x-api-key", "bench-key-0")
    names = ["none"] + [s for s, _, _ in STEPS]
    envoys = {}
    try:
        for name in names:
            envoys[name] = start(f"steps-{name}", config(name, N))
        rps = {name: [] for name in names}
        for rnd in range(ROUNDS):
            for name in names:
                rps[name].append(wrk(envoys[name], header)["rps"])
            print(f"round {rnd + 1}/{ROUNDS}: " + ", ".join(f"{n} {rps[n][-1]:.0f}" for n in names), flush=True)
    finally:
        for e in envoys.values():
            e.stop()
    med = {n: statistics.median(v) for n, v in rps.items()}
    base_us = 1e6 / med["none"]
    print(f"\nno-op filter: {med['none']:.0f} rps = {base_us:.1f} µs of Envoy CPU per request\n")
    print("| step | keygate use | bytes into the VM | µs per call |\n|---|---|---|---|")
    for step, use, size in STEPS:
        per_call = (1e6 / med[step] - base_us) / N
        print(f"| `{step}` | {use} | {size} | {per_call:.2f} |")
    print(f"\nwrk -t1 -c32 -d{DURATION}s, {ROUNDS} interleaved rounds, N={N} calls per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
