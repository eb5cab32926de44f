"""The GPU check: one model package on ONNX Runtime's CUDA execution provider, side by side with the CPU.

    python -m benchmarks.gpu_check --package PACKAGE [--data ARCHIVE] [--out benchmarks/results/gpu_check.md]

1. Runtime: the provider that the service's and batch jobs' runtime (`Predictor`, device=auto) really got, with
   float32 (the default) and with TF32 allowed.
2. Outputs: its probabilities against the CPU's on real test images (max abs difference, top-1 agreement).
3. Engine: images/s of `Predictor.predict` at several batch sizes, each runtime (interleaved rounds, median).
4. Service path without HTTP: the service's `Classifier` (adaptive batching) under many concurrent single-image
   requests with distinct images: images/s, the batch sizes formed, and every answer equal to that image's
   own unbatched result (results never cross between requests).
5. Batch job: `batch`'s local engine over the archive's test images (10,000 in CIFAR-10) on each
   device: images/s, and the top-1 accuracy computed from its output file.

Without a usable GPU every section still runs, and the report says that device=auto fell back to the CPU and why.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks import batch_scoring
from benchmarks.common import DEFAULT_ARCHIVE, decode_all, read_test_jpegs
from benchmarks.raw_engine import measure_engine
from inference.files import atomic_write
from inference.package import ModelPackage, load_package
from inference.runtime import Predictor, cpu_threads
from service.classifier import Classifier
from service.settings import ServiceSettings

DEFAULT_BATCH_SIZES = (1, 16, 64, 256, 1024)
# Probabilities of one image may differ in the last bits between batch sizes (kernels chosen per shape).
SAME_RESULT_ATOL = 1e-4


@dataclass(frozen=True)
class Runtime:
    label: str
    backend: str  # onnx | onnx-int8 | torchscript
    device: str  # as asked: auto | cpu
    tf32: bool = False


CPU_REFERENCE = Runtime("ONNX Runtime, device=cpu", "onnx", "cpu")  # what every other runtime is compared with
RUNTIMES = (
    Runtime("ONNX Runtime, device=auto", "onnx", "auto"),
    CPU_REFERENCE,
    Runtime("ONNX Runtime, device=auto, tf32", "onnx", "auto", tf32=True),
    Runtime("TorchScript, device=auto", "torchscript", "auto"),
)


def environment() -> list[str]:
    import onnxruntime as ort
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch"
    return [
        f"- Machine: {platform.node()}, {os.cpu_count()} CPU cores ({cpu_threads()} usable); GPU: {gpu}",
        f"- Versions: onnxruntime {ort.__version__} (providers {', '.join(ort.get_available_providers())}), "
        f"torch {torch.__version__}, Python {platform.python_version()}",
    ]


def runtime_rows(predictors: dict[Runtime, Predictor]) -> list[str]:
    lines = ["| runtime | device in use | provider | TF32 | fallback reason |", "|---|---|---|---|---|"]
    for runtime, predictor in predictors.items():
        info = predictor.info
        lines.append(
            f"| {runtime.label} | {info.device} | {info.provider} | {info.tf32} | {info.fallback_reason or ''} |"
        )
    return lines


def output_rows(predictors: dict[Runtime, Predictor], pixels: np.ndarray) -> list[str]:
    """Each runtime against ONNX Runtime on the CPU, in batches of 64."""
    outputs = {
        runtime: np.concatenate([p.predict(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        for runtime, p in predictors.items()
    }
    reference = outputs[CPU_REFERENCE]
    lines = [
        f"| runtime | max abs difference vs ONNX Runtime CPU ({len(pixels)} test images) | top-1 agreement |",
        "|---|---:|---:|",
    ]
    for runtime, probabilities in outputs.items():
        if runtime == CPU_REFERENCE:
            continue
        difference = float(np.abs(probabilities - reference).max())
        agreement = float((probabilities.argmax(1) == reference.argmax(1)).mean())
        lines.append(f"| {runtime.label} | {difference:.2e} | {agreement:.2%} |")
    return lines


def engine_rows(predictors: dict[Runtime, Predictor], pixels: np.ndarray, args: argparse.Namespace) -> list[str]:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rates: dict[Runtime, dict[int, list[float]]] = {r: {b: [] for b in batch_sizes} for r in predictors}
    for _ in range(args.rounds):
        for runtime, predictor in predictors.items():
            for result in measure_engine(predictor, pixels, batch_sizes, args.seconds):
                rates[runtime][result.batch_size].append(result.images_per_second)
    header = "| runtime | " + " | ".join(f"img/s @{b}" for b in batch_sizes) + " |"
    lines = [header, "|---|" + "---:|" * len(batch_sizes)]
    for runtime, by_batch in rates.items():
        cells = " | ".join(f"{statistics.median(by_batch[b]):,.0f}" for b in batch_sizes)
        lines.append(f"| {runtime.label} ({predictors[runtime].info.device}) | {cells} |")
    return lines


async def service_path(package: ModelPackage, device: str, pixels: np.ndarray, concurrency: int, max_batch: int) -> str:
    """One row: the service's Classifier under `concurrency` concurrent one-image requests, one per test image."""
    settings = ServiceSettings(
        model=str(package.root), device=device, max_batch_size=max_batch, max_queue=max(512, concurrency)
    )
    classifier = Classifier(settings, package)
    await classifier.start()
    if not classifier.ready:
        raise RuntimeError(f"the classifier did not become ready: {classifier.failure}")
    # Each image's own result, unbatched, before any concurrency.
    alone = [classifier.predictor.predict(pixels[i : i + 1])[0] for i in range(len(pixels))]
    batch_sizes: list[int] = []
    run_batch = classifier.batcher.predict  # wrapped, to count the batches the batcher forms

    def counting(batch: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(batch))
        return run_batch(batch)

    classifier.batcher.predict = counting
    gate = asyncio.Semaphore(concurrency)

    async def request(index: int) -> np.ndarray:
        async with gate:
            return (await classifier.infer(pixels[index : index + 1]))[0]

    start = time.perf_counter()
    answers = await asyncio.gather(*(request(i) for i in range(len(pixels))))
    elapsed = time.perf_counter() - start
    await classifier.stop()
    differences = np.abs(np.stack(answers) - np.stack(alone)).max(axis=1)  # per request
    crossed = int((differences > SAME_RESULT_ATOL).sum())
    info = classifier.info
    return (
        f"| {device} ({info.device}, {info.provider}) | {concurrency} | {len(pixels) / elapsed:,.0f} | "
        f"{statistics.mean(batch_sizes):.1f} (max {max(batch_sizes)}) | {differences.max():.1e} | "
        f"{crossed} of {len(pixels)} |"
    )


