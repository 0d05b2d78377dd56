"""The keygate CLI as a newcomer meets it: the real binary, no Envoy. A store
must be created explicitly, messages name what is wrong and what to do,
`--json` errors are JSON, and a closed pipe ends it quietly."""

import json
import os
import subprocess
import time

import pytest

from tests.harness import KEYGATE, free_port


def run(*args, store=None, env=None, stdin=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("KEYGATE_STORE", "KEYGATE_SYNC_SECRET")}
    full_env.update(env or {})
    cmd = [str(KEYGATE), *(["--store", str(store)] if store else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=full_env, input=stdin)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store.json"
    p = run("--json", "store", "init", store=path)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["store_id"]) == 16
    return path


def test_a_missing_store_is_refused_naming_the_path_and_the_variable(tmp_path):
    missing = tmp_path / "typo.json"
    for args in (["key", "list"], ["key", "create", "--tenant", "acme", "--scope", "read"], ["key", "show", "x"]):
        p = run(*args, store=missing)
        assert p.returncode == 1, (args, p.stdout)
        assert str(missing) in p.stderr and "store init" in p.stderr and "KEYGATE_STORE" in p.stderr, p.stderr
        assert p.stdout == ""
    assert list(tmp_path.iterdir()) == [], "nothing may be created"


def test_no_store_configured_is_refused_and_nothing_is_created(tmp_path):
    p = subprocess.run([str(KEYGATE), "key", "create", "--tenant", "acme", "--scope", "read"], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "KEYGATE_STORE"})
    assert p.returncode == 1 and "KEYGATE_STORE" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_store_in_a_missing_directory_is_not_created(tmp_path):
    deep = tmp_path / "no" / "such" / "dir" / "s.json"
    p = run("store", "init", store=deep)
    assert p.returncode == 1 and "does not exist" in p.stderr, p.stderr
    assert not (tmp_path / "no").exists()


def test_sync_once_without_a_store_pushes_nothing(tmp_path):
    port = free_port()
    p = run("sync", "--once", "--endpoint", f"http://127.0.0.1:{port}", store=tmp_path / "nope.json",
            env={"KEYGATE_SYNC_SECRET": "x" * 40})
    assert p.returncode == 1 and "no store at" in p.stderr, p.stderr


def test_init_refuses_an_existing_store(store):
    before = store.read_bytes()
    p = run("store", "init", store=store)
    assert p.returncode == 1 and "already exists" in p.stderr
    assert store.read_bytes() == before


def test_a_bad_tenant_is_blamed_on_the_tenant(store):
    p = run("key", "create", "--tenant", "bad tenant", "--scope", "read", store=store)
    assert p.returncode == 1
    assert "--tenant" in p.stderr and "key_id" not in p.stderr, p.stderr


def test_a_default_key_with_a_scope_is_refused(store):
    p = run("key", "create", "--tenant", "acme", "--kind", "default", "--scope", "read", store=store)
    assert p.returncode == 1 and "--scope" in p.stderr and "default key has every scope" in p.stderr, p.stderr
    assert json.loads(run("--json", "key", "list", store=store).stdout) == []


@pytest.mark.parametrize("args, forms", [
    (["key", "create", "--tenant", "acme", "--scope", "read", "--rate", "5/fortnight"], "100/min"),
    (["logs", "--since", "yesterday"], "10m"),
])
def test_unparseable_values_say_which_forms_work(store, args, forms):
    p = run(*args, store=store, stdin="")
    assert p.returncode == 2
    assert forms in p.stderr and "expected number" not in p.stderr, p.stderr


def test_json_mode_prints_errors_as_json_on_stderr(store, tmp_path):
    for args, code in ((["key", "show", "nope"], "no_such_key"),
                       (["key", "create", "--tenant", "acme", "--rate", "x"], "usage"),
                       (["key", "list"], "store_missing")):
        target = store if code != "store_missing" else tmp_path / "missing.json"
        p = run("--json", *args, store=target)
        assert p.returncode != 0 and p.stdout == ""
        err = json.loads(p.stderr)
        assert err["error"] == code and err["message"], err


