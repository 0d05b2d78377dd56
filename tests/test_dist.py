"""Release artifacts: the OCI layouts of the filter (Istio "compat" image and
Wasm OCI artifact) are well-formed, carry the built .wasm byte for byte and
are reproducible; `make dist` produces verifiable checksums and versioned
binaries."""

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile

import pytest

from scripts import oci_layout
from tests.harness import KEYGATE, ROOT, WASM


def blob(layout, digest):
    algo, hexdigest = digest.split(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its name"
    return data


def manifest_of(layout):
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [desc] = index["manifests"]
    assert desc["mediaType"] == oci_layout.OCI_MANIFEST
    data = blob(layout, desc["digest"])
    assert len(data) == desc["size"]
    return json.loads(data)


def checked_layer(layout, desc):
    data = blob(layout, desc["digest"])
    assert len(data) == desc["size"]
    return data


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("oci")
    digests = oci_layout.build(WASM, out, "0.0.0-test", "abc1234")
    return out, digests


def test_compat_image_holds_plugin_wasm_identical_to_the_build(layouts):
    out, _ = layouts
    layout = out / "oci-compat"
    manifest = manifest_of(layout)
    assert manifest["config"]["mediaType"] == oci_layout.OCI_CONFIG
    config = json.loads(checked_layer(layout, manifest["config"]))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == oci_layout.OCI_LAYER_GZIP
    tar_bytes = gzip.decompress(checked_layer(layout, layer))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        [member] = tar.getmembers()
        assert member.name == "plugin.wasm" and member.isfile()
        assert tar.extractfile(member).read() == WASM.read_bytes()


def test_wasm_artifact_layer_is_the_built_wasm(layouts):
    out, digests = layouts
    layout = out / "oci-wasm"
    manifest = manifest_of(layout)
    assert manifest["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
    config = json.loads(checked_layer(layout, manifest["config"]))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.wasm.content.layer.v1+wasm"
    assert checked_layer(layout, layer) == WASM.read_bytes()
    assert layer["digest"] == digests["wasm"] == "sha256:" + hashlib.sha256(WASM.read_bytes()).hexdigest()
    assert config["layerDigests"] == [layer["digest"]]


def tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_building_twice_gives_the_same_digests_and_bytes(layouts, tmp_path):
    out, digests = layouts
    again = oci_layout.build(WASM, tmp_path, "0.0.0-test", "abc1234")
    assert again == digests
    for name in ("oci-compat", "oci-wasm"):
        assert tree(tmp_path / name) == tree(out / name)


def test_a_different_wasm_changes_the_digest(layouts, tmp_path):
    _, digests = layouts
    other = tmp_path / "other.wasm"
    other.write_bytes(WASM.read_bytes() + b"\0")
    assert oci_layout.build(other, tmp_path / "o", "0.0.0-test", "abc1234")["oci-compat"] != digests["oci-compat"]


@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed (apt-get install skopeo)")
@pytest.mark.parametrize("name", ["oci-compat", "oci-wasm"])
def test_skopeo_reads_and_copies_the_layout_keeping_its_digest(layouts, tmp_path, name):
    """A real OCI client accepts the layout, as `skopeo copy … docker://` would."""
    out, digests = layouts
    src = f"oci:{out / name}:0.0.0-test"
    raw = subprocess.run(["skopeo", "inspect", "--raw", src], capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout).hexdigest() == digests[name]
    copy = subprocess.run(["skopeo", "copy", "--quiet", src, f"oci:{tmp_path / 'copy'}:x"], capture_output=True,
                          timeout=60)
    assert copy.returncode == 0, copy.stderr
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digests[name]


def git_head():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.mark.skipif(not shutil.which("make") or not shutil.which("cargo"), reason="needs make and cargo")
def test_make_dist_writes_checksummed_versioned_artifacts(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(["make", "-s", "dist", f"DIST={dist}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("keygate.wasm", "keygate", "SHA256SUMS", "oci-compat/index.json", "oci-wasm/index.json",
                 "examples/envoy.yaml", "examples/envoy-remote.yaml", "examples/deploy"):
        assert (dist / name).exists(), name
    assert (dist / "keygate.wasm").read_bytes() == WASM.read_bytes()
    check = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=dist, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {line.split(maxsplit=1)[1] for line in (dist / "SHA256SUMS").read_text().splitlines()}
    assert {"keygate.wasm", "keygate"} <= listed
    # The example manifests in dist/ pin this build's images.
    compat = json.loads((dist / "oci-compat/index.json").read_text())["manifests"][0]["digest"]
    assert compat in (dist / "examples/deploy/istio/wasmplugin.yaml").read_text()
    artifact = json.loads((dist / "oci-wasm/index.json").read_text())["manifests"][0]["digest"]
    assert artifact.split(":")[1] in (dist / "examples/deploy/envoy-gateway/envoyextensionpolicy.yaml").read_text()
    version = subprocess.run([dist / "keygate", "--version"], capture_output=True, text=True, timeout=10).stdout
    head = git_head()
    assert re.fullmatch(r"keygate \d+\.\d+\.\d+\S* \((\w+)\)\n", version), version
    if head:
        assert f"({head})" in version
        # The filter logs the same commit at start (src/root_context.rs).
        assert head.encode() in (dist / "keygate.wasm").read_bytes()


def test_keygate_version_names_the_commit():
    out = subprocess.run([KEYGATE, "--version"], capture_output=True, text=True, timeout=10).stdout
    assert re.fullmatch(r"keygate \d+\.\d+\.\d+\S* \(([0-9a-f]{7,}|unknown)\)\n", out), out
