"""A batch scoring job: open the input, pick the engine, stream rows into the resumable output, summarise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.engines import ENGINES, create_engine
from batch.engines.base import EngineSettings, ServedModel
from batch.engines.local import POOLS
from batch.inputs import open_input
from batch.output import ChunkedOutput, check_output_path
from inference.imaging import DEFAULT_MAX_PIXELS
from inference.package import BACKEND_FILES, MANIFEST_NAME, ModelPackage, load_package
from inference.runtime import DEVICES, cpu_threads

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5  # capped at the model's class count when not given
DEFAULT_URL_WORKERS = 4  # concurrent requests: enough to keep a service's adaptive batcher fed


class JobError(Exception):
    """A job that cannot run as configured; the message says why."""


@dataclass(frozen=True)
class BatchJob:
    """Every setting of a job, with its default: the CLI's flags take their defaults from here."""

    input: str  # folder, .tar/.tar.gz/.tgz, .parquet or .txt list of paths
    output: Path  # .parquet or .csv
    model: str | None = None  # package folder; with `url`, the name of a model the service serves (or None)
    url: str | None = None  # a running service: score through its /classify_batch
    engine: str = "local"  # local | ray (url is implied by `url`)
    top_k: int | None = None  # None: min(DEFAULT_TOP_K, classes)
    batch_size: int = 64
    workers: int | None = None  # None: one per core (local, ray) or DEFAULT_URL_WORKERS (url)
    pool: str = "process"  # local decoding workers: process | thread
    backend: str = "onnx"
    device: str = "auto"
    tf32: bool = False  # TF32 on the GPU (inference.runtime.Predictor)
    threads: int | None = None
    rows_per_part: int = 4096
    resume: bool = False
    ray_address: str | None = None
    id_column: str = "id"
    image_column: str = "image"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class BatchSummary:
    output: Path
    scored: int  # rows with predictions in the whole output (earlier runs included)
    failed: int  # error rows in the whole output
    new_rows: int  # rows this run produced
    setup_seconds: float  # model load, worker start, warm-up
    scoring_seconds: float  # first record to last row written, output assembly included

    @property
    def images_per_second(self) -> float:
        return self.new_rows / self.scoring_seconds if self.scoring_seconds > 0 else 0.0

    def line(self) -> str:
        earlier = self.scored + self.failed - self.new_rows
        resumed = f", {earlier} from an earlier run" if earlier else ""
        return (
            f"scored {self.scored}, failed {self.failed} ({self.new_rows} this run{resumed}) in "
            f"{self.scoring_seconds:.1f} s: {self.images_per_second:.0f} images/s "
            f"(+{self.setup_seconds:.1f} s setup) -> {self.output}"
        )


def run_job(job: BatchJob, *, progress: bool = False) -> BatchSummary:
    from tqdm import tqdm  # not at import: the CLI's spawned decoding workers import this module too

    started = time.perf_counter()
    engine_name = _check(job)
    package = load_package(job.model) if engine_name != "url" else None
    if package is not None:
        package.model_path(job.backend)  # PackageError if the package lacks that backend's file
    top_k = _top_k(job, package)
    source = open_input(job.input, id_column=job.id_column, image_column=job.image_column)
    served = None
    if engine_name == "url":
        from batch.engines.remote import served_model  # httpx only for url jobs, as the engine itself

        served = served_model(job.url, job.model)
    output = ChunkedOutput(
        job.output,
        _identity(job, source.kind, package, served, top_k),
        top_k=top_k,
        rows_per_part=job.rows_per_part,
        resume=job.resume,
    )
    settings = engine_settings(job, engine_name, package, top_k, served)
    remaining = None if source.count is None else source.count - len(output.done_ids)
    if output.done_ids:
        log.info(
            "resuming: %d of %s inputs are already in the output",
            len(output.done_ids),
            source.count,
        )
    new_rows = 0
    try:
        with create_engine(engine_name, settings) as engine:
            scoring_started = time.perf_counter()
            with tqdm(total=remaining, unit="img", disable=not progress, desc="scoring", smoothing=0.1) as bar:
                for rows in engine.score(output.remaining(source.records())):
                    output.add(rows)
                    new_rows += len(rows)
                    bar.update(len(rows))
    except BaseException:
        output.abandon()  # e.g. the engine could not start: leave no folder that asks for --resume
        raise
    scored, failed = output.finish()
    finished = time.perf_counter()
    return BatchSummary(job.output, scored, failed, new_rows, scoring_started - started, finished - scoring_started)


