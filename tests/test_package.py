"""The safe package loader: checksums, format version, external data, and no training code, torch or pickle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from inference.package import (
    MANIFEST_NAME,
    PACKAGE_FORMAT_VERSION,
    PackageError,
    load_package,
    sha256_file,
)
from tests.support.color_package import color_model, make_color_package

REPO = Path(__file__).resolve().parents[1]


def write_files(root: Path, extra: dict[str, bytes]) -> None:
    """Add files to the package's folder and list them, with their sha256, in its manifest."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    for name, data in extra.items():
        (root / name).write_bytes(data)
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": len(data)}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def package_dir(tmp_path) -> Path:
    """A package with three model files: the colour graph as fp32 and 'int8' ONNX, and opaque TorchScript bytes."""
    root = make_color_package(tmp_path / "package")
    write_files(
        root,
        {
            "model.int8.onnx": (root / "model.onnx").read_bytes(),
            "model.ts": bytes(range(256)) * 40,  # the loader checks its bytes and never opens it
        },
    )
    return root


def test_an_intact_package_loads_with_every_backend(package_dir):
    package = load_package(package_dir)
    assert package.backends == ["onnx", "onnx-int8", "torchscript"]
    assert package.model_path("onnx-int8") == package_dir / "model.int8.onnx"


@pytest.mark.parametrize("file_name", ["model.onnx", "model.int8.onnx", "model.ts"])
@pytest.mark.parametrize("position", [0, 0.5, -1])
def test_a_tampered_byte_in_any_file_is_refused(package_dir, file_name, position):
    path = package_dir / file_name
    data = bytearray(path.read_bytes())
    index = int(position * (len(data) - 1)) if position >= 0 else len(data) - 1
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=f"{file_name} fails its checksum"):
        load_package(package_dir)


@pytest.mark.parametrize("file_name", ["model.onnx", "model.int8.onnx", "model.ts"])
def test_a_truncated_file_is_refused(package_dir, file_name):
    path = package_dir / file_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PackageError, match="tampered with or truncated"):
        load_package(package_dir)


@pytest.mark.parametrize("file_name", ["model.onnx", "model.int8.onnx", "model.ts"])
def test_a_missing_file_is_refused(package_dir, file_name):
    (package_dir / file_name).unlink()
    with pytest.raises(PackageError, match=f"{file_name} is missing"):
        load_package(package_dir)


def test_a_missing_manifest_is_refused(package_dir):
    (package_dir / MANIFEST_NAME).unlink()
    with pytest.raises(PackageError, match="not a model package"):
        load_package(package_dir)


@pytest.mark.parametrize("version", [PACKAGE_FORMAT_VERSION + 1, 0, "1", None])
def test_an_unknown_format_version_is_refused(package_dir, version):
    manifest = json.loads((package_dir / MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (package_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="format version"):
        load_package(package_dir)


def test_a_foreign_manifest_is_refused(package_dir):
    (package_dir / MANIFEST_NAME).write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(PackageError, match="is not a visionserve-model-package manifest"):
        load_package(package_dir)


def test_a_listed_file_outside_the_folder_is_refused(package_dir, tmp_path):
    (tmp_path / "elsewhere.bin").write_bytes(b"x")
    manifest = json.loads((package_dir / MANIFEST_NAME).read_text())
    manifest["files"]["../elsewhere.bin"] = {"sha256": sha256_file(tmp_path / "elsewhere.bin")}
    (package_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="points outside the package folder"):
        load_package(package_dir)


def onnx_with_external_weights(location: str) -> bytes:
    """The colour graph with its `weights` tensor stored in the external file `location` (not written here)."""
    model = color_model((32, 32))
    (weights,) = [t for t in model.graph.initializer if t.name == "weights"]
    length = len(numpy_helper.to_array(weights).tobytes())
    external_data_helper.set_external_data(weights, location=location, offset=0, length=length)
    weights.ClearField("raw_data")
    weights.data_location = onnx.TensorProto.EXTERNAL
    return model.SerializeToString()


@pytest.mark.parametrize("location", ["../outside.bin", "../../etc/passwd", "/etc/passwd", "sub/../../outside.bin"])
def test_onnx_external_data_outside_the_folder_is_refused(package_dir, tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(np.eye(3, dtype=np.float32).tobytes())
    write_files(package_dir, {"model.onnx": onnx_with_external_weights(location)})
    with pytest.raises(PackageError, match="outside the package folder"):
        load_package(package_dir)


def test_onnx_external_data_inside_the_folder_is_accepted(package_dir):
    weights = (np.eye(3) * 8.0).astype(np.float32).tobytes()
    write_files(
        package_dir,
        {"weights.bin": weights, "model.onnx": onnx_with_external_weights("weights.bin")},
    )
    package = load_package(package_dir)
    model = onnx.load(str(package.model_path("onnx")))  # resolves the external file beside it
    (tensor,) = [t for t in model.graph.initializer if t.name == "weights"]
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), np.eye(3) * 8.0)


@pytest.mark.e2e
def test_loading_a_package_imports_no_training_code_and_no_torch(package_dir):
    script = f"""
import sys
import inference.package, inference.imaging
package = inference.package.load_package({str(package_dir)!r})
assert package.backends == ["onnx", "onnx-int8", "torchscript"], package.backends
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "export", "torch", "torchvision"))
print(",".join(forbidden))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == ""
