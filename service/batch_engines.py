"""Batch scoring engines: each turns a stream of records into output rows, in input order.

- local: a pool of decoding workers (processes by default, or threads) reads and decodes chunks of
  `batch_size` records while the main thread runs each decoded chunk through one Predictor (ONNX Runtime,
  CUDA with the checked CPU fallback, or TorchScript): decoding overlaps inference.
- ray: Ray Data, `map_batches` over an actor pool of predictors (service/batch_ray.py).
- url: a running service's POST /classify_batch (service/batch_remote.py).

An engine is a context manager: entering it does the setup (model load, worker start, warm-up), so that
the job can time scoring apart from setup; `score(records)` yields lists of ScoreRow.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

from inference.imaging import DEFAULT_MAX_PIXELS
from inference.package import ModelPackage
from inference.runtime import Predictor
from service.batch_inputs import Record
from service.batch_scoring import ScoreRow, decode_chunk, score_chunk

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

POOLS = ("process", "thread")


class EngineError(Exception):
    """An engine could not start (e.g. the Ray cluster of --ray-address cannot be joined); the message says why."""


@dataclass(frozen=True)
class EngineSettings:
    package: ModelPackage | None  # None only in --url mode, where the service holds the model
    top_k: int
    batch_size: int = 64  # images per inference call (local, ray) or per request (url)
    # Decoding workers (local; 0: inline), predictor actors (ray) or concurrent requests (url).
    workers: int = 2
    pool: str = "process"  # local decoding workers: process | thread
    backend: str = "onnx"
    device: str = "auto"
    tf32: bool = False
    threads: int | None = None  # ONNX Runtime intra-op threads; None: the Predictor's default
    max_pixels: int = DEFAULT_MAX_PIXELS
    ray_address: str | None = None
    url: str | None = None


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(executor: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """executor.map that keeps at most `window` tasks in flight (bounded memory on endless inputs), in order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class InlineExecutor(Executor):
    """Runs each task at submit time, in the caller's thread: `--workers 0`."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def decode_pool(pool: str, workers: int) -> Executor:
    if workers == 0:
        return InlineExecutor()
    pools: dict[str, Callable[[], Executor]] = {
        # spawn, not fork: the parent holds ONNX Runtime's and tqdm's threads, which fork does not copy safely.
        "process": lambda: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")),
        "thread": lambda: ThreadPoolExecutor(workers, thread_name_prefix="decode"),
    }
    if pool not in pools:
        raise ValueError(f"unknown decoding pool {pool!r}; valid: {', '.join(pools)}")
    return pools[pool]()


class LocalEngine:
    """Decoding workers feeding one Predictor in this process."""

    def __init__(self, settings: EngineSettings) -> None:
        assert settings.package is not None
        self.settings = settings
        self.package = settings.package

    def __enter__(self) -> LocalEngine:
        s = self.settings
        self.predictor = Predictor(
            self.package, backend=s.backend, device=s.device, intra_op_threads=s.threads, tf32=s.tf32
        )
        self.predictor.warm_up(s.batch_size)
        info = self.predictor.info
        log.info(
            "local engine: %s on %s (%s, %d threads), %d %s decoding workers",
            info.backend,
            info.device,
            info.provider,
            info.intra_op_threads,
            s.workers,
            s.pool,
        )
        self.pool = decode_pool(s.pool, s.workers)
        # Start every worker now (processes spawn lazily) so that their start-up counts as setup.
        empty = functools.partial(decode_chunk, size=self.package.spec.input_size)
        for future in [self.pool.submit(empty, []) for _ in range(max(1, s.workers))]:
            future.result()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.pool.shutdown(cancel_futures=True)

    def score(self, records: Iterable[Record]) -> Iterator[list[ScoreRow]]:
        s = self.settings
        spec = self.package.spec
        decode = functools.partial(decode_chunk, size=spec.input_size, max_pixels=s.max_pixels)
        # Enough chunks in flight to keep every worker busy while the main thread runs a batch.
        window = 2 * max(1, s.workers) + 1
        for chunk in ordered_map(self.pool, decode, batched(records, s.batch_size), window):
            yield score_chunk(self.predictor, chunk, s.top_k)


def _ray_engine(settings: EngineSettings):
    from service.batch_ray import RayEngine  # Ray is an optional, heavy dependency

    return RayEngine(settings)


def _remote_engine(settings: EngineSettings):
    from service.batch_remote import RemoteEngine

    return RemoteEngine(settings)


ENGINES: dict[str, Callable[[EngineSettings], Any]] = {
    "local": LocalEngine,
    "ray": _ray_engine,
    "url": _remote_engine,
}
