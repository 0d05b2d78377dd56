"""`make run`'s demo (scripts/run_demo.py): the demo tenant's keys live in the
demo store, so the CLI can manage them; the store survives restarts; the
run's temporary directory is removed when it stops."""

import os
import re
import signal
import subprocess
import sys
import time

from tests.harness import KEYGATE, ROOT, free_port, request, wait_until


def start_demo(store, ports):
    env = {**os.environ, "KEYGATE_STORE": str(store), "KEYGATE_PORT": str(ports[0]),
           "KEYGATE_ADMIN_PORT": str(ports[1]), "KEYGATE_SYNC_PORT": str(ports[2]),
           "KEYGATE_API_PORT": str(free_port())}
    store.parent.mkdir(parents=True, exist_ok=True)
    out = store.parent / "demo.out"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.run_demo"], env=env, cwd=ROOT,
                            stdout=out.open("w"), stderr=subprocess.STDOUT)
    assert wait_until(lambda: "Ctrl-C stops" in out.read_text() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, out.read_text()
    return proc, out


def stop_demo(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def status(port, key):
    return request(port, "GET", "/v1/items", [("x-api-key", key)]).status


def test_demo_keys_are_in_the_store_and_managed_by_the_cli(tmp_path):
    store = tmp_path / "demo" / "demo-store.json"
    ports = [free_port(), free_port(), free_port()]
    cli = [str(KEYGATE), "--store", str(store)]
    proc, out = start_demo(store, ports)
    try:
        banner = out.read_text()
        assert "Created the demo store" in banner and "rm -rf" in banner
        assert "from the next request" not in banner
        workdir = re.search(r"Envoy log:\s+(\S+)/envoy\.log", banner).group(1)
        assert wait_until(lambda: status(ports[0], "demo-acme-read-key") == 200, timeout=10)
        assert status(ports[0], "demo-acme-suspended-key") == 403
        shown = subprocess.run([*cli, "--json", "key", "show", "acme-read"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        subprocess.run([*cli, "key", "deactivate", "acme-read"], check=True, capture_output=True)
        assert wait_until(lambda: status(ports[0], "demo-acme-read-key") == 403, timeout=10)
        revoked = subprocess.run([*cli, "session", "revoke", "--key", "acme-default", "--session", "demo"],
                                 capture_output=True, text=True)
        assert revoked.returncode == 0, revoked.stderr
    finally:
        stop_demo(proc)
    assert not os.path.exists(workdir), "the run's temporary directory is removed"

    # A restart keeps the store as it was left.
    proc, out = start_demo(store, ports)
    try:
        assert "Using the demo store" in out.read_text()
        time.sleep(0.5)
        assert wait_until(lambda: status(ports[0], "demo-acme-default-key") == 200, timeout=10)
        assert status(ports[0], "demo-acme-read-key") == 403
    finally:
        stop_demo(proc)
