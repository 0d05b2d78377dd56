"""deploy/: every manifest parses, pins the image by digest, keeps secrets in
Secrets, and every plugin configuration in it is accepted by the filter's own
validation in a real Envoy (and a broken one is refused, so the check bites)."""

import configparser
import copy
import json
import re

import pytest
import yaml

from tests.harness import ROOT, request

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs():
    return [(p, d) for p in MANIFESTS for d in docs(p)]


def plugin_configs():
    """(where, plugin configuration) for every wasm plugin in deploy/."""
    found = []
    for path, doc in all_docs():
        if doc.get("kind") == "WasmPlugin":
            found.append((f"{path.name}:WasmPlugin", doc["spec"]["pluginConfig"]))
        elif doc.get("kind") == "EnvoyExtensionPolicy":
            for wasm in doc["spec"]["wasm"]:
                found.append((f"{path.name}:EnvoyExtensionPolicy:{wasm['name']}", wasm["config"]))
    return found


def test_every_manifest_parses_and_names_its_kind():
    assert MANIFESTS, "no manifests under deploy/"
    for path, doc in all_docs():
        assert isinstance(doc, dict), path
        if path.name != "sync-sidecar.yaml":  # a patch, not an object
            assert doc.get("apiVersion") and doc.get("kind"), path


def test_there_is_a_plugin_config_for_istio_and_envoy_gateway():
    kinds = {where.split(":")[1] for where, _ in plugin_configs()}
    assert kinds == {"WasmPlugin", "EnvoyExtensionPolicy"}


def test_plugins_pull_the_image_by_digest_and_fail_closed():
    for _, doc in all_docs():
        if doc.get("kind") == "WasmPlugin":
            assert re.fullmatch(r"oci://[^@\s]+@sha256:[0-9a-f]{64}", doc["spec"]["url"])
            assert doc["spec"]["failStrategy"] == "FAIL_CLOSE"
        elif doc.get("kind") == "EnvoyExtensionPolicy":
            for wasm in doc["spec"]["wasm"]:
                assert wasm["code"]["type"] == "Image"
                assert re.fullmatch(r"[0-9a-f]{64}", wasm["code"]["image"]["sha256"])
                assert wasm["failOpen"] is False


def containers():
    for path, doc in all_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for c in spec["containers"]:
                yield path, spec, c


def test_keygate_containers_take_the_store_from_a_secret_and_run_unprivileged():
    seen = set()
    for path, pod, c in containers():
        seen.add(c["args"][0])
        env = {e["name"]: e for e in c.get("env", [])}
        assert "secretKeyRef" in env["KEYGATE_STORE"]["valueFrom"], path
        assert "value" not in env["KEYGATE_STORE"]
        ctx = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert ctx["runAsNonRoot"] is True and ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert seen == {"serve", "sync"}
    text = "\n".join(p.read_text() for p in MANIFESTS)
    assert not re.search(r"^[^#]*postgres://[^:@\s]+:[^@\s]+@", text, re.M), "a database password in a manifest"


def test_systemd_units_run_keygate_serve_and_sync_with_secrets_from_a_file():
    for name, sub in (("keygate-serve.service", "serve"), ("keygate-sync.service", "sync")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read_string((DEPLOY / "systemd" / name).read_text())
        assert {"Unit", "Service", "Install"} <= set(unit.sections())
        assert unit["Service"]["ExecStart"].split()[:2] == ["/usr/local/bin/keygate", sub]
        assert unit["Service"]["EnvironmentFile"].startswith("/etc/keygate/")
        assert unit["Service"]["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("where, config", plugin_configs(), ids=[w for w, _ in plugin_configs()])
def test_plugin_config_in_manifest_is_accepted_by_the_filter(envoy_factory, where, config):
    # The JSON Istio and Envoy Gateway hand the filter; starting fails if
    # on_configure refuses it.
    with envoy_factory(raw=json.dumps(config)) as envoy:
        assert "configured: role Gate" in envoy.log()
        assert request(envoy.port, "GET", "/health").status == 200
        assert request(envoy.port, "GET", "/v1/items").status == 401


def test_a_broken_manifest_plugin_config_is_refused(envoy_factory):
    where, config = plugin_configs()[0]
    broken = copy.deepcopy(config)
    broken["routes"][1]["path_prefix"] = "v1"  # no leading slash
    with envoy_factory(raw=json.dumps(broken), wait=False) as envoy:
        code = envoy.wait_exit(60)
        assert code is not None and code != 0, f"Envoy accepted a broken copy of {where}"
        assert "routes[1].path_prefix" in envoy.log()
