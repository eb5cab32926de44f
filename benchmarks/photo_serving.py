"""Camera photos end to end: a ResNet transfer model at 224x224 served with /classify and run by batch scoring, driven
with 12 MP JPEGs, against what decoding alone and the model alone reach on the same cores.

    python -m benchmarks.photo_serving [--photos 96] [--concurrency 2 4 8] [--seconds 15]

The bound: a pipeline that decodes and runs the model on the same cores cannot beat 1/(1/decode + 1/model), where
`decode` is photos/s of decode_image alone (one thread per core) and `model` images/s of the runtime session alone at
its best batch (as benchmarks/batch_scoring.py's bound). The model is torchvision's ResNet-18 with a new 10-class head
and random weights: its cost, not its answers, matters here. Results: benchmarks/results/photo_serving.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from batch.job import BatchJob, run_job
from benchmarks.common import (
    CACHE,
    CIFAR10_CLASSES,
    DEFAULT_ARCHIVE,
    LOGS,
    RESULTS,
    labelled_test_jpegs,
    machine,
    run_and_report,
)
from benchmarks.photos import JPEG_QUALITY, camera_like, encode
from benchmarks.random_weights import random_package
from benchmarks.raw_engine import best, measure_engine
from benchmarks.servers import SERVICE, BentoServer
from inference.imaging import decode_image
from inference.package import load_package
from inference.runtime import Predictor, cpu_threads

ARCH = "resnet18_transfer"
INPUT_SIZE = (224, 224)
PHOTO_SIZE = (4000, 3000)
FOLDER = CACHE / "photo_serving"


def twelve_megapixel_photos(archive: Path, count: int) -> list[Path]:
    """`count` camera-like 12 MP JPEGs (q90) made from CIFAR-10 test images, generated once under the cache."""
    folder = FOLDER / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, _, small) in enumerate(labelled_test_jpegs(archive, count, seed=7)):
        path = folder / f"photo-{i:03d}.jpg"
        if not path.is_file():
            pixels = camera_like(small, PHOTO_SIZE, seed=i)
            path.write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=JPEG_QUALITY))
        paths.append(path)
    return paths


def decode_rate(photos: list[bytes], threads: int, seconds: float) -> float:
    """Photos/s of decode_image alone over `threads` threads (it releases the GIL while libjpeg-turbo works)."""
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> int:
        done, index = 0, offset
        while time.perf_counter() < deadline:
            decode_image(photos[index % len(photos)], INPUT_SIZE)
            done += 1
            index += threads
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    return total / (time.perf_counter() - started)


async def serve_rate(url: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop of raw-JPEG /classify requests: photos/s answered 200, and how many were not."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    ok = failed = 0

    async def client(offset: int) -> None:
        nonlocal ok, failed
        index = offset
        while loop.time() < end:
            body = photos[index % len(photos)]
            async with session.post(f"{url}/classify", data=body, headers={"content-type": "image/jpeg"}) as r:
                await r.read()
                ok, failed = (ok + 1, failed) if r.status == 200 else (ok, failed + 1)
            index += concurrency

    started = loop.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"concurrency": concurrency, "photos_per_second": ok / (loop.time() - started), "failed": failed}


def run(args: argparse.Namespace) -> dict:
    package, _ = random_package(
        FOLDER, ARCH, CIFAR10_CLASSES, args.archive, "--eval-limit", "50", "--parity-images", "8", input_size=INPUT_SIZE
    )
    paths = twelve_megapixel_photos(args.archive, args.photos)
    photos = [path.read_bytes() for path in paths]
    cores = cpu_threads()
    decode = decode_rate(photos, cores, args.seconds)
    predictor = Predictor(load_package(package), device="cpu")
    pixels = np.stack([decode_image(photo, INPUT_SIZE) for photo in photos[:8]])
    model = best(measure_engine(predictor, pixels, batch_sizes=(1, 4, 8, 16), seconds=args.seconds / 3))
    bound = 1 / (1 / decode + 1 / model.images_per_second)
    print(f"decode {decode:.1f} photos/s, model {model.images_per_second:.1f} images/s, bound {bound:.1f}", flush=True)

    env = {"VISIONSERVE_MODEL": str(package.resolve())}
    with BentoServer(SERVICE, env, log_dir=LOGS, name="photo-serving") as server:
        served = [asyncio.run(serve_rate(server.url, photos, c, args.seconds)) for c in args.concurrency]
    best_served = max(served, key=lambda s: s["photos_per_second"])

    folder = FOLDER / "batch-input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in paths:
        os.link(path, folder / path.name)  # the same files, without copying 4 MB each
    output = FOLDER / "scores.parquet"
    output.unlink(missing_ok=True)
    summary = run_job(BatchJob(input=str(folder), output=output, model=str(package)))
    return {
        "command": "python -m benchmarks.photo_serving " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "photos": len(photos),
        "photo_megabytes": round(float(np.mean([len(p) for p in photos])) / 2**20, 2),
        "decode_photos_per_second": round(decode, 1),
        "model_images_per_second": round(model.images_per_second, 1),
        "model_best_batch": model.batch_size,
        "bound": round(bound, 1),
        "served": [{**s, "photos_per_second": round(s["photos_per_second"], 1)} for s in served],
        "served_best": round(best_served["photos_per_second"], 1),
        "batch_images_per_second": round(summary.images_per_second, 1),
        "batch_failed": summary.failed,
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Camera photos end to end: a 224x224 ResNet transfer model, served and batch-scored",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}",
        "",
        f"{r['photos']} camera-like 12 MP JPEGs (4000x3000, q90, {r['photo_megabytes']} MB on average; CIFAR-10 test "
        f"images upscaled with noise) through `{ARCH}` with random weights at 224x224.",
        "",
        "| measure | photos/s | of the bound 1/(1/decode + 1/model) | target |",
        "|---|---:|---:|---|",
        f"| decoding alone (decode_image, one thread per core) | {r['decode_photos_per_second']} | | |",
        f"| the model alone (runtime session, best batch {r['model_best_batch']}) | {r['model_images_per_second']} | | |",
        f"| the bound | {r['bound']} | 100% | |",
        f"| served, /classify with raw JPEG bodies, best concurrency | {r['served_best']} "
        f"| {r['served_best'] / r['bound']:.0%} | 80% |",
        f"| batch scoring a folder of the photos (local engine, defaults) | {r['batch_images_per_second']} "
        f"| {r['batch_images_per_second'] / r['bound']:.0%} | 80% |",
        "",
        "Served at each concurrency: "
        + ", ".join(
            f"{s['concurrency']} clients {s['photos_per_second']}/s ({s['failed']} not 200)" for s in r["served"]
        )
        + f"; batch scoring: {r['batch_failed']} failed.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photo_serving", description=__doc__.splitlines()[0])
    # 96: a folder of 24 is scored in under 2 s, where the first chunk's decoding, before any overlap with the
    # model, is a large share of the job.
    parser.add_argument("--photos", type=int, default=96, help="distinct 12 MP photos (default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8], help="clients to try")
    parser.add_argument("--seconds", type=float, default=15, help="measuring time per phase (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "photo_serving.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
