#!/usr/bin/env python3
"""Writes the keygate filter as two OCI image layout directories, without a
Docker engine and with the standard library only:

  oci-compat/  Istio's "compat" image: an OCI image whose single gzipped tar
               layer holds `plugin.wasm` (what Istio's WasmPlugin and Envoy
               Gateway pull).
  oci-wasm/    the Wasm OCI artifact: config `application/vnd.wasm.config.v0+json`,
               one layer `application/vnd.wasm.content.layer.v1+wasm` that is
               the .wasm itself.

Reproducible: the tar entry has a fixed mtime/uid/gid/owner/mode, gzip's
header carries mtime 0 and no file name, JSON is written with sorted keys
and no timestamps, so the same .wasm always gives the same digests.
Push with `skopeo copy oci:dist/oci-compat docker://REGISTRY/keygate:TAG`
(see README, "Distribution")."""

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.wasm.config.v0+json"
WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
# 2000-01-01T00:00:00Z: a fixed, non-zero time for the tar entry (some tools
# treat mtime 0 as "unset").
FIXED_MTIME = 946684800


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type, data, **extra):
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data),
            **extra}


def compat_layer(wasm):
    """(gzipped layer, uncompressed tar): one file, plugin.wasm, at the root."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mtime = FIXED_MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    tar_bytes = tar_buf.getvalue()
    gz_buf = io.BytesIO()
    # filename="" and mtime=0: nothing of the build machine in the header.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buf, mtime=0, compresslevel=9) as gz:
        gz.write(tar_bytes)
    return gz_buf.getvalue(), tar_bytes


def write_layout(out, manifest_blobs, manifest, annotations):
    """An OCI image layout: oci-layout, index.json, blobs/sha256/<digest>."""
    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    manifest_bytes = canonical_json(manifest)
    for data in [*manifest_blobs, manifest_bytes]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [descriptor(OCI_MANIFEST, manifest_bytes, annotations=annotations)]}
    (out / "index.json").write_bytes(canonical_json(index))
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def build(wasm_path, out_dir, version, revision):
    wasm = Path(wasm_path).read_bytes()
    out_dir = Path(out_dir)
    annotations = {
        "org.opencontainers.image.title": "keygate",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.description": "keygate API-key gate, proxy-wasm filter for Envoy",
    }
    ref = {"org.opencontainers.image.ref.name": version}

    layer, tar_bytes = compat_layer(wasm)
    config = canonical_json({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]},
    })
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER_GZIP, layer)],
                # Istio reads this variant annotation for compat images.
                "annotations": {**annotations, "module.wasm.image/variant": "compat"}}
    compat = write_layout(out_dir / "oci-compat", [config, layer], manifest, ref)

    wasm_layer = descriptor(WASM_LAYER, wasm)
    config = canonical_json({"architecture": "wasm", "os": "wasip1", "layerDigests": [wasm_layer["digest"]]})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": WASM_CONFIG,
                "config": descriptor(WASM_CONFIG, config), "layers": [wasm_layer], "annotations": annotations}
    artifact = write_layout(out_dir / "oci-wasm", [config, wasm], manifest, ref)
    return {"oci-compat": compat, "oci-wasm": artifact, "wasm": "sha256:" + hashlib.sha256(wasm).hexdigest()}


# Digest placeholders in deploy/ manifests, filled in by `--deploy-dir`:
# the Istio WasmPlugin pins the compat image, Envoy Gateway the Wasm artifact.
PLACEHOLDERS = {"oci-compat": "0" * 64, "oci-wasm": "0" * 63 + "1"}


def fill_digests(deploy_dir, digests):
    """Replaces the placeholder digests in every file under `deploy_dir`."""
    for path in sorted(Path(deploy_dir).rglob("*")):
        if path.is_file():
            text = path.read_text()
            for layout, placeholder in PLACEHOLDERS.items():
                text = text.replace(placeholder, digests[layout].removeprefix("sha256:"))
            path.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wasm", required=True, help="the built filter (.wasm)")
    parser.add_argument("--out", required=True, help="directory to write oci-compat/ and oci-wasm/ into")
    parser.add_argument("--version", required=True)
    parser.add_argument("--revision", required=True, help="git commit")
    parser.add_argument("--deploy-dir", help="copy of deploy/ whose placeholder digests to fill in")
    args = parser.parse_args()
    digests = build(args.wasm, args.out, args.version, args.revision)
    if args.deploy_dir:
        fill_digests(args.deploy_dir, digests)
    for name, digest in digests.items():
        print(f"{name}: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
