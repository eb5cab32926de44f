"""The export stage: every architecture exports and passes the parity gate; metadata, manifest, atomicity, CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import cli, pipeline
from export.onnx_export import read_metadata
from export.pipeline import ExportConfig, ExportError, export_package
from export.torchscript_export import load_torchscript
from inference.package import (
    INPUT_NAME,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    PACKAGE_FORMAT,
    PackageError,
    load_package,
    sha256_file,
)
from inference.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from tests.support.export_fixtures import write_image_folder, write_run
from training.checkpoint import load_checkpoint
from training.models import CIFAR10_MEAN, CIFAR10_STD, build_model, get_model_info, list_models

REPO = Path(__file__).resolve().parents[1]


def export_config(run: Path, out: Path, **changes) -> ExportConfig:
    defaults = dict(run_dir=run, out_dir=out, parity_batch=7, bentoml=False)
    return ExportConfig(**{**defaults, **changes})


@pytest.fixture(scope="module")
def data_32(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data32"), size=(32, 32))


@pytest.fixture(scope="module")
def cnn_package(tmp_path_factory, data_32) -> tuple[Path, Path]:
    """(run folder, package folder) of a random-weight cnn_bn exported to ONNX and TorchScript."""
    root = tmp_path_factory.mktemp("cnn")
    run = write_run(root / "cnn-run", "cnn_bn", data_32)
    result = export_package(export_config(run, root / "package"))
    return run, result.package_dir


@pytest.mark.parametrize(
    "arch",
    [pytest.param(info.name, marks=pytest.mark.slow) for info in list_models()],
)
def test_every_architecture_exports_both_formats_and_passes_the_gate(tmp_path, arch):
    data = write_image_folder(tmp_path / "data", size=get_model_info(arch).input_size, train=2, test=4)
    run = write_run(tmp_path / "run", arch, data)
    result = export_package(export_config(run, tmp_path / "package"))

    assert result.report.passed
    package = load_package(result.package_dir)
    assert set(package.backends) == {"onnx", "torchscript"}
    for backend in ("onnx", "torchscript"):
        parity = package.manifest["metrics"][backend]["parity"]
        assert set(parity) == {"cpu/batch_1", "cpu/batch_7"}
        for figures in parity.values():
            assert figures["max_abs_diff"] <= 1e-4
            assert figures["top1_agreement"] == 1.0
            assert figures["images"] == 12


@pytest.mark.slow
def test_onnx_graph_takes_uint8_pixels_with_a_dynamic_batch(cnn_package):
    _, package_dir = cnn_package
    model = onnx.load(str(package_dir / "model.onnx"))
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in model.graph.output] == [OUTPUT_PROBABILITIES, OUTPUT_LOGITS]

    session = ort.InferenceSession(str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        probabilities, logits = session.run(None, {INPUT_NAME: pixels})
        assert probabilities.shape == logits.shape == (batch, 3)
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


def test_torchscript_convolutions_run_float32_not_tf32_on_a_gpu(cnn_package):
    _, package_dir = cnn_package
    module, _ = load_torchscript(package_dir / "model.ts")
    convolutions = [node for node in module.inlined_graph.nodes() if node.kind() == "aten::_convolution"]
    assert convolutions
    for node in convolutions:
        *_, cudnn_enabled, allow_tf32 = (value.toIValue() for value in node.inputs())
        assert (cudnn_enabled, allow_tf32) == (True, False)


@pytest.mark.slow
def test_exported_graphs_match_the_trained_model_on_the_same_pixels(cnn_package):
    """The in-graph normalisation equals training's: the ONNX and TorchScript outputs equal eager logits."""
    from training.augment import to_model_input

    run, package_dir = cnn_package
    checkpoint = load_checkpoint(run)
    model = checkpoint.build_model()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(to_model_input(torch.from_numpy(pixels), checkpoint.spec.mean, checkpoint.spec.std)).numpy()
    assert_both_graphs_give(package_dir, pixels, expected)


