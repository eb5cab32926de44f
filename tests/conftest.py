"""Shared pytest fixtures: tiny synthetic image trees and archives (no real dataset needed)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ---- image-folder data sources (training.data tests) --------------------------------------------


@pytest.fixture
def image_tree_factory() -> Callable[..., Path]:
    """make(root, classes=("cat", "dog"), counts={"train": 3, "test": 2}, size=(8, 8), suffix=".png", seed=0)
    writes root/<split>/<class>/NNN<suffix> with random RGB pixels and returns root."""

    def make(
        root: Path,
        classes=("cat", "dog"),
        counts=None,
        size=(8, 8),
        suffix: str = ".png",
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        for split, count in (counts or {"train": 3, "test": 2}).items():
            for name in classes:
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                    Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}{suffix}")
        return root

    return make


@pytest.fixture
def tar_archive_factory() -> Callable[..., Path]:
    """make(tree_root, archive_path, top="") packs tree_root's contents (under `top` if given) into a
    .tar/.tar.gz/.tgz chosen by archive_path's suffix, and returns archive_path."""

    def make(tree_root: Path, archive_path: Path, top: str = "") -> Path:
        mode = "w" if archive_path.name.endswith(".tar") else "w:gz"
        with tarfile.open(archive_path, mode) as archive:
            for path in sorted(tree_root.rglob("*")):
                relative = path.relative_to(tree_root).as_posix()
                archive.add(path, arcname=f"{top}/{relative}" if top else relative, recursive=False)
        return archive_path

    return make


# ---- a running service (bentoml serve in a subprocess; service and batch --url tests) ------------------------------


@pytest.fixture(scope="session")
def color_service(tmp_path_factory):
    """A ready server (RunningServer: .url, .package) serving the colour package (red/green/blue), with
    SERVICE_TEST_SETTINGS (tests/support/servers.py). Started once per session; its process group is ended
    afterwards."""
    from tests.support.color_package import make_color_package
    from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server

    work_dir = tmp_path_factory.mktemp("color-service")
    server = start_server(make_color_package(work_dir / "color"), work_dir, SERVICE_TEST_SETTINGS)
    yield server
    stop_server(server)
