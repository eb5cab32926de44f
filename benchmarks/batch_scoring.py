"""Batch scoring throughput on the 10,000 CIFAR-10 test images: local engine vs its limits, Ray's overhead, accuracy.

    python -m benchmarks.batch_scoring [--resnet PACKAGE] [--cnn PACKAGE] [--workers 2] [--no-ray]

Side by side in one run, in rounds that each measure their limits right before their jobs (these machines are
shared and noisy: compare the ratios, medians over the rounds):
- ResNet-18 (compute-bound): the local engine's images/s (folder and archive) against the raw engine
  (Predictor.predict on already-decoded arrays) at its best batch size;
- the small CNN (decode-bound): the local engine against min(decode-only images/s with the same worker count,
  engine-only images/s); process and thread decoding pools;
- the Ray engine against the local engine on the same input;
- the top-1 accuracy computed from each output file (labels from the folder names) against the package's
  offline evaluation (the manifest's metrics.onnx.test_accuracy, written by `python -m export`).

Without --resnet/--cnn, random-weight packages are built once with `python -m export` (full test split for
the offline accuracy) under .cache/batch_bench/. Results: benchmarks/results/batch_scoring.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from batch.engines.base import batched, ordered_map
from batch.engines.local import decode_pool
from batch.inputs import open_input
from batch.job import BatchJob, BatchSummary, run_job
from batch.scoring import decode_chunk
from benchmarks.random_weights import random_package
from benchmarks.raw_engine import best, measure_engine
from inference.files import atomic_write
from inference.imaging import decode_image
from inference.runtime import Predictor, cpu_threads

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "batch_bench"
RESULTS = REPO / "benchmarks" / "results" / "batch_scoring.md"
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # the offline copy beside the repo
BATCH_SIZES = (16, 32, 64, 128, 256)
SIZE = (32, 32)  # both packages' input size


# ---- data and packages -----------------------------------------------------------------------------------------


def test_split(archive: Path) -> tuple[Path, Path]:
    """(folder, archive) of the archive's test images as <class>/<file>.jpg, extracted once under CACHE (per
    archive: its path, size and modification time name the copy)."""
    info = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:12]
    folder, test_archive = CACHE / f"test-{key}", CACHE / f"test-{key}.tar.gz"
    if test_archive.is_file() and folder.is_dir():
        return folder, test_archive
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"test-{key}.tar.gz.tmp"
    with tarfile.open(archive, "r|*") as source, tarfile.open(partial, "w:gz") as target:
        for member in source:
            parts = Path(member.name).parts
            if member.isfile() and "test" in parts[:-2]:
                relative = "/".join(parts[parts.index("test") + 1 :])
                data = source.extractfile(member).read()  # a stream: each member is read once
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(data)
                member.name = relative
                target.addfile(member, io.BytesIO(data))
    os.replace(partial, test_archive)
    return folder, test_archive


def random_weight_package(arch: str, archive: Path) -> Path:
    """A random-weight CIFAR-10 package of `arch`, exported once with the whole test split evaluated."""
    classes = sorted(p.name for p in test_split(archive)[0].iterdir())
    return random_package(CACHE, arch, classes, archive)[0]


def describe(package: Path) -> dict:
    manifest = json.loads((package / "manifest.json").read_text())
    trained = manifest.get("source", {}).get("training_metrics", {}).get("test_accuracy") is not None
    return {
        "path": str(package),
        "name": f"{manifest['name']} {manifest['version']}",
        "arch": manifest["spec"]["arch"],
        "weights": "trained" if trained else "random (untrained)",
        "offline_accuracy": manifest.get("metrics", {}).get("onnx", {}).get("test_accuracy"),
        "offline_images": manifest.get("gate", {}).get("eval_images"),
    }


# ---- measurements ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    label: str
    kind: str  # folder | archive: which decode-only rate bounds the job
    summary: BatchSummary
    accuracy: float

    @property
    def images_per_second(self) -> float:
        return self.summary.images_per_second

    @property
    def end_to_end(self) -> float:
        """Images/s including setup (model load, worker or Ray start)."""
        return self.summary.new_rows / (self.summary.setup_seconds + self.summary.scoring_seconds)


def output_accuracy(output: Path) -> float:
    """Top-1 accuracy from the output file; the label is the folder name above each image."""
    table = pq.read_table(output, columns=["id", "label_1", "error"]).to_pylist()
    assert all(row["error"] is None for row in table), "some test images failed to score"
    return sum(row["id"].split("/")[-2] == row["label_1"] for row in table) / len(table)


def score(label: str, package: Path, source: Path, kind: str, tag: str, **options) -> JobResult:
    output = CACHE / "outputs" / f"{tag}.parquet"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    summary = run_job(BatchJob(input=str(source), output=output, model=str(package), top_k=1, **options))
    result = JobResult(label, kind, summary, output_accuracy(output))
    print(
        f"  {label}: {result.images_per_second:.0f} images/s scoring, {result.end_to_end:.0f} with setup "
        f"({summary.setup_seconds:.1f} s); accuracy {result.accuracy:.4f}",
        flush=True,
    )
    return result


def decode_only(source: Path, size: tuple[int, int], workers: int, batch_size: int) -> float:
    """Images/s of the local engine's reading and decoding stages alone (no model): the same source reading,
    chunks, process pool and ordering as a job (an archive is read inside the timing, as in a job)."""
    decode = functools.partial(decode_chunk, size=size)
    with decode_pool("process", workers) as executor:
        for future in [executor.submit(decode, []) for _ in range(workers)]:
            future.result()  # workers started, as in LocalEngine's setup
        start = time.perf_counter()
        chunks = batched(open_input(source).records(), batch_size)
        decoded = sum(len(chunk.ids) for chunk in ordered_map(executor, decode, chunks, 2 * workers + 1))
        return decoded / (time.perf_counter() - start)


def raw_engine(package: Path, pixels: np.ndarray, seconds: float):
    """The best batch size in short bursts of each of BATCH_SIZES."""
    predictor = Predictor.from_path(package, device="cpu")
    results = measure_engine(predictor, pixels, BATCH_SIZES, seconds)
    for r in results:
        print(f"  raw engine batch {r.batch_size}: {r.images_per_second:.0f} images/s", flush=True)
    return best(results)


def raw_pass(package: Path, pixels: np.ndarray, batch_size: int) -> float:
    """Images/s of one pass over all of `pixels` at `batch_size`: a job's own workload and duration, minus the
    reading and decoding. Short bursts (raw_engine) pick the batch size but overstate what a minute sustains."""
    predictor = Predictor.from_path(package, device="cpu")
    predictor.predict(pixels[:batch_size])  # warm-up at this shape
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        predictor.predict(pixels[first : first + batch_size])
    rate = len(pixels) / (time.perf_counter() - start)
    print(f"  raw engine, one pass over {len(pixels)} images at batch {batch_size}: {rate:.0f} images/s", flush=True)
    return rate


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One round's limits, measured right before its jobs, and the jobs."""

    engine: float  # images/s of one raw pass over the decoded images at the jobs' batch size
    decode: dict[str, float]  # kind -> decode-only images/s
    jobs: list[JobResult]

    def limit(self, key: str, job: JobResult) -> float:
        return self.engine if key == "resnet" else min(self.decode[job.kind], self.engine)

    def bound(self, job: JobResult) -> float:
        """Decoding and inference share the same CPU cores here: together they cannot beat this rate."""
        return 1 / (1 / self.decode[job.kind] + 1 / self.engine)