def test_usage_does_not_claim_the_store_option_is_required():
    p = run("key", "list", "--help")
    assert p.returncode == 0
    assert "[--store" in p.stdout or "--store <PATH|URL>" in p.stdout
    assert "Usage: keygate key list --store" not in p.stdout


def test_a_closed_pipe_ends_quietly(store):
    for i in range(3):
        assert run("key", "create", "--tenant", f"t{i}", "--scope", "read", store=store).returncode == 0
    for args in (["--json", "key", "list"], ["key", "list"]):
        cmd = [str(KEYGATE), "--store", str(store), *args]
        # `head -c1` closes the pipe after one byte: keygate must not panic.
        p = subprocess.run(f"{' '.join(cmd)} | head -c1 >/dev/null; echo ${{PIPESTATUS[0]}}", shell=True,
                           executable="/bin/bash", capture_output=True, text=True, timeout=30)
        assert "panicked" not in p.stderr and "Broken pipe" not in p.stderr, p.stderr
        assert p.stdout.strip() in ("0", "141"), p.stdout


def test_a_large_output_into_a_closed_pipe_exits_quietly(store, tmp_path):
    log = tmp_path / "access.log"
    line = json.dumps({"time": "2026-11-24T02:12:24.582Z", "key_id": "k1", "tenant": "acme", "method": "GET",
                       "path": "/v1", "client_ip": "127.0.0.1", "status": 200, "decision": "allowed"})
    log.write_text((line + "\n") * 20000)
    p = subprocess.run(f"{KEYGATE} logs --file {log} | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=30)
    assert p.stderr == "", p.stderr
    assert p.stdout.strip() == "141"


def test_demo_key_values_can_be_given_and_then_managed(store):
    p = run("--json", "key", "create", "--tenant", "acme", "--id", "acme-read", "--scope", "read",
            "--key-value", "demo-acme-read-key", store=store)
    assert json.loads(p.stdout)["api_key"] == "demo-acme-read-key"
    assert "demo-acme-read-key" not in store.read_text()
    assert json.loads(run("--json", "key", "show", "acme-read", store=store).stdout)["key_id"] == "acme-read"
    short = run("key", "create", "--tenant", "acme", "--scope", "read", "--key-value", "short", store=store)
    assert short.returncode == 1 and "--key-value" in short.stderr


def test_postgres_unreachable_names_host_and_port():
    port = free_port()
    p = run("key", "list", store=f"postgres://nobody@127.0.0.1:{port}/keygate")
    assert p.returncode == 1 and f"127.0.0.1:{port}" in p.stderr, p.stderr


def test_sync_waits_for_an_unreachable_postgres_naming_it(tmp_path):
    port = free_port()
    log = tmp_path / "sync.log"
    env = {k: v for k, v in os.environ.items() if k != "KEYGATE_STORE"}
    env["KEYGATE_SYNC_SECRET"] = "x" * 40
    with log.open("w") as f:
        proc = subprocess.Popen([str(KEYGATE), "--store", f"postgres://nobody@127.0.0.1:{port}/keygate", "sync",
                                 "--endpoint", f"http://127.0.0.1:{free_port()}"], stderr=f, env=env)
    try:
        deadline = time.monotonic() + 20

        def said():
            text = log.read_text()
            return f"127.0.0.1:{port}" in text and "waiting" in text

        while not said() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"127.0.0.1:{port}" in log.read_text() and "waiting" in log.read_text(), log.read_text()
        assert proc.poll() is None, "the daemon waits for the database instead of exiting"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_store_init_if_missing_keeps_an_existing_store_and_its_identity(store):
    before = json.loads(run("--json", "key", "create", "--tenant", "acme", "--scope", "read", store=store).stdout)
    again = run("--json", "store", "init", store=store)
    assert again.returncode == 1 and "store_exists" in again.stderr, again.stderr
    kept = run("--json", "store", "init", "--if-missing", store=store)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["created"] is False
    listed = json.loads(run("--json", "key", "list", store=store).stdout)
    assert [k["key_id"] for k in listed] == [before["key_id"]]


def test_store_init_if_missing_creates_a_new_store(tmp_path):
    path = tmp_path / "new.json"
    p = run("--json", "store", "init", "--if-missing", store=path)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["store_id"]) == 16
