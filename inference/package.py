"""Model packages: the folder that export writes and the service and batch scoring load, verified before use.

A package is a folder holding `manifest.json` plus the model files it lists. The manifest records every
file's sha256; `load_package` refuses a package whose files are missing, tampered with or truncated,
whose manifest has an unknown format or version, or whose ONNX files point at data outside the folder.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.spec import ModelSpec

MANIFEST_NAME = "manifest.json"
PACKAGE_FORMAT = "visionserve-model-package"
PACKAGE_FORMAT_VERSION = 1

# File roles inside a package -> the conventional file name export writes.
BACKEND_FILES = {
    "onnx": "model.onnx",  # fp32, dynamic batch
    "onnx-int8": "model.int8.onnx",  # static int8 (QDQ)
    "torchscript": "model.ts",
}

# Exported graphs' tensor names.
INPUT_NAME = "pixels"  # uint8 (N, H, W, 3) RGB
OUTPUT_PROBABILITIES = "probabilities"  # float32 (N, num_classes)
OUTPUT_LOGITS = "logits"  # float32 (N, num_classes)


class PackageError(Exception):
    """A model package that must not be used; the message says why."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    manifest: dict[str, Any]
    spec: ModelSpec

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def backends(self) -> list[str]:
        files = self.manifest["files"]
        return [b for b, file_name in BACKEND_FILES.items() if file_name in files]

    def model_path(self, backend: str) -> Path:
        """The verified file of `backend` (one of BACKEND_FILES)."""
        if backend not in BACKEND_FILES:
            raise PackageError(f"unknown backend {backend!r}; valid: {sorted(BACKEND_FILES)}")
        file_name = BACKEND_FILES[backend]
        if file_name not in self.manifest["files"]:
            raise PackageError(f"package {self.root} has no {backend} model (no {file_name}); it has {self.backends}")
        return self.root / file_name

    def sha256(self, backend: str) -> str:
        return str(self.manifest["files"][BACKEND_FILES[backend]]["sha256"])


def read_manifest(root: Path) -> dict[str, Any]:
    manifest_path = Path(root) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(f"{root} is not a model package: no {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{manifest_path} is not a {PACKAGE_FORMAT} manifest")
    if manifest.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(
            f"{manifest_path} has format version {manifest.get('format_version')!r}; "
            f"this release reads version {PACKAGE_FORMAT_VERSION} only"
        )
    for key in ("name", "version", "spec", "files"):
        if key not in manifest:
            raise PackageError(f"{manifest_path} lacks the field {key!r}")
    return manifest


def load_package(root: str | Path, *, verify: bool = True) -> ModelPackage:
    """Read and (by default) verify a package: every listed file present, inside the folder, with its sha256."""
    root = Path(root).resolve()
    manifest = read_manifest(root)
    try:
        spec = ModelSpec.from_dict(manifest["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{root / MANIFEST_NAME} has an invalid spec: {exc}") from None
    if verify:
        for file_name, entry in manifest["files"].items():
            path = _inside(root, file_name)
            if not path.is_file():
                raise PackageError(f"package file {file_name} is missing from {root}")
            actual = sha256_file(path)
            if actual != entry.get("sha256"):
                raise PackageError(
                    f"package file {file_name} fails its checksum (sha256 {actual}, manifest says "
                    f"{entry.get('sha256')}): tampered with or truncated; refusing to load it"
                )
            if file_name.endswith(".onnx"):
                _check_onnx_external_data(root, path)
    return ModelPackage(root=root, manifest=manifest, spec=spec)


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise PackageError(f"package file {relative!r} points outside the package folder {root}")
    return path


def _check_onnx_external_data(root: Path, path: Path) -> None:
    """Refuse ONNX tensors whose external data lives outside the package (a path-traversal read)."""
    import onnx  # only needed to read the graph's tensor locations, not to run it

    model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = _inside(path.parent, location)
        if root not in target.parents:
            raise PackageError(f"{path.name} keeps tensor data in {location!r}, outside the package folder")
