"""Throwaway (issue 17): where an allowed request's time goes, call by call.

Apply bench/hostcall-profile.patch (times every host call of src/host.rs
with get_current_time and reports the running totals in an `x-kg-ns`
response header), build, run, revert:

    git apply bench/hostcall-profile.patch && make wasm
    .venv/bin/python -m bench.hostcall_profile 1500
    git apply -R bench/hostcall-profile.patch && make wasm

Each figure includes one clock read (~0.1-0.3 us, the `empty` row); the
clock ticks in whole microseconds, so per-call figures are averages over
many requests. Not part of make bench.
"""
import json, statistics, sys, base64
from bench.bench import keygate_config, start, record, ROUTES, sha, SECRET, load_through_sync, login, KEY
from tests.harness import request
N=int(sys.argv[1]) if len(sys.argv)>1 else 1500
creds=[record(0, secret_hash=sha(SECRET))]+[record(i) for i in range(1,1000)]
basic=("authorization", "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode())
setups=[("static-1k", keygate_config({"routes": ROUTES, "credentials": creds, "tokens": {"lifetime_secs": 86400}}, login=True), False),
        ("sync-1k", keygate_config({"routes": ROUTES, "tokens": {"lifetime_secs": 86400}}, login=True), True)]
for name, cfg, sync in setups:
    e=start("kgprof-"+name, cfg)
    try:
        if sync: load_through_sync(e, 1000, secret_of_0=sha(SECRET))
        for label, hdr in [("x-api-key", ("x-api-key","bench-key-1")), ("basic", basic), ("token", login(e, "bench-key-1"))]:
            # fresh VM state per row is not possible; diff cumulative dumps
            def dump():
                r=request(e.port,"GET","/v1/items",[hdr]); v=r.header("x-kg-ns"); head, prof = v.split(" | ")
                d={}
                for item in prof.split(";"):
                    k,val=item.split("="); n,t,b=map(int,val.split("/")); d[k]=(n,t,b)
                return head, d
            for _ in range(50): dump()
            _, d0 = dump(); reqs=[]
            for _ in range(N):
                head, d1 = dump(); reqs.append(int(head.split()[0]))
            print(f"== {name} {label}: on_request_headers median {statistics.median(reqs)/1000:.1f} us, min {min(reqs)/1000:.1f}")
            for k in sorted(d1):
                n=d1[k][0]-d0.get(k,(0,0,0))[0]; t=d1[k][1]-d0.get(k,(0,0,0))[1]; b=d1[k][2]-d0.get(k,(0,0,0))[2]
                if n: print(f"  {k:40s} calls/req {n/N:5.2f}  us/call {t/n/1000:5.2f}  bytes/call {b/n:5.1f}")
    finally:
        e.stop()