def batch_job_rows(package: Path, archive: Path, workers: int) -> list[str]:
    folder, _ = batch_scoring.test_split(archive)
    lines = [
        "| device asked | images | images/s (scoring) | setup s | accuracy from the output file |",
        "|---|---:|---:|---:|---:|",
    ]
    for device in ("auto", "cpu"):
        job = batch_scoring.score(
            f"folder, device={device}", package, folder, "folder", f"gpu-check-{device}", device=device,
            workers=workers, batch_size=256,
        )  # fmt: skip
        lines.append(
            f"| {device} | {job.summary.new_rows:,} | {job.images_per_second:,.0f} | {job.summary.setup_seconds:.1f} | "
            f"{job.accuracy:.4f} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="model package folder (with model.ts)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    parser.add_argument("--images", type=int, default=2000, help="test images for outputs and the service path")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per runtime, batch size, round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved engine rounds; the median is reported")
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent requests on the service path")
    parser.add_argument("--max-batch", type=int, default=64, help="the service path's maximum batch size")
    parser.add_argument("--workers", type=int, default=cpu_threads(), help="the batch job's decoding workers")
    parser.add_argument("--no-batch-job", dest="batch_job", action="store_false", help="skip section 5")
    parser.add_argument("--out", type=Path, help="write the report (markdown) here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    package = load_package(args.package)
    pixels = decode_all(read_test_jpegs(args.data, args.images), package.spec.input_size)
    runtimes = [r for r in RUNTIMES if r.backend in package.backends]  # a package may lack model.ts
    predictors = {r: Predictor(package, backend=r.backend, device=r.device, tf32=r.tf32) for r in runtimes}
    lines = [
        "# GPU check",
        "",
        f"- Command: `python -m benchmarks.gpu_check {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        *environment(),
        f"- Package: {package.name} {package.version} ({package.spec.arch}, input {package.spec.input_size}); "
        f"images: {len(pixels)} CIFAR-10 (JPEG q75) test images from {args.data.name}, decoded once",
        "",
        "## 1. Runtime in use",
        "",
        *runtime_rows(predictors),
        "",
        "## 2. Outputs",
        "",
        *output_rows(predictors, pixels),
        "",
        f"## 3. Engine throughput (median of {args.rounds} interleaved rounds of {args.seconds} s per cell)",
        "",
        *engine_rows(predictors, pixels, args),
        "",
        f"## 4. Service path: Classifier + adaptive batching (max batch {args.max_batch}), no HTTP",
        "",
        "| device asked (in use) | concurrent requests | images/s | mean batch | max abs difference from the "
        f"image's own unbatched result | answers off by more than {SAME_RESULT_ATOL:g} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for device in ("auto", "cpu"):
        lines.append(asyncio.run(service_path(package, device, pixels, args.concurrency, args.max_batch)))
    if args.batch_job:
        lines += ["", f"## 5. Batch job: the archive's test images as a folder, {args.workers} workers", ""]
        lines += batch_job_rows(args.package, args.data, args.workers)
    lines += ["", f"Run time {time.perf_counter() - started:.0f} s."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with atomic_write(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