def test_the_package_spec_carries_the_registry_normalisation(cnn_package):
    run, package_dir = cnn_package
    info = get_model_info("cnn_bn")
    for spec in (load_checkpoint(run).spec, load_package(package_dir).spec):
        assert (spec.mean, spec.std) == (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)


def test_a_run_that_recorded_imagenet_normalisation_exports_and_serves_with_it(tmp_path, data_32):
    run = write_run(tmp_path / "run", "cnn_bn", data_32, normalisation=(IMAGENET_MEAN, IMAGENET_STD))
    result = export_package(export_config(run, tmp_path / "package", formats=("onnx",)))
    assert result.report.passed
    spec = load_package(result.package_dir).spec
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)

    from training.augment import to_model_input

    model = load_checkpoint(run).build_model()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(result.package_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_LOGITS], {INPUT_NAME: pixels})
    with torch.no_grad():
        for mean, std, same in ((IMAGENET_MEAN, IMAGENET_STD, True), (CIFAR10_MEAN, CIFAR10_STD, False)):
            expected = model(to_model_input(torch.from_numpy(pixels), mean, std)).numpy()
            assert np.allclose(logits, expected, atol=1e-4) == same


def assert_both_graphs_give(package_dir: Path, pixels: np.ndarray, logits: np.ndarray) -> None:
    """model.onnx and model.ts both map `pixels` to `logits` (within 1e-4)."""
    session = ort.InferenceSession(str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_LOGITS], {INPUT_NAME: pixels})
    np.testing.assert_allclose(onnx_logits, logits, atol=1e-4)
    module, _ = load_torchscript(package_dir / "model.ts")
    with torch.no_grad():
        _, ts_logits = module(torch.from_numpy(pixels))
    np.testing.assert_allclose(ts_logits.numpy(), logits, atol=1e-4)


@pytest.mark.slow
def test_metadata_inside_the_files_and_the_manifest_round_trip(cnn_package):
    run, package_dir = cnn_package
    spec = load_checkpoint(run).spec
    manifest = json.loads((package_dir / "manifest.json").read_text())

    onnx_meta = read_metadata(package_dir / "model.onnx")
    _, ts_meta = load_torchscript(package_dir / "model.ts")
    for meta in (onnx_meta, ts_meta):
        assert ModelSpec.from_dict(meta["spec"]) == spec
        assert meta["input"] == manifest["input"]
        assert (meta["name"], meta["version"]) == (manifest["name"], manifest["version"])
    assert ort.InferenceSession(
        str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    ).get_modelmeta().custom_metadata_map["visionserve.spec"] == json.dumps(spec.to_dict(), sort_keys=True)

    assert manifest["format"] == PACKAGE_FORMAT
    assert ModelSpec.from_dict(manifest["spec"]) == spec
    assert manifest["name"] == "cnn-run"
    assert manifest["input"] == {
        "name": "pixels", "dtype": "uint8", "shape": [-1, 32, 32, 3], "layout": "NHWC", "color": "RGB"
    }  # fmt: skip
    assert [o["name"] for o in manifest["outputs"]] == [OUTPUT_PROBABILITIES, OUTPUT_LOGITS]
    for file_name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(package_dir / file_name)
        assert entry["bytes"] == (package_dir / file_name).stat().st_size
    assert manifest["opset"] == 18
    assert onnx.load(str(package_dir / "model.onnx")).opset_import[0].version == 18
    assert {"torch", "onnx", "onnxscript"} <= set(manifest["versions"])
    assert any(k.startswith("onnxruntime") for k in manifest["versions"])
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(run / "checkpoint.pt")
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0
    assert set(manifest["metrics"]) == {"pytorch", "onnx", "torchscript"}
    assert manifest["metrics"]["onnx"]["test_accuracy"] == manifest["metrics"]["pytorch"]["test_accuracy"]
    assert manifest["gate"]["passed"] is True
    assert manifest["gate"]["thresholds"]["fp32_max_abs_diff"] == 1e-4
    assert manifest["test_time_augmentation"] == onnx_meta["test_time_augmentation"] == "none"


