"""The parity gate: every exported format must behave like the trained model in PyTorch eager, or nothing is published.

Figures are measured on a fixed sample of real test images at batch 1 and at a larger odd batch (so that a
graph that only works for one batch size, or mixes samples within a batch, is caught), on the CPU and,
when a GPU is present, with ONNX Runtime's CUDA provider; test accuracy is measured for every format.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.torchscript_export import load_torchscript
from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES
from inference.runtime import CPU_PROVIDER, CUDA_PROVIDER, cpu_threads, onnx_session
from inference.spec import ModelSpec

# uint8 (N, H, W, 3) pixels -> float32 (N, C) probabilities
Predict = Callable[[np.ndarray], np.ndarray]

EVAL_BATCH = 64  # batch size for accuracy passes (parity batches are separate)


@dataclass(frozen=True)
class GateThresholds:
    fp32_max_abs_diff: float = 1e-4  # on probabilities
    fp32_min_top1_agreement: float = 1.0
    int8_min_top1_agreement: float = 0.99
    int8_max_accuracy_drop: float = 0.01  # test accuracy in [0, 1]: 0.01 is one point


@dataclass(frozen=True)
class ParityFigures:
    """One format on one device at one batch size, against eager PyTorch on the same images."""

    device: str  # cpu | cuda
    batch_size: int
    images: int
    max_abs_diff: float  # max |p_format - p_eager| over all images and classes
    top1_agreement: float  # fraction of images whose arg-max class is the same


@dataclass(frozen=True)
class FormatReport:
    backend: str  # onnx | onnx-int8 | torchscript
    precision: str  # fp32 | int8
    test_accuracy: float
    parity: tuple[ParityFigures, ...]
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "parity": {f"{p.device}/batch_{p.batch_size}": _figures_dict(p) for p in self.parity},
            "passed": self.passed,
            "failures": list(self.failures),
        }


@dataclass(frozen=True)
class GateReport:
    thresholds: GateThresholds
    reference_accuracy: float  # eager PyTorch on the same evaluation images
    eval_images: int
    parity_images: int
    formats: tuple[FormatReport, ...]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.formats)

    @property
    def failures(self) -> list[str]:
        return [failure for f in self.formats for failure in f.failures]

    def metrics(self) -> dict[str, Any]:
        """The manifest's `metrics`: eager PyTorch and every exported format."""
        metrics: dict[str, Any] = {"pytorch": {"test_accuracy": self.reference_accuracy}}
        for report in self.formats:
            metrics[report.backend] = report.to_dict()
        return metrics

    def gate(self) -> dict[str, Any]:
        """The manifest's `gate`: what was checked, against which limits, and the verdict."""
        return {
            "thresholds": asdict(self.thresholds),
            "eval_images": self.eval_images,
            "parity_images": self.parity_images,
            "passed": self.passed,
        }

    def table(self) -> str:
        """A plain-text table of every figure, for the terminal."""
        lines = [
            f"eager PyTorch: test accuracy {self.reference_accuracy:.4f} on {self.eval_images} images",
            f"{'format':<12} {'device':<6} {'batch':>5} {'max |dp|':>10} {'top-1 agree':>11} {'test acc':>9}  verdict",
        ]
        for report in self.formats:
            for p in report.parity:
                verdict = "ok" if report.passed else "FAIL"
                lines.append(
                    f"{report.backend:<12} {p.device:<6} {p.batch_size:>5} {p.max_abs_diff:>10.2e} "
                    f"{p.top1_agreement:>11.2%} {report.test_accuracy:>9.4f}  {verdict}"
                )
        lines += [f"FAILED: {failure}" for failure in self.failures]
        return "\n".join(lines)


def eager_predictor(model: nn.Module, spec: ModelSpec, flip_tta: bool = False, device: str = "cpu") -> Predict:
    """The reference: the trained model in eager PyTorch, fed exactly as training's evaluation feeds it.
    On another device than the CPU it runs a copy of `model`, which stays where it is."""
    from training.augment import flip_averaged_logits, to_model_input  # the training path's own evaluation

    model = (model if device == "cpu" else copy.deepcopy(model).to(device)).eval()

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = to_model_input(torch.from_numpy(pixels).to(device), spec.mean, spec.std)
            logits = flip_averaged_logits(model, x) if flip_tta else model(x)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return predict


