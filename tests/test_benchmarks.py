"""Benchmark scripts still run end to end, on tiny data and timings (their figures are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.mark.slow
def test_export_formats_benchmark_writes_its_table(tmp_path, image_tree_factory):
    data = image_tree_factory(tmp_path / "data", CIFAR10_CLASSES, {"train": 2, "test": 2}, size=(32, 32))
    out = tmp_path / "export_formats.md"
    command = [
        sys.executable, str(REPO / "benchmarks" / "export_formats.py"), "--models", "simple_cnn",
        "--data", str(data), "--eval-limit", "20", "--parity-images", "8", "--batches", "1,3",
        "--seconds", "0.02", "--rounds", "1", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert "## simple_cnn" in table
    for row in ("| PyTorch eager |", "| TorchScript |", "| ONNX fp32 |", "| ONNX int8 (QDQ) |"):
        assert row in table
