"""envoy/docker-compose.yml cannot run here (no Docker engine); these checks
keep it in step with envoy/envoy.yaml, which the rest of the suite runs."""

import yaml

from tests.harness import ENVOY_YAML, load_envoy_yaml, wasm_filter

COMPOSE = yaml.safe_load((ENVOY_YAML.parent / "docker-compose.yml").read_text())
ENVOY = load_envoy_yaml()


def listener(name):
    return next(l for l in ENVOY["static_resources"]["listeners"] if l["name"] == name)


def test_compose_mounts_the_config_and_the_wasm_where_envoy_yaml_expects_them():
    volumes = COMPOSE["services"]["envoy"]["volumes"]
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in volumes
    wasm_path = wasm_filter(ENVOY)["vm_config"]["code"]["local"]["filename"]
    assert any(v.endswith(f":{wasm_path}:ro") and "keygate_filter.wasm" in v for v in volumes)


def test_compose_passes_every_secret_the_vm_reads_from_its_environment():
    wanted = set()
    for name in ("gate", "sync"):
        wanted |= set(wasm_filter(ENVOY, name)["vm_config"]["environment_variables"]["host_env_keys"])
    assert wanted <= set(COMPOSE["services"]["envoy"]["environment"])


def test_compose_ports_and_upstream_match_envoy_yaml():
    gate_port = listener("gate")["address"]["socket_address"]["port_value"]
    assert f"127.0.0.1:{gate_port}:{gate_port}" in COMPOSE["services"]["envoy"]["ports"]
    upstream = next(c for c in ENVOY["static_resources"]["clusters"] if c["name"] == "upstream")
    addr = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr["address"] in COMPOSE["services"]
    assert str(addr["port_value"]) in COMPOSE["services"][addr["address"]]["command"]


def test_compose_sidecar_reaches_the_loopback_sync_listener():
    sync = listener("sync")["address"]["socket_address"]
    assert sync["address"] == "127.0.0.1"
    sidecar = COMPOSE["services"]["sidecar"]
    assert sidecar["network_mode"] == "service:envoy"
    assert f"http://127.0.0.1:{sync['port_value']}" in sidecar["command"]


DOCKERFILE = (ENVOY_YAML.parent.parent / "Dockerfile").read_text()


def dockerfile_stages():
    return [line.split()[1] for line in DOCKERFILE.splitlines() if line.startswith("FROM ")]


def test_compose_sidecar_is_built_from_the_dockerfile_not_a_host_binary():
    sidecar = COMPOSE["services"]["sidecar"]
    build = sidecar["build"]
    dockerfile = (ENVOY_YAML.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == ENVOY_YAML.parent.parent / "Dockerfile"
    assert not any("target/" in v for v in sidecar.get("volumes", [])), "host-built binary mounted"
    # The image's entrypoint is keygate: the command is its arguments.
    assert sidecar["command"][0] == "sync"
    store = sidecar["environment"]["KEYGATE_STORE"]
    assert any(v.endswith(":" + store.rsplit("/", 1)[0]) for v in sidecar["volumes"]), "store not on a volume"


def test_dockerfile_is_multi_stage_non_root_without_a_shell():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert final.startswith(("gcr.io/distroless/", "scratch")), final
    user = [line.split()[1] for line in DOCKERFILE.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = next(line for line in DOCKERFILE.splitlines() if line.startswith("ENTRYPOINT "))
    assert '"/usr/local/bin/keygate"' in entry, "exec form, no shell"
    # --locked: the image builds what Cargo.lock says.
    assert "--locked" in DOCKERFILE and "-p keygate-sidecar" in DOCKERFILE


def test_compose_creates_the_sidecar_store_once_before_sync_starts():
    sidecar = COMPOSE["services"]["sidecar"]
    init = COMPOSE["services"]["store-init"]
    assert init["image"] == sidecar["image"]
    assert init["command"] == ["store", "init", "--if-missing"]
    assert init["environment"]["KEYGATE_STORE"] == sidecar["environment"]["KEYGATE_STORE"]
    assert init["volumes"] == sidecar["volumes"]
    assert sidecar["depends_on"]["store-init"]["condition"] == "service_completed_successfully"