def onnx_predictor(path: Path, provider: str = CPU_PROVIDER, threads: int | None = None) -> Predict:
    """An ONNX Runtime session on exactly `provider`, set up as the service sets it up; raises RuntimeError if
    the session did not get the provider.

    threads: intra-op threads (None: one per CPU core available to this process).
    """
    import onnxruntime as ort

    if provider == CUDA_PROVIDER:
        ort.preload_dlls(msvc=False)  # CUDA/cuDNN from the nvidia-* wheels beside torch, when installed
    providers = [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]
    session = onnx_session(path, providers, threads or cpu_threads())
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime could not use {provider} for {path.name}")

    def predict(pixels: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: pixels})[0]

    return predict


def torchscript_predictor(path: Path, device: str = "cpu") -> Predict:
    module, _ = load_torchscript(path)
    module = module.to(device)

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probabilities, _ = module(torch.from_numpy(pixels).to(device))
            return probabilities.cpu().numpy()

    return predict


def cuda_available() -> bool:
    """Whether the gate should also run ONNX Runtime with CUDA: a GPU and a CUDA-enabled build are present."""
    import onnxruntime as ort

    return torch.cuda.is_available() and CUDA_PROVIDER in ort.get_available_providers()


def predict_in_batches(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, C) probabilities of uint8 (N, H, W, 3) images, run `batch_size` at a time (the last batch may be smaller)."""
    chunks = [predict(np.ascontiguousarray(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def compare(reference: np.ndarray, candidate: np.ndarray, device: str, batch_size: int) -> ParityFigures:
    if candidate.shape != reference.shape:
        raise ValueError(f"{device} batch {batch_size}: output shape {candidate.shape}, expected {reference.shape}")
    return ParityFigures(
        device=device,
        batch_size=batch_size,
        images=len(reference),
        max_abs_diff=float(np.abs(candidate - reference).max()),
        top1_agreement=float(np.mean(candidate.argmax(axis=1) == reference.argmax(axis=1))),
    )


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def check_format(
    backend: str,
    precision: str,
    predictors: dict[str, Predict],
    reference: np.ndarray,
    parity_images: np.ndarray,
    batch_sizes: tuple[int, ...],
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    reference_accuracy: float,
    thresholds: GateThresholds,
) -> FormatReport:
    """Measure one format on every device in `predictors` ({"cpu": ..., "cuda": ...}) and judge it."""
    parity = tuple(
        compare(reference, predict_in_batches(predict, parity_images, b), device, b)
        for device, predict in predictors.items()
        for b in batch_sizes
    )
    test_accuracy = accuracy(predict_in_batches(predictors["cpu"], eval_images, EVAL_BATCH), eval_labels)
    failures = []
    for p in parity:
        where = f"{backend} on {p.device} at batch {p.batch_size}"
        if precision == "fp32":
            if p.max_abs_diff > thresholds.fp32_max_abs_diff:
                failures.append(f"{where}: max |dp| {p.max_abs_diff:.2e} > {thresholds.fp32_max_abs_diff:.0e}")
            if p.top1_agreement < thresholds.fp32_min_top1_agreement:
                failures.append(
                    f"{where}: top-1 agreement {p.top1_agreement:.2%} < {thresholds.fp32_min_top1_agreement:.2%}"
                )
        elif p.top1_agreement < thresholds.int8_min_top1_agreement:
            failures.append(
                f"{where}: top-1 agreement {p.top1_agreement:.2%} < {thresholds.int8_min_top1_agreement:.2%}"
            )
    # Rounded so that exactly one point (e.g. 1.0 - 0.99 = 0.010000000000000009) counts as one point.
    if precision == "int8" and round(reference_accuracy - test_accuracy, 9) > thresholds.int8_max_accuracy_drop:
        failures.append(
            f"{backend}: test accuracy {test_accuracy:.4f} is more than {thresholds.int8_max_accuracy_drop:.2f} "
            f"below eager PyTorch's {reference_accuracy:.4f}"
        )
    return FormatReport(backend, precision, test_accuracy, parity, tuple(failures))


def _figures_dict(p: ParityFigures) -> dict[str, Any]:
    return {"max_abs_diff": p.max_abs_diff, "top1_agreement": p.top1_agreement, "images": p.images}
