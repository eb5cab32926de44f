"""The machine's limit for a model package: a raw ONNX Runtime session in-process, images/s at each batch size.

    python -m benchmarks.raw_engine --package PACKAGE [--batch-sizes 1,8,32,64,128] [--seconds 3]

No HTTP, no decoding, no queue: `Predictor.predict` called back to back on already-decoded CIFAR-10 test images.
The best batch size's images/s is what the service's /classify is compared against (benchmarks/load_test.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.runtime import Predictor

DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 128)


@dataclass(frozen=True)
class EngineResult:
    batch_size: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def measure_engine(
    predictor: Predictor, pixels: np.ndarray, batch_sizes=DEFAULT_BATCH_SIZES, seconds: float = 3.0
) -> list[EngineResult]:
    """Images/s of `predictor.predict` at each batch size, over `seconds` each after one warm-up call.

    pixels: (M, H, W, 3) uint8 decoded images; batches are taken from it round-robin.
    """
    results = []
    for batch_size in batch_sizes:
        index = np.arange(batch_size)
        predictor.predict(pixels[index % len(pixels)])  # warm-up: first-call allocations at this shape
        images, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            predictor.predict(pixels[(index + images) % len(pixels)])
            images += batch_size
        results.append(EngineResult(batch_size, images, elapsed))
    return results


def best(results: list[EngineResult]) -> EngineResult:
    return max(results, key=lambda r: r.images_per_second)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.load_test import DEFAULT_ARCHIVE, decode_all, read_test_jpegs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="model package folder")
    parser.add_argument("--backend", default="onnx", help="package backend: onnx, onnx-int8 or torchscript")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per batch size")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        predictor = Predictor.from_path(args.package, backend=args.backend, device="cpu")
        pixels = decode_all(read_test_jpegs(args.data, 512), predictor.spec.input_size)
    except Exception as exc:  # a CLI: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in measure_engine(predictor, pixels, batch_sizes, args.seconds):
        print(f"batch {result.batch_size:4d}: {result.images_per_second:9.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
