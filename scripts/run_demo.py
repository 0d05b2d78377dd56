#!/usr/bin/env python3
"""`make run`: Envoy with keygate on 127.0.0.1:10000 in front of the echo
upstream, configured from envoy/envoy.yaml, and `keygate serve` (the
management API on 127.0.0.1:8080, the sync daemon feeding Envoy, the
access-log ingester) on the demo store (.keygate/demo.db, SQLite). The first
run creates the store (`keygate store init`) and puts the demo tenant's keys
in it with fixed, well-known values, so the CLI and the API can show,
deactivate, revoke and rotate them; later runs keep whatever the store holds.
Each run makes a fresh operator token for the API (the previous run's is
revoked), saved 0600 in .keygate/api-token. Ctrl-C stops everything."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.harness import (BUILD, DEMO_KEYS, KEYGATE, ROOT, EchoServer, Envoy, demo_plugin_config, free_port,
                           render)
from tests.test_api import Server

GATE_PORT = int(os.environ.get("KEYGATE_PORT", "10000"))
ADMIN_PORT = int(os.environ.get("KEYGATE_ADMIN_PORT", "9901"))
SYNC_PORT = int(os.environ.get("KEYGATE_SYNC_PORT", "10001"))
API_PORT = int(os.environ.get("KEYGATE_API_PORT", "8080"))
# Not KEYGATE_STORE: a user who exported it for another store would get a
# demo whose banner lists keys that store does not hold.
STORE = Path(os.environ.get("KEYGATE_DEMO_STORE", ROOT / ".keygate" / "demo.db")).resolve()
# Tokens, tenants, audit and request logs: the store itself when it is SQLite.
DB = STORE if STORE.suffix in (".db", ".sqlite", ".sqlite3") else STORE.parent / "keygate.db"
API_TOKEN = STORE.parent / "api-token"
# CLI exit to the first request that sees the change, measured by
# bench/propagation.py on the project's 2-core machine.
PROPAGATION = "p50 ~1 ms, p99 ~12 ms"

# The demo tenant's keys: the same ids and values as envoy/envoy.yaml's
# plugin-config credentials (which the e2e tests use), created in the store
# so the CLI can manage them.
DEMO_STORE_KEYS = [
    ("acme-default", ["--kind", "default"]),
    ("acme-read", ["--scope", "read", "--rate", "5/min"]),
    ("acme-partner", ["--scope", "write", "--env", "test", "--secret-value", DEMO_KEYS["acme-partner"]["secret"]]),
    ("acme-suspended", ["--scope", "read"]),
]


def cli(*args):
    proc = subprocess.run([str(KEYGATE), "--store", str(STORE), *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"keygate {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def prepare_store():
    """Creates the demo store with the demo keys on the first run; True if it did."""
    if STORE.exists():
        return False
    STORE.parent.mkdir(parents=True, exist_ok=True)
    cli("store", "init")
    for key_id, args in DEMO_STORE_KEYS:
        cli("key", "create", "--tenant", "acme", "--id", key_id, "--key-value", DEMO_KEYS[key_id]["key"], *args)
    cli("key", "deactivate", "acme-suspended")
    return True


def missing_demo_keys():
    """Demo keys the store no longer holds (revoked, or another store)."""
    missing = []
    for key_id in DEMO_KEYS:
        try:
            cli("key", "show", key_id)
        except RuntimeError:
            missing.append(key_id)
    return missing


def write_private(path, text):
    """A secret file only this user can read (also one left by an earlier run)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def fresh_api_token():
    """A new operator token for this run, saved 0600; the previous run's is revoked."""
    id_file = API_TOKEN.with_name("api-token.id")
    if id_file.exists():
        # Already revoked or from an older database: nothing to undo.
        subprocess.run([str(KEYGATE), "token", "revoke", id_file.read_text().strip(), "--db", str(DB)],
                       capture_output=True, timeout=30)
    out = cli("--json", "token", "create", "--operator", "--db", str(DB))
    tok = json.loads(out)
    write_private(API_TOKEN, tok["token"] + "\n")
    id_file.write_text(tok["token_id"] + "\n")
    return tok["token"]


def portal_link():
    """A one-time developer-portal link for tenant acme (works once, 10 minutes)."""
    try:
        out = cli("--json", "portal", "link", "--tenant", "acme", "--db", str(DB),
                  "--base-url", f"http://127.0.0.1:{API_PORT}")
        return json.loads(out)["url"]
    except Exception as e:  # the demo runs without a link; say why
        return f"(no portal link: {e})"


