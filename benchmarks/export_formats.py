"""Throughput and accuracy of every export format side by side: PyTorch eager, TorchScript, ONNX fp32, ONNX int8.

For each model (a training run, or random weights when none is given) the export stage's own functions write
the formats into a scratch folder and run the parity gate; then every format is timed at each batch size on
the same real test images, in interleaved rounds (the median round reported: these machines are shared and noisy).

    python benchmarks/export_formats.py --run cnn_bn=runs/cnn_bn --run resnet18=runs/resnet18 \\
        --out benchmarks/results/export_formats.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR10_CLASSES  # noqa: E402
from benchmarks.random_weights import random_run  # noqa: E402
from export.manifest import default_version  # noqa: E402
from export.parity import (  # noqa: E402
    CPU_PROVIDER,
    CUDA_PROVIDER,
    GateReport,
    Predict,
    cuda_available,
    eager_predictor,
    onnx_predictor,
    torchscript_predictor,
)
from export.pipeline import ExportConfig, load_evaluation_images, run_gate, write_formats  # noqa: E402
from inference.files import atomic_write  # noqa: E402
from inference.package import BACKEND_FILES  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402

DEFAULT_MODELS = ("cnn_bn", "resnet18")
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz")  # beside the repo
FORMAT_LABELS = {
    "pytorch": "PyTorch eager",
    "torchscript": "TorchScript",
    "onnx": "ONNX fp32",
    "onnx-int8": "ONNX int8 (QDQ)",
}


@dataclass(frozen=True)
class ModelResult:
    name: str
    weights: str  # where the weights came from
    report: GateReport
    throughput: dict[str, dict[int, float]]  # format -> batch size -> images/s (median round)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="MODEL=RUN_DIR",
        help="a training run per model (repeatable); models without one use random weights",
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated architectures")
    parser.add_argument("--data", default=DEFAULT_DATA, help="data source for accuracy, parity and calibration")
    parser.add_argument("--eval-limit", type=int, default=1000, help="test images for the accuracy figures")
    parser.add_argument("--parity-images", type=int, default=256, help="test images for the parity figures")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes to time")
    parser.add_argument("--seconds", type=float, default=0.6, help="timed seconds per format, batch size and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads per runtime")
    parser.add_argument("--out", type=Path, help="write the results as markdown here")
    return parser.parse_args()


def images_per_second(predict: Predict, pixels: np.ndarray, seconds: float) -> float:
    predict(pixels)  # warm-up: allocators, kernels
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        predict(pixels)
        calls += 1
    return calls * len(pixels) / elapsed


def benchmark_model(name: str, run: Path | None, args: argparse.Namespace, scratch: Path) -> ModelResult:
    if run is None:
        run = random_run(scratch / f"{name}-run", name, CIFAR10_CLASSES, DEFAULT_DATA)
        weights = "random weights (no trained run given)"
    checkpoint = load_checkpoint(run)
    if checkpoint.epoch:
        accuracy = checkpoint.metrics.get("test_accuracy")
        accuracy = f"{accuracy:.4f}" if isinstance(accuracy, float) else accuracy
        weights = f"trained run {run} ({checkpoint.epoch} epochs; training's test accuracy {accuracy})"
    spec, model = checkpoint.spec, checkpoint.build_model()
    config = ExportConfig(
        run_dir=run,
        out_dir=scratch / name,
        int8=True,
        data=args.data,
        eval_limit=args.eval_limit,
        parity_images=args.parity_images,
        bentoml=False,
    )
    images = load_evaluation_images(config, spec, checkpoint.config)
    folder = scratch / f"{name}-package"
    folder.mkdir()
    print(f"{name}: exporting ({weights})", file=sys.stderr)
    flip_tta = False  # one pass per image in every format, whatever the run evaluated with: the runtimes' own speed
    files = write_formats(
        model, spec, folder, config, name, default_version(), images.calibration, flip_tta, lambda message: None
    )
    print(
        f"{name}: parity gate and accuracy on {len(images.eval_images)} test images",
        file=sys.stderr,
    )
    report = run_gate(model, spec, folder, files, images, config, flip_tta)

    predictors: dict[str, Predict] = {
        "pytorch": eager_predictor(model, spec, flip_tta),
        "torchscript": torchscript_predictor(folder / BACKEND_FILES["torchscript"]),
        "onnx": onnx_predictor(folder / BACKEND_FILES["onnx"], CPU_PROVIDER, args.threads),
        "onnx-int8": onnx_predictor(folder / BACKEND_FILES["onnx-int8"], CPU_PROVIDER, args.threads),
    }
    if torch.cuda.is_available():
        predictors["pytorch cuda"] = eager_predictor(model, spec, flip_tta, device="cuda")
        predictors["torchscript cuda"] = torchscript_predictor(folder / BACKEND_FILES["torchscript"], device="cuda")
    if cuda_available():
        for backend in ("onnx", "onnx-int8"):
            predictors[f"{backend} cuda"] = onnx_predictor(folder / BACKEND_FILES[backend], CUDA_PROVIDER)
    batches = [int(b) for b in args.batches.split(",")]
    pixels = {b: np.ascontiguousarray(images.eval_images[:b]) for b in batches}
    rounds: dict[str, dict[int, list[float]]] = {f: {b: [] for b in batches} for f in predictors}
    for round_index in range(args.rounds):
        print(f"{name}: timing round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for b in batches:
            for label, predict in predictors.items():
                rounds[label][b].append(images_per_second(predict, pixels[b], args.seconds))
    throughput = {
        label: {b: statistics.median(rates) for b, rates in by_batch.items()} for label, by_batch in rounds.items()
    }
    return ModelResult(name, weights, report, throughput)


def markdown(results: list[ModelResult], args: argparse.Namespace, seconds: float) -> str:
    batches = [int(b) for b in args.batches.split(",")]
    cpu = platform.processor() or _cpu_model()
    lines = [
        "# Export formats: throughput and accuracy",
        "",
        f"- Command: `python {' '.join(sys.argv)}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; run time {seconds:.0f} s",
        f"- Machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads per runtime; "
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"- Versions: torch {torch.__version__}, onnxruntime {ort.__version__}",
        f"- Images/s: uint8 pixels in, probabilities out, median of {args.rounds} interleaved rounds of "
        f"{args.seconds} s per cell; the machine is shared, so compare within a table, not across runs.",
        f"- Accuracy: {results[0].report.eval_images} test images of {args.data}; parity: "
        f"{results[0].report.parity_images} test images against eager PyTorch at batch 1 and 33.",
        "",
    ]
    for result in results:
        report = result.report
        accuracies = {"pytorch": report.reference_accuracy} | {f.backend: f.test_accuracy for f in report.formats}
        parity = {f.backend: f for f in report.formats}
        header = "| format | test acc | " + " | ".join(f"img/s @{b}" for b in batches)
        header += (
            " | x eager, same device @" + ", @".join(map(str, batches)) + " | max abs dp (cpu) | top-1 agree | gate |"
        )
        lines += [f"## {result.name}", "", f"Weights: {result.weights}.", "", header]
        lines.append("|" + "---|" * (header.count("|") - 1))
        for label, rates in result.throughput.items():
            backend = label.split(" ")[0]
            name = FORMAT_LABELS[backend] + (" CUDA" if label.endswith("cuda") else "")
            eager = result.throughput["pytorch cuda" if label.endswith("cuda") else "pytorch"]  # same device
            ratios = ", ".join(f"{rates[b] / eager[b]:.1f}x" for b in batches)
            row = f"| {name} | {accuracies[backend]:.4f} | " + " | ".join(_rate(rates[b]) for b in batches)
            if backend in parity and not label.endswith("cuda"):
                figures = [p for p in parity[backend].parity if p.device == "cpu"]
                worst_dp = max(p.max_abs_diff for p in figures)
                agreement = min(p.top1_agreement for p in figures)
                verdict = "pass" if parity[backend].passed else "FAIL"
                row += f" | {ratios} | {worst_dp:.1e} | {agreement:.1%} | {verdict} |"
            else:
                row += f" | {ratios} | reference | | |" if label == "pytorch" else f" | {ratios} | | | |"
            lines.append(row)
        int8, fp32 = result.throughput["onnx-int8"], result.throughput["onnx"]
        drop = (report.reference_accuracy - accuracies["onnx-int8"]) * 100
        lines += [
            "",
            "int8 / fp32 ONNX speed: "
            + ", ".join(f"{int8[b] / fp32[b]:.2f}x @{b}" for b in batches)
            + f"; int8 accuracy change: {-drop:+.2f} points.",
            "",
        ]
        for precision, backend in (("fp32", "onnx"), ("int8", "onnx-int8")):  # the gate runs ONNX only on CUDA
            gap = [p for f in report.formats if f.backend == backend for p in f.parity if p.device == "cuda"]
            if gap:
                worst, agreement = max(p.max_abs_diff for p in gap), min(p.top1_agreement for p in gap)
                lines += [
                    f"ONNX Runtime CUDA {precision} vs eager PyTorch (CPU): max abs difference in probabilities "
                    f"{worst:.1e}, top-1 agreement {agreement:.1%}.",
                    "",
                ]
        if report.failures:
            lines += ["Gate failures: " + "; ".join(report.failures) + ".", ""]
    return "\n".join(lines)


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:,.0f}" if images_per_second >= 100 else f"{images_per_second:.2g}"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # Float32 on every runtime, as the ONNX Runtime sessions run by default (inference.runtime.onnx_session).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = dict(item.split("=", 1) for item in args.run)
    models = [m for m in args.models.split(",") if m] + [m for m in runs if m not in args.models.split(",")]
    start = time.perf_counter()
    results: list[ModelResult] = []
    with tempfile.TemporaryDirectory(prefix="export-bench-") as scratch:
        for model in models:
            results.append(benchmark_model(model, Path(runs[model]) if model in runs else None, args, Path(scratch)))
            text = markdown(results, args, time.perf_counter() - start)
            if args.out:  # after each model: a run cut short still leaves the tables it finished
                with atomic_write(args.out, "w") as f:
                    f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
