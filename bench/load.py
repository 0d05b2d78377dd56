#!/usr/bin/env python3
"""Where the time of loading N credentials through `keygate sync` goes.

One Envoy (`--concurrency 1`, pinned to CPU 0, the bench's keygate config)
per build; a JSON file store of N keys (the bench's records); then
`keygate sync --once` against its sync listener, timed and split into:

- wall time of the sync command, and the sidecar's own phases from its log
  (store read, push);
- the sidecar's CPU (user + system, from the child's rusage);
- Envoy's CPU over the sync (from /proc), i.e. the sync role's work:
  signature, JSON parse, validation, entry encoding, shared-data writes;
- Envoy RSS per credential afterwards, as `make bench` reports it.

Usage: `.venv/bin/python -m bench.load` (after `make wasm native sidecar`).
Env: LOAD_N (default 1000000), LOAD_BUILDS (default "wasm,native"),
LOAD_ROUNDS (default 1; each round a fresh Envoy), LOAD_PERF=DIR (record
`perf` profiles of the sidecar and of Envoy during the sync into DIR; read
them with `perf report -i DIR/<build>-sidecar.data`), LOAD_BASE=DIR (also
measure another release in the same run, e.g. main's: DIR holds its
keygate_filter.wasm, libkeygate_native.so and keygate; each round runs
every build with it first, then with this tree's artifacts), LOAD_CHECKED
(default 1: the store gets the `<store>.checked` note keygate leaves after
its own writes, so it is read as keygate would read a store it wrote;
0: as a file edited by hand, validated in full)."""

import os
import re
from pathlib import Path
import resource
import subprocess
import sys
import time

from bench.bench import ROUTES, WORK, cpu_seconds, keygate_config, record, rss_kib, start
from tests.harness import KEYGATE, NATIVE_DIR

N = int(os.environ.get("LOAD_N", "1000000"))
BUILDS = [b for b in os.environ.get("LOAD_BUILDS", "wasm,native").split(",") if b]
ROUNDS = int(os.environ.get("LOAD_ROUNDS", "1"))
PERF = os.environ.get("LOAD_PERF")
BASE = os.environ.get("LOAD_BASE")
CHECKED = os.environ.get("LOAD_CHECKED", "1") == "1"


def write_store(n):
    path = WORK / f"load-store-{n}.json"
    if not path.exists():
        import json
        with open(path, "w") as f:
            f.write('{"store_id":"0123456789abcdef","version":1,"keys":[')
            for i in range(n):
                if i:
                    f.write(",")
                f.write(json.dumps({"created_at": 0, "updated_at": 0, "record": record(i)}, separators=(",", ":")))
            f.write("]}")
    note = path.with_name(path.name + ".checked")
    if CHECKED and not note.exists():
        # For the note keygate writes beside a store it wrote (see
        # write_note): CRC-32 (zlib's is crc32fast's) of the file.
        import zlib
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        CRC[path] = crc
    elif not CHECKED and note.exists():
        note.unlink()
    return path


CRC = {}


def write_note(store, keygate):
    """The `.checked` note as the keygate binary that reads it writes it:
    since session 5 it names keygate's version and validation rules (bump
    RULES with crates/control's VALIDATION_RULES); before, "crc len"."""
    if store not in CRC:
        return
    crc, size = CRC[store], store.stat().st_size
    note = store.with_name(store.name + ".checked")
    if b"keygate-store-note " in Path(keygate).read_bytes():
        version = subprocess.run([str(keygate), "--version"], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
        note.write_text(f"keygate-store-note {version} rules {RULES} {crc:08x} {size}\n")
    else:
        note.write_text(f"{crc:08x} {size}\n")


RULES = 1


def one(build, store, rnd, base=None):
    """One sync of `store` into a fresh Envoy; `base`: a directory with
    another release's artifacts to use instead of this tree's."""
    config = keygate_config({"routes": ROUTES, "tokens": {"lifetime_secs": 86400}}, login=True)
    keygate = KEYGATE
    if base:
        keygate = Path(base) / "keygate"
        for lst in config["static_resources"]["listeners"]:
            for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
                if f["name"] == "keygate" and "vm_config" in f["typed_config"].get("config", {}):
                    f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(
                        Path(base) / "keygate_filter.wasm")
    # Read by Envoy at start (the native build's module directory).
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(base or NATIVE_DIR)
    envoy = start(f"load-{build}{'-base' if base else ''}-{rnd}", config, build)
    try:
        rss0 = rss_kib(envoy.proc.pid)
        cpu0 = cpu_seconds(envoy.proc.pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        perf, wrap = None, []
        if PERF:
            os.makedirs(PERF, exist_ok=True)
            perf = subprocess.Popen(["perf", "record", "-g", "-o", f"{PERF}/{build}-envoy.data", "-p",
                                     str(envoy.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wrap = ["perf", "record", "-F", "1000", "--call-graph", "dwarf,16384", "-o", f"{PERF}/{build}-sidecar.data", "--"]
            time.sleep(1)
        write_note(store, keygate)
        t0 = time.monotonic()
        proc = subprocess.run([*wrap, str(keygate), "--store", str(store), "sync", "--once", "--endpoint",
                               f"http://127.0.0.1:{envoy.sync_port}"], capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "KEYGATE_SYNC_SECRET": envoy.sync_secret})
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if perf:
            perf.send_signal(2)
            perf.wait(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        envoy_cpu = cpu_seconds(envoy.proc.pid) - cpu0
        rss = (rss_kib(envoy.proc.pid) - rss0) * 1024 / N
        read = re.search(r"read (\d+) keys? .* in ([\d.]+) ms", proc.stderr)
        push = re.search(r"full push of (\d+) credentials .* in (\d+) batches.*\(([\d.]+) ms\)", proc.stderr)
        return {
            "build": f"{build} (LOAD_BASE)" if base else build, "wall": wall,
            "read_s": float(read[2]) / 1e3 if read else None,
            "push_s": float(push[3]) / 1e3 if push else None,
            "batches": int(push[2]) if push else None,
            "sidecar_user": ru1.ru_utime - ru0.ru_utime, "sidecar_sys": ru1.ru_stime - ru0.ru_stime,
            "envoy_cpu": envoy_cpu, "rss_per_cred": rss,
        }
    finally:
        envoy.stop()


def main():
    t = time.monotonic()
    store = write_store(N)
    print(f"store of {N} keys written in {time.monotonic() - t:.1f} s ({store.stat().st_size >> 20} MiB)", flush=True)
    print("| build | sync wall | store read | push | batches | sidecar CPU user+sys | Envoy CPU | Envoy RSS/credential |")
    print("|---|---|---|---|---|---|---|---|")
    for rnd in range(ROUNDS):
        for build in BUILDS:
            for base in ([BASE] if BASE else []) + [None]:
                r = one(build, store, rnd, base)
                fmt = lambda v, unit="s": "-" if v is None else f"{v:.2f} {unit}"  # noqa: E731
                print(f"| {r['build']} | {r['wall']:.2f} s | {fmt(r['read_s'])} | {fmt(r['push_s'])} | {r['batches']} "
                      f"| {r['sidecar_user']:.2f} + {r['sidecar_sys']:.2f} s | {r['envoy_cpu']:.2f} s "
                      f"| {r['rss_per_cred']:.0f} B |", flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
