#!/usr/bin/env python3
"""`make run`: Envoy with keygate on 127.0.0.1:10000 in front of the echo
upstream, configured from envoy/envoy.yaml with the demo credentials.
Ctrl-C stops everything."""

import os
import secrets
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import BUILD, DEMO_KEYS, KEYGATE, ROOT, EchoServer, Envoy, Sidecar, free_port, render  # noqa: E402

GATE_PORT = int(os.environ.get("KEYGATE_PORT", "10000"))
ADMIN_PORT = int(os.environ.get("KEYGATE_ADMIN_PORT", "9901"))
SYNC_PORT = int(os.environ.get("KEYGATE_SYNC_PORT", "10001"))
STORE = Path(os.environ.get("KEYGATE_STORE", ROOT / ".keygate" / "demo-store.json"))


def banner(port, admin_port):
    base = f"http://127.0.0.1:{port}"
    partner = DEMO_KEYS["acme-partner"]
    print(f"""
keygate ({BUILD} build) is running: Envoy {base} -> echo upstream (admin http://127.0.0.1:{admin_port})

Demo credentials (tenant acme; demo only, their hashes are in envoy/envoy.yaml):
  acme-default   {DEMO_KEYS['acme-default']['key']:<26} default kind: full access
  acme-read      {DEMO_KEYS['acme-read']['key']:<26} scope read, 5 requests/min
  acme-partner   {partner['key']}:{partner['secret']}  (Basic) scope write, env test
  acme-suspended {DEMO_KEYS['acme-suspended']['key']:<26} inactive

Try:
  curl -i {base}/health
  curl -i {base}/v1/items
  curl -i {base}/v1/items -H 'X-API-Key: {DEMO_KEYS['acme-read']['key']}'
  curl -i {base}/v1/items -H 'Authorization: Bearer {DEMO_KEYS['acme-default']['key']}'
  curl -i -X POST {base}/v1/items -H 'X-API-Key: {DEMO_KEYS['acme-read']['key']}'
  curl -i -X POST {base}/v1/orders -u {partner['key']}:{partner['secret']}
  curl -i {base}/v1/items -H 'X-API-Key: {DEMO_KEYS['acme-suspended']['key']}'
  for i in $(seq 7); do curl -s -o /dev/null -w '%{{http_code}} ' {base}/v1/items -H 'X-API-Key: {DEMO_KEYS['acme-read']['key']}'; done; echo
  curl -s -X POST {base}/auth/login -d '{{"api_key": "{DEMO_KEYS['acme-default']['key']}", "session_id": "demo"}}'

Manage keys live (the sidecar pushes every change into Envoy, no restart):
  export KEYGATE_STORE={STORE}
  {KEYGATE} key create --tenant globex --scope read --rate 10/min
  {KEYGATE} key list
  {KEYGATE} key deactivate <key-id>      # 403 from the next request
  {KEYGATE} key revoke <key-id>          # 401 from the next request

Ctrl-C stops Envoy, the sidecar and the upstream.
""", flush=True)


def main():
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # A fresh sync secret per run, handed to Envoy and the sidecar only.
    sync_secret = secrets.token_hex(32)
    STORE.parent.mkdir(parents=True, exist_ok=True)
    with EchoServer(free_port()) as echo:
        access_log = STORE.parent / "access.log"
        config = render(gate_port=GATE_PORT, admin_port=ADMIN_PORT, upstream_port=echo.port, sync_port=SYNC_PORT,
                        access_log=access_log)
        envoy = Envoy(config, concurrency=2, sync_secret=sync_secret, token_keys=f"demo:{secrets.token_hex(32)}")
        sidecar = Sidecar(STORE, [f"http://127.0.0.1:{SYNC_PORT}"], workdir=envoy.dir, secret=sync_secret)
        try:
            envoy.start()
            sidecar.start()
            banner(GATE_PORT, ADMIN_PORT)
            print(f"Envoy log:   {envoy.log_path}\nSidecar log: {sidecar.log_path}\nAccess log:  {access_log}\n"
                  f"Requests of a key: {KEYGATE} logs --file {access_log} --key acme-read\n"
                  f"Metrics:     curl -s http://127.0.0.1:{ADMIN_PORT}/stats/prometheus | grep keygate_requests_total", flush=True)
            while not stop and envoy.proc.poll() is None and sidecar.proc.poll() is None:
                time.sleep(0.2)
            if sidecar.proc.poll() is not None:
                print(f"sidecar exited ({sidecar.proc.returncode}); log: {sidecar.log_path}", file=sys.stderr)
                return 1
            if envoy.proc.poll() is not None:
                print(f"Envoy exited ({envoy.proc.returncode}); log: {envoy.log_path}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            pass
        except (RuntimeError, TimeoutError) as e:
            print(f"could not start Envoy: {e}", file=sys.stderr)
            return 1
        finally:
            sidecar.stop()
            envoy.stop()
            print("\nstopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
