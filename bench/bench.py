#!/usr/bin/env python3
"""`make bench`: keygate against bare Envoy and Envoy's native filters.

All configurations run side by side as separate Envoys (concurrency 1, pinned
to CPU 0); wrk (pinned to CPU 1) loads them in interleaved rounds and the
table reports medians, all measured in one run. Routes answer with
direct_response, so only Envoy and its filters are measured. Every
configuration is checked to enforce (401 without a key, 200 with one) before
it is measured: a benchmark of a filter that lets everything through is
worthless.

Env: BENCH_DURATION (s per run, default 5), BENCH_ROUNDS (default 3),
BENCH_SIZES (credential counts loaded through the sync path, default
"100000,1000000"), BENCH_CONNECTIONS (default 32); BENCH_BASELINE_WASM (a
.wasm) and BENCH_BASELINE_NATIVE (a module name, see baseline_native_config)
add the same rows for another build, measured in the same run."""

import atexit
import base64
import copy
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.harness import KEYGATE, WASM, Envoy, free_port, keygate, render, request
from tests.harness import native_config as dynamic_module_config

DURATION = int(os.environ.get("BENCH_DURATION", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1000000").split(",") if s]
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
ONLY = os.environ.get("BENCH_ONLY")
WORK = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
# Removed at exit: a 1M-key store is ~250 MB per run.
atexit.register(shutil.rmtree, WORK, ignore_errors=True)

ROUTES = [{"methods": ["GET"], "path_prefix": "/v1", "scope": "read"}]
LIMIT = {"requests": 1_000_000_000, "window_secs": 60}
KEY = "bench-key-0"
SECRET = "bench-secret-0"

WRK_LUA = """
local hdr_name, hdr_value
function init(args) hdr_name = args[1]; hdr_value = args[2] end
function request() return wrk.format("GET", "/v1/items", {[hdr_name] = hdr_value}) end
function done(summary, latency, requests)
  io.write(string.format("BENCH %d %f %f %f %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, summary.errors.status))
end
"""


def sha(s):
    return hashlib.sha256(s.encode()).hexdigest()


def record(i, **extra):
    r = {"key_id": f"bench-{i:07d}", "key_hash": sha(f"bench-key-{i}"), "tenant": f"t{i // 5}", "scopes": ["read"],
         "allowed_ips": ["127.0.0.0/8"], "rate_limit": LIMIT}
    r.update(extra)
    return r


def direct_response(config):
    """Answer from Envoy itself; drop the sync listener where unused."""
    for lst in config["static_resources"]["listeners"]:
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        if lst["name"] == "gate":
            hcm["route_config"]["virtual_hosts"][0]["routes"] = [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]
            hcm.pop("access_log", None)
    return config


def gate_filters(config):
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def keygate_config(plugin, login=False):
    config = direct_response(render(plugin, gate_port=free_port(), admin_port=free_port(), upstream_port=free_port()))
    if login:
        # As in envoy.yaml: the buffer filter holds logins while keygate reads them.
        routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"]["virtual_hosts"][0]["routes"]
        yaml_login = render(None, gate_port=1, admin_port=2, upstream_port=3)["static_resources"]["listeners"][0][
            "filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
        routes.insert(0, {**yaml_login, "route": None, "direct_response": {"status": 404}})
        routes[0].pop("route")
    else:
        filters = gate_filters(config)
        filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.buffer"]
    return config


def bare_config():
    config = keygate_config({})
    filters = gate_filters(config)
    filters[:] = [f for f in filters if f["name"] == "envoy.filters.http.router"]
    config["static_resources"]["listeners"] = config["static_resources"]["listeners"][:1]
    return config


NOOP = Path(__file__).resolve().parent / "noop-filter"
NOOP_WASM = NOOP / "target/wasm32-wasip1/release/noop_filter.wasm"


def noop_config():
    """A filter that does nothing: the cost of running any wasm filter."""
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                    str(NOOP / "Cargo.toml")], check=True, timeout=600)
    config = keygate_config({})
    for f in gate_filters(config):
        if f["name"] == "keygate":
            vm = f["typed_config"]["config"]["vm_config"]
            vm["code"]["local"]["filename"] = str(NOOP_WASM)
            vm["vm_id"] = "noop"
    config["static_resources"]["listeners"] = config["static_resources"]["listeners"][:1]
    return config


def native_config(n):
    """What a user would compose from Envoy's own filters: api_key_auth for the
    keys, rbac for the scope rule (GET /v1) and the IP allowlist, and
    local_ratelimit with a bucket that never runs dry."""
    config = bare_config()
    pct = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    gate_filters(config)[:0] = [
        {"name": "envoy.filters.http.api_key_auth", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": f"bench-key-{i}", "client": f"bench-{i:07d}"} for i in range(n)],
            "key_sources": [{"header": "x-api-key"}],
            "forwarding": {"header": "x-keygate-key-id", "hide_credentials": True}}},
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"read": {
                "permissions": [{"and_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"url_path": {"path": {"prefix": "/v1"}}}]}}],
                "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}]}}}}},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_rl",
            "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "bench_rl_enabled", **pct},
            "filter_enforced": {"runtime_key": "bench_rl_enforced", **pct}}},
    ]
    return config


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start(name, config, build=None):
    envoy = Envoy(config, concurrency=1, workdir=WORK / name, log_level=os.environ.get("BENCH_ENVOY_LOG", "warn"),
                  extra_args=[], build=build)
    (WORK / name).mkdir(parents=True, exist_ok=True)
    envoy.start()
    subprocess.run(["taskset", "-acp", "0", str(envoy.proc.pid)], capture_output=True, check=False)
    return envoy


def check_enforces(name, envoy, header):
    """401/403 without a valid key, 200 with one: refuse to measure otherwise."""
    denied = request(envoy.port, "GET", "/v1/items", [])
    wrong = request(envoy.port, "GET", "/v1/items", [("x-api-key", "not-a-key")])
    ok = request(envoy.port, "GET", "/v1/items", [header])
    if ("keygate" in name or "native" in name) and (denied.status not in (401, 403) or wrong.status not in (401, 403) or ok.status != 200):
        raise RuntimeError(f"{name}: does not enforce (no key {denied.status}, bad key {wrong.status}, key {ok.status})")
    if ok.status != 200:
        raise RuntimeError(f"{name}: a valid request got {ok.status}")
    if "three limits" in name:
        # Measure only what the row says: the key's three limits and its tenant's.
        policy = ok.header("ratelimit-policy") or ""
        if policy.count(";q=") != 4 or "tenant-minute" not in policy:
            raise RuntimeError(f"{name}: expected 3 key limits and a tenant limit, got {policy!r}")


# The limits rows (issue 18): every key with three limits (a window, another
# window, a calendar quota) and its tenant with a shared limit, against every
# key with the one window of the other rows; both loaded through sync.
THREE_LIMITS = ["1000000000/s", "1000000000/min", "1000000000/day"]
TENANT_LIMITS = ["1000000000/min"]


def load_through_sync(envoy, n, secret_of_0=None, limits=None):
    """Loads n credentials the way production does: a store, then `keygate sync`.
    limits="three": each key has THREE_LIMITS and each tenant TENANT_LIMITS."""
    store = WORK / f"store-{n}.json"
    started = time.monotonic()
    with open(store, "w") as f:
        # A store has an identity (keygate store init); any fixed one will do.
        f.write('{"store_id":"0123456789abcdef","version":1,"keys":[')
        for i in range(n):
            if i:
                f.write(",")
            rec = record(i, secret_hash=secret_of_0) if i == 0 and secret_of_0 else record(i)
            if limits == "three":
                rec.pop("rate_limit")
                rec["limits"] = THREE_LIMITS
            f.write(json.dumps({"created_at": 0, "updated_at": 0, "record": rec}, separators=(",", ":")))
        f.write("]")
        if limits == "three":
            tenants = sorted({record(i)["tenant"] for i in range(n)})
            f.write(',"tenant_limits":' + json.dumps([{"tenant": t, "limits": TENANT_LIMITS} for t in tenants]))
        f.write("}")
    written = time.monotonic()
    rss_before = rss_kib(envoy.proc.pid)
    cpu_before = cpu_seconds(envoy.proc.pid)
    ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(KEYGATE), "--store", str(store), "sync", "--once", "--endpoint",
                           f"http://127.0.0.1:{envoy.sync_port}"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "KEYGATE_SYNC_SECRET": envoy.sync_secret})
    if proc.returncode != 0:
        raise RuntimeError(f"sync of {n} credentials failed: {proc.stderr[-2000:]}")
    loaded = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    store.unlink()
    rss_after = rss_kib(envoy.proc.pid)
    # The sidecar's own phases (its log), so the figure says where it went.
    read = re.search(r"read \d+ keys? .* in ([\d.]+) ms", proc.stderr)
    push = re.search(r"full push of .*\(([\d.]+) ms\)", proc.stderr)
    return {"load_s": loaded - written, "bytes_per_credential": (rss_after - rss_before) * 1024 / n,
            "read_s": float(read[1]) / 1e3 if read else None, "push_s": float(push[1]) / 1e3 if push else None,
            "envoy_cpu_s": cpu_seconds(envoy.proc.pid) - cpu_before,
            "sidecar_cpu_s": ru.ru_utime + ru.ru_stime - ru_before.ru_utime - ru_before.ru_stime}


