"""The export stage as one function: a training run in, a verified model package folder out, or nothing at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import manifest as manifest_lib
from export.model_store import check_tag_free, register_package, remove_from_store
from export.onnx_export import DEFAULT_OPSET, check_onnx, embed_metadata, export_onnx, opset_of
from export.parity import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    EVAL_BATCH,
    FormatReport,
    GateReport,
    GateThresholds,
    Predict,
    accuracy,
    check_format,
    cuda_available,
    eager_predictor,
    onnx_predictor,
    predict_in_batches,
    torchscript_predictor,
)
from export.quantize import quantize_int8
from export.torchscript_export import export_torchscript
from export.wrapper import serving_module
from inference.package import BACKEND_FILES, load_package, sha256_file
from inference.spec import ModelSpec

FORMATS = ("onnx", "torchscript")  # fp32 formats; int8 is the separate `int8` option
REQUIRED_FORMAT = "onnx"  # the service's default backend: every package has it


class ExportError(Exception):
    """An export that cannot start or finish; the message is one line saying why."""


class GateFailed(ExportError):
    """An exported format does not behave like the trained model; nothing was published."""

    def __init__(self, report: GateReport) -> None:
        super().__init__("parity gate failed: " + "; ".join(report.failures))
        self.report = report


@dataclass(frozen=True)
class ExportConfig:
    run_dir: Path
    out_dir: Path
    formats: tuple[str, ...] = FORMATS
    int8: bool = False
    opset: int = DEFAULT_OPSET
    calibration_size: int = 512  # training images the int8 ranges are calibrated on
    data: str | None = None  # None -> the data source recorded in the run's config
    eval_limit: int | None = None  # test images for the accuracy figures; None -> the whole test split
    parity_images: int = 1000  # test images compared with eager PyTorch (int8's 99% needs hundreds)
    parity_batch: int = 33  # the larger (odd) batch size of the parity check, beside batch 1
    name: str | None = None  # None -> the run folder's name
    version: str | None = None  # None -> a UTC timestamp
    bentoml: bool = True  # also register the package in the BentoML model store
    overwrite: bool = False  # replace an existing package folder
    seed: int = 0  # picks the evaluation, parity and calibration samples
    tta: bool | None = None  # flip TTA inside the graph; None -> as the run was evaluated (its --tta)
    thresholds: GateThresholds = field(default_factory=GateThresholds)


@dataclass(frozen=True)
class EvaluationImages:
    """Real images from the run's data source, aligned to the model's class order."""

    parity: np.ndarray  # (P, H, W, 3) uint8, test split
    eval_images: np.ndarray  # (E, H, W, 3) uint8, test split
    eval_labels: np.ndarray  # (E,) int64
    calibration: np.ndarray  # (K, H, W, 3) uint8, training split
    source: str


@dataclass(frozen=True)
class ExportResult:
    package_dir: Path
    manifest: dict[str, Any]
    report: GateReport
    bentoml_tag: str | None


def export_package(config: ExportConfig, *, progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """Export `config.run_dir` to `config.out_dir`: write every format into a temporary folder beside it, gate
    them against eager PyTorch, write the manifest, register in BentoML, and only then rename the folder into place."""
    from training.checkpoint import CHECKPOINT_NAME, load_checkpoint

    _check_config(config)
    out_dir = Path(config.out_dir).resolve()
    checkpoint_path = Path(config.run_dir) / CHECKPOINT_NAME
    if not Path(config.run_dir).is_dir():
        raise ExportError(f"{config.run_dir} is not a run folder (it should hold {CHECKPOINT_NAME})")
    checkpoint_sha256 = sha256_file(checkpoint_path) if checkpoint_path.is_file() else None
    checkpoint = load_checkpoint(checkpoint_path)
    if sha256_file(checkpoint_path) != checkpoint_sha256:
        raise ExportError(f"{checkpoint_path} changed while it was being read; export again once training stops")
    spec = checkpoint.spec
    name = config.name or manifest_lib.default_name(config.run_dir)
    version = config.version or manifest_lib.default_version()
    try:
        manifest_lib.check_name_and_version(name, version)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if config.bentoml:
        check_tag_free(name, version)
    model = checkpoint.build_model()
    flip_tta = checkpoint.evaluated_with_tta if config.tta is None else config.tta
    images = load_evaluation_images(config, spec, checkpoint.config)
    progress(f"data: {images.source} ({len(images.eval_images)} test images for accuracy)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp makes the folder private; the published package is readable like any other folder.
    staging.chmod(0o755)
    tag = None
    try:
        files = write_formats(model, spec, staging, config, name, version, images.calibration, flip_tta, progress)
        progress("parity gate: comparing every format with eager PyTorch")
        report = run_gate(model, spec, staging, files, images, config, flip_tta)
        if not report.passed:
            raise GateFailed(report)
        manifest = manifest_lib.build_manifest(
            name=name,
            version=version,
            spec=spec,
            files=files,
            opset=config.opset,
            source={
                "checkpoint_sha256": checkpoint_sha256,
                "run": str(Path(config.run_dir).resolve()),
                "epoch": checkpoint.epoch,
                "data": images.source,
                "training_metrics": checkpoint.metrics,
            },
            metrics=report.metrics(),
            gate=report.gate(),
            flip_tta=flip_tta,
        )
        manifest_lib.write_manifest(staging, manifest)
        load_package(staging)  # the reader's own verification, before anything is published
        if config.bentoml:
            progress("registering in the BentoML model store")
            tag = register_package(staging)
        _publish(staging, out_dir, config.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if tag is not None:
            remove_from_store(tag)
        raise
    return ExportResult(out_dir, manifest, report, tag)


def load_evaluation_images(config: ExportConfig, spec: ModelSpec, run_config: dict[str, Any]) -> EvaluationImages:
    """Test images for parity and accuracy, training images for calibration, in the spec's class order."""
    from training.data import load_dataset

    source = config.data or run_config.get("data")
    if not source:
        raise ExportError("the run's config names no data source; pass --data SOURCE")
    cache_dir = Path(run_config.get("cache_dir", ".cache/datasets"))
    dataset = load_dataset(source, cache_dir=cache_dir, image_size=spec.input_size)
    if dataset.class_names != spec.class_names:
        missing = [c for c in spec.class_names if c not in dataset.class_names]
        if missing:
            raise ExportError(f"data source {source} lacks the model's classes {missing}")
        dataset = dataset.select(spec.class_names)
    if len(dataset.test_images) == 0 or len(dataset.train_images) == 0:
        raise ExportError(f"data source {source} needs both training and test images")
    rng = np.random.default_rng(config.seed)
    # A seeded shuffle: a prefix of it mixes the classes, unlike a prefix of a class-sorted split.
    test_order = rng.permutation(len(dataset.test_images))
    eval_order = test_order[: config.eval_limit] if config.eval_limit else test_order
    train_order = rng.permutation(len(dataset.train_images))[: config.calibration_size]
    return EvaluationImages(
        parity=dataset.test_images[test_order[: config.parity_images]],
        eval_images=dataset.test_images[eval_order],
        eval_labels=dataset.test_labels[eval_order],
        calibration=dataset.train_images[np.sort(train_order)],
        source=str(source),
    )


