"""Writing a package's manifest.json: identity, spec, input/output contract, file checksums, provenance, metrics.

Reading and verifying it is inference.package's job (the service and batch scoring do that without torch).
"""

from __future__ import annotations

import json
import platform
import re
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from inference.files import atomic_write
from inference.package import (
    INPUT_NAME,
    MANIFEST_NAME,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    sha256_file,
)
from inference.spec import ModelSpec

# Names and versions double as BentoML model tags, so they follow its rules: lowercase letters, digits, . _ -
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
VERSION_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
VERSIONED_DISTRIBUTIONS = (
    "torch",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "onnxscript",
    "numpy",
    "visionserve",
)


def input_contract(spec: ModelSpec) -> dict[str, Any]:
    height, width = spec.input_size
    return {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "shape": [-1, height, width, 3],
        "layout": "NHWC",
        "color": "RGB",
    }


def output_contract(spec: ModelSpec) -> list[dict[str, Any]]:
    shape = [-1, spec.num_classes]
    return [
        {"name": OUTPUT_PROBABILITIES, "dtype": "float32", "shape": shape},
        {"name": OUTPUT_LOGITS, "dtype": "float32", "shape": shape},
    ]


def embedded_metadata(name: str, version: str, spec: ModelSpec, flip_tta: bool = False) -> dict[str, Any]:
    """What every exported file carries inside itself, so that a lone file still says how to feed it."""
    return {
        "format": PACKAGE_FORMAT,
        "name": name,
        "version": version,
        "spec": spec.to_dict(),
        "input": input_contract(spec),
        "outputs": output_contract(spec),
        # "flip": the graph averages the logits of each image and its mirror; "none": one view.
        "test_time_augmentation": "flip" if flip_tta else "none",
    }


def default_name(run_dir: Path) -> str:
    """The run folder's name made into a valid package name (lowercase; other characters become '-')."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(run_dir).resolve().name.lower()).strip("._-")[:63]
    return name or "model"


def default_version(now: datetime | None = None) -> str:
    """A sortable UTC timestamp, e.g. 20261126-201502."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")


def check_name_and_version(name: str, version: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid package name {name!r}: use up to 63 lowercase letters, digits, '.', '_' or '-'")
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"invalid package version {version!r}: use lowercase letters, digits, '.', '_' or '-'")


def file_entry(path: Path, backend: str, precision: str) -> dict[str, Any]:
    return {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "backend": backend,
        "precision": precision,
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote the package (installed distributions only)."""
    versions = {"python": platform.python_version()}
    for distribution in VERSIONED_DISTRIBUTIONS:
        try:
            versions[distribution] = importlib_metadata.version(distribution)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(
    *,
    name: str,
    version: str,
    spec: ModelSpec,
    files: dict[str, dict[str, Any]],
    opset: int,
    source: dict[str, Any],
    metrics: dict[str, Any],
    gate: dict[str, Any],
    flip_tta: bool = False,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    check_name_and_version(name, version)
    return {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        **embedded_metadata(name, version, spec, flip_tta),
        "files": files,
        "opset": opset,
        "versions": library_versions(),
        "source": source,
        "created_at": (created_at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "metrics": metrics,
        "gate": gate,
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write root/manifest.json atomically (temporary file + rename)."""
    path = Path(root) / MANIFEST_NAME
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    return path