def measure_round(key: str, package: Path, sources: dict[str, Path], pixels: np.ndarray, local: dict) -> Round:
    engine = raw_pass(package, pixels, local["batch_size"])
    decode = {kind: decode_only(path, SIZE, local["workers"], local["batch_size"]) for kind, path in sources.items()}
    print(f"  decode only: {', '.join(f'{k} {v:.0f}' for k, v in decode.items())} images/s", flush=True)
    jobs = [score(f"local, {kind}", package, path, kind, f"{key}-{kind}", **local) for kind, path in sources.items()]
    if key == "resnet":
        # Inline decoding (--workers 0): on a CPU-only machine decoding workers compete with the model's
        # threads for the same cores; for a compute-bound model decoding in turn costs less.
        inline = {**local, "workers": 0}
        jobs += [
            score(f"local, {kind}, inline decoding", package, path, kind, f"{key}-{kind}-inline", **inline)
            for kind, path in sources.items()
        ]
    return Round(engine, decode, jobs)


def cnn_variants(package: Path, folder: Path, local: dict, ray: bool) -> list[JobResult]:
    """Other ways to run the small CNN's folder job, measured once after the rounds."""
    jobs = [
        score("local, folder, thread pool", package, folder, "folder", "cnn-thr", pool="thread", **local),
        score("local, folder, 1 ORT thread", package, folder, "folder", "cnn-t1", threads=1, **local),
    ]
    if ray:
        jobs.append(score("ray, folder", package, folder, "folder", "cnn-ray", engine="ray", **local))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet", type=Path, help="ResNet-18 package (default: random weights)")
    parser.add_argument("--cnn", type=Path, help="small CNN package (default: random-weight cnn_bn)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive")
    parser.add_argument("--workers", type=int, default=cpu_threads(), help="decoding workers")
    parser.add_argument("--seconds", type=float, default=3.0, help="raw engine: time per batch size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of limits and jobs per model; medians reported")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    folder, archive = test_split(args.data)
    packages = {
        "resnet": args.resnet or random_weight_package("resnet18", args.data),
        "cnn": args.cnn or random_weight_package("cnn_bn", args.data),
    }
    records = list(open_input(folder).records())
    pixels = np.stack([decode_image(Path(r.path).read_bytes(), SIZE) for r in records])
    print(f"{len(records)} test images; {args.workers} workers; {cpu_threads()} cores", flush=True)
    sources = {"folder": folder, "archive": archive}

    report: dict = {
        "images": len(records),
        "packages": {key: describe(package) for key, package in packages.items()},
        "workers": args.workers,
        "burst_seconds": args.seconds,
        "rounds": args.rounds,
    }
    for key, package in packages.items():
        print(f"{key}: {package}", flush=True)
        raw = raw_engine(package, pixels, args.seconds)
        local = {"batch_size": raw.batch_size, "workers": args.workers}
        rounds = []
        for index in range(args.rounds):
            print(f"{key}: round {index + 1}/{args.rounds}", flush=True)
            rounds.append(measure_round(key, package, sources, pixels, local))
        variants = cnn_variants(package, folder, local, not args.no_ray) if key == "cnn" else []
        report[key] = {"raw": raw, "rounds": rounds, "variants": variants}
    markdown = render(report, command, time.perf_counter() - started)
    with atomic_write(args.out, "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range when there are several values."""
    median = format(statistics.median(values), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def render(report: dict, command: str, seconds: float) -> str:
    cpu_lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpu_lines if line.startswith("model name")), "?")
    lines = [
        f"# Batch scoring: the {report['images']:,} CIFAR-10 test images (JPEG q75)",
        "",
        f"Command: `python -m benchmarks.batch_scoring {command}`  ",
        f"Machine: {cpu_threads()} cores ({cpu}), no GPU: ONNX Runtime on its CPU provider; shared with other "
        f"jobs. {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took {seconds:.0f} s.  ",
        f"Decoding workers: {report['workers']} processes unless said otherwise. Images/s count scoring time (first "
        'record to the assembled output file); "with setup" adds model load, worker start and, for Ray, ray.init.  ',
        f"Each model runs {report['rounds']} rounds; a round measures its limits (one raw-engine pass over the "
        "decoded images, decode only) right before its jobs, and each job is compared with its own round's limits. "
        "Cells give the median over the rounds and, in brackets, the range.",
        "",
        "| role | package | arch | weights | offline accuracy (export, onnx) |",
        "|---|---|---|---|---|",
    ]
    for key, info in report["packages"].items():
        offline = info["offline_accuracy"]
        accuracy = "n/a" if offline is None else f"{offline:.4f} on {info['offline_images']} images"
        lines.append(f"| {key} | {info['name']} | {info['arch']} | {info['weights']} | {accuracy} |")
    for key, title in (
        ("resnet", "ResNet-18 (compute-bound)"),
        ("cnn", "small CNN (decode-bound)"),
    ):
        entry = report[key]
        raw, rounds = entry["raw"], entry["rounds"]
        offline = report["packages"][key]["offline_accuracy"]
        target = "the raw engine" if key == "resnet" else "min(decode only, raw engine)"
        decode_kinds = rounds[0].decode
        lines += [
            "",
            f"## {title}",
            "",
            f"Raw engine on decoded arrays: its best batch size in {report['burst_seconds']:g}-second bursts is "
            f"{raw.batch_size} (used by the jobs) at {raw.images_per_second:.0f} images/s. Per round, one pass over "
            f"the {report['images']:,} decoded images at that batch size (the engine's limit): "
            + ", ".join(f"{r.engine:.0f}" for r in rounds)
            + f" images/s. Decode only ({report['workers']} process workers, no model): "
            + "; ".join(f"{kind} " + ", ".join(f"{r.decode[kind]:.0f}" for r in rounds) for kind in decode_kinds)
            + f" images/s. Target limit: {target}.",
            "",
            "| job | images/s | with setup | target limit | vs target | shared-CPU bound | vs bound "
            "| accuracy from output | = offline |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by_label: dict[str, list[tuple[Round, JobResult]]] = {}
        for r in rounds:
            for job in r.jobs:
                by_label.setdefault(job.label, []).append((r, job))
        last = rounds[-1]
        by_label |= {job.label: [(last, job)] for job in entry["variants"]}  # measured once, after the last round
        for label, runs in by_label.items():
            accuracies = {round(job.accuracy, 4) for _, job in runs}
            same = "n/a" if offline is None else ("yes" if accuracies == {round(offline, 4)} else "no")
            lines.append(
                f"| {label} | {spread([j.images_per_second for _, j in runs], '.0f')} | "
                f"{spread([j.end_to_end for _, j in runs], '.0f')} | "
                f"{spread([r.limit(key, j) for r, j in runs], '.0f')} | "
                f"{spread([j.images_per_second / r.limit(key, j) for r, j in runs], '.0%')} | "
                f"{spread([r.bound(j) for r, j in runs], '.0f')} | "
                f"{spread([j.images_per_second / r.bound(j) for r, j in runs], '.0%')} | "
                f"{' '.join(f'{a:.4f}' for a in sorted(accuracies))} | {same} |"
            )
        ray = next((job for job in entry["variants"] if job.label.startswith("ray")), None)
        if ray is not None:
            local = last.jobs[0]
            lines += [
                "",
                f"Ray engine on one machine vs the local engine (same folder and batch size, {report['workers']} "
                f"actors of 1 thread; the local job of the last round): {ray.images_per_second / local.images_per_second:.0%} "
                f"of its images/s while scoring (actor start included), {ray.end_to_end / local.end_to_end:.0%} with "
                f"setup ({ray.summary.setup_seconds:.1f} s vs {local.summary.setup_seconds:.1f} s).",
            ]
    lines += [
        "",
        "## Reading these numbers",
        "",
        "- The targets of issue 5 (90% of the raw engine for ResNet-18, 80% of min(decode, engine) for the small "
        "CNN) assume that decoding and inference use different resources (CPU decoding feeding a GPU). On this "
        "CPU-only machine both run on the same cores, so with a steady load a job's images/s cannot exceed the "
        "shared-CPU bound 1/(1/decode + 1/engine); the column against that bound shows what the pipeline itself "
        "loses. The machine is shared with other engineers' jobs and its load changes within a run (see the raw "
        "engine per round): ratios above 100% mean a job ran at a quieter moment than its limits.",
        "- Accuracy from output: top-1 of the output file's label_1 against the folder name of each image; "
        f"offline: `python -m export`'s evaluation of the same ONNX file on the same {report['images']:,} images (manifest "
        "metrics.onnx.test_accuracy). Random-weight packages give about 10%; the check is that the two agree.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