def write_formats(
    model,
    spec: ModelSpec,
    folder: Path,
    config: ExportConfig,
    name: str,
    version: str,
    calibration: np.ndarray,
    flip_tta: bool,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Write the requested model files into `folder`; returns their manifest entries by file name."""
    module = serving_module(model, spec, flip_tta)
    metadata = manifest_lib.embedded_metadata(name, version, spec, flip_tta)
    files: dict[str, dict[str, Any]] = {}

    onnx_path = folder / BACKEND_FILES["onnx"]
    progress(f"ONNX (opset {config.opset})")
    export_onnx(module, onnx_path, opset=config.opset)
    if opset_of(onnx_path) != config.opset:  # torch.onnx falls back to its own opset when it cannot convert
        raise ExportError(
            f"torch.onnx could not write opset {config.opset} (it wrote {opset_of(onnx_path)}); ask for a later one"
        )
    embed_metadata(onnx_path, {**metadata, "precision": "fp32"})
    check_onnx(onnx_path)
    files[onnx_path.name] = manifest_lib.file_entry(onnx_path, "onnx", "fp32")

    if config.int8:
        int8_path = folder / BACKEND_FILES["onnx-int8"]
        progress(f"ONNX int8 (static QDQ, {len(calibration)} calibration images)")
        quantize_int8(onnx_path, int8_path, calibration)
        embed_metadata(int8_path, {**metadata, "precision": "int8"})
        check_onnx(int8_path)
        files[int8_path.name] = manifest_lib.file_entry(int8_path, "onnx-int8", "int8")

    if "torchscript" in config.formats:
        ts_path = folder / BACKEND_FILES["torchscript"]
        progress("TorchScript")
        export_torchscript(module, ts_path, {**metadata, "precision": "fp32"})
        files[ts_path.name] = manifest_lib.file_entry(ts_path, "torchscript", "fp32")
    return files


def run_gate(
    model,
    spec: ModelSpec,
    folder: Path,
    files: dict[str, dict[str, Any]],
    images: EvaluationImages,
    config: ExportConfig,
    flip_tta: bool,
) -> GateReport:
    """Every written format against eager PyTorch: parity at batch 1 and `parity_batch`, and test accuracy."""
    eager = eager_predictor(model, spec, flip_tta)
    reference = predict_in_batches(eager, images.parity, EVAL_BATCH)
    reference_accuracy = accuracy(predict_in_batches(eager, images.eval_images, EVAL_BATCH), images.eval_labels)
    batch_sizes = (1, config.parity_batch)
    with_cuda = cuda_available()
    reports: list[FormatReport] = []
    for file_name, entry in files.items():
        path = folder / file_name
        predictors: dict[str, Predict]
        if entry["backend"] == "torchscript":
            predictors = {"cpu": torchscript_predictor(path)}
        else:
            predictors = {"cpu": onnx_predictor(path, CPU_PROVIDER)}
            if with_cuda:
                try:
                    predictors["cuda"] = onnx_predictor(path, CUDA_PROVIDER)
                except RuntimeError as exc:  # a GPU that torch sees but ONNX Runtime cannot use
                    raise ExportError(f"{exc}; the gate runs on every device present") from None
        reports.append(
            check_format(
                entry["backend"],
                entry["precision"],
                predictors,
                reference,
                images.parity,
                batch_sizes,
                images.eval_images,
                images.eval_labels,
                reference_accuracy,
                config.thresholds,
            )
        )
    return GateReport(
        config.thresholds,
        reference_accuracy,
        len(images.eval_images),
        len(images.parity),
        tuple(reports),
    )


def _check_config(config: ExportConfig) -> None:
    unknown = [f for f in config.formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format(s) {unknown}; valid: {', '.join(FORMATS)} (int8 is the --int8 option)")
    if REQUIRED_FORMAT not in config.formats:
        raise ExportError(f"every package needs the {REQUIRED_FORMAT} format; add it to the formats")
    if config.parity_batch < 2 or config.parity_batch % 2 == 0:
        raise ExportError(f"the parity batch must be an odd number above 1, got {config.parity_batch}")
    for label, value in (
        ("parity images", config.parity_images),
        ("calibration size", config.calibration_size),
    ):
        if value < 1:
            raise ExportError(f"{label} must be at least 1, got {value}")
    if config.eval_limit is not None and config.eval_limit < 1:
        raise ExportError(f"eval limit must be at least 1, got {config.eval_limit}")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not config.overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it")


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing package is swapped out only after that succeeds."""
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} appeared during the export; not replacing it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "package")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
