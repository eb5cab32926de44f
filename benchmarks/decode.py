"""decode_image's two JPEG paths side by side: the same pixels, and the time each takes per image.

    python -m benchmarks.decode [--data ARCHIVE] [--limit N] [--rounds 5]

Every JPEG of the archive's test split is decoded by `inference.imaging.decode_image` (simplejpeg for the
common JPEG) and by Pillow alone (`pillow_open` + `pillow_pixels`), and the two arrays are compared; then both paths are timed,
taking turns round by round, on the images as stored (32x32) and on the same images re-encoded at 256x256
(quality 90), which the model's 32x32 input makes decode_image resize. Times are this process's CPU time per
image (so other jobs' load does not count), the median over the rounds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import DEFAULT_ARCHIVE, RESULTS, machine, read_test_jpegs, write_atomic
from inference.imaging import decode_image, pillow_open, pillow_pixels, plain_jpeg_size

SIZE = (32, 32)  # the CIFAR models' input (H, W)


def pillow_only(data: bytes) -> np.ndarray:
    return pillow_pixels(pillow_open(data), SIZE)


def upscaled(blobs: list[bytes], side: int = 256) -> list[bytes]:
    out = []
    for data in blobs:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).resize((side, side), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def cpu_us_per_image(decode, blobs: list[bytes]) -> float:
    """CPU microseconds of `decode` per image, the mean over `blobs` (this process's CPU time, so other jobs' load
    on the machine does not count)."""
    started = time.process_time()
    for data in blobs:
        decode(data)
    return 1e6 * (time.process_time() - started) / len(blobs)


def run(args: argparse.Namespace) -> str:
    blobs = read_test_jpegs(args.data, args.limit)
    fast = sum(plain_jpeg_size(data) is not None for data in blobs)
    equal = sum(np.array_equal(decode_image(data, SIZE), pillow_only(data)) for data in blobs)
    samples = {"as stored (32x32)": blobs[: args.timed], "re-encoded at 256x256": upscaled(blobs[: args.timed // 4])}
    rows = []
    for name, sample in samples.items():
        times: dict[str, list[float]] = {"decode_image": [], "Pillow alone": []}
        for _ in range(args.rounds):
            times["decode_image"].append(cpu_us_per_image(lambda d: decode_image(d, SIZE), sample))
            times["Pillow alone"].append(cpu_us_per_image(pillow_only, sample))
        ours, pillow = (statistics.median(times[k]) for k in ("decode_image", "Pillow alone"))
        rows.append(f"| {name} | {len(sample)} | {ours:.1f} | {pillow:.1f} | {pillow / ours:.2f}x |")
    m = machine()
    return "\n".join(
        [
            "# Decoding a JPEG: decode_image (simplejpeg for the common JPEG) vs Pillow alone",
            "",
            f"- Command: `{' '.join(['python -m benchmarks.decode', *sys.argv[1:]])}`",
            f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}; one process, CPU time per image",
            f"- Images: {len(blobs)} test JPEGs of {args.data}",
            "",
            f"Same pixels: **{equal} of {len(blobs)}** images decode to identical arrays by both paths; "
            f"{fast} of them took simplejpeg's path.",
            "",
            "| images | timed | decode_image µs | Pillow alone µs | speed-up |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    parser.add_argument("--limit", type=int, default=10_000, help="test JPEGs compared")
    parser.add_argument("--timed", type=int, default=2000, help="of them, timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode.md")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_atomic(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
