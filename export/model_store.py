"""Registering a verified package in the BentoML model store, so that `bentoml build` can pack it.

The store entry's folder holds the package's files unchanged (plus BentoML's own model.yaml), so
`inference.package.load_package(bentoml.models.get(tag).path)` verifies and loads it like any folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from inference.package import MANIFEST_NAME, PACKAGE_FORMAT, load_package


class ModelStoreError(Exception):
    """The BentoML model store refused the package; the message says why."""


def register_package(package_dir: Path) -> str:
    """Copy the package at `package_dir` into the BentoML model store as `name:version`; return that tag."""
    import bentoml  # imported here: only registration needs it, and it takes seconds to import

    package = load_package(package_dir)  # verified: only a checked package goes into the store
    tag = f"{package.name}:{package.version}"
    check_tag_free(package.name, package.version)
    labels = {"format": PACKAGE_FORMAT, "arch": package.spec.arch}
    metadata = {
        "manifest": MANIFEST_NAME,
        "class_names": list(package.spec.class_names),
        "input_size": list(package.spec.input_size),
        "backends": package.backends,
        "test_accuracy": {
            backend: figures["test_accuracy"]
            for backend, figures in package.manifest.get("metrics", {}).items()
            if "test_accuracy" in figures
        },
    }
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for file_name in [MANIFEST_NAME, *package.manifest["files"]]:
            shutil.copy2(package.root / file_name, Path(model.path) / file_name)
        # BentoML makes the folder owner-only (a temporary directory); Bentos and images copy that mode, and a
        # container run as another user (OpenShift's arbitrary uid) could not read the model.
        os.chmod(model.path, 0o755)
    return tag


def check_tag_free(name: str, version: str) -> None:
    """Raise ModelStoreError if the store already holds `name:version` (checked before a long export, and again at the end)."""
    import bentoml

    try:
        bentoml.models.get(f"{name}:{version}")
    except bentoml.exceptions.NotFound:
        return
    raise ModelStoreError(f"the BentoML model store already has {name}:{version}; choose another --version")


def remove_from_store(tag: str) -> None:
    """Undo `register_package` (used when publishing the folder fails afterwards)."""
    import bentoml

    bentoml.models.delete(tag)
