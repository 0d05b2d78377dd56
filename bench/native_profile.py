#!/usr/bin/env python3
"""Per-step cost of an allowed request on the native build (crates/native).

Builds the module with its `profile` feature (into target/native-profile, so
the normal build is untouched), runs one Envoy (--concurrency 1, CPU 0) with
the bench's "keygate native, 1k keys (X-API-Key)" configuration under wrk
(CPU 1), and prints the mean nanoseconds per request of each step as the
module's workers log them (`keygate-profile:` lines, one per 100k requests).
The timer itself (two clock reads per step, ~20-40 ns) is inside each figure.

Env: BENCH_DURATION (s, default 20: a report needs 100k requests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE_DIR = ROOT / "target/native-profile"


def build():
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "keygate-native", "--features", "profile",
                    "--target-dir", str(PROFILE_DIR), "--config", 'profile.release.panic="unwind"'],
                   cwd=ROOT, check=True, timeout=1800)
    return PROFILE_DIR / "release"


def main():
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(build())
    os.environ.setdefault("BENCH_DURATION", "20")
    from bench.bench import KEY, ROUTES, keygate_config, record, start, wrk, check_enforces

    name = "keygate native, 1k keys (X-API-Key)"
    config = keygate_config({"routes": ROUTES, "credentials": [record(i) for i in range(1000)]})
    header = ("x-api-key", KEY)
    envoy = start("native_profile", config, "native")
    try:
        check_enforces(name, envoy, header)
        result = wrk(envoy, header)
        log = envoy.log()
    finally:
        envoy.stop()
    lines = [line for line in log.splitlines() if "keygate-profile:" in line]
    if not lines:
        raise RuntimeError(f"no keygate-profile line after {result['rps']:.0f} rps: a report needs 100k "
                           "requests (raise BENCH_DURATION)")
    steps = dict(re.findall(r" ([^=;]+?)=(\d+)ns/", lines[-1]))
    steps = {k.strip(): int(v) for k, v in steps.items()}
    # decide's lap includes the two host parts timed inside it.
    steps["decide (rest)"] -= steps.get("source_address", 0) + steps.get("rate_counter", 0)
    print(f"{result['rps']:.0f} rps, Envoy CPU {result['cpu_us']:.1f} µs/request; last report: {lines[-1].split('keygate-profile: ')[1].split(';')[0]}")
    print("\n| step | ns per request |\n|---|---|")
    for k, v in steps.items():
        print(f"| {k} | {v} |")
    print(f"| **total in the module's hooks** | {sum(steps.values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
