"""The machine's limit for a model package: a raw ONNX Runtime session in-process, images/s at each batch size.

    python -m benchmarks.raw_engine --package PACKAGE [--batch-sizes 1,8,32,64,128] [--seconds 3] [--calls 1]

No HTTP, no decoding, no queue: `Predictor.predict` called back to back on already-decoded CIFAR-10 test images.
The best batch size's images/s is what the service's /classify is compared against (benchmarks/load_test.py);
`--calls 2` measures two calls side by side with half the threads each, as VISIONSERVE_MODEL_INSTANCES=2 serves.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_ARCHIVE, decode_all, read_test_jpegs
from inference.runtime import Predictor, cpu_threads

DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 128)
ENGINE_CALLS = (1, 2)  # the raw engine as one call, and as two side by side (VISIONSERVE_MODEL_INSTANCES=2)


@dataclass(frozen=True)
class EngineResult:
    batch_size: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def measure_engine(
    predictor: Predictor,
    pixels: np.ndarray,
    batch_sizes=DEFAULT_BATCH_SIZES,
    seconds: float = 3.0,
    calls: int = 1,
) -> list[EngineResult]:
    """Images/s of `predictor.predict` at each batch size, over `seconds` each after one warm-up call.

    pixels: (M, H, W, 3) uint8 decoded images; batches are taken from it round-robin.
    calls: model calls run side by side from as many threads, as the service's model instances run them (give
    the predictor the runtime threads of one call).
    """
    return [_measure_batch_size(predictor, pixels, batch_size, seconds, calls) for batch_size in batch_sizes]


def _measure_batch_size(
    predictor: Predictor, pixels: np.ndarray, batch_size: int, seconds: float, calls: int
) -> EngineResult:
    index = np.arange(batch_size)
    predictor.predict(pixels[index % len(pixels)])  # warm-up: first-call allocations at this shape
    images = [0] * calls
    start = time.perf_counter()

    def call_back_to_back(slot: int) -> None:
        offset = slot * batch_size  # each caller its own images
        while time.perf_counter() - start < seconds:
            predictor.predict(pixels[(index + offset + calls * images[slot]) % len(pixels)])
            images[slot] += batch_size

    callers = [threading.Thread(target=call_back_to_back, args=(slot,)) for slot in range(calls)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    return EngineResult(batch_size, sum(images), time.perf_counter() - start)


def lone_latency_ms(predictor: Predictor, pixels: np.ndarray, calls: int = 200) -> float:
    """The median wall time of one-image calls made one after another: what a lone request's model call costs."""
    predictor.predict(pixels[:1])  # warm-up: first-call allocations at batch 1
    times = []
    for i in range(calls):
        image = pixels[i % len(pixels)][None]
        start = time.perf_counter()
        predictor.predict(image)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def engine_predictor(package: Path, calls: int = 1, backend: str = "onnx") -> Predictor:
    """The package on the CPU with this machine's cores shared by `calls` side-by-side calls."""
    return Predictor.from_path(package, backend=backend, device="cpu", intra_op_threads=max(1, cpu_threads() // calls))


def best(results: list[EngineResult]) -> EngineResult:
    return max(results, key=lambda r: r.images_per_second)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="model package folder")
    parser.add_argument("--backend", default="onnx", help="package backend: onnx, onnx-int8 or torchscript")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per batch size")
    parser.add_argument(
        "--calls", type=int, default=1, help="model calls side by side, each with cores/calls runtime threads"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        if args.calls < 1:
            raise ValueError(f"--calls must be >= 1, got {args.calls}")
        predictor = engine_predictor(args.package, args.calls, backend=args.backend)
        pixels = decode_all(read_test_jpegs(args.data, 512), predictor.spec.input_size)
    except Exception as exc:  # a CLI: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in measure_engine(predictor, pixels, batch_sizes, args.seconds, args.calls):
        print(f"batch {result.batch_size:4d}: {result.images_per_second:9.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