def fmt_s(v):
    return "-" if v is None else f"{v:.1f} s"


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(envoy, header):
    cpu_before = cpu_seconds(envoy.proc.pid)
    lua = WORK / "bench.lua"
    lua.write_text(WRK_LUA)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s", "-s", str(lua),
                          f"http://127.0.0.1:{envoy.port}", "--", header[0], header[1]],
                         capture_output=True, text=True, timeout=DURATION + 60).stdout
    m = re.search(r"BENCH (\d+) ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    requests, seconds, p50, p99, bad = int(m[1]), float(m[2]), float(m[3]), float(m[4]), int(m[5])
    if bad:
        raise RuntimeError(f"{bad} non-2xx responses under load")
    # Envoy's CPU time per request: unlike rps, barely moved by other load on the machine.
    cpu_us = (cpu_seconds(envoy.proc.pid) - cpu_before) / max(requests, 1) * 1e6
    return {"rps": requests / seconds, "p50": p50, "p99": p99, "cpu_us": cpu_us}


# Another keygate .wasm (e.g. main's) measured beside this one in the same
# run: before/after ratios without run-to-run noise.
BASELINE_WASM = os.environ.get("BENCH_BASELINE_WASM")


def baseline_config(plugin, sync=False):
    config = keygate_config(plugin, login=True)
    for lst in config["static_resources"]["listeners"]:
        for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["name"] == "keygate":
                f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = BASELINE_WASM
    if not sync:
        config["static_resources"]["listeners"] = config["static_resources"]["listeners"][:1]
    return config


# Another native module measured beside this one: the name of a copy of
# e.g. main's libkeygate_native.so as lib<name>.so in the module directory
# (KEYGATE_NATIVE_DIR, which holds this branch's libkeygate_native.so too).
BASELINE_NATIVE = os.environ.get("BENCH_BASELINE_NATIVE")


def baseline_native_config(plugin):
    config = dynamic_module_config(keygate_config(plugin, login=True))
    for f in gate_filters(config):
        if "dynamic_module_config" in f.get("typed_config", {}):
            f["typed_config"]["dynamic_module_config"]["name"] = BASELINE_NATIVE
    config["static_resources"]["listeners"] = config["static_resources"]["listeners"][:1]
    return config


def login(envoy, key):
    r = request(envoy.port, "POST", "/auth/login", [], json.dumps({"api_key": key}).encode())
    if r.status != 200:
        raise RuntimeError(f"login failed: {r.status}")
    return ("authorization", "Bearer " + r.json()["access_token"])


def main():
    begun = time.monotonic()
    basic = ("authorization", "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode())
    # Key 0 has a secret (the Basic rows); key 1 is a plain key (X-API-Key and token rows).
    api_key = ("x-api-key", "bench-key-1")
    creds_1k = [record(0, secret_hash=sha(SECRET))] + [record(i) for i in range(1, 1000)]
    tokens = {"lifetime_secs": 86400}
    plugin_1k = {"routes": ROUTES, "credentials": creds_1k, "tokens": tokens}
    # (envoy name, config, credentials to load through sync or None[, build])
    envoy_setups = [
        ("bare", bare_config(), None),
        ("noop", noop_config(), None),
        ("native", native_config(1000), None),
        ("keygate-1k", keygate_config({"routes": ROUTES, "credentials": creds_1k, "tokens": tokens}, login=True),
         None),
        *[(f"keygate-{n // 1000}k", keygate_config({"routes": ROUTES, "tokens": tokens}, login=True), n)
          for n in SIZES],
    ]
    if BASELINE_WASM:
        envoy_setups.append(("baseline-1k", baseline_config({"routes": ROUTES, "credentials": creds_1k,
                                                            "tokens": tokens}), None))
        # The baseline at each synced size too (its sync role, its memory).
        envoy_setups += [(f"baseline-{n // 1000}k", baseline_config({"routes": ROUTES, "tokens": tokens}, sync=True), n)
                         for n in SIZES]
    # The same keygate as an Envoy dynamic module (crates/native, `make native`).
    envoy_setups += [("native-1k", keygate_config(plugin_1k, login=True), None, "native"),
                     *[(f"native-{n // 1000}k", keygate_config({"routes": ROUTES, "tokens": tokens}, login=True), n,
                        "native") for n in SIZES]]
    if BASELINE_NATIVE:
        envoy_setups.append(("baseline-native-1k", baseline_native_config(plugin_1k), None, "native"))
    # One limit versus three limits and a tenant limit, 1k keys via sync, each build.
    for build in ("wasm", "native"):
        for style in ("one", "three"):
            envoy_setups.append((f"limits-{style}-{build}", keygate_config({"routes": ROUTES}), (1000, style), build))
    # (row name, envoy name, header or "token")
    rows = [
        ("bare Envoy", "bare", api_key),
        ("no-op proxy-wasm filter (reference)", "noop", api_key),
        ("native api_key_auth + rbac + local_ratelimit, 1k keys", "native", ("x-api-key", "bench-key-1")),
    ]
    for build, prefix in (("wasm", "keygate"), ("native", "native")):
        for n in [1000] + SIZES:
            name = f"{prefix}-{n // 1000}k"
            via = "" if n == 1000 else " via sync"
            rows += [(f"keygate {build}, {n // 1000}k keys{via} (X-API-Key)", name, api_key),
                     (f"keygate {build}, {n // 1000}k keys{via} (Basic key:secret)", name, basic),
                     (f"keygate {build}, {n // 1000}k keys{via} (issued bearer token)", name, "token")]
    if BASELINE_WASM:
        for n in [1000] + SIZES:
            name, via = f"baseline-{n // 1000}k", "" if n == 1000 else " via sync"
            rows += [(f"baseline wasm (BENCH_BASELINE_WASM), {n // 1000}k keys{via} (X-API-Key)", name, api_key),
                     (f"baseline wasm (BENCH_BASELINE_WASM), {n // 1000}k keys{via} (Basic key:secret)", name, basic),
                     (f"baseline wasm (BENCH_BASELINE_WASM), {n // 1000}k keys{via} (issued bearer token)", name,
                      "token")]
    if BASELINE_NATIVE:
        rows += [("baseline native (BENCH_BASELINE_NATIVE), 1k keys (X-API-Key)", "baseline-native-1k", api_key),
                 ("baseline native (BENCH_BASELINE_NATIVE), 1k keys (Basic key:secret)", "baseline-native-1k", basic),
                 ("baseline native (BENCH_BASELINE_NATIVE), 1k keys (issued bearer token)", "baseline-native-1k",
                  "token")]
    limit_rows = {build: (f"keygate {build}, 1k keys via sync, one limit (X-API-Key)",
                          f"keygate {build}, 1k keys via sync, three limits + tenant limit (X-API-Key)")
                  for build in ("wasm", "native")}
    for build, (one, three) in limit_rows.items():
        rows += [(one, f"limits-one-{build}", api_key), (three, f"limits-three-{build}", api_key)]
    only = os.environ.get("BENCH_ROWS")
    if only:
        rows = [r for r in rows if any(part in r[0] for part in only.split(","))]
    if ONLY:
        rows = [r for r in rows if r[0] == "bare Envoy" or re.search(ONLY, r[0])]
    wanted = {e for _, e, _ in rows}
    envoys, headers, loads = {}, {}, {}
    try:
        for name, config, n, *build in envoy_setups:
            if name not in wanted:
                continue
            print(f"starting: {name}", flush=True)
            envoys[name] = start(name, config, *build)
            n, limits = n if isinstance(n, tuple) else (n, None)
            if n:
                loads[name] = load_through_sync(envoys[name], n, secret_of_0=sha(SECRET), limits=limits)
                ld = loads[name]
                print(f"  loaded {n} credentials in {ld['load_s']:.1f} s (store read {fmt_s(ld['read_s'])}, "
                      f"push {fmt_s(ld['push_s'])}, sidecar CPU {ld['sidecar_cpu_s']:.1f} s, "
                      f"Envoy CPU {ld['envoy_cpu_s']:.1f} s), "
                      f"{ld['bytes_per_credential']:.0f} B RSS each", flush=True)
        measured = [r for r in rows if r[1] in envoys]
        for row, name, header in measured:
            headers[row] = login(envoys[name], "bench-key-1") if header == "token" else header
            check_enforces(row, envoys[name], headers[row])
        results = {row: [] for row, _, _ in measured}
        for rnd in range(ROUNDS):
            for row, name, _ in measured:
                results[row].append(wrk(envoys[name], headers[row]))
                print(f"  round {rnd + 1}/{ROUNDS} {row}: {results[row][-1]['rps']:.0f} rps, "
                      f"{results[row][-1]['cpu_us']:.1f} µs Envoy CPU/request", flush=True)
        rss = {name: rss_kib(e.proc.pid) for name, e in envoys.items()}
    finally:
        for e in envoys.values():
            e.stop()

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu_us")}
           for n, rs in results.items()}
    bare = med.get("bare Envoy", {}).get("rps")
    noop = med.get("no-op proxy-wasm filter (reference)", {}).get("rps")
    noop_cpu = med.get("no-op proxy-wasm filter (reference)", {}).get("cpu_us")
    ratio = lambda v, ref: f"{v / ref:.2f}" if ref and v else "-"
    # CPU ratio: the no-op filter's Envoy CPU per request over this row's,
    # the measure with less of the machine's noise than rps.
    lines = ["| config | rps | ratio to bare | ratio to no-op wasm | Envoy CPU/request | CPU ratio (no-op/this) "
             "| p50 | p99 | Envoy RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for row, name, _ in rows:
        if row not in med:
            lines.append(f"| {row} | not measured | | | | | | | |")
            continue
        m = med[row]
        lines.append(f"| {row} | {m['rps']:.0f} | {ratio(m['rps'], bare)} | {ratio(m['rps'], noop)} "
                     f"| {m['cpu_us']:.1f} µs | {ratio(noop_cpu, m['cpu_us'])} "
                     f"| {m['p50']:.2f} ms | {m['p99']:.2f} ms | {rss[name] / 1024:.0f} MiB |")
    print("\n" + "\n".join(lines))
    if loads:
        print("\n| credentials loaded through `keygate sync` | load time | store read | push | sidecar CPU "
              "| Envoy CPU | Envoy RSS per credential |\n|---|---|---|---|---|---|---|")
        for name, l in loads.items():
            print(f"| {name} | {l['load_s']:.1f} s | {fmt_s(l['read_s'])} | {fmt_s(l['push_s'])} "
                  f"| {l['sidecar_cpu_s']:.1f} s | {l['envoy_cpu_s']:.1f} s | {l['bytes_per_credential']:.0f} B |")
    for build, (one, three) in limit_rows.items():
        if one in med and three in med:
            print(f"\nlimits, {build}: three limits + tenant limit vs one limit, same run: "
                  f"Envoy CPU/request {med[three]['cpu_us']:.1f} / {med[one]['cpu_us']:.1f} µs = "
                  f"{med[three]['cpu_us'] / med[one]['cpu_us']:.2f}; rps {med[three]['rps']:.0f} / "
                  f"{med[one]['rps']:.0f} = {med[three]['rps'] / med[one]['rps']:.2f}")
    print(f"\nwasm: {WASM.stat().st_size} bytes; wrk -t1 -c{CONNECTIONS} -d{DURATION}s x {ROUNDS} interleaved rounds; "
          f"Envoy --concurrency 1 on CPU 0, wrk on CPU 1; whole run {time.monotonic() - begun:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
