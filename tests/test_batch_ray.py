"""Batch scoring with --engine ray on a small local Ray instance: same rows as the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.color_package import make_color_package
from tests.test_batch import BAD_FILES, LABELS, color_files, read_output, run_cli, write_archive

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_ray_engine_gives_the_local_engines_rows(tmp_path):
    package = make_color_package(tmp_path / "color")
    files = {**color_files(LABELS * 3), **{name: data for name, (data, _) in BAD_FILES.items()}}
    source = write_archive(tmp_path / "images.tar.gz", files)
    common = [
        "--model",
        package,
        "--input",
        source,
        "--top-k",
        2,
        "--batch-size",
        5,
        "--allow-failures",
    ]
    assert run_cli(*common, "--output", tmp_path / "ray.parquet", "--engine", "ray", "--workers", 1) == 0
    assert run_cli(*common, "--output", tmp_path / "local.parquet", "--workers", 0) == 0
    ray_rows, local_rows = (
        read_output(tmp_path / "ray.parquet"),
        read_output(tmp_path / "local.parquet"),
    )
    assert [r["id"] for r in ray_rows] == list(files)
    assert ray_rows == local_rows
    assert sum(r["error"] is not None for r in ray_rows) == len(BAD_FILES)
    assert all(r["label_1"] == Path(r["id"]).name.split("-")[0] for r in ray_rows if r["error"] is None)