@pytest.mark.slow
@pytest.mark.parametrize("tta", [None, False])  # as the run was evaluated (with --tta), and --no-tta
def test_a_run_evaluated_with_flip_tta_serves_it_from_inside_the_graph(tmp_path, data_32, tta):
    from training.augment import to_model_input

    run = write_run(tmp_path / "run", "cnn_bn", data_32, tta=True)
    package_dir = export_package(export_config(run, tmp_path / "package", tta=tta)).package_dir
    checkpoint = load_checkpoint(run)
    model = checkpoint.build_model().eval()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(pixels), checkpoint.spec.mean, checkpoint.spec.std)
        plain = model(x).numpy()
        expected = (plain + model(x.flip(3)).numpy()) / 2 if tta is None else plain
    assert np.abs(expected - plain).max() > 1e-3 or tta is False  # the mirror really changes the answer
    assert_both_graphs_give(package_dir, pixels, expected)
    name = "flip" if tta is None else "none"
    manifest = json.loads((package_dir / "manifest.json").read_text())
    _, ts_meta = load_torchscript(package_dir / "model.ts")
    onnx_meta = read_metadata(package_dir / "model.onnx")
    assert manifest["test_time_augmentation"] == onnx_meta["test_time_augmentation"] == name
    assert ts_meta["test_time_augmentation"] == name


@pytest.mark.slow
def test_int8_package_of_a_fitted_model_passes_the_gate(tmp_path, data_32):
    run = write_run(tmp_path / "run", "cnn_bn", data_32, fit_steps=15)
    result = export_package(export_config(run, tmp_path / "package", int8=True, calibration_size=16))

    int8 = result.manifest["metrics"]["onnx-int8"]
    assert int8["passed"] and int8["test_accuracy"] >= result.manifest["metrics"]["pytorch"]["test_accuracy"] - 0.01
    assert result.manifest["files"]["model.int8.onnx"]["precision"] == "int8"
    model = onnx.load(str(result.package_dir / "model.int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    producers = {output: node for node in model.graph.node for output in node.output}
    assert producers[OUTPUT_PROBABILITIES].op_type == "Softmax"  # float probabilities, not 8-bit ones
    assert {n.op_type for n in model.graph.node if INPUT_NAME in n.input}.isdisjoint({"QuantizeLinear"})
    assert read_metadata(result.package_dir / "model.int8.onnx")["precision"] == "int8"


def _export_a_different_model(module, path, *, opset):
    """Stands in for a broken exporter: writes another network's weights under the same contract."""
    from export.onnx_export import export_onnx
    from export.wrapper import serving_module

    torch.manual_seed(123)
    spec = ModelSpec(arch="cnn_bn", class_names=("red", "green", "blue"))
    export_onnx(serving_module(build_model("cnn_bn", 3), spec), path, opset=opset)


@pytest.mark.slow
def test_failed_gate_exits_non_zero_with_the_figures_and_leaves_nothing(tmp_path, data_32, monkeypatch, capsys):
    run = write_run(tmp_path / "run", "cnn_bn", data_32)
    out = tmp_path / "out" / "package"
    monkeypatch.setattr(pipeline, "export_onnx", _export_a_different_model)

    code = cli.main(["--run", str(run), "--out", str(out), "--parity-batch", "7", "--no-bentoml"])

    assert code == cli.EXIT_GATE_FAILED
    err = capsys.readouterr().err
    assert "FAILED: onnx on cpu at batch 1" in err and "max |dp|" in err and "Traceback" not in err
    assert "torchscript  cpu        7" in err  # every format's figures are reported, passing or not
    assert list((tmp_path / "out").iterdir()) == []  # no package, no staging folder


@pytest.mark.slow
def test_a_failure_after_the_gate_leaves_nothing_either(tmp_path, data_32, monkeypatch):
    run = write_run(tmp_path / "run", "cnn_bn", data_32)

    def refuse(_package_dir):
        raise RuntimeError("model store unavailable")

    monkeypatch.setattr(pipeline, "register_package", refuse)
    with pytest.raises(RuntimeError, match="model store"):
        export_package(export_config(run, tmp_path / "out" / "package", bentoml=True, formats=("onnx",)))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_existing_package_is_kept_unless_overwrite(tmp_path, data_32):
    run = write_run(tmp_path / "run", "cnn_bn", data_32)
    out = tmp_path / "package"
    first = export_package(export_config(run, out, formats=("onnx",), version="1"))
    with pytest.raises(ExportError, match="already exists"):
        export_package(export_config(run, out, formats=("onnx",), version="2"))
    assert load_package(out).version == "1"
    second = export_package(export_config(run, out, formats=("onnx",), version="2", overwrite=True))
    assert load_package(out).version == "2" and second.package_dir == first.package_dir
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or old copy left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--formats", "onnx,tflite"], "unknown format(s) ['tflite']"),
        (["--formats", "torchscript"], "needs the onnx format"),
        (["--parity-batch", "8"], "odd number"),
        (["--name", "Bad Name"], "invalid package name"),
        (["--data", "/nonexistent/images"], "/nonexistent/images"),
    ],
)
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, data_32, capsys, args, message):
    run = write_run(tmp_path / "run", "cnn_bn", data_32)
    code = cli.main(["--run", str(run), "--out", str(tmp_path / "package"), "--no-bentoml", *args])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_ERROR
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "package").exists()