def engine_settings(
    job: BatchJob, engine_name: str, package: ModelPackage | None, top_k: int, served: ServedModel | None = None
) -> EngineSettings:
    """The job's settings with every default resolved, as the engine `engine_name` gets them."""
    default_workers = DEFAULT_URL_WORKERS if engine_name == "url" else cpu_threads()
    return EngineSettings(
        package=package,
        top_k=top_k,
        batch_size=job.batch_size,
        workers=default_workers if job.workers is None else job.workers,
        pool=job.pool,
        backend=job.backend,
        device=job.device,
        tf32=job.tf32,
        threads=job.threads,
        max_pixels=job.max_pixels,
        ray_address=job.ray_address,
        url=job.url,
        served=served,
    )


def _check(job: BatchJob) -> str:
    """The engine name, once the job's options are consistent."""
    if job.url is not None:
        if job.model is not None and (Path(job.model) / MANIFEST_NAME).is_file():
            raise JobError(
                f"with --url, --model names a model the service serves; {job.model} is a package folder "
                "(without --url it is scored here)"
            )
        if job.engine != "local":
            raise JobError(f"--url sends the images to a service; it cannot run with --engine {job.engine}")
        engine = "url"
    else:
        if job.model is None:
            raise JobError("--model is required (or --url, to score through a running service)")
        engine = job.engine
    choices = {
        "engine": (engine, tuple(ENGINES)),
        "pool": (job.pool, POOLS),
        "device": (job.device, DEVICES),
    }
    choices["backend"] = (job.backend, tuple(BACKEND_FILES))
    for name, (value, valid) in choices.items():
        if value not in valid:
            raise JobError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    for name, value, minimum in (
        ("batch size", job.batch_size, 1),
        ("rows per part", job.rows_per_part, 1),
    ):
        if value < minimum:
            raise JobError(f"{name} must be at least {minimum}, got {value}")
    if job.workers is not None and job.workers < 0:
        raise JobError(f"workers must be 0 or more, got {job.workers}")
    check_output_path(job.output)
    return engine


def _top_k(job: BatchJob, package: ModelPackage | None) -> int:
    classes = package.spec.num_classes if package is not None else None
    if job.top_k is None:
        return min(DEFAULT_TOP_K, classes or DEFAULT_TOP_K)
    if job.top_k < 1 or (classes is not None and job.top_k > classes):
        raise JobError(f"top-k must be between 1 and the model's {classes or 'number of'} classes, got {job.top_k}")
    return job.top_k


def _identity(
    job: BatchJob, kind: str, package: ModelPackage | None, served: ServedModel | None, top_k: int
) -> dict[str, Any]:
    """What must not change between a run and its resume (JSON types only: it is compared after a round trip)."""
    if package is not None:
        model: dict[str, Any] = {
            "name": package.name,
            "version": package.version,
            "backend": job.backend,
            "sha256": package.sha256(job.backend),
        }
    else:
        assert served is not None
        model = {"url": job.url, "name": served.name, "version": served.version}
    identity = {
        "input": str(Path(job.input).resolve()),
        "input_kind": kind,
        "model": model,
        "top_k": top_k,
    }
    if kind == "parquet":
        identity["columns"] = {"id": job.id_column, "image": job.image_column}
    return identity
