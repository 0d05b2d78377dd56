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


def start_demo(store, ports, tmpdir):
    # KEYGATE_STORE names another store: the demo keeps to its own.
    env = {**os.environ, "KEYGATE_STORE": str(store.parent / "not-the-demo.json"), "TMPDIR": str(tmpdir),
           "KEYGATE_DEMO_STORE": str(store), "KEYGATE_PORT": str(ports[0]),
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
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc, out = start_demo(store, ports, tmpdir)
    try:
        banner = out.read_text()
        assert "Created the demo store" in banner and "rm -rf" in banner
        assert "from the next request" not in banner and "no longer holds" not in banner
        assert re.search(r"Envoy log:\s+(\S+)", banner).group(1) == str(store.parent / "envoy.log")
        assert list(tmpdir.iterdir()), "the run keeps its Envoy config in a temporary directory"
        assert wait_until(lambda: status(ports[0], "demo-acme-read-key") == 200, timeout=10)
        # The banner's `keygate sync` line works: the run's secret is in a private file.
        secret_file = store.parent / "sync-secret"
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        assert f"--secret-file {secret_file}" in banner
        synced = subprocess.run([*cli, "sync", "--endpoint", f"http://127.0.0.1:{ports[2]}", "--secret-file",
                                 str(secret_file), "--once"], capture_output=True, text=True, timeout=60)
        assert synced.returncode == 0, synced.stderr
        assert status(ports[0], "demo-acme-suspended-key") == 403
        shown = subprocess.run([*cli, "--json", "key", "show", "acme-read"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        subprocess.run([*cli, "key", "deactivate", "acme-read"], check=True, capture_output=True)
        assert wait_until(lambda: status(ports[0], "demo-acme-read-key") == 403, timeout=10)
        revoked = subprocess.run([*cli, "session", "revoke", "--key", "acme-default", "--session", "demo"],
                                 capture_output=True, text=True)
        assert revoked.returncode == 0, revoked.stderr
        subprocess.run([*cli, "key", "revoke", "acme-suspended"], check=True, capture_output=True)
    finally:
        stop_demo(proc)
    assert not list(tmpdir.iterdir()), "the run's temporary directory is removed"
    assert "keygate" in (store.parent / "envoy.log").read_text(), "Envoy's log is kept beside the store"

    # A restart keeps the store as it was left, and says which demo key is gone.
    proc, out = start_demo(store, ports, tmpdir)
    try:
        banner = out.read_text()
        assert "Using the demo store" in banner
        assert "the demo store no longer holds acme-suspended (revoked?)" in banner
        time.sleep(0.5)
        assert wait_until(lambda: status(ports[0], "demo-acme-default-key") == 200, timeout=10)
        assert status(ports[0], "demo-acme-read-key") == 403
    finally:
        stop_demo(proc)
