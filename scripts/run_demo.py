#!/usr/bin/env python3
"""`make run`: Envoy with keygate on 127.0.0.1:10000 in front of the echo
upstream, configured from envoy/envoy.yaml with the demo credentials.
Ctrl-C stops everything."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import DEMO_KEYS, EchoServer, Envoy, free_port, render  # noqa: E402

GATE_PORT = int(os.environ.get("KEYGATE_PORT", "10000"))
ADMIN_PORT = int(os.environ.get("KEYGATE_ADMIN_PORT", "9901"))


def banner(port, admin_port):
    base = f"http://127.0.0.1:{port}"
    partner = DEMO_KEYS["acme-partner"]
    print(f"""
keygate is running: Envoy {base} -> echo upstream (admin http://127.0.0.1:{admin_port})

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

Ctrl-C stops Envoy and the upstream.
""", flush=True)


def main():
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with EchoServer(free_port()) as echo:
        config = render(gate_port=GATE_PORT, admin_port=ADMIN_PORT, upstream_port=echo.port)
        envoy = Envoy(config, concurrency=2)
        try:
            envoy.start()
            banner(GATE_PORT, ADMIN_PORT)
            print(f"Envoy log: {envoy.log_path}", flush=True)
            while not stop and envoy.proc.poll() is None:
                time.sleep(0.2)
            if envoy.proc.poll() is not None:
                print(f"Envoy exited ({envoy.proc.returncode}); log: {envoy.log_path}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            pass
        except (RuntimeError, TimeoutError) as e:
            print(f"could not start Envoy: {e}", file=sys.stderr)
            return 1
        finally:
            envoy.stop()
            print("\nstopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