@pytest.mark.slow
def test_cli_refuses_an_opset_the_exporter_cannot_write(tmp_path, data_32, capsys):
    run = write_run(tmp_path / "run", "cnn_bn", data_32)
    code = cli.main(["--run", str(run), "--out", str(tmp_path / "package"), "--no-bentoml", "--opset", "13"])
    assert code == cli.EXIT_ERROR
    assert "could not write opset 13" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name == "package" or p.name.startswith(".")]


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    code = cli.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "package"), "--no-bentoml"])
    assert code == cli.EXIT_ERROR
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["model.onnx", "model.ts", "manifest.json"])
def test_a_tampered_byte_in_an_exported_package_is_refused(cnn_package, tmp_path, file_name):
    _, package_dir = cnn_package
    copy = Path(shutil.copytree(package_dir, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    if file_name == "manifest.json":  # an edited checksum no longer matches the file it describes
        entry = manifest["files"]["model.onnx"]
        entry["sha256"] = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")
        (copy / file_name).write_text(json.dumps(manifest))
    else:
        data = bytearray((copy / file_name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / file_name).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="fails its checksum"):
        load_package(copy)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_registers_the_package_in_the_bentoml_model_store(tmp_path, data_32):
    run = write_run(tmp_path / "Run_A", "cnn_bn", data_32)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    command = [
        sys.executable,
        "-m",
        "export",
        "--run",
        str(run),
        "--out",
        str(tmp_path / "package"),
    ]
    command += ["--formats", "onnx", "--parity-batch", "7", "--version", "v1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "BentoML model run_a:v1" in result.stdout

    stored = tmp_path / "bentoml" / "models" / "run_a" / "v1"
    package = load_package(stored)  # the store's copy verifies like the folder
    assert stat.S_IMODE(stored.stat().st_mode) == 0o755  # Bentos copy it: any user of an image must read it
    assert package.name == "run_a" and package.version == "v1"
    assert package.manifest == load_package(tmp_path / "package").manifest

    # The same tag again is refused, and that export leaves no folder behind.
    command[command.index(str(tmp_path / "package"))] = str(tmp_path / "again")
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already has run_a:v1" in again.stderr
    assert not (tmp_path / "again").exists()