def banner(port, admin_port, api_token, sync_secret_file):
    base = f"http://127.0.0.1:{port}"
    api = f"http://127.0.0.1:{API_PORT}"
    partner = DEMO_KEYS["acme-partner"]
    print(f"""
keygate ({BUILD} build) is running: Envoy {base} -> echo upstream (admin http://127.0.0.1:{admin_port})

Demo credentials (tenant acme; demo only) live in the demo store {STORE}:
the CLI below can show, deactivate, revoke and rotate them.
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

Manage keys live: the sidecar pushes every change into Envoy, no restart
(measured from the command's exit to enforcement: {PROPAGATION}):
  export KEYGATE_STORE={STORE}
  {KEYGATE} key list
  {KEYGATE} key show acme-read
  {KEYGATE} key create --tenant globex --scope read --rate 10/min
  {KEYGATE} key deactivate acme-read     # then 403
  {KEYGATE} key activate acme-read
  {KEYGATE} session revoke --key acme-default --session demo   # its tokens: 401
  {KEYGATE} key revoke <key-id>          # then 401
  {KEYGATE} sync --endpoint http://127.0.0.1:{SYNC_PORT} --secret-file {sync_secret_file} --once

Management API (keygate serve; OpenAPI at {api}/api/v1/openapi.json):
  export KEYGATE_API_URL={api}
  export KEYGATE_API_TOKEN={api_token}    # operator token of this run, also in {API_TOKEN}
  curl -s $KEYGATE_API_URL/api/v1/tenants/acme/keys -H "Authorization: Bearer $KEYGATE_API_TOKEN"
  curl -s -X POST $KEYGATE_API_URL/api/v1/tenants/acme/keys -H "Authorization: Bearer $KEYGATE_API_TOKEN" \\
       -H 'Content-Type: application/json' -d '{{"name": "from the API", "scopes": ["read"]}}'
  curl -s "$KEYGATE_API_URL/api/v1/tenants/acme/logs?limit=5" -H "Authorization: Bearer $KEYGATE_API_TOKEN"

Developer portal for tenant acme (one-time link, valid 10 minutes; make another with
`{KEYGATE} portal link --tenant acme --db {DB} --base-url {api}`):
  {portal_link()}

The store keeps its keys across `make run` restarts; to start fresh:
  rm -rf {STORE.parent}

Ctrl-C stops Envoy, the sidecar (keygate serve) and the upstream.
""", flush=True)


def main():
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # A fresh sync secret per run, handed to Envoy and the sidecar only.
    sync_secret = secrets.token_hex(32)
    try:
        created = prepare_store()
    except RuntimeError as e:
        print(f"could not prepare the demo store {STORE}: {e}", file=sys.stderr)
        return 1
    print(f"{'Created' if created else 'Using'} the demo store {STORE}.", flush=True)
    missing = missing_demo_keys()
    if missing:
        print(f"note: the demo store no longer holds {', '.join(missing)} (revoked?): the banner's keys for "
              f"them will get 401; `rm -rf {STORE.parent}` starts fresh.", flush=True)
    # The sync secret of this run, for trying `keygate sync` by hand.
    sync_secret_file = STORE.parent / "sync-secret"
    write_private(sync_secret_file, sync_secret + "\n")
    # The demo keys come from the store; the plugin config keeps none, so each
    # key id exists once (envoy/envoy.yaml's inline keys remain for the tests
    # and as the documented plugin-config alternative).
    plugin_config = {**demo_plugin_config(), "credentials": []}
    workdir = Path(tempfile.mkdtemp(prefix="keygate-run-"))
    with EchoServer(free_port()) as echo:
        access_log = STORE.parent / "access.log"
        config = render(plugin_config, gate_port=GATE_PORT, admin_port=ADMIN_PORT, upstream_port=echo.port,
                        sync_port=SYNC_PORT, access_log=access_log)
        envoy = Envoy(config, concurrency=2, workdir=workdir, sync_secret=sync_secret,
                      token_keys=f"demo:{secrets.token_hex(32)}")
        # Beside the other logs, kept after exit (config errors show there).
        envoy.log_path = STORE.parent / "envoy.log"
        envoy.log_path.unlink(missing_ok=True)
        # `keygate serve` is the sidecar: it syncs Envoy (an API change is
        # pushed at once), ingests the access log and answers the API.
        sidecar = Server(str(STORE), STORE.parent, "--listen", f"127.0.0.1:{API_PORT}", "--db", str(DB),
                         "--endpoint", f"http://127.0.0.1:{SYNC_PORT}", "--access-log", str(access_log),
                         secret=sync_secret, log_name="sidecar.log")
        try:
            api_token = fresh_api_token()
            envoy.start()
            sidecar.start()
            banner(GATE_PORT, ADMIN_PORT, api_token, sync_secret_file)
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
            shutil.rmtree(workdir, ignore_errors=True)
            print("\nstopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
