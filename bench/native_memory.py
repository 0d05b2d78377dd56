#!/usr/bin/env python3
"""Where the native module's memory per credential goes after a full push.

One Envoy per build and round (`--concurrency 1`, the bench's keygate config,
log level info), a JSON file store of N keys (bench.load's), `keygate sync
--once`; then, per credential:

- Envoy's RSS growth (what `make bench` and bench.load report), also after a
  few seconds' wait (memory the allocator hands back late);
- tcmalloc's own account (admin `/memory`): `allocated` (live blocks: what
  the module and Envoy hold), `heap_size` (pages tcmalloc holds),
  `pageheap_free` (free pages it still maps), `pageheap_unmapped` (returned);
- the tables' bytes as the sync role logs them.

Usage: `.venv/bin/python -m bench.native_memory` (after `make native
sidecar`). Env: LOAD_N (default 1000000), MEM_BUILDS (default
"this=target/release"; a comma list of label=dir, each dir holding a
libkeygate_native.so, e.g. "this=target/release,main=/tmp/main-native"),
MEM_ROUNDS (default 1), MEM_WAIT (seconds before the second reading,
default 5), MEM_STORE (a path: the store is kept there and reused)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.bench import ROUTES, keygate_config, rss_kib, start
from bench.load import write_store
from tests.harness import KEYGATE, ROOT

N = int(os.environ.get("LOAD_N", "1000000"))
BUILDS = [b.split("=", 1) for b in os.environ.get("MEM_BUILDS", "this=target/release").split(",") if b]
ROUNDS = int(os.environ.get("MEM_ROUNDS", "1"))
WAIT = float(os.environ.get("MEM_WAIT", "5"))
MEMORY_FIELDS = ("allocated", "heap_size", "pageheap_free", "pageheap_unmapped")


def memory(envoy):
    m = json.loads(envoy.admin("/memory"))
    return {k: int(m.get(k, 0)) for k in MEMORY_FIELDS}


def one(label, directory, store, rnd):
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(ROOT / directory)
    os.environ["BENCH_ENVOY_LOG"] = "info"
    config = keygate_config({"routes": ROUTES, "tokens": {"lifetime_secs": 86400}}, login=True)
    envoy = start(f"mem-{label}-{rnd}", config, "native")
    try:
        rss0, mem0 = rss_kib(envoy.proc.pid), memory(envoy)
        t0 = time.monotonic()
        proc = subprocess.run([str(KEYGATE), "--store", str(store), "sync", "--once", "--endpoint",
                               f"http://127.0.0.1:{envoy.sync_port}"], capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "KEYGATE_SYNC_SECRET": envoy.sync_secret})
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        rss1, mem1 = rss_kib(envoy.proc.pid), memory(envoy)
        time.sleep(WAIT)
        rss2 = rss_kib(envoy.proc.pid)
        time.sleep(0.3)  # the log is flushed every 100 ms
        tables = re.findall(r"tables hold (\d+) credentials in (\d+) bytes, (\d+) key ids in (\d+) bytes", envoy.log())
        per = lambda b: b / N
        row = {
            "build": label, "wall": wall,
            "rss": per((rss1 - rss0) * 1024), "rss_later": per((rss2 - rss0) * 1024),
            **{k: per(mem1[k] - mem0[k]) for k in MEMORY_FIELDS},
            "tables": per(int(tables[-1][1]) + int(tables[-1][3])) if tables else None,
            "credentials": per(int(tables[-1][1])) if tables else None,
            "key_ids": per(int(tables[-1][3])) if tables else None,
        }
        return row
    finally:
        envoy.stop()


def main():
    # MEM_STORE=path keeps the written store for the next run.
    keep = os.environ.get("MEM_STORE")
    if keep and Path(keep).exists():
        store = Path(keep)
    else:
        store = write_store(N)
        if keep:
            store = Path(shutil.move(store, keep))
    cols = ["build", "sync wall", "RSS", f"RSS +{WAIT:.0f} s", "tcmalloc allocated", "heap_size", "pageheap_free",
            "pageheap_unmapped", "tables (credentials + key ids)"]
    print(f"per credential, {N} credentials")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for rnd in range(ROUNDS):
        for label, directory in BUILDS:
            r = one(label, directory, store, rnd)
            b = lambda v: "-" if v is None else f"{v:.1f} B"
            tables = "-" if r["tables"] is None else f"{r['tables']:.1f} B ({r['credentials']:.1f} + {r['key_ids']:.1f})"
            print(f"| {r['build']} | {r['wall']:.1f} s | {b(r['rss'])} | {b(r['rss_later'])} | {b(r['allocated'])} "
                  f"| {b(r['heap_size'])} | {b(r['pageheap_free'])} | {b(r['pageheap_unmapped'])} | {tables} |",
                  flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
